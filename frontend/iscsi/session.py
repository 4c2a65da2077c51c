"""iSCSI sessions of one listener: TSIH allocation and session reinstatement (RFC 7143 4.4, 6.3.5).

A session is identified on the wire by its TSIH and, across logins, by the initiator port
(InitiatorName + ISID) and the target: a leading login with TSIH 0 whose (initiator name, ISID,
target name) matches an open session *reinstates* it: the old session is closed and replaced
(RFC 7143 6.3.5). ``SessionTable`` implements ``login.SessionLookup``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from frontend.iscsi.params import SessionParams, SessionType
from frontend.scsi.types import Nexus
from frontend.target import Target

MAX_TSIH = 0xFFFF

SessionKey = tuple[str, int, str | None]


@dataclass(eq=False)
class Session:
    """One logged-in session. ``nexus`` is None for discovery sessions (no SCSI there)."""

    params: SessionParams
    target: Target | None
    nexus: Nexus | None
    closed: bool = field(default=False)

    @property
    def tsih(self) -> int:
        return self.params.tsih

    @property
    def key(self) -> SessionKey:
        return (self.params.initiator_name, self.params.isid, self.params.target_name)

    @property
    def is_discovery(self) -> bool:
        return self.params.session_type is SessionType.DISCOVERY


class TsihExhausted(Exception):
    """All 65535 TSIHs are in use."""


class SessionTable:
    """The open sessions of one listener, by TSIH and by (initiator name, ISID, target name)."""

    def __init__(self) -> None:
        self._by_tsih: dict[int, Session] = {}
        self._by_key: dict[SessionKey, Session] = {}
        self._next_tsih = 1

    # --- login.SessionLookup -------------------------------------------------------------------

    def tsih_exists(self, tsih: int) -> bool:
        return tsih in self._by_tsih

    def new_tsih(self) -> int:
        """A TSIH not in use, never 0 (RFC 7143 11.12.6). Allocated round-robin so a TSIH is not
        handed out again soon after its session ends."""
        for _ in range(MAX_TSIH):
            tsih = self._next_tsih
            self._next_tsih = tsih % MAX_TSIH + 1
            if tsih not in self._by_tsih:
                return tsih
        raise TsihExhausted("no free TSIH")

    # --- lifecycle -------------------------------------------------------------------------------

    def open(
        self, params: SessionParams, target: Target | None, *, tpgt: int
    ) -> tuple[Session, Session | None]:
        """Register the session a login just created. Returns it and the session it displaced
        (reinstatement, RFC 7143 6.3.5), which is closed here; the caller must end that session's
        I_T nexus and have its connection dropped."""
        nexus = None
        if target is not None and params.session_type is SessionType.NORMAL:
            nexus = Nexus(params.initiator_name, params.isid, target.iqn, tpgt)
        session = Session(params, target, nexus)
        displaced = self._by_key.get(session.key)
        same_tsih = self._by_tsih.get(params.tsih)
        if displaced is not None:
            self.close(displaced)
        if same_tsih is not None and same_tsih is not displaced:
            self.close(same_tsih)
            displaced = displaced or same_tsih
        self._by_tsih[params.tsih] = session
        self._by_key[session.key] = session
        return session, displaced

    def close(self, session: Session) -> bool:
        """End ``session``. True if this call ended it, False if it was already closed (so exactly
        one caller reports the I_T nexus loss)."""
        if session.closed:
            return False
        session.closed = True
        if self._by_tsih.get(session.tsih) is session:
            del self._by_tsih[session.tsih]
        if self._by_key.get(session.key) is session:
            del self._by_key[session.key]
        return True

    # --- queries ---------------------------------------------------------------------------------

    def get(self, tsih: int) -> Session | None:
        return self._by_tsih.get(tsih)

    def find(self, initiator_name: str, isid: int, target_name: str | None) -> Session | None:
        return self._by_key.get((initiator_name, isid, target_name))

    def of_target(self, iqn: str) -> list[Session]:
        return [s for s in self._by_tsih.values() if s.params.target_name == iqn]

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._by_tsih.values()))

    def __len__(self) -> int:
        return len(self._by_tsih)
