"""The relay's errors: a small typed hierarchy, each with a stable code and status."""

from __future__ import annotations


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""

    code = "relay_error"
    status = 500
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PayloadError(RelayError):
    """The inbound payload as a whole cannot be used (answered 400)."""

    code = "invalid_payload"
    status = 400


class SettingsError(RelayError):
    """A setting has a value the relay cannot use (answered 422, naming the field)."""

    code = "invalid_setting"
    status = 422

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem
