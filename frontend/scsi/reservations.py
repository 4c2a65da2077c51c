"""Reservations of one logical unit: persistent reservations and RESERVE(6)/RELEASE(6).

Sans-IO: the :class:`Reservations` object holds the state, decodes PERSISTENT RESERVE IN / OUT
(SPC-4 6.15, 6.16) and answers "does this command conflict?" (SPC-4 5.13.1, SBC-3 4.17). The logical
unit queues the UNIT ATTENTIONs it is handed back and persists :meth:`Reservations.to_record` when a
PERSISTENT RESERVE OUT reports a change.

Rules and where they come from:

* Registrations are per I_T nexus (SPC-4 5.13.7): initiator port (iSCSI name + ISID) and target port
  (target name + TPGT, the relative target port identifier). ``SPEC_I_PT=1`` and ``ALL_TG_PT=1`` are
  not supported and are rejected with INVALID FIELD IN PARAMETER LIST, as REPORT CAPABILITIES says
  (SIP_C=0, ATP_C=0).
* Compatible reservation handling is off (CRH=0, SPC-4 5.13.3): while any I_T nexus is registered,
  every RESERVE and RELEASE command gets RESERVATION CONFLICT.
* A RESERVE(6) held by another I_T nexus (SPC-2 5.5.1, 7.21) conflicts with everything except
  INQUIRY, REPORT LUNS, REQUEST SENSE, PERSISTENT RESERVE IN and RELEASE (a no-op for a non-holder).
  RESERVE(6) is never persisted; a LUN reset, a target reset and the loss of the holder's I_T nexus
  drop it (SPC-2 5.5.1, SAM-5 6.3).
* Persist through power loss (SPC-4 5.13.5): the state survives a restart only when the last valid
  APTPL bit was one. The PRgeneration restarts at zero on power on either way (SPC-4 6.15.2).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from frontend.scsi.cdb import invalid_cdb, invalid_param, u16, u32
from frontend.scsi.commands import Access, spec_for
from frontend.scsi.sense import (
    INSUFFICIENT_REGISTRATION_RESOURCES,
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
    PARAMETER_LIST_LENGTH_ERROR,
    REGISTRATIONS_PREEMPTED,
    RESERVATIONS_PREEMPTED,
    RESERVATIONS_RELEASED,
    Asc,
    CheckCondition,
    SenseKey,
)
from frontend.scsi.types import Nexus, ScsiStatus

#: Size of the basic PERSISTENT RESERVE OUT parameter list (SPC-4 6.16.3).
BASIC_PARAMETER_LIST_LENGTH: Final = 24
#: Registrations kept per logical unit; more gets INSUFFICIENT REGISTRATION RESOURCES (SPC-4 5.13.7).
MAX_REGISTRATIONS: Final = 1024
#: Version of the dict that :meth:`Reservations.to_record` returns.
RECORD_VERSION: Final = 1

_ISCSI_PROTOCOL_ID: Final = 0x5  # SPC-4 7.6.1 table 444
_TRANSPORT_ID_FORMAT_PORT: Final = 0x1  # iSCSI TransportID, initiator port form (SPC-4 7.6.4.6)
_MAX_ISID: Final = (1 << 48) - 1
_GENERATION_MASK: Final = 0xFFFFFFFF

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class ReservationConflict(Exception):
    """The command ends with status RESERVATION CONFLICT (SAM-5 5.3.1); there is no sense data."""

    status: Final = ScsiStatus.RESERVATION_CONFLICT

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PrOutOutcome:
    """What a PERSISTENT RESERVE OUT did, for the logical unit to act on."""

    changed: bool
    """The state changed: the logical unit persists :meth:`Reservations.to_record`."""
    unit_attentions: tuple[tuple[Nexus, Asc], ...] = ()
    """UNIT ATTENTIONs to queue, one per I_T nexus. For PREEMPT AND ABORT the nexuses that got
    REGISTRATIONS PREEMPTED are the ones whose tasks the logical unit aborts (SPC-4 5.13.11.4.5)."""


NO_CHANGE: Final = PrOutOutcome(changed=False)


class PrInAction(enum.IntEnum):
    """PERSISTENT RESERVE IN service actions (SPC-4 6.15.1, table 166)."""

    READ_KEYS = 0x00
    READ_RESERVATION = 0x01
    REPORT_CAPABILITIES = 0x02
    READ_FULL_STATUS = 0x03


class PrOutAction(enum.IntEnum):
    """PERSISTENT RESERVE OUT service actions (SPC-4 6.16.2, table 181)."""

    REGISTER = 0x00
    RESERVE = 0x01
    RELEASE = 0x02
    CLEAR = 0x03
    PREEMPT = 0x04
    PREEMPT_AND_ABORT = 0x05
    REGISTER_AND_IGNORE_EXISTING_KEY = 0x06
    REGISTER_AND_MOVE = 0x07


class PrType(enum.IntEnum):
    """Persistent reservation types (SPC-4 6.15.3.4, table 171)."""

    WRITE_EXCLUSIVE = 0x1
    EXCLUSIVE_ACCESS = 0x3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 0x5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 0x6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 0x7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 0x8

    @property
    def write_exclusive(self) -> bool:
        """Reads from any I_T nexus are allowed; only writes are reserved."""
        return self in _WRITE_EXCLUSIVE_TYPES

    @property
    def registrants_only(self) -> bool:
        return self in (PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY)

    @property
    def all_registrants(self) -> bool:
        """Every registered I_T nexus is a reservation holder (SPC-4 5.13.9)."""
        return self in (PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)

    @property
    def registrants_have_access(self) -> bool:
        """Every registered I_T nexus has the holder's access (SPC-4 5.13.1 table 60)."""
        return self.registrants_only or self.all_registrants


