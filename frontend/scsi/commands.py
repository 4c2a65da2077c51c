"""The SCSI command set of a logical unit: one ``CommandSpec`` per opcode and service action.

``COMMANDS`` is the one definition of what Sparrow implements. Everything that needs to know about
a command is derived from it, so the views cannot disagree (tests/unit/test_scsi_commands.py checks):

* dispatch in lu.py: ``DISPATCH`` (keyed by :func:`dispatch_key`) names the ``LogicalUnit`` method
  that runs the command (defined in the handler module of its family, cmd_*.py), the checks it
  passes (``Gate``) and its CDB length (the NACA check);
* REPORT SUPPORTED OPERATION CODES (opcodes.py): :func:`command_table` with the CDB usage data;
* the persistent-reservation conflict check (reservations.py): :func:`command_access` and the
  RESERVE(6) rules, from ``access``, ``reserve6_exempt`` and ``compat_reservation``;
* the per-command metrics in server.py: :func:`metric_kind`;
* fast-path eligibility: ``fast_path`` (the plain READ/WRITE 10/16).

Service actions: SERVICE ACTION IN(16) and MAINTENANCE IN are dispatched by service action (an
unknown one is INVALID COMMAND OPERATION CODE); PERSISTENT RESERVE IN/OUT and SANITIZE are
dispatched by opcode and their handler decodes the service action (an unknown one is INVALID FIELD
IN CDB), so all specs of such an opcode share handler, gate and length.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from frontend.scsi.opcodes import (
    SANITIZE_ACTIONS,
    CommandInfo,
    MaintenanceIn,
    Opcode,
    SanitizeAction,
    ServiceActionIn16,
)


class Gate(enum.IntFlag):
    """How a command passes the checks the logical unit runs in front of it (lu.py)."""

    NONE = 0
    #: SAM-5 5.14: INQUIRY, REPORT LUNS and REQUEST SENSE are not stopped by a UA. We also let
    #: PERSISTENT RESERVE IN through (read-only; the UA stays queued for the next command): an
    #: initiator that checks reservations on an idle path (libiscsi's suite cleanup does, on every
    #: path) must not fail because another path reset the LU or changed a mode page.
    UA_EXEMPT = 0x1
    STANDBY_OK = 0x2  # SPC-4 5.15.2.4.4: allowed in the standby access state
    UNAVAILABLE_OK = 0x4  # SPC-4 5.15.2.4.5/6: allowed when unavailable or transitioning
    WRITES = 0x8  # modifies the medium: refused while SWP=1
    #: SBC-3 4.11: processed while a sanitize operation is in progress (INQUIRY, REPORT LUNS,
    #: REQUEST SENSE); every other command gets NOT READY / SANITIZE IN PROGRESS.
    SANITIZE_OK = 0x10
    #: Reads or writes the medium: refused with SANITIZE COMMAND FAILED after a failed sanitize.
    MEDIUM = 0x20


class Access(enum.Enum):
    """How a command fares against a persistent reservation (SPC-4 5.13.1 table 60, SBC-3 4.17)."""

    ALLOWED = "allowed"
    """Allowed through every reservation type, from any I_T nexus."""
    READ = "read"
    """Allowed through Write Exclusive types from any I_T nexus; reserved under Exclusive Access."""
    WRITE = "write"
    """Allowed only for the holder (or any registrant of a registrants-only/all-registrants type)."""


class MetricKind(enum.Enum):
    """The ``op`` label a command is counted under in /metrics."""

    READ = "read"
    WRITE = "write"
    OTHER = "other"


def _start_stop_access(cdb: bytes) -> Access:
    """START STOP UNIT: START=1 with POWER CONDITION=0 is allowed (SBC-3 table 13)."""
    return Access.ALLOWED if len(cdb) > 4 and cdb[4] & 0x01 and cdb[4] >> 4 == 0 else Access.WRITE


def _prevent_allow_access(cdb: bytes) -> Access:
    """PREVENT ALLOW MEDIUM REMOVAL: only PREVENT=00b is allowed (SBC-3 table 13)."""
    return Access.ALLOWED if len(cdb) > 4 and cdb[4] & 0x03 == 0 else Access.WRITE


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """One command (opcode, and service action where it has one) and everything about it.

    ``usage`` is the CDB USAGE DATA of SPC-4 6.35.3: byte 0 is the opcode, every other bit is set
    when the device server evaluates that bit of the CDB; its length is the CDB length.
    """

    name: str
    opcode: int
    service_action: int | None
    #: Name of the ``LogicalUnit`` coroutine method that runs the command: (req, cdb) -> ScsiResult.
    #: It lives in the handler class of the command's family (cmd_blockio.py, cmd_device.py, ...).
    handler: str
    usage: bytes
    gate: Gate
    #: Reservation class; ``access_of`` decides instead when a CDB field changes the answer.
    access: Access
    access_of: Callable[[bytes], Access] | None = None
    #: Let through a RESERVE(6) held by another I_T nexus (SPC-2 5.5.1).
    reserve6_exempt: bool = False
    #: RESERVE/RELEASE(6)/(10): RESERVATION CONFLICT while any I_T nexus is registered (SPC-4
    #: 5.13.3, CRH=0).
    compat_reservation: bool = False
    metric: MetricKind = MetricKind.OTHER
    #: A plain READ/WRITE(10)/(16): the data path may serve it without the general dispatch.
    fast_path: bool = False
    #: Offered (in REPORT SUPPORTED OPERATION CODES) only by a logical unit that can deallocate.
    needs_unmap: bool = False
    #: Bits of CDB byte 1 evaluated only by a logical unit that can deallocate (WRITE SAME's UNMAP).
    unmap_usage: int = 0

    @property
    def length(self) -> int:
        """CDB length; its last byte is CONTROL."""
        return len(self.usage)

    def usage_for(self, supports_unmap: bool) -> bytes:
        if not self.unmap_usage or not supports_unmap:
            return self.usage
        return bytes((self.usage[0], self.usage[1] | self.unmap_usage)) + self.usage[2:]

    def access_for(self, cdb: bytes) -> Access:
        return self.access if self.access_of is None else self.access_of(cdb)


_R = Gate.MEDIUM
_W = Gate.WRITES | Gate.MEDIUM
_INFO = Gate.UA_EXEMPT | Gate.STANDBY_OK | Gate.UNAVAILABLE_OK | Gate.SANITIZE_OK
_ANY_STATE = Gate.STANDBY_OK | Gate.UNAVAILABLE_OK
_DPOFUA = 0x18
_AL, _RD, _WR = Access.ALLOWED, Access.READ, Access.WRITE
_MR, _MW = MetricKind.READ, MetricKind.WRITE


def _u(opcode: int, *usage: int) -> bytes:
    return bytes((opcode, *usage))


def _rw10(opcode: int, flags: int) -> bytes:
    return _u(opcode, flags, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x00)


def _rw12(opcode: int, flags: int) -> bytes:
    return _u(opcode, flags, *(0xFF,) * 8, 0x1F, 0x00)


def _rw16(opcode: int, flags: int) -> bytes:
    return _u(opcode, flags, *(0xFF,) * 12, 0x1F, 0x00)


def _sanitize(sa: SanitizeAction) -> CommandSpec:
    # SBC-3 5.30: IMMED and AUSE are evaluated; only OVERWRITE takes a parameter list.
    plen = 0xFF if sa == SanitizeAction.OVERWRITE else 0x00
    o = Opcode.SANITIZE
    return CommandSpec(
        f"SANITIZE/{sa.name}", o, sa, "_sanitize", _u(o, 0x80 | 0x20 | sa, 0, 0, 0, 0, 0, plen, plen, 0),
        Gate.WRITES, _WR, needs_unmap=True,
    )  # fmt: skip


def _pr_in(sa: int) -> CommandSpec:
    o = Opcode.PERSISTENT_RESERVE_IN
    return CommandSpec(
        f"PERSISTENT RESERVE IN/{sa}", o, sa, "_persistent_reserve_in",
        _u(o, sa, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0),
        Gate.UA_EXEMPT | Gate.STANDBY_OK, _AL, reserve6_exempt=True,
    )  # fmt: skip


def _pr_out(sa: int) -> CommandSpec:
    o = Opcode.PERSISTENT_RESERVE_OUT
    # ALLOWED: its service actions check the registration themselves (SPC-4 5.13.2 table 61).
    return CommandSpec(
        f"PERSISTENT RESERVE OUT/{sa}", o, sa, "_persistent_reserve_out",
        _u(o, sa, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0), Gate.STANDBY_OK, _AL,
    )  # fmt: skip


_O = Opcode
_S = CommandSpec

#: Every command the logical unit implements, in (opcode, service action) order, which is the order
#: REPORT SUPPORTED OPERATION CODES lists them in.
COMMANDS: tuple[CommandSpec, ...] = (
    _S("TEST UNIT READY", _O.TEST_UNIT_READY, None, "_test_unit_ready", _u(_O.TEST_UNIT_READY, 0, 0, 0, 0, 0),
       Gate.NONE, _AL),
    _S("REQUEST SENSE", _O.REQUEST_SENSE, None, "_request_sense", _u(_O.REQUEST_SENSE, 0x01, 0, 0, 0xFF, 0),
       _INFO, _AL, reserve6_exempt=True),
    _S("READ(6)", _O.READ_6, None, "_read_6", _u(_O.READ_6, 0x1F, 0xFF, 0xFF, 0xFF, 0), _R, _RD, metric=_MR),
    _S("WRITE(6)", _O.WRITE_6, None, "_write_6", _u(_O.WRITE_6, 0x1F, 0xFF, 0xFF, 0xFF, 0), _W, _WR,
       metric=_MW),
    _S("INQUIRY", _O.INQUIRY, None, "_inquiry", _u(_O.INQUIRY, 0x01, 0xFF, 0xFF, 0xFF, 0), _INFO, _AL,
       reserve6_exempt=True),
    _S("MODE SELECT(6)", _O.MODE_SELECT_6, None, "_mode_select", _u(_O.MODE_SELECT_6, 0x11, 0, 0, 0xFF, 0),
       Gate.STANDBY_OK, _WR),
    _S("RESERVE(6)", _O.RESERVE_6, None, "_reserve_6", _u(_O.RESERVE_6, 0, 0, 0, 0, 0), Gate.NONE, _WR,
       compat_reservation=True),
    _S("RELEASE(6)", _O.RELEASE_6, None, "_release_6", _u(_O.RELEASE_6, 0, 0, 0, 0, 0), Gate.NONE, _WR,
       compat_reservation=True, reserve6_exempt=True),
    _S("MODE SENSE(6)", _O.MODE_SENSE_6, None, "_mode_sense", _u(_O.MODE_SENSE_6, 0x08, 0xFF, 0xFF, 0xFF, 0),
       _ANY_STATE, _RD),
    _S("START STOP UNIT", _O.START_STOP_UNIT, None, "_start_stop_unit",
       _u(_O.START_STOP_UNIT, 0x01, 0, 0x0F, 0xF7, 0), Gate.NONE, _WR, access_of=_start_stop_access),
    _S("PREVENT ALLOW MEDIUM REMOVAL", _O.PREVENT_ALLOW_MEDIUM_REMOVAL, None, "_prevent_allow",
       _u(_O.PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 0x03, 0), Gate.NONE, _WR,
       access_of=_prevent_allow_access),
    _S("READ CAPACITY(10)", _O.READ_CAPACITY_10, None, "_read_capacity_10",
       _u(_O.READ_CAPACITY_10, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, 0), _ANY_STATE, _AL),
    _S("READ(10)", _O.READ_10, None, "_read_10", _rw10(_O.READ_10, _DPOFUA), _R, _RD, metric=_MR,
       fast_path=True),
    _S("WRITE(10)", _O.WRITE_10, None, "_write_10", _rw10(_O.WRITE_10, _DPOFUA), _W, _WR, metric=_MW,
       fast_path=True),
    _S("WRITE AND VERIFY(10)", _O.WRITE_AND_VERIFY_10, None, "_write_verify_10",
       _rw10(_O.WRITE_AND_VERIFY_10, 0x12), _W, _WR, metric=_MW),
    _S("VERIFY(10)", _O.VERIFY_10, None, "_verify_10", _rw10(_O.VERIFY_10, 0x16), _R, _RD),
    _S("PRE-FETCH(10)", _O.PRE_FETCH_10, None, "_prefetch_10", _rw10(_O.PRE_FETCH_10, 0x02), Gate.NONE, _RD),
    _S("SYNCHRONIZE CACHE(10)", _O.SYNCHRONIZE_CACHE_10, None, "_sync_cache_10",
       _rw10(_O.SYNCHRONIZE_CACHE_10, 0x02), Gate.NONE, _WR),
    _S("READ DEFECT DATA(10)", _O.READ_DEFECT_DATA_10, None, "_read_defect_data_10",
       _u(_O.READ_DEFECT_DATA_10, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0), Gate.NONE, _RD),
    _S("WRITE SAME(10)", _O.WRITE_SAME_10, None, "_write_same_10", _rw10(_O.WRITE_SAME_10, 0x00), _W, _WR,
       unmap_usage=0x08),
    _S("UNMAP", _O.UNMAP, None, "_unmap_cmd", _u(_O.UNMAP, 0, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, 0), _W, _WR,
       needs_unmap=True),
    *(_sanitize(sa) for sa in SANITIZE_ACTIONS),
    _S("MODE SELECT(10)", _O.MODE_SELECT_10, None, "_mode_select",
       _u(_O.MODE_SELECT_10, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0), Gate.STANDBY_OK, _WR),
    # RESERVE/RELEASE(10): no third-party reservations (3RDPTY, LONGID).
    _S("RESERVE(10)", _O.RESERVE_10, None, "_reserve_10", _u(_O.RESERVE_10, *(0,) * 9), Gate.NONE, _WR,
       compat_reservation=True),
    _S("RELEASE(10)", _O.RELEASE_10, None, "_release_10", _u(_O.RELEASE_10, *(0,) * 9), Gate.NONE, _WR,
       compat_reservation=True, reserve6_exempt=True),
    _S("MODE SENSE(10)", _O.MODE_SENSE_10, None, "_mode_sense",
       _u(_O.MODE_SENSE_10, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0), _ANY_STATE, _RD),
    *(_pr_in(sa) for sa in range(4)),
    *(_pr_out(sa) for sa in range(8)),
    _S("READ(16)", _O.READ_16, None, "_read_16", _rw16(_O.READ_16, _DPOFUA), _R, _RD, metric=_MR,
       fast_path=True),
    _S("COMPARE AND WRITE", _O.COMPARE_AND_WRITE, None, "_compare_and_write",
       _u(_O.COMPARE_AND_WRITE, _DPOFUA, *(0xFF,) * 8, 0, 0, 0, 0xFF, 0x1F, 0), _W, _WR, metric=_MW),
    _S("WRITE(16)", _O.WRITE_16, None, "_write_16", _rw16(_O.WRITE_16, _DPOFUA), _W, _WR, metric=_MW,
       fast_path=True),
    _S("ORWRITE(16)", _O.ORWRITE_16, None, "_orwrite_16", _rw16(_O.ORWRITE_16, _DPOFUA), _W, _WR, metric=_MW),
    _S("WRITE AND VERIFY(16)", _O.WRITE_AND_VERIFY_16, None, "_write_verify_16",
       _rw16(_O.WRITE_AND_VERIFY_16, 0x12), _W, _WR, metric=_MW),
    _S("VERIFY(16)", _O.VERIFY_16, None, "_verify_16", _rw16(_O.VERIFY_16, 0x16), _R, _RD),
    _S("PRE-FETCH(16)", _O.PRE_FETCH_16, None, "_prefetch_16", _rw16(_O.PRE_FETCH_16, 0x02), Gate.NONE, _RD),
    _S("SYNCHRONIZE CACHE(16)", _O.SYNCHRONIZE_CACHE_16, None, "_sync_cache_16",
       _rw16(_O.SYNCHRONIZE_CACHE_16, 0x02), Gate.NONE, _WR),
    _S("WRITE SAME(16)", _O.WRITE_SAME_16, None, "_write_same_16", _rw16(_O.WRITE_SAME_16, 0x01), _W, _WR,
       unmap_usage=0x08),
    _S("WRITE ATOMIC(16)", _O.WRITE_ATOMIC_16, None, "_write_atomic_16", _rw16(_O.WRITE_ATOMIC_16, _DPOFUA),
       _W, _WR, metric=_MW),
    _S("READ CAPACITY(16)", _O.SERVICE_ACTION_IN_16, ServiceActionIn16.READ_CAPACITY_16, "_read_capacity_16",
       _u(_O.SERVICE_ACTION_IN_16, ServiceActionIn16.READ_CAPACITY_16, *(0xFF,) * 12, 0x01, 0),
       _ANY_STATE, _AL),
    _S("GET LBA STATUS", _O.SERVICE_ACTION_IN_16, ServiceActionIn16.GET_LBA_STATUS, "_get_lba_status",
       _u(_O.SERVICE_ACTION_IN_16, ServiceActionIn16.GET_LBA_STATUS, *(0xFF,) * 12, 0, 0), Gate.NONE, _RD),
    _S("REPORT LUNS", _O.REPORT_LUNS, None, "_report_luns",
       _u(_O.REPORT_LUNS, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0), _INFO, _AL, reserve6_exempt=True),
    # PARAMETER DATA FORMAT + SA
    _S("REPORT TARGET PORT GROUPS", _O.MAINTENANCE_IN, MaintenanceIn.REPORT_TARGET_PORT_GROUPS,
       "_report_target_port_groups",
       _u(_O.MAINTENANCE_IN, 0xE0 | MaintenanceIn.REPORT_TARGET_PORT_GROUPS, *(0,) * 4, *(0xFF,) * 4, 0, 0),
       _ANY_STATE, _AL),
    _S("REPORT SUPPORTED OPERATION CODES", _O.MAINTENANCE_IN, MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES,
       "_report_supported_opcodes",
       _u(_O.MAINTENANCE_IN, MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES, 0x87, *(0xFF,) * 7, 0, 0),
       _ANY_STATE, _RD),
    _S("READ(12)", _O.READ_12, None, "_read_12", _rw12(_O.READ_12, _DPOFUA), _R, _RD, metric=_MR),
    _S("WRITE(12)", _O.WRITE_12, None, "_write_12", _rw12(_O.WRITE_12, _DPOFUA), _W, _WR, metric=_MW),
    _S("WRITE AND VERIFY(12)", _O.WRITE_AND_VERIFY_12, None, "_write_verify_12",
       _rw12(_O.WRITE_AND_VERIFY_12, 0x12), _W, _WR, metric=_MW),
    _S("VERIFY(12)", _O.VERIFY_12, None, "_verify_12", _rw12(_O.VERIFY_12, 0x16), _R, _RD),
    _S("READ DEFECT DATA(12)", _O.READ_DEFECT_DATA_12, None, "_read_defect_data_12",
       _u(_O.READ_DEFECT_DATA_12, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0), Gate.NONE, _RD),
)  # fmt: skip

#: Opcodes dispatched by service action (CDB byte 1, bits 4-0); the others by opcode alone.
SA_DISPATCHED: frozenset[int] = frozenset((Opcode.SERVICE_ACTION_IN_16, Opcode.MAINTENANCE_IN))


def dispatch_key(cdb: bytes) -> int:
    """The key of ``cdb``'s command in ``DISPATCH`` (``cdb`` is at least two bytes long)."""
    op = cdb[0]
    return (op << 8) | (cdb[1] & 0x1F) if op in SA_DISPATCHED else op


