"""The Amazon emulator: Login with Amazon and the Events API, in one local ASGI app.

Used by the tests, ``relay demo`` and the benchmarks as Amazon, and by users to try
their setup. See docs/decisions/0003-amazon-emulator.md for what it checks and how
to drive it (faults, revocation, clock, recording).
"""

from app.emulator.app import EmulatorApp, create_app, serve

__all__ = ["EmulatorApp", "create_app", "serve"]