_WRITE_EXCLUSIVE_TYPES: Final = frozenset(
    {PrType.WRITE_EXCLUSIVE, PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS}
)

#: (byte, bit) of each type in the PERSISTENT RESERVATION TYPE MASK (SPC-4 6.15.4, table 170).
_TYPE_MASK_BITS: Final = {
    PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS: (0, 7),
    PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: (0, 6),
    PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY: (0, 5),
    PrType.EXCLUSIVE_ACCESS: (0, 3),
    PrType.WRITE_EXCLUSIVE: (0, 1),
    PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS: (1, 0),
}

#: LU_SCOPE, the only scope SPC-4 still defines (6.15.3.3).
LU_SCOPE: Final = 0x0


# --------------------------------------------------------------------------------------------------
# I_T nexus identity, TransportIDs


@dataclass(frozen=True, slots=True, order=True)
class _Port:
    """The identity of an I_T nexus. iSCSI names compare case-insensitively (RFC 3722)."""

    initiator: str
    isid: int
    target: str
    tpgt: int


def _port(nexus: Nexus) -> _Port:
    return _Port(nexus.initiator_name.lower(), nexus.isid, nexus.target_name.lower(), nexus.tpgt)


def iscsi_transport_id(nexus: Nexus) -> bytes:
    """iSCSI TransportID, initiator port format 01b (SPC-4 7.6.4.6): ``<name>,i,0x<isid>``.

    The name is NUL terminated and padded so the ADDITIONAL LENGTH is a multiple of four and at
    least 20.
    """
    name = nexus.initiator_port.encode("utf-8") + b"\x00"
    padded = max(20, (len(name) + 3) // 4 * 4)
    body = name.ljust(padded, b"\x00")
    return bytes([_TRANSPORT_ID_FORMAT_PORT << 6 | _ISCSI_PROTOCOL_ID, 0]) + _U16.pack(len(body)) + body


def parse_iscsi_transport_id(data: bytes, offset: int) -> tuple[str, int]:
    """(initiator name, ISID) from an iSCSI TransportID of format 01b (SPC-4 7.6.4.6).

    ``offset`` is where the TransportID starts in the parameter list (for the sense field pointer).
    Format 00b (a name without ISID names an initiator device, not a port) is not accepted.
    """
    if len(data) < 4:
        raise invalid_param(offset)
    if data[0] & 0x0F != _ISCSI_PROTOCOL_ID:
        raise invalid_param(offset, 3)
    if data[0] >> 6 != _TRANSPORT_ID_FORMAT_PORT:
        raise invalid_param(offset, 7)
    length = _U16.unpack_from(data, 2)[0]
    body = data[4 : 4 + length]
    if len(body) < length or b"\x00" not in body:
        raise invalid_param(offset + 2)
    try:
        text = body.split(b"\x00", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_param(offset + 4) from None
    cut = text.lower().rfind(",i,0x")
    name, isid_hex = text[:cut], text[cut + 5 :]
    if cut <= 0 or not 1 <= len(isid_hex) <= 12:
        raise invalid_param(offset + 4)
    try:
        isid = int(isid_hex, 16)
    except ValueError:
        raise invalid_param(offset + 4) from None
    return name, isid


# --------------------------------------------------------------------------------------------------
# Decoded commands


@dataclass(frozen=True, slots=True)
class _Registration:
    nexus: Nexus
    key: int


@dataclass(frozen=True, slots=True)
class _Reservation:
    holder: _Port
    """The holder; for the all-registrants types any registered I_T nexus (every registrant holds)."""
    type: PrType


@dataclass(frozen=True, slots=True)
class _PrOutCdb:
    """PERSISTENT RESERVE OUT CDB fields (SPC-4 6.16.1, table 180)."""

    action: PrOutAction
    scope: int
    type: int
    parameter_list_length: int


@dataclass(frozen=True, slots=True)
class _BasicParameters:
    """The basic PERSISTENT RESERVE OUT parameter list (SPC-4 6.16.3, table 182)."""

    reservation_key: int
    service_action_key: int
    spec_i_pt: bool
    all_tg_pt: bool
    aptpl: bool


@dataclass(frozen=True, slots=True)
class _MoveParameters:
    """The REGISTER AND MOVE parameter list (SPC-4 6.16.4, table 184)."""

    reservation_key: int
    service_action_key: int
    unreg: bool
    aptpl: bool
    relative_target_port: int
    initiator_name: str
    isid: int


def _parameter_list_length_error() -> CheckCondition:
    return CheckCondition(SenseKey.ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)


def _decode_pr_out_cdb(cdb: bytes) -> _PrOutCdb:
    if len(cdb) < 10:
        raise invalid_cdb(0)
    try:
        action = PrOutAction(cdb[1] & 0x1F)
    except ValueError:
        raise invalid_cdb(1, 4) from None
    return _PrOutCdb(
        action=action,
        scope=cdb[2] >> 4,
        type=cdb[2] & 0x0F,
        parameter_list_length=u32(cdb, 5),
    )


def _decode_basic(params: bytes, length: int) -> _BasicParameters:
    """SPC-4 6.16.3: SPEC_I_PT=1 is not supported; otherwise the list is exactly 24 bytes."""
    if min(length, len(params)) >= BASIC_PARAMETER_LIST_LENGTH and params[20] & 0x08:
        raise invalid_param(20, 3)  # SPEC_I_PT: SIP_C=0
    if length != BASIC_PARAMETER_LIST_LENGTH or len(params) < BASIC_PARAMETER_LIST_LENGTH:
        raise _parameter_list_length_error()
    flags = params[20]
    return _BasicParameters(
        reservation_key=_U64.unpack_from(params, 0)[0],
        service_action_key=_U64.unpack_from(params, 8)[0],
        spec_i_pt=bool(flags & 0x08),
        all_tg_pt=bool(flags & 0x04),
        aptpl=bool(flags & 0x01),
    )


def _decode_move(params: bytes, length: int) -> _MoveParameters:
    """SPC-4 6.16.4: 24 bytes of header, then one TransportID."""
    if length < BASIC_PARAMETER_LIST_LENGTH or len(params) < min(length, BASIC_PARAMETER_LIST_LENGTH):
        raise _parameter_list_length_error()
    tid_length = _U32.unpack_from(params, 20)[0]
    if BASIC_PARAMETER_LIST_LENGTH + tid_length > length or len(params) < length:
        raise _parameter_list_length_error()
    name, isid = parse_iscsi_transport_id(
        params[BASIC_PARAMETER_LIST_LENGTH : BASIC_PARAMETER_LIST_LENGTH + tid_length],
        BASIC_PARAMETER_LIST_LENGTH,
    )
    return _MoveParameters(
        reservation_key=_U64.unpack_from(params, 0)[0],
        service_action_key=_U64.unpack_from(params, 8)[0],
        unreg=bool(params[17] & 0x02),
        aptpl=bool(params[17] & 0x01),
        relative_target_port=_U16.unpack_from(params, 18)[0],
        initiator_name=name,
        isid=isid,
    )


def _pr_type(code: int) -> PrType:
    try:
        return PrType(code)
    except ValueError:
        raise invalid_cdb(2, 3) from None


# --------------------------------------------------------------------------------------------------
# The state


class Reservations:
    """Reservation state of one logical unit (SPC-4 5.13) plus the RESERVE(6) holder (SPC-2 5.5)."""

    def __init__(self, record: dict[str, Any] | None = None) -> None:
        self._registrations: dict[_Port, _Registration] = {}
        self._reservation: _Reservation | None = None
        self._aptpl = False
        self._generation = 0  # SPC-4 6.15.2: zero at power on, whatever APTPL says
        self._reserve6: Nexus | None = None
        if record is not None:
            self._restore(record)

    # ---- read-only views ------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """PRgeneration (SPC-4 6.15.2), a 32-bit wrapping counter."""
        return self._generation

    @property
    def aptpl(self) -> bool:
        """The last valid APTPL bit received (SPC-4 5.13.5)."""
        return self._aptpl

    def registered_key(self, nexus: Nexus) -> int | None:
        """The reservation key ``nexus`` is registered with, if any."""
        registration = self._registrations.get(_port(nexus))
        return None if registration is None else registration.key

    def reservation(self) -> tuple[Nexus, PrType] | None:
        """The persistent reservation: a holder's I_T nexus and the type, or None."""
        if self._reservation is None:
            return None
        return self._registrations[self._reservation.holder].nexus, self._reservation.type

    def reserve6_holder(self) -> Nexus | None:
        """The I_T nexus holding a RESERVE(6), if any."""
        return self._reserve6

    def _holds_reserve6(self, port: _Port) -> bool:
        return self._reserve6 is not None and _port(self._reserve6) == port

    def is_holder(self, nexus: Nexus) -> bool:
        """Whether ``nexus`` holds the persistent reservation (SPC-4 5.13.9)."""
        res = self._reservation
        if res is None:
            return False
        port = _port(nexus)
        if res.type.all_registrants:
            return port in self._registrations
        return res.holder == port

    # ---- the conflict check ---------------------------------------------------------------

    @property
    def any_registered(self) -> bool:
        """Whether any reservation (persistent or RESERVE(6)) or registration exists: when not,
        no command can conflict (the fast path's check)."""
        return not (self._reserve6 is None and self._reservation is None and not self._registrations)

    def conflicts(self, nexus: Nexus, cdb: bytes) -> bool:
        """Whether the command in ``cdb`` from ``nexus`` ends in RESERVATION CONFLICT.

        PERSISTENT RESERVE OUT is only refused here for a RESERVE(6) held elsewhere; its service
        actions check the registration themselves (SPC-4 5.13.2 table 61) after the CDB is decoded.
        """
        if self._reserve6 is None and self._reservation is None and not self._registrations:
            return False  # nothing reserved or registered: nothing can conflict (the common case)
        if not cdb:
            return False
        spec = spec_for(cdb)  # None: a command the LU does not implement, treated as a write
        port = _port(nexus)
        if (
            self._reserve6 is not None
            and not self._holds_reserve6(port)
            and (spec is None or not spec.reserve6_exempt)
        ):
            return True
        if spec is not None and spec.compat_reservation:
            return bool(self._registrations)  # SPC-4 5.13.3 with CRH=0
        res = self._reservation
        if res is None:
            return False
        access = Access.WRITE if spec is None else spec.access_for(cdb)
        if access is Access.ALLOWED:
            return False
        if self.is_holder(nexus) or (res.type.registrants_have_access and port in self._registrations):
            return False
        return not (access is Access.READ and res.type.write_exclusive)

    # ---- RESERVE(6) / RELEASE(6) ----------------------------------------------------------

    def reserve6(self, nexus: Nexus) -> None:
        """RESERVE(6) (SPC-2 7.21): reserve the whole logical unit for ``nexus``."""
        if self._registrations:
            raise ReservationConflict("RESERVE(6) while persistent registrations exist (SPC-4 5.13.3)")
        if self._reserve6 is not None and not self._holds_reserve6(_port(nexus)):
            raise ReservationConflict("RESERVE(6) held by another I_T nexus")
        self._reserve6 = nexus

    def release6(self, nexus: Nexus) -> None:
        """RELEASE(6) (SPC-2 7.19): a no-op unless ``nexus`` holds the RESERVE(6)."""
        if self._registrations:
            raise ReservationConflict("RELEASE(6) while persistent registrations exist (SPC-4 5.13.3)")
        if self._holds_reserve6(_port(nexus)):
            self._reserve6 = None

    def reset(self) -> None:
        """LUN RESET, TARGET WARM/COLD RESET: RESERVE(6) goes, persistent state stays (SAM-5 6.3)."""
        self._reserve6 = None

    def nexus_lost(self, nexus: Nexus) -> None:
        """I_T nexus loss (logout, dropped connection): a RESERVE(6) it holds goes (SPC-2 5.5.1)."""
        if self._holds_reserve6(_port(nexus)):
            self._reserve6 = None

    # ---- PERSISTENT RESERVE IN ------------------------------------------------------------

    def persistent_reserve_in(self, nexus: Nexus, cdb: bytes) -> bytes:
        """PERSISTENT RESERVE IN (SPC-4 6.15): parameter data cut to the ALLOCATION LENGTH.

        The ADDITIONAL LENGTH fields always tell the full length (SPC-4 6.15.2).
        """
        del nexus  # the data is the same from every I_T nexus
        if len(cdb) < 10:
            raise invalid_cdb(0)
        try:
            action = PrInAction(cdb[1] & 0x1F)
        except ValueError:
            raise invalid_cdb(1, 4) from None
        allocation_length = u16(cdb, 7)
        match action:
            case PrInAction.READ_KEYS:
                data = self._read_keys()
            case PrInAction.READ_RESERVATION:
                data = self._read_reservation()
            case PrInAction.REPORT_CAPABILITIES:
                data = self._report_capabilities()
            case PrInAction.READ_FULL_STATUS:
                data = self._read_full_status()
        return data[:allocation_length]

    def _read_keys(self) -> bytes:
        """SPC-4 6.15.2 table 167."""
        keys = b"".join(_U64.pack(r.key) for r in self._registrations.values())
        return _U32.pack(self._generation) + _U32.pack(len(keys)) + keys

    def _read_reservation(self) -> bytes:
        """SPC-4 6.15.3 tables 168, 169: the key is zero for the all-registrants types."""
        header = _U32.pack(self._generation)
        res = self._reservation
        if res is None:
            return header + _U32.pack(0)
        key = 0 if res.type.all_registrants else self._registrations[res.holder].key
        descriptor = _U64.pack(key) + bytes(4) + bytes([0, LU_SCOPE << 4 | res.type]) + bytes(2)
        return header + _U32.pack(len(descriptor)) + descriptor

    def _report_capabilities(self) -> bytes:
        """SPC-4 6.15.4 table 170.

        RLR_C=0, CRH=0, SIP_C=0, ATP_C=0, PTPL_C=1; TMV=1 with all six types; ALLOW COMMANDS=011b
        (TEST UNIT READY is allowed through every type, MODE SENSE and the other reads of
        table 60 are allowed through Write Exclusive); PTPL_A tells the current APTPL state.
        """
        mask = bytearray(2)
        for byte, bit in _TYPE_MASK_BITS.values():
            mask[byte] |= 1 << bit
        byte2 = 0x01  # PTPL_C
        byte3 = 0x80 | 0b011 << 4 | (0x01 if self._aptpl else 0)  # TMV, ALLOW COMMANDS, PTPL_A
        return _U16.pack(8) + bytes([byte2, byte3]) + bytes(mask) + bytes(2)

    def _read_full_status(self) -> bytes:
        """SPC-4 6.15.5 tables 171, 172: one descriptor per registered I_T nexus."""
        res = self._reservation
        descriptors = bytearray()
        for port, registration in self._registrations.items():
            holder = res is not None and (res.type.all_registrants or res.holder == port)
            scope_type = (LU_SCOPE << 4 | res.type) if holder and res is not None else 0
            transport_id = iscsi_transport_id(registration.nexus)
            descriptors += (
                _U64.pack(registration.key)
                + bytes(4)
                + bytes([0x01 if holder else 0x00, scope_type])  # ALL_TG_PT=0, R_HOLDER
                + bytes(4)
                + _U16.pack(registration.nexus.tpgt)  # RELATIVE TARGET PORT IDENTIFIER
                + _U32.pack(len(transport_id))
                + transport_id
            )
        return _U32.pack(self._generation) + _U32.pack(len(descriptors)) + bytes(descriptors)

    # ---- PERSISTENT RESERVE OUT -----------------------------------------------------------

    def persistent_reserve_out(self, nexus: Nexus, cdb: bytes, params: bytes) -> PrOutOutcome:
        """PERSISTENT RESERVE OUT (SPC-4 6.16, 5.13.7 - 5.13.11).

        Raises CheckCondition for a bad CDB or parameter list and ReservationConflict where SPC-4
        says RESERVATION CONFLICT; either way nothing has changed.
        """
        decoded = _decode_pr_out_cdb(cdb)
        params = bytes(params)
        if decoded.action is PrOutAction.REGISTER_AND_MOVE:
            return self._register_and_move(
                nexus, decoded, _decode_move(params, decoded.parameter_list_length)
            )
        basic = _decode_basic(params, decoded.parameter_list_length)
        match decoded.action:
            case PrOutAction.REGISTER:
                return self._register(nexus, basic, ignore_existing_key=False)
            case PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY:
                return self._register(nexus, basic, ignore_existing_key=True)
            case PrOutAction.RESERVE:
                return self._reserve(nexus, decoded, basic)
            case PrOutAction.RELEASE:
                return self._release(nexus, decoded, basic)
            case PrOutAction.CLEAR:
                return self._clear(nexus, basic)
            case PrOutAction.PREEMPT | PrOutAction.PREEMPT_AND_ABORT:
                return self._preempt(nexus, decoded, basic)
        raise AssertionError(decoded.action)  # pragma: no cover - the match is exhaustive

    def _registration_of(self, nexus: Nexus, reservation_key: int) -> _Registration:
        """The caller's registration; RESERVATION CONFLICT if none or the key differs (SPC-4 5.13.2)."""
        registration = self._registrations.get(_port(nexus))
        if registration is None:
            raise ReservationConflict("I_T nexus is not registered")
        if registration.key != reservation_key:
            raise ReservationConflict("RESERVATION KEY does not match the registered key")
        return registration

    def _bump(self) -> None:
        self._generation = (self._generation + 1) & _GENERATION_MASK

    def _register(self, nexus: Nexus, p: _BasicParameters, *, ignore_existing_key: bool) -> PrOutOutcome:
        """REGISTER and REGISTER AND IGNORE EXISTING KEY (SPC-4 5.13.7 table 56, 5.13.11.3)."""
        if p.all_tg_pt:
            raise invalid_param(20, 2)  # ATP_C=0
        port = _port(nexus)
        current = self._registrations.get(port)
        if current is None:
            if not ignore_existing_key and p.reservation_key != 0:
                raise ReservationConflict("unregistered I_T nexus sent a non-zero RESERVATION KEY")
            if p.service_action_key == 0:
                return NO_CHANGE  # nothing to register, nothing to remove
            if len(self._registrations) >= MAX_REGISTRATIONS:
                raise CheckCondition(SenseKey.ILLEGAL_REQUEST, INSUFFICIENT_REGISTRATION_RESOURCES)
            self._registrations[port] = _Registration(nexus, p.service_action_key)
            self._aptpl = p.aptpl
            self._bump()
            return PrOutOutcome(changed=True)
        if not ignore_existing_key and p.reservation_key != current.key:
            raise ReservationConflict("RESERVATION KEY does not match the registered key")
        if p.service_action_key == 0:
            unit_attentions = self._unregister(port)
            self._bump()
            return PrOutOutcome(changed=True, unit_attentions=tuple(unit_attentions))
        self._registrations[port] = _Registration(current.nexus, p.service_action_key)
        self._aptpl = p.aptpl
        self._bump()
        return PrOutOutcome(changed=True)

    def _unregister(self, port: _Port) -> list[tuple[Nexus, Asc]]:
        """Remove one registration and what goes with it (SPC-4 5.13.11.3).

        The holder of a Write Exclusive/Exclusive Access/registrants-only reservation releases it by
        unregistering; for registrants-only every other registrant gets RESERVATIONS RELEASED. An
        all-registrants reservation lasts until its last registrant is gone.
        """
        del self._registrations[port]
        res = self._reservation
        if res is None:
            return []
        if res.type.all_registrants:
            if not self._registrations:
                self._reservation = None
            elif res.holder == port:
                self._reservation = _Reservation(next(iter(self._registrations)), res.type)
            return []
        if res.holder != port:
            return []
        self._reservation = None
        if res.type.registrants_only:
            return [(r.nexus, RESERVATIONS_RELEASED) for r in self._registrations.values()]
        return []

    def _reserve(self, nexus: Nexus, cdb: _PrOutCdb, p: _BasicParameters) -> PrOutOutcome:
        """RESERVE (SPC-4 5.13.9): no change to PRgeneration."""
        if cdb.scope != LU_SCOPE:
            raise invalid_cdb(2, 7)
        pr_type = _pr_type(cdb.type)
        self._registration_of(nexus, p.reservation_key)
        res = self._reservation
        if res is None:
            self._reservation = _Reservation(_port(nexus), pr_type)
            return PrOutOutcome(changed=True)
        if self.is_holder(nexus) and res.type == pr_type:
            return NO_CHANGE
        raise ReservationConflict("a persistent reservation of another holder or type exists")

    def _release(self, nexus: Nexus, cdb: _PrOutCdb, p: _BasicParameters) -> PrOutOutcome:
        """RELEASE (SPC-4 5.13.10): a no-op for a non-holder; no change to PRgeneration."""
        self._registration_of(nexus, p.reservation_key)
        res = self._reservation
        if res is None or not self.is_holder(nexus):
            return NO_CHANGE
        if cdb.scope != LU_SCOPE or cdb.type != res.type:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
        self._reservation = None
        if not res.type.registrants_have_access:
            return PrOutOutcome(changed=True)
        port = _port(nexus)
        return PrOutOutcome(
            changed=True,
            unit_attentions=self._attentions(
                (r.nexus for q, r in self._registrations.items() if q != port), RESERVATIONS_RELEASED
            ),
        )

    def _clear(self, nexus: Nexus, p: _BasicParameters) -> PrOutOutcome:
        """CLEAR (SPC-4 5.13.11.2.6): every registration and the reservation go."""
        self._registration_of(nexus, p.reservation_key)
        port = _port(nexus)
        others = [r.nexus for q, r in self._registrations.items() if q != port]
        self._registrations.clear()
        self._reservation = None
        self._bump()
        return PrOutOutcome(changed=True, unit_attentions=self._attentions(others, RESERVATIONS_PREEMPTED))

    def _preempt(self, nexus: Nexus, cdb: _PrOutCdb, p: _BasicParameters) -> PrOutOutcome:
        """PREEMPT and PREEMPT AND ABORT (SPC-4 5.13.11.4, figure 13).

        The abort of the preempted I_T nexuses' tasks is the logical unit's job: they are the
        nexuses handed back with REGISTRATIONS PREEMPTED.
        """
        if cdb.scope != LU_SCOPE:
            raise invalid_cdb(2, 7)
        pr_type = _pr_type(cdb.type)
        self._registration_of(nexus, p.reservation_key)
        port = _port(nexus)
        sark = p.service_action_key
        res = self._reservation

        if res is not None and res.type.all_registrants and sark == 0:
            # 5.13.11.4.3: preempt an all-registrants reservation, every other registration goes.
            victims = [q for q in self._registrations if q != port]
            return self._preempt_reservation(port, victims, res, pr_type)
        if res is not None and not res.type.all_registrants:
            holder_key = self._registrations[res.holder].key
            if sark == holder_key:
                # 5.13.11.4.3: the reservation moves to the preempting I_T nexus.
                victims = [q for q, r in self._registrations.items() if r.key == sark and q != port]
                return self._preempt_reservation(port, victims, res, pr_type)
        if sark == 0:
            raise invalid_param(8)  # 5.13.11.4.4: zero names no registration to remove
        # 5.13.11.4.4: remove the registrations with that key; the reservation is not touched.
        victims = [q for q, r in self._registrations.items() if r.key == sark]
        if not victims:
            raise ReservationConflict("SERVICE ACTION RESERVATION KEY matches no registration")
        preempted = [self._registrations[q].nexus for q in victims if q != port]
        unit_attentions: list[tuple[Nexus, Asc]] = []
        for victim in victims:
            unit_attentions += self._unregister(victim)
        self._bump()
        return PrOutOutcome(
            changed=True,
            unit_attentions=self._attentions(preempted, REGISTRATIONS_PREEMPTED) + tuple(unit_attentions),
        )

    def _preempt_reservation(
        self, port: _Port, victims: list[_Port], old: _Reservation, new_type: PrType
    ) -> PrOutOutcome:
        """SPC-4 5.13.11.4.3 items a) to e)."""
        preempted = [self._registrations.pop(q).nexus for q in victims]
        self._reservation = _Reservation(port, new_type)
        self._bump()
        unit_attentions = self._attentions(preempted, REGISTRATIONS_PREEMPTED)
        if old.type != new_type:
            kept = (r.nexus for q, r in self._registrations.items() if q != port)
            unit_attentions += self._attentions(kept, RESERVATIONS_RELEASED)
        return PrOutOutcome(changed=True, unit_attentions=unit_attentions)

    def _register_and_move(self, nexus: Nexus, cdb: _PrOutCdb, p: _MoveParameters) -> PrOutOutcome:
        """REGISTER AND MOVE (SPC-4 5.13.8): register another I_T nexus and give it the reservation.

        The destination target port is this target's port with the given relative target port
        identifier (the TPGT). The reservation keeps its scope and type.
        """
        if cdb.scope != LU_SCOPE:
            raise invalid_cdb(2, 7)
        self._registration_of(nexus, p.reservation_key)
        res = self._reservation
        port = _port(nexus)
        if res is None or res.type.all_registrants or res.holder != port:
            raise ReservationConflict("REGISTER AND MOVE from an I_T nexus that is not the holder")
        if p.service_action_key == 0:
            raise invalid_param(8)
        if p.isid > _MAX_ISID:
            raise invalid_param(BASIC_PARAMETER_LIST_LENGTH + 4)
        destination = Nexus(p.initiator_name, p.isid, nexus.target_name, p.relative_target_port)
        dest_port = _port(destination)
        if dest_port == port:
            raise invalid_param(BASIC_PARAMETER_LIST_LENGTH)
        if dest_port not in self._registrations:
            if len(self._registrations) >= MAX_REGISTRATIONS:
                raise CheckCondition(SenseKey.ILLEGAL_REQUEST, INSUFFICIENT_REGISTRATION_RESOURCES)
            self._registrations[dest_port] = _Registration(destination, p.service_action_key)
        self._reservation = _Reservation(dest_port, res.type)
        if p.unreg:
            del self._registrations[port]
        self._aptpl = p.aptpl
        self._bump()
        return PrOutOutcome(changed=True)

    @staticmethod
    def _attentions(nexuses: Iterable[Nexus], code: Asc) -> tuple[tuple[Nexus, Asc], ...]:
        return tuple((n, code) for n in nexuses)

    # ---- persistence ----------------------------------------------------------------------

    def to_record(self) -> dict[str, Any]:
        """The full persistent state as plain JSON-able data (RESERVE(6) is never part of it)."""
        res = self._reservation
        return {
            "version": RECORD_VERSION,
            "aptpl": self._aptpl,
            "generation": self._generation,
            "registrations": [
                {
                    "initiator_name": r.nexus.initiator_name,
                    "isid": r.nexus.isid,
                    "target_name": r.nexus.target_name,
                    "tpgt": r.nexus.tpgt,
                    "key": r.key,
                }
                for r in self._registrations.values()
            ],
            "reservation": None
            if res is None
            else {"holder": list(self._registrations).index(res.holder), "type": int(res.type)},
        }

    def _restore(self, record: dict[str, Any]) -> None:
        """Power on (SPC-4 5.13.5): keep registrations and reservation only if APTPL was one.

        A record this class did not write raises ValueError.
        """
        if record.get("version") != RECORD_VERSION:
            raise ValueError(f"unknown reservations record version {record.get('version')!r}")
        if not record.get("aptpl"):
            return
        try:
            registrations = dict(self._restore_registration(entry) for entry in record["registrations"])
            reservation: _Reservation | None = None
            if record.get("reservation") is not None:
                index = int(record["reservation"]["holder"])
                pr_type = PrType(int(record["reservation"]["type"]))
                if not 0 <= index < len(registrations):
                    raise ValueError(f"reservation holder {index} is not a registration")
                reservation = _Reservation(list(registrations)[index], pr_type)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed reservations record: {exc}") from exc
        if len(registrations) != len(record["registrations"]):
            raise ValueError("malformed reservations record: an I_T nexus is registered twice")
        self._registrations = registrations
        self._reservation = reservation
        self._aptpl = True

    @staticmethod
    def _restore_registration(entry: dict[str, Any]) -> tuple[_Port, _Registration]:
        nexus = Nexus(
            str(entry["initiator_name"]), int(entry["isid"]), str(entry["target_name"]), int(entry["tpgt"])
        )
        key = int(entry["key"])
        if not 0 < key < 1 << 64 or not 0 <= nexus.isid <= _MAX_ISID or not 0 <= nexus.tpgt <= 0xFFFF:
            raise ValueError(f"bad registration in record: {entry!r}")
        return _port(nexus), _Registration(nexus, key)
