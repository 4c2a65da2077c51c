"""What the frontend reports about itself. The daemon supplies a prometheus-backed implementation."""

from __future__ import annotations

from typing import Protocol


class FrontendMetrics(Protocol):
    def command_done(self, volume: str, op: str, nbytes: int, seconds: float) -> None:
        """op is "read", "write" or "other"."""

    def session_opened(self, kind: str) -> None:
        """kind is "normal" or "discovery"."""

    def session_closed(self, kind: str) -> None: ...

    def login_failed(self, reason: str) -> None: ...

    def internal_error(self, where: str) -> None:
        """A bug caught inside the iSCSI core (frontend/internal_errors.py)."""


class NoMetrics:
    def command_done(self, volume: str, op: str, nbytes: int, seconds: float) -> None:
        pass

    def session_opened(self, kind: str) -> None:
        pass

    def session_closed(self, kind: str) -> None:
        pass

    def login_failed(self, reason: str) -> None:
        pass

    def internal_error(self, where: str) -> None:
        pass
