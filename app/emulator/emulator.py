"""One emulator's whole state: every piece lives here, none in module globals,
so a test process can run several emulators side by side."""

from __future__ import annotations

from collections.abc import Collection

from app.emulator.faults import FaultQueue
from app.emulator.lwa import LoginWithAmazon
from app.emulator.recorder import Recorder
from app.emulator.state import Clock, Config


class Emulator:
    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str,
        access_token_ttl: int,
        code_ttl: int,
        max_body_bytes: int,
        allowed_redirect_uris: Collection[str] | None,
    ) -> None:
        self.client_id = client_id
        self._client_secret = client_secret
        self._access_token_ttl = access_token_ttl
        self._code_ttl = code_ttl
        self._initial_config = Config(
            max_body_bytes=max_body_bytes,
            allowed_redirect_uris=None
            if allowed_redirect_uris is None
            else list(allowed_redirect_uris),
        )
        self.reset()

    def reset(self) -> None:
        """Back to the state right after start: no tokens, faults, records or clock offset."""
        self.clock = Clock()
        self.config = Config(**self._initial_config.as_dict())
        self.lwa = LoginWithAmazon(
            client_id=self.client_id,
            client_secret=self._client_secret,
            access_token_ttl=self._access_token_ttl,
            code_ttl=self._code_ttl,
            clock=self.clock,
            config=self.config,
        )
        self.faults = FaultQueue()
        self.recorder = Recorder(self.config)
