"""The iSCSI login phase, target side, without I/O (RFC 7143 sections 6, 11.12, 11.13, 12, 13).

One :class:`LoginMachine` serves one TCP connection from accept to the end of login. The
connection feeds it every Login Request (``receive(request, now)``) and sends the Login Response
of the returned :class:`LoginStep`; the step's ``outcome`` says whether login goes on (None),
succeeded (:class:`LoginSucceeded`: switch to full-feature phase with the negotiated
``SessionParams``) or failed (:class:`LoginFailed`: close the connection after sending).

Stages (RFC 7143 6.3)::

    SecurityNegotiation(0) --T--> LoginOperationalNegotiation(1) --T--> FullFeaturePhase(3)
             \\-------------------------------T-------------------------------/

An initiator may start in stage 1 only when the target needs no authentication. The target
moves to the next stage only when the initiator asks (T=1) and, in the security stage, once
authentication is complete; otherwise it answers T=0 and the initiator continues in the same
stage. Text split over several PDUs (C=1) is acknowledged with empty responses and processed
once complete.

StatSN: the first response carries the request's ExpStatSN and each later response one more;
after success the connection continues from :attr:`LoginMachine.next_stat_sn`.

Redirection (RFC 7143 11.13.5, 13.8): when the TargetName names a target this node knows but does
not serve (a :class:`~frontend.target.RemoteTarget`, or a local target currently redirected), the
response to the leading login request has Status-Class 0x01 / Status-Detail 0x01 ("target moved
temporarily") and the one key ``TargetAddress=host:port`` (no portal group tag: 13.8 says it MUST
be omitted in a redirect), no TSIH, and the outcome is :class:`LoginFailed` with that status, so
the connection closes after sending (11.13.5: a non-zero Status-Class ends the connection).
The redirect is answered in whatever stage the initiator starts, before any authentication: it
reveals only the portal of a target whose name the initiator already gave, and the initiator must
authenticate at that portal anyway. tgt answers redirects the same way (at the start of login), and
libiscsi (lib/login.c, lib/connect.c) acts on exactly 0x0101 with a TargetAddress: it disconnects
and logs in again at that address; its later reconnects go to the portal it was first given, which
redirects again to the primary of the moment.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from frontend.iscsi.chap import CHAP_KEYS, ChapAuthenticator
from frontend.iscsi.errors import LoginError, LoginStatus, TextFormatError
from frontend.iscsi.keys import (
    KEYS,
    MAX_TEXT_BYTES,
    NONE,
    NOT_UNDERSTOOD,
    REJECT,
    KeyClass,
    KeyValue,
    OperationalNegotiator,
    ValueSyntaxError,
    encode_text,
    find_duplicate,
    is_iscsi_name,
    parse_list,
    parse_text,
)
from frontend.iscsi.params import SessionParams, SessionType
from frontend.iscsi.pdu import LoginRequest, LoginResponse
from frontend.target import ChapConfig, RemoteTarget, Target, TargetRegistry, TargetSettings

ISCSI_VERSION = 0x00
"""RFC 7143 11.12.4: the only version defined."""

MAX_LOGIN_RESPONSE_BYTES = 8192
"""RFC 7143 13.12: during login the initiator receives data segments of at most 8192 bytes."""

SERIAL_MASK = 0xFFFFFFFF


class SessionLookup(Protocol):
    """What login needs to know about existing sessions (implemented by the connection layer)."""

    def tsih_exists(self, tsih: int) -> bool: ...

    def new_tsih(self) -> int: ...


class TargetMoved(LoginError):
    """The target is served at another portal: a redirect, not an error (RFC 7143 11.13.5).

    ``address`` is the TargetAddress value sent back (``host:port``, RFC 7143 13.8)."""

    def __init__(self, remote: RemoteTarget) -> None:
        self.address = remote.portal.redirect_address()
        super().__init__(
            *LoginStatus.TARGET_MOVED_TEMPORARILY, f"target {remote.iqn[:224]} is served at {self.address}"
        )


@dataclass(frozen=True)
class LoginSucceeded:
    params: SessionParams
    target: Target | None            # None for a discovery session


@dataclass(frozen=True)
class LoginFailed:
    status_class: int
    status_detail: int
    reason: str                      # for the log and the login_failed metric


@dataclass(frozen=True)
class LoginStep:
    response: LoginResponse          # always send this
    outcome: LoginSucceeded | LoginFailed | None   # None = login goes on; Failed = close after sending


class Stage(enum.IntEnum):
    """CSG / NSG values, RFC 7143 11.12.3 (2 is reserved)."""

    SECURITY = 0
    OPERATIONAL = 1
    FULL_FEATURE = 3


TRANSITIONS: Mapping[Stage, frozenset[Stage]] = {
    Stage.SECURITY: frozenset({Stage.OPERATIONAL, Stage.FULL_FEATURE}),
    Stage.OPERATIONAL: frozenset({Stage.FULL_FEATURE}),
    Stage.FULL_FEATURE: frozenset(),
}
"""The stage a T bit may ask for from each current stage (RFC 7143 6.3, 11.12.3)."""


class AuthState(enum.Enum):
    NOT_STARTED = "not-started"   # no AuthMethod agreed yet
    CHAP = "chap"                 # AuthMethod=CHAP agreed, exchange in progress
    DONE = "done"                 # authenticated, or no authentication needed


class LoginState(enum.Enum):
    NEGOTIATING = "negotiating"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class _LeadingHeader:
    """The header fields that must not change between the requests of one login."""

    isid: int
    tsih: int
    cid: int


def _stage(value: int, what: str) -> Stage:
    try:
        return Stage(value)
    except ValueError:
        raise LoginError(*LoginStatus.INITIATOR_ERROR, f"{what} {value} is reserved") from None


def _class_of(key: str) -> KeyClass | None:
    spec = KEYS.get(key)
    return spec.key_class if spec is not None else None


# Keys are answered in request order, except that FirstBurstLength is answered after
# MaxBurstLength so that it can be bounded by it (RFC 7143 13.14).
def _answer_order(p: KeyValue) -> int:
    return 1 if p.key == "FirstBurstLength" else 0


class LoginMachine:
    """The target side of one connection's login (see the module docstring)."""

    def __init__(
        self,
        settings: TargetSettings,
        targets: TargetRegistry,
        sessions: SessionLookup,
        *,
        now: float,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._settings = settings
        self._targets = targets
        self._sessions = sessions
        self._random_bytes = random_bytes
        self._deadline = now + settings.login_timeout
        self._state = LoginState.NEGOTIATING
        self._stage = Stage.SECURITY
        self._leading: _LeadingHeader | None = None
        self._text = bytearray()
        self._identity: dict[str, str] = {}
        self._session_type: SessionType | None = None
        self._target: Target | None = None
        self._chap_config: ChapConfig | None = None
        self._negotiator: OperationalNegotiator | None = None
        self._auth = AuthState.NOT_STARTED
        self._chap: ChapAuthenticator | None = None
        self._tpgt_sent = False
        self._stat_sn: int | None = None

    @property
    def deadline(self) -> float:
        """When login must be over; the connection closes after it (``settings.login_timeout``)."""
        return self._deadline

    @property
    def state(self) -> LoginState:
        return self._state

    @property
    def stage(self) -> Stage:
        return self._stage

    @property
    def next_stat_sn(self) -> int:
        """The StatSN of the connection's next response (after the last Login Response)."""
        return 0 if self._stat_sn is None else (self._stat_sn + 1) & SERIAL_MASK

    def receive(self, request: LoginRequest, now: float) -> LoginStep:
        """Process one Login Request; never raises for anything the initiator sends."""
        try:
            return self._receive(request, now)
        except LoginError as e:
            self._state = LoginState.FAILED
            data = encode_text([KeyValue("TargetAddress", e.address)]) if isinstance(e, TargetMoved) else b""
            response = self._response(
                request,
                csg=request.csg if request.csg in (0, 1) else int(self._stage),
                transit=False,
                nsg=0,
                data=data,
                status=(e.status_class, e.status_detail),
            )
            return LoginStep(response, LoginFailed(e.status_class, e.status_detail, e.reason))

    # --- one request -------------------------------------------------------------------------

    def _receive(self, request: LoginRequest, now: float) -> LoginStep:
        if self._state is LoginState.FAILED:
            raise LoginError(*LoginStatus.INITIATOR_ERROR, "login already failed")
        if self._state is LoginState.SUCCEEDED:
            raise LoginError(*LoginStatus.INVALID_DURING_LOGIN, "login request after login completed")
        if now >= self._deadline:
            raise LoginError(*LoginStatus.INITIATOR_ERROR, "login timed out")
        self._check_header(request)
        self._text += request.data
        if len(self._text) > MAX_TEXT_BYTES:
            raise LoginError(*LoginStatus.INITIATOR_ERROR, f"login text exceeds {MAX_TEXT_BYTES} bytes")
        if request.cont:
            # RFC 7143 6.6 / 11.12.2: acknowledge each partial text with an empty response.
            return LoginStep(self._response(request, csg=request.csg, transit=False, nsg=0), None)
        text, self._text = bytes(self._text), bytearray()
        try:
            pairs = parse_text(text)
        except TextFormatError as e:
            raise LoginError(*LoginStatus.INITIATOR_ERROR, f"malformed login text: {e}") from None
        duplicate = find_duplicate(pairs)
        if duplicate is not None:
            raise LoginError(*LoginStatus.INITIATOR_ERROR, f"{duplicate} sent twice")
        return self._process(request, pairs)

    def _check_header(self, request: LoginRequest) -> None:
        """RFC 7143 11.12: version, flags, stages, and the fields fixed for the whole login."""
        if not request.version_min <= ISCSI_VERSION <= request.version_max:
            raise LoginError(
                *LoginStatus.UNSUPPORTED_VERSION,
                f"versions {request.version_min}..{request.version_max} exclude {ISCSI_VERSION}",
            )
        if request.transit and request.cont:
            raise LoginError(*LoginStatus.INITIATOR_ERROR, "T and C bits both set")
        csg = _stage(request.csg, "CSG")
        if csg is Stage.FULL_FEATURE:
            raise LoginError(*LoginStatus.INITIATOR_ERROR, "CSG is full-feature phase")
        if request.transit and _stage(request.nsg, "NSG") not in TRANSITIONS[csg]:
            raise LoginError(*LoginStatus.INITIATOR_ERROR, f"transition {request.csg}->{request.nsg}")
        header = _LeadingHeader(request.isid, request.tsih, request.cid)
        if self._leading is None:
            self._leading = header
            if request.tsih != 0:
                # Adding a connection to an existing session (RFC 7143 6.3.1); we allow one.
                if not self._sessions.tsih_exists(request.tsih):
                    raise LoginError(*LoginStatus.SESSION_DOES_NOT_EXIST, f"no session {request.tsih:#x}")
                raise LoginError(*LoginStatus.TOO_MANY_CONNECTIONS, "MaxConnections=1")
            # The first request may skip the security stage; whether it may is checked once the
            # target (and so its CHAP requirement) is known.
            self._stage = csg
        elif header != self._leading:
            raise LoginError(*LoginStatus.INITIATOR_ERROR, "ISID, TSIH or CID changed during login")
        elif csg is not self._stage:
            raise LoginError(*LoginStatus.INITIATOR_ERROR, f"CSG {csg.value} in stage {self._stage.value}")

    def _process(self, request: LoginRequest, pairs: tuple[KeyValue, ...]) -> LoginStep:
        identity = [p for p in pairs if _class_of(p.key) is KeyClass.IDENTITY]
        self._declare_identity(identity)
        if self._session_type is None:
            self._establish_session()
        negotiator = self._negotiator
        assert negotiator is not None
        out: list[KeyValue] = []
        if self._session_type is SessionType.NORMAL and not self._tpgt_sent:
            # RFC 7143 13.9: the target declares its portal group tag in its first response.
            out.append(KeyValue("TargetPortalGroupTag", str(self._settings.tpgt)))
            self._tpgt_sent = True
        if self._stage is Stage.OPERATIONAL and self._auth is not AuthState.DONE:
            if self._chap_config is not None:
                raise LoginError(*LoginStatus.AUTHENTICATION_FAILURE, "CHAP required; stage skipped")
            self._auth = AuthState.DONE

        security = {p.key: p.value for p in pairs if _class_of(p.key) is KeyClass.SECURITY}
        if security:
            if self._stage is not Stage.SECURITY:
                raise LoginError(*LoginStatus.INITIATOR_ERROR, "security keys outside the security stage")
            out.extend(self._authenticate(security))

        for p in sorted(pairs, key=_answer_order):
            spec = KEYS.get(p.key)
            if spec is None:
                out.append(KeyValue(p.key, NOT_UNDERSTOOD))
            elif spec.key_class is KeyClass.OPERATIONAL:
                answer = negotiator.answer(p.key, p.value)
                if answer is not None:
                    out.append(KeyValue(p.key, answer))
            elif spec.key_class in (KeyClass.TARGET_ONLY, KeyClass.FULL_FEATURE) and all(
                kv.key != p.key for kv in out
            ):
                # Keys only a target may send (or only in full-feature phase) are refused, unless
                # we declare that key ourselves in this very response (TargetPortalGroupTag).
                out.append(KeyValue(p.key, REJECT))

        transit = False
        if request.transit:
            if self._stage is Stage.SECURITY and self._auth is AuthState.NOT_STARTED:
                # No AuthMethod offered: the default is None (RFC 7143 12.1).
                if self._chap_config is not None:
                    raise LoginError(*LoginStatus.AUTHENTICATION_FAILURE, "CHAP required, not offered")
                self._auth = AuthState.DONE
            transit = self._auth is AuthState.DONE
        nsg = Stage(request.nsg) if transit else None
        if self._stage is Stage.OPERATIONAL or nsg is Stage.FULL_FEATURE:
            out.extend(negotiator.declarations())

        data = encode_text(out)
        if len(data) > MAX_LOGIN_RESPONSE_BYTES:
            raise LoginError(*LoginStatus.INITIATOR_ERROR, "too many keys: the answer exceeds 8192 bytes")
        csg = int(self._stage)
        if nsg is None:
            return LoginStep(self._response(request, csg=csg, transit=False, nsg=0, data=data), None)
        self._stage = nsg
        if nsg is not Stage.FULL_FEATURE:
            return LoginStep(self._response(request, csg=csg, transit=True, nsg=int(nsg), data=data), None)
        tsih = self._sessions.new_tsih()
        params = self._params(negotiator, tsih)
        self._state = LoginState.SUCCEEDED
        response = self._response(request, csg=csg, transit=True, nsg=int(nsg), data=data, tsih=tsih)
        return LoginStep(response, LoginSucceeded(params, self._target))

    # --- identity (RFC 7143 13.4 - 13.8, 13.21) ----------------------------------------------

    def _declare_identity(self, pairs: list[KeyValue]) -> None:
        for p in pairs:
            previous = self._identity.get(p.key)
            if previous is not None:
                # libiscsi repeats its identity keys in the operational stage: harmless if unchanged.
                if previous != p.value:
                    raise LoginError(*LoginStatus.INITIATOR_ERROR, f"{p.key} changed during login")
                continue
            if self._session_type is not None and p.key != "InitiatorAlias":
                raise LoginError(*LoginStatus.INITIATOR_ERROR, f"{p.key} not in the first login request")
            self._identity[p.key] = p.value

    def _establish_session(self) -> None:
        """Validate the leading request's identity keys and find the target (RFC 7143 6.3.1)."""
        initiator = self._identity.get("InitiatorName")
        if initiator is None:
            raise LoginError(*LoginStatus.MISSING_PARAMETER, "no InitiatorName")
        if not is_iscsi_name(initiator):
            raise LoginError(*LoginStatus.INITIATOR_ERROR, "InitiatorName is not an iSCSI name")
        kind = self._identity.get("SessionType", SessionType.NORMAL.value)
        try:
            session_type = SessionType(kind)
        except ValueError:
            raise LoginError(*LoginStatus.SESSION_TYPE_NOT_SUPPORTED, f"SessionType={kind[:32]}") from None
        if session_type is SessionType.NORMAL:
            name = self._identity.get("TargetName")
            if name is None:
                raise LoginError(*LoginStatus.MISSING_PARAMETER, "no TargetName")
            # iSCSI names compare case-insensitively (RFC 7143 4.2.7.1: stringprep lowercases).
            target = self._targets.resolve(name) or self._targets.resolve(name.lower())
            if target is None:
                raise LoginError(*LoginStatus.TARGET_NOT_FOUND, f"no target {name[:224]}")
            if isinstance(target, RemoteTarget):
                raise TargetMoved(target)
            self._target = target
            self._chap_config = target.chap
        else:
            # A TargetName on a discovery login names nothing we serve; it is ignored.
            self._chap_config = self._targets.discovery_chap
        self._session_type = session_type
        self._negotiator = OperationalNegotiator(self._settings, session_type)

    # --- security (RFC 7143 12.1) ------------------------------------------------------------

    def _authenticate(self, security: dict[str, str]) -> list[KeyValue]:
        out: list[KeyValue] = []
        if "AuthMethod" in security:
            if self._auth is not AuthState.NOT_STARTED:
                raise LoginError(*LoginStatus.INITIATOR_ERROR, "AuthMethod negotiated twice")
            try:
                methods = parse_list(security["AuthMethod"])
            except ValueSyntaxError as e:
                raise LoginError(*LoginStatus.AUTHENTICATION_FAILURE, f"bad AuthMethod: {e}") from None
            if self._chap_config is not None:
                if "CHAP" not in methods:
                    raise LoginError(*LoginStatus.AUTHENTICATION_FAILURE, "CHAP required, not offered")
                out.append(KeyValue("AuthMethod", "CHAP"))
                self._auth = AuthState.CHAP
                self._chap = ChapAuthenticator(self._chap_config, self._random_bytes)
            else:
                if NONE not in methods:
                    raise LoginError(*LoginStatus.AUTHENTICATION_FAILURE, "no authentication configured")
                out.append(KeyValue("AuthMethod", NONE))
                self._auth = AuthState.DONE
        chap_keys = {k: v for k, v in security.items() if k in CHAP_KEYS}
        if chap_keys:
            if self._chap is None or self._auth is not AuthState.CHAP:
                raise LoginError(*LoginStatus.AUTHENTICATION_FAILURE, "CHAP keys without AuthMethod=CHAP")
            out.extend(self._chap.receive(chap_keys))
            if self._chap.done:
                self._auth = AuthState.DONE
        return out

    # --- results ---------------------------------------------------------------------------

    def _params(self, n: OperationalNegotiator, tsih: int) -> SessionParams:
        assert self._leading is not None and self._session_type is not None
        max_burst = n.value_int("MaxBurstLength")
        return SessionParams(
            session_type=self._session_type,
            initiator_name=self._identity["InitiatorName"],
            isid=self._leading.isid,
            tsih=tsih,
            target_name=self._target.iqn if self._target is not None else None,
            initiator_alias=self._identity.get("InitiatorAlias"),
            header_digest=n.value("HeaderDigest") == "CRC32C",
            data_digest=n.value("DataDigest") == "CRC32C",
            max_recv_data_segment_length=self._settings.max_recv_data_segment_length,
            max_send_data_segment_length=n.value_int("MaxRecvDataSegmentLength"),
            max_burst_length=max_burst,
            first_burst_length=min(n.value_int("FirstBurstLength"), max_burst),
            initial_r2t=n.value_bool("InitialR2T"),
            immediate_data=n.value_bool("ImmediateData"),
            max_outstanding_r2t=n.value_int("MaxOutstandingR2T"),
            data_pdu_in_order=n.value_bool("DataPDUInOrder"),
            data_sequence_in_order=n.value_bool("DataSequenceInOrder"),
            default_time2wait=n.value_int("DefaultTime2Wait"),
            default_time2retain=n.value_int("DefaultTime2Retain"),
            error_recovery_level=n.value_int("ErrorRecoveryLevel"),
            max_connections=n.value_int("MaxConnections"),
        )

    def _response(
        self,
        request: LoginRequest,
        *,
        csg: int,
        transit: bool,
        nsg: int,
        data: bytes = b"",
        tsih: int | None = None,
        status: tuple[int, int] = LoginStatus.SUCCESS,
    ) -> LoginResponse:
        """RFC 7143 11.13: echo ISID and ITT; ExpCmdSN is the request's CmdSN (login requests
        are immediate); TSIH is the initiator's except in the final response of a new session."""
        stat_sn = request.exp_stat_sn if self._stat_sn is None else (self._stat_sn + 1) & SERIAL_MASK
        self._stat_sn = stat_sn
        return LoginResponse(
            transit=transit,
            cont=False,
            csg=csg,
            nsg=nsg,
            version_max=ISCSI_VERSION,
            version_active=ISCSI_VERSION,
            isid=request.isid,
            tsih=request.tsih if tsih is None else tsih,
            itt=request.itt,
            stat_sn=stat_sn,
            exp_cmd_sn=request.cmd_sn,
            max_cmd_sn=(request.cmd_sn + self._settings.cmd_window - 1) & SERIAL_MASK,
            status_class=status[0],
            status_detail=status[1],
            data=data,
        )