def _spec_key(spec: CommandSpec) -> int:
    if spec.opcode in SA_DISPATCHED:
        assert spec.service_action is not None
        return (spec.opcode << 8) | spec.service_action
    return spec.opcode


def _dispatch(specs: tuple[CommandSpec, ...]) -> dict[int, CommandSpec]:
    """One spec per dispatch key: the first of an opcode whose handler decodes the service action."""
    out: dict[int, CommandSpec] = {}
    for spec in specs:
        out.setdefault(_spec_key(spec), spec)
    return out


#: The command each dispatch key runs.
DISPATCH: Mapping[int, CommandSpec] = _dispatch(COMMANDS)


def spec_for(cdb: bytes) -> CommandSpec | None:
    """The spec of the command in ``cdb``, or None for a command the logical unit does not implement."""
    if not cdb:
        return None
    if len(cdb) < 2:
        cdb = cdb + b"\0"
    return DISPATCH.get(dispatch_key(cdb))


def command_access(cdb: bytes) -> Access:
    """Classify a CDB for the persistent reservation conflict check (SPC-4 table 60, SBC-3 table 13).

    A command the logical unit does not implement counts as WRITE (the conservative answer); the
    logical unit answers it with INVALID COMMAND OPERATION CODE before any reservation check.
    """
    spec = spec_for(cdb)
    return Access.WRITE if spec is None else spec.access_for(cdb)


