"""LogicalUnit: the SPC-4 / SBC-3 command set of one logical unit over a ``BlockStore``.

``execute`` runs the checks SAM-5 puts before a command (UNIT ATTENTION, reservation conflict, ALUA
access state, write protect), then the command's handler from a dispatch table keyed by opcode (and
service action). Handlers raise ``CheckCondition``; ``execute`` turns every SCSI-level error into a
``ScsiResult`` and never raises for one. A command during which the LU left the serving access
states (the node fenced it while the store I/O was in flight) is answered as the new state answers
new commands (NOT READY, 04/0A when fenced), never GOOD: the one check after the handler.

A *paused* LU (``paused``: the operator paused the volume, docs/cluster.md "Pause and resume")
answers every command an unavailable target port would refuse with NOT READY, LOGICAL UNIT IS IN
PROCESS OF BECOMING READY (04/01: retried by initiators; sense.py says why this one); INQUIRY,
REPORT LUNS, REQUEST SENSE (which reports it), READ CAPACITY and the other information commands
still answer. A command already running when the pause arrives completes; :meth:`drained` waits
for it (the node applies a paused epoch only then).

Write-cache truth: the store is write-back. FUA writes and SYNCHRONIZE CACHE await ``store.flush``;
with WCE=0 (MODE SELECT on the caching page) every write-type command flushes before GOOD.
"""

from __future__ import annotations

import asyncio
import enum
import errno
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from frontend.scsi import mode as modes
from frontend.scsi.cdb import invalid_cdb, truncate, u16
from frontend.scsi.cmd_blockio import BlockIoCommands
from frontend.scsi.cmd_device import DeviceCommands, report_luns
from frontend.scsi.cmd_provisioning import ProvisioningCommands
from frontend.scsi.cmd_reservations import ReservationCommands
from frontend.scsi.cmd_sanitize import SanitizeCommands
from frontend.scsi.commands import DISPATCH, SA_DISPATCHED, CommandSpec, Gate, command_table
from frontend.scsi.inquiry import BlockLimits, VpdContext, no_lun_inquiry
from frontend.scsi.lubase import (
    ALUA_NOT_READY,
    CONFLICT,
    INVALID_OPCODE,
    MAX_ATOMIC_BYTES,
    MAX_COMPARE_AND_WRITE_BLOCKS,
    MAX_TRANSFER_BYTES,
    MAX_UNMAP_DESCRIPTORS,
    MAX_UNMAP_LBA_COUNT,
    MAX_WRITE_SAME_BYTES,
    OPTIMAL_TRANSFER_BYTES,
    AccessState,
    SanitizeRun,
    check_result,
    result_with,
)
from frontend.scsi.opcodes import Opcode, SanitizeAction
from frontend.scsi.rangelock import RangeLock
from frontend.scsi.reservations import ReservationConflict, Reservations
from frontend.scsi.sense import (
    ASYMMETRIC_ACCESS_STATE_CHANGED,
    BUS_DEVICE_RESET,
    CAPACITY_DATA_CHANGED,
    LBA_OUT_OF_RANGE,
    LOGICAL_UNIT_NOT_SUPPORTED,
    LU_NOT_ACCESSIBLE_TRANSITION,
    LU_NOT_READY_BECOMING_READY,
    LU_NOT_READY_CAUSE_NOT_REPORTABLE,
    MODE_PARAMETERS_CHANGED,
    POWER_ON_OCCURRED,
    POWER_ON_RESET,
    SANITIZE_COMMAND_FAILED,
    SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
    UNRECOVERED_READ_ERROR,
    WRITE_ERROR,
    WRITE_PROTECTED,
    Asc,
    CheckCondition,
    SenseKey,
    fixed_sense,
)
from frontend.scsi.types import Nexus, ScsiRequest, ScsiResult, ScsiStatus
from frontend.scsi.unsupported import UnsupportedCommands
from store.blockstore import (
    BlockStore,
    ForwardedWrites,
    InlineIo,
    StoreClosed,
    StoreError,
    StoreIOError,
    StoreOp,
    StoreRangeError,
    StoreUnavailable,
)

__all__ = ["AccessState", "LogicalUnit", "LuIdentity", "ResetKind", "no_such_lun", "report_luns"]


class ResetKind(enum.Enum):
    """Task management resets that reach the logical unit (SAM-5 7.5, 7.7; RFC 7143 11.5.1)."""

    LUN = "lun"
    TARGET_WARM = "target-warm"
    TARGET_COLD = "target-cold"


@dataclass(frozen=True)
class LuIdentity:
    volume: str
    serial: str
    naa: bytes
    vendor: str = "SPARROW"
    product: str = "VOLUME"
    revision: str = "0001"


#: SANITIZE service actions offered by default. OVERWRITE is implemented (and an ABORT TASK of its
#: command returns at once: the iSCSI layer cancels the execution, ``_sanitize`` lets the operation run
#: on) but is not offered yet: libiscsi's Sanitize.Reset needs the overwrite to outlast about 5 s, so on
#: small volumes it fails while a target that does not offer OVERWRITE skips it. Pass
#: ``sanitize_actions=SANITIZE_ACTIONS`` to offer it.
DEFAULT_SANITIZE_ACTIONS: tuple[SanitizeAction, ...] = (
    SanitizeAction.BLOCK_ERASE,
    SanitizeAction.CRYPTO_ERASE,
    SanitizeAction.EXIT_FAILURE_MODE,
)

_UNIT_ATTENTION_RESETS = {
    ResetKind.LUN: BUS_DEVICE_RESET,  # SAM-5 6.3.3: 29h/03h
    ResetKind.TARGET_WARM: POWER_ON_RESET,  # 29h/00h
    ResetKind.TARGET_COLD: POWER_ON_OCCURRED,  # RFC 7143 11.5.1: cold reset is a power cycle, 29h/01h
}

#: The last access state in which the LU serves I/O (an int, compared on every command).
_LAST_SERVING = int(AccessState.ACTIVE_NON_OPTIMIZED)


Handler = Callable[["LogicalUnit", ScsiRequest, bytes], Awaitable[ScsiResult]]


def _check_access(gate: int, state: AccessState) -> None:
    """Refuse a command that the non-serving access state ``state`` does not let through: NOT
    READY, LOGICAL UNIT NOT ACCESSIBLE with the state's ASCQ (SPC-4 5.15.2.4.4-6: 04/0B standby,
    04/0C unavailable, 04/0A transitioning; retryable, the initiator tries another path)."""
    allowed = Gate.STANDBY_OK if state == AccessState.STANDBY else Gate.UNAVAILABLE_OK
    if not gate & allowed:
        raise CheckCondition(SenseKey.NOT_READY, ALUA_NOT_READY[state])


@dataclass(frozen=True, slots=True)
class _Command:
    handler: Handler
    gate: int
    length: int  # CDB length; its last byte is CONTROL