_METRIC_BY_OPCODE: dict[int, MetricKind] = {s.opcode: s.metric for s in COMMANDS}

#: Opcodes a per-command fast path may serve without the general dispatch (it must still fall back
#: to ``LogicalUnit.execute`` for anything but the plain case).
FAST_PATH_OPCODES: frozenset[int] = frozenset(s.opcode for s in COMMANDS if s.fast_path)


def metric_kind(cdb: bytes | bytearray | memoryview) -> MetricKind:
    """The /metrics kind of a command (by opcode); OTHER for an empty CDB or an unknown opcode."""
    return _METRIC_BY_OPCODE.get(cdb[0], MetricKind.OTHER) if cdb else MetricKind.OTHER


def command_table(
    *, supports_unmap: bool, sanitize_actions: tuple[SanitizeAction, ...] = SANITIZE_ACTIONS
) -> tuple[CommandInfo, ...]:
    """What REPORT SUPPORTED OPERATION CODES lists for a logical unit, in opcode order.

    SANITIZE needs deallocation (BLOCK and CRYPTO ERASE are carried out by deallocating), so like
    UNMAP it is listed only with ``supports_unmap``; ``sanitize_actions`` picks the service actions
    offered.
    """
    return tuple(
        CommandInfo(s.opcode, s.service_action, s.usage_for(supports_unmap))
        for s in COMMANDS
        if (supports_unmap or not s.needs_unmap)
        and (s.opcode != Opcode.SANITIZE or s.service_action in sanitize_actions)
    )