class LogicalUnit(
    BlockIoCommands, ProvisioningCommands, SanitizeCommands, DeviceCommands, ReservationCommands
):
    """One SCSI logical unit (LUN 0 of a target) backed by a ``BlockStore``: its state, the checks in
    front of every command, and dispatch to the handler families (cmd_*.py) through commands.py."""

    def __init__(
        self,
        store: BlockStore,
        identity: LuIdentity,
        *,
        reservations: Reservations | None = None,
        on_reservations_changed: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
        tpgt: int = 1,
        physical_block_size: int | None = None,
        sanitize_actions: tuple[SanitizeAction, ...] = DEFAULT_SANITIZE_ACTIONS,
        unsupported: UnsupportedCommands | None = None,
    ) -> None:
        self.store = store
        #: The commands answered INVALID COMMAND OPERATION CODE (the node keeps one per volume).
        self.unsupported = unsupported if unsupported is not None else UnsupportedCommands()
        self.identity = identity
        self.reservations = reservations if reservations is not None else Reservations()
        self._on_reservations_changed = on_reservations_changed
        self.tpgt = tpgt
        self._access_state = AccessState.ACTIVE_OPTIMIZED
        self._mode = modes.DEFAULTS
        self._uas: dict[Nexus, list[Asc]] = {}
        #: CAW / ORWRITE / WRITE ATOMIC / SANITIZE hold their blocks exclusively; other block
        #: commands hold theirs shared (see rangelock.py).
        self._ranges = RangeLock()
        self._sanitizing: SanitizeRun | None = None
        self._sanitize_failed: SanitizeRun | None = None
        self._paused = False
        #: Commands in their handler (awaiting the store), and who waits for none (:meth:`drained`).
        self._running = 0
        self._idle: asyncio.Event | None = None
        bs = store.block_size
        self._bs = bs
        self._unmap = bool(store.supports_unmap)
        # LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT (SBC-3 5.16.2). Provisioning (UNMAP, GET LBA
        # STATUS) stays at logical-block granularity whatever it is.
        physical = physical_block_size or bs
        if physical < bs or physical % bs or (physical // bs) & (physical // bs - 1):
            raise ValueError(f"physical block size {physical} is not a power-of-two multiple of {bs}")
        self._lbppbe = (physical // bs).bit_length() - 1
        # LBPRZ: unmapped blocks always read as zeros, but we only *promise* it on 512-byte LUNs.
        # qemu 7.2 (Debian 12) asserts on 4096-byte LUNs that report LBPRZ=1: block/iscsi.c
        # iscsi_co_readv calls iscsi_co_block_status with BDRV_REQUEST_MAX_BYTES, which is not a
        # multiple of 4096, and that path is taken only when LBPRZ=1 ("Assertion
        # `QEMU_IS_ALIGNED(offset | bytes, iscsilun->block_size)' failed"). LBPRZ=0 withdraws the
        # promise only; reads of deallocated blocks still return zeros.
        self._lbprz = self._unmap and bs == 512
        self._max_transfer = MAX_TRANSFER_BYTES // bs
        self.limits = BlockLimits(
            max_compare_and_write=MAX_COMPARE_AND_WRITE_BLOCKS,
            optimal_granularity=max(1, 4096 // bs, 1 << self._lbppbe),
            max_transfer=self._max_transfer,
            optimal_transfer=OPTIMAL_TRANSFER_BYTES // bs,
            max_unmap_lba_count=MAX_UNMAP_LBA_COUNT,
            max_unmap_descriptors=MAX_UNMAP_DESCRIPTORS,
            optimal_unmap_granularity=1 << self._lbppbe,
            max_write_same=MAX_WRITE_SAME_BYTES // bs,
            max_atomic_transfer=MAX_ATOMIC_BYTES // bs,
        )
        self._vpd = VpdContext(
            vendor=identity.vendor,
            product=identity.product,
            revision=identity.revision,
            serial=identity.serial,
            naa=identity.naa,
            relative_port=tpgt,
            port_group=tpgt,
            supports_unmap=self._unmap,
            limits=self.limits,
            lbprz=self._lbprz,
        )
        self._sanitize_actions = frozenset(sanitize_actions)
        self._inline = store if isinstance(store, InlineIo) else None
        self._forwarding = store if isinstance(store, ForwardedWrites) else None
        self._table = command_table(supports_unmap=self._unmap, sanitize_actions=tuple(sanitize_actions))

    # ---- state the daemon sets -------------------------------------------------------------------

    @property
    def access_state(self) -> AccessState:
        return self._access_state

    @access_state.setter
    def access_state(self, state: AccessState) -> None:
        """An implicit ALUA transition: every I_T nexus gets ASYMMETRIC ACCESS STATE CHANGED
        (SPC-4 5.15.2.3)."""
        state = AccessState(state)
        if state != self._access_state:
            self._access_state = state
            self._queue_ua_all(ASYMMETRIC_ACCESS_STATE_CHANGED)

    @property
    def paused(self) -> bool:
        return self._paused

    @paused.setter
    def paused(self, value: bool) -> None:
        """The operator paused (or resumed) the volume: no UNIT ATTENTION (the LU's inventory and
        parameters did not change; the NOT READY answers say it)."""
        self._paused = bool(value)

    async def drained(self) -> None:
        """Return once no command is in its handler: after ``paused = True``, the commands that
        passed the checks before it (a WRITE awaiting its replicas) have completed, so no write
        lands after the pause is reported applied. New commands are refused meanwhile (the gate);
        the information commands a paused LU answers do not wait on the store."""
        while self._running:
            if self._idle is None:
                self._idle = asyncio.Event()
            await self._idle.wait()

    @property
    def write_cache_enabled(self) -> bool:
        return self._mode.wce

    @write_cache_enabled.setter
    def write_cache_enabled(self, value: bool) -> None:
        if bool(value) != self._mode.wce:
            self._mode = modes.ModeState(wce=bool(value), swp=self._mode.swp)
            self._queue_ua_all(MODE_PARAMETERS_CHANGED)

    def pending_unit_attentions(self, nexus: Nexus) -> tuple[Asc, ...]:
        return tuple(self._uas.get(nexus, ()))

    def reset(self, kind: ResetKind, nexus: Nexus | None) -> None:
        """LUN RESET / TARGET WARM RESET / TARGET COLD RESET: drop RESERVE(6) reservations (never
        persistent ones) and give every I_T nexus, the issuing one included, the reset UA."""
        self.reservations.reset()
        if kind is ResetKind.TARGET_COLD:
            self._mode = modes.DEFAULTS  # power on: current values become the defaults
        if nexus is not None:
            self._uas.setdefault(nexus, [])
        self._queue_ua_all(_UNIT_ATTENTION_RESETS[kind])

    def nexus_lost(self, nexus: Nexus) -> None:
        """Logout or connection loss of an I_T nexus: its RESERVE(6) goes, and the nexus is
        forgotten (a later login starts clean, without a UA)."""
        self.reservations.nexus_lost(nexus)
        self._uas.pop(nexus, None)

    def capacity_changed(self) -> None:
        """The volume grew: CAPACITY DATA HAS CHANGED for every known nexus (SBC-3 4.7)."""
        self._queue_ua_all(CAPACITY_DATA_CHANGED)

    # ---- execution ---------------------------------------------------------------------------------

    def _check_gates(self, gate: int, state: AccessState) -> None:
        """Refuse a command that its gate does not let through the LU's current state."""
        if self._sanitizing is not None and not gate & Gate.SANITIZE_OK:
            raise self._sanitize_in_progress()
        if self._sanitize_failed is not None and gate & Gate.MEDIUM:
            raise CheckCondition(SenseKey.MEDIUM_ERROR, SANITIZE_COMMAND_FAILED)
        if state > _LAST_SERVING:
            _check_access(gate, state)
        if self._paused and not gate & Gate.UNAVAILABLE_OK:
            raise CheckCondition(SenseKey.NOT_READY, LU_NOT_READY_BECOMING_READY)
        if gate & Gate.WRITES and self._mode.swp:
            raise CheckCondition(SenseKey.DATA_PROTECT, WRITE_PROTECTED)

    async def execute(self, req: ScsiRequest) -> ScsiResult:
        cdb = req.cdb
        if len(cdb) < 16:
            if not cdb:
                return INVALID_OPCODE
            cdb = bytes(cdb).ljust(16, b"\0")
        op = cdb[0]
        cmd = _COMMANDS.get((op << 8) | (cdb[1] & 0x1F) if op in SA_DISPATCHED else op)
        queue = self._uas.get(req.nexus)
        if queue is None:
            queue = self._uas[req.nexus] = []
        if queue and (cmd is None or not cmd.gate & Gate.UA_EXEMPT):
            return check_result(SenseKey.UNIT_ATTENTION, queue.pop(0))
        if cmd is None:
            self.unsupported.note(cdb, req.nexus.initiator_name)
            return INVALID_OPCODE
        try:
            if cdb[cmd.length - 1] & 0x04:  # NACA: ACA is not supported (SAM-5 5.9.1)
                raise invalid_cdb(cmd.length - 1, 2)
            if self.reservations.conflicts(req.nexus, cdb):
                return CONFLICT
            state = self._access_state
            if (
                self._sanitizing is not None
                or self._sanitize_failed is not None
                or state > _LAST_SERVING
                or self._mode.swp
                or self._paused
            ):  # the uncommon states; the common path stays free of Flag arithmetic
                self._check_gates(cmd.gate, state)
            self._running += 1
            try:
                result = await cmd.handler(self, req, cdb)
            finally:
                self._running -= 1
                if not self._running and self._idle is not None:
                    self._idle.set()
                    self._idle = None
            if self._access_state > _LAST_SERVING:
                # Fenced (or demoted) while the command ran: the store I/O may have happened, but
                # the command is answered as the new state answers it, never GOOD. This is what
                # keeps a deposed primary from acknowledging a write after its fence
                # (docs/architecture.md, "The fencing bound").
                _check_access(cmd.gate, self._access_state)
            return result
        except CheckCondition as e:
            return ScsiResult(ScsiStatus.CHECK_CONDITION, sense=e.fixed_sense())
        except ReservationConflict:
            return CONFLICT
        except StoreIOError as e:
            if e.errno == errno.ENOSPC:
                # A thin-provisioned LU out of space for good (until an administrator frees some):
                # SBC-3 4.7.3 resource exhaustion, DATA PROTECT / SPACE ALLOCATION FAILED WRITE
                # PROTECT. Linux turns it into ENOSPC for the writer; ESXi pauses the VM.
                return check_result(SenseKey.DATA_PROTECT, SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
            if e.op in (StoreOp.READ, StoreOp.MAPPED_EXTENT):
                return check_result(SenseKey.MEDIUM_ERROR, UNRECOVERED_READ_ERROR)
            return check_result(SenseKey.MEDIUM_ERROR, WRITE_ERROR)
        except StoreClosed:
            return check_result(SenseKey.NOT_READY, LU_NOT_READY_CAUSE_NOT_REPORTABLE)
        except StoreUnavailable:  # replicas did not acknowledge in time: retryable, never GOOD
            return check_result(SenseKey.NOT_READY, LU_NOT_ACCESSIBLE_TRANSITION)
        except StoreRangeError:
            return check_result(SenseKey.ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)


    # ---- the fast path (docs/architecture.md, "The fast path") -------------------------------------

    @property
    def inline_io(self) -> bool:
        """Whether the store can answer reads and writes inline (the iSCSI fast path uses the LU)."""
        return self._inline is not None

    def _plain(self, nexus: Nexus, lba: int, n: int, length: int) -> bool:
        """Whether READ/WRITE(10/16) of ``n`` blocks at ``lba`` moving ``length`` bytes from ``nexus``
        is the plain case that ``execute`` would answer GOOD with no other effect than the I/O: no
        UNIT ATTENTION queued, no reservation or registration at all, a serving access state, no
        SANITIZE, no software write protect, no exclusive range lock anywhere, the range and length
        valid. (The caller has checked the CDB's PROTECT, FUA and NACA bits.) Like ``execute``, the
        first command of a nexus registers it for later UNIT ATTENTIONs."""
        queue = self._uas.get(nexus)
        if queue is None:
            self._uas[nexus] = []
        elif queue:
            return False
        res = self.reservations
        return (
            0 < n <= self._max_transfer
            and n * self._bs == length
            and lba + n <= self.store.size // self._bs
            and self._access_state <= _LAST_SERVING
            and not self._paused
            and self._sanitizing is None
            and self._sanitize_failed is None
            and not self._mode.swp
            and self._ranges.uncontended
            and not res.any_registered
        )

    def read_now(self, nexus: Nexus, lba: int, n: int, length: int) -> bytes | None:
        """READ(10/16), plain case, answered inline: the data (GOOD), or None, having done nothing
        but register ``nexus``, when ``execute`` must answer it. No range lock is taken: nothing
        else runs while an inline read does, and no exclusive holder exists (``_plain``)."""
        inline = self._inline
        if inline is None or not self._plain(nexus, lba, n, length):
            return None
        return inline.read_now(lba * self._bs, length)

    def write_now(self, nexus: Nexus, lba: int, n: int, data: bytes | bytearray | memoryview) -> bool:
        """WRITE(10/16) without FUA, plain case, with the write cache on, done inline: True (GOOD),
        or False, having written nothing, when ``execute`` must answer it."""
        inline = self._inline
        if inline is None or not self._mode.wce or not self._plain(nexus, lba, n, len(data)):
            return False
        return inline.write_now(lba * self._bs, data)


    def write_fast(
        self, nexus: Nexus, lba: int, n: int, data: bytes | bytearray | memoryview
    ) -> int | None:
        """WRITE(10/16) without FUA, plain case, with the write cache on: 0 when done inline (GOOD
        now, as ``write_now``); a ticket (> 0) when the store wrote it locally and forwards it to
        replicas (``ForwardedWrites``): answer it once ``forwarded(ticket)`` is done, as
        ``forwarded_sense`` says; None, having done nothing, when ``execute`` must answer it."""
        if not self._mode.wce or not self._plain(nexus, lba, n, len(data)):
            return None
        offset = lba * self._bs
        inline = self._inline
        if inline is not None and inline.write_now(offset, data):
            return 0
        forwarding = self._forwarding
        return None if forwarding is None else forwarding.write_forward(offset, data)

    def forwarded(self, ticket: int) -> asyncio.Future[None]:
        """Done when the forwarded write ``ticket`` may be answered (``write_fast``)."""
        assert self._forwarding is not None
        return self._forwarding.written(ticket)

    def forwarded_sense(self, error: BaseException | None) -> bytes | None:
        """How ``execute`` ends a forwarded WRITE whose wait ended with ``error`` (None: it did not
        fail): None for GOOD, else the sense data of its CHECK CONDITION. The access state is
        checked after the I/O, as ``execute`` does (a write that returns after the fence is never
        GOOD: docs/architecture.md, "The fencing bound")."""
        if error is not None:
            if isinstance(error, StoreUnavailable):
                return CheckCondition(SenseKey.NOT_READY, LU_NOT_ACCESSIBLE_TRANSITION).fixed_sense()
            if isinstance(error, StoreClosed):
                return CheckCondition(SenseKey.NOT_READY, LU_NOT_READY_CAUSE_NOT_REPORTABLE).fixed_sense()
            if isinstance(error, StoreError):
                return CheckCondition(SenseKey.MEDIUM_ERROR, WRITE_ERROR).fixed_sense()
            raise error
        if self._access_state > _LAST_SERVING:
            try:
                _check_access(_WRITE_GATE, self._access_state)
            except CheckCondition as e:
                return e.fixed_sense()
        return None


def _bind(spec: CommandSpec) -> _Command:
    handler = getattr(LogicalUnit, spec.handler, None)
    if handler is None:
        raise TypeError(f"{spec.name}: LogicalUnit has no handler {spec.handler}")
    return _Command(handler, int(spec.gate), spec.length)


#: The dispatch view of ``commands.DISPATCH``: the bound handler, gate and CDB length per key.
_COMMANDS: dict[int, _Command] = {key: _bind(spec) for key, spec in DISPATCH.items()}
#: The gate of the fast path's writes (WRITE(10) and WRITE(16) share it).
_WRITE_GATE = _COMMANDS[Opcode.WRITE_10].gate
assert _COMMANDS[Opcode.WRITE_16].gate == _WRITE_GATE


def no_such_lun(req: ScsiRequest) -> ScsiResult:
    """Answer a command addressed to a LUN with no logical unit (SPC-4 6.6.2, 6.33, 6.39; SAM-5
    5.8.3): INQUIRY reports peripheral qualifier 011b, REPORT LUNS and REQUEST SENSE work, anything
    else is ILLEGAL REQUEST / LOGICAL UNIT NOT SUPPORTED."""
    cdb = bytes(req.cdb).ljust(16, b"\0")
    try:
        if cdb[0] == Opcode.INQUIRY:
            alloc = u16(cdb, 3)
            if cdb[1] & 0x01:
                if cdb[2] != 0x00:
                    raise invalid_cdb(2)
                data = bytes((0x7F, 0x00, 0x00, 0x01, 0x00))
            elif cdb[2]:
                raise invalid_cdb(2)
            else:
                data = no_lun_inquiry()
            return result_with(ScsiStatus.GOOD, truncate(data, alloc))
        if cdb[0] == Opcode.REPORT_LUNS:
            return report_luns(cdb)
        if cdb[0] == Opcode.REQUEST_SENSE:
            data = fixed_sense(SenseKey.ILLEGAL_REQUEST, LOGICAL_UNIT_NOT_SUPPORTED)
            return result_with(ScsiStatus.GOOD, truncate(data, cdb[4]))
    except CheckCondition as e:
        return ScsiResult(ScsiStatus.CHECK_CONDITION, sense=e.fixed_sense())
    return check_result(SenseKey.ILLEGAL_REQUEST, LOGICAL_UNIT_NOT_SUPPORTED)
