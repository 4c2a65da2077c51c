"""LogicalUnit: the SPC-4 / SBC-3 command set of one logical unit over a ``BlockStore``.

``execute`` runs the checks SAM-5 puts before a command (UNIT ATTENTION, reservation conflict, ALUA
access state, write protect), then the command's handler from a dispatch table keyed by opcode (and
service action). Handlers raise ``CheckCondition``; ``execute`` turns every SCSI-level error into a
``ScsiResult`` and never raises for one. A command during which the LU left the serving access
states (the node fenced it while the store I/O was in flight) is answered as the new state answers
new commands (NOT READY, 04/0A when fenced), never GOOD: the one check after the handler.

Write-cache truth: the store is write-back. FUA writes and SYNCHRONIZE CACHE await ``store.flush``;
with WCE=0 (MODE SELECT on the caching page) every write-type command flushes before GOOD.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import functools
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from frontend.constructors import positional_constructor
from frontend.scsi import mode as modes
from frontend.scsi.cdb import (
    BlockRange,
    check_range,
    invalid_cdb,
    invalid_param,
    lba_out_of_range,
    rw6,
    rw10,
    rw12,
    rw16,
    truncate,
    u16,
    u32,
    u64,
)
from frontend.scsi.inquiry import BlockLimits, VpdContext, no_lun_inquiry, standard_inquiry, vpd_page
from frontend.scsi.opcodes import (
    MaintenanceIn,
    Opcode,
    SanitizeAction,
    ServiceActionIn16,
    command_table,
    report_supported_operation_codes,
)
from frontend.scsi.rangelock import RangeLock
from frontend.scsi.reservations import ReservationConflict, Reservations
from frontend.scsi.sense import (
    ASYMMETRIC_ACCESS_STATE_CHANGED,
    BUS_DEVICE_RESET,
    CAPACITY_DATA_CHANGED,
    INTERNAL_TARGET_FAILURE,
    INVALID_COMMAND_OPERATION_CODE,
    LBA_OUT_OF_RANGE,
    LOGICAL_UNIT_NOT_SUPPORTED,
    LU_NOT_ACCESSIBLE_STANDBY,
    LU_NOT_ACCESSIBLE_TRANSITION,
    LU_NOT_ACCESSIBLE_UNAVAILABLE,
    LU_NOT_READY_CAUSE_NOT_REPORTABLE,
    LU_NOT_READY_SANITIZE_IN_PROGRESS,
    MISCOMPARE_DURING_VERIFY,
    MODE_PARAMETERS_CHANGED,
    NO_ADDITIONAL_SENSE,
    PARAMETER_LIST_LENGTH_ERROR,
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
from store.blockstore import (
    BlockStore,
    StoreClosed,
    StoreError,
    StoreIOError,
    StoreOp,
    StoreRangeError,
    StoreUnavailable,
)


class AccessState(enum.IntEnum):
    """Asymmetric access states (SPC-4 6.37, table 279)."""

    ACTIVE_OPTIMIZED = 0x0
    ACTIVE_NON_OPTIMIZED = 0x1
    STANDBY = 0x2
    UNAVAILABLE = 0x3
    TRANSITIONING = 0xF


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


# ---- limits (SBC-3 6.5.3) -----------------------------------------------------------------------

MAX_TRANSFER_BYTES = 32 * 1024 * 1024
OPTIMAL_TRANSFER_BYTES = 1024 * 1024
MAX_ATOMIC_BYTES = 1024 * 1024
MAX_COMPARE_AND_WRITE_BLOCKS = 255
MAX_UNMAP_DESCRIPTORS = 2048
MAX_UNMAP_LBA_COUNT = 0xFFFFFFFF  # no limit
MAX_WRITE_SAME_BYTES = 1024 * 1024 * 1024
#: Size of the buffer WRITE SAME repeats its block into.
WRITE_SAME_CHUNK = 1024 * 1024
#: Bytes a sanitize operation writes (OVERWRITE) per store call; it awaits each one, so the event
#: loop keeps serving other volumes while a sanitize runs.
SANITIZE_WRITE_CHUNK = 1024 * 1024
#: Bytes a sanitize operation deallocates (BLOCK/CRYPTO ERASE) per store call.
SANITIZE_UNMAP_CHUNK = 1024 * 1024 * 1024
#: End of every LBA range: a lock over [0, ALL_BLOCKS) covers the whole logical unit.
ALL_BLOCKS = 1 << 64
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
#: Unit attentions kept per I_T nexus; older ones are dropped past this.
MAX_PENDING_UAS = 16

_UNIT_ATTENTION_RESETS = {
    ResetKind.LUN: BUS_DEVICE_RESET,  # SAM-5 6.3.3: 29h/03h
    ResetKind.TARGET_WARM: POWER_ON_RESET,  # 29h/00h
    ResetKind.TARGET_COLD: POWER_ON_OCCURRED,  # RFC 7143 11.5.1: cold reset is a power cycle, 29h/01h
}

#: The last access state in which the LU serves I/O (an int, compared on every command).
_LAST_SERVING = int(AccessState.ACTIVE_NON_OPTIMIZED)

_ALUA_NOT_READY = {
    AccessState.STANDBY: LU_NOT_ACCESSIBLE_STANDBY,
    AccessState.UNAVAILABLE: LU_NOT_ACCESSIBLE_UNAVAILABLE,
    AccessState.TRANSITIONING: LU_NOT_ACCESSIBLE_TRANSITION,
}


class Gate(enum.IntFlag):
    """How a command passes the checks in front of it."""

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


_G_INFO = Gate.UA_EXEMPT | Gate.STANDBY_OK | Gate.UNAVAILABLE_OK | Gate.SANITIZE_OK
_G_ANY_STATE = Gate.STANDBY_OK | Gate.UNAVAILABLE_OK

Handler = Callable[["LogicalUnit", ScsiRequest, bytes], Awaitable[ScsiResult]]


def _check_access(gate: int, state: AccessState) -> None:
    """Refuse a command that the non-serving access state ``state`` does not let through: NOT
    READY, LOGICAL UNIT NOT ACCESSIBLE with the state's ASCQ (SPC-4 5.15.2.4.4-6: 04/0B standby,
    04/0C unavailable, 04/0A transitioning; retryable, the initiator tries another path)."""
    allowed = Gate.STANDBY_OK if state == AccessState.STANDBY else Gate.UNAVAILABLE_OK
    if not gate & allowed:
        raise CheckCondition(SenseKey.NOT_READY, _ALUA_NOT_READY[state])


@dataclass(frozen=True, slots=True)
class _Command:
    handler: Handler
    gate: int
    length: int  # CDB length; its last byte is CONTROL


_make_result = positional_constructor(ScsiResult)


def _result(
    status: ScsiStatus, data: bytes | bytearray | memoryview = b"", transfer_length: int | None = None
) -> ScsiResult:
    return ScsiResult(status, data, None, transfer_length)


def _check_result(key: SenseKey, code: Asc) -> ScsiResult:
    return ScsiResult(ScsiStatus.CHECK_CONDITION, sense=fixed_sense(key, code))


_GOOD = ScsiResult(ScsiStatus.GOOD)
_CONFLICT = ScsiResult(ScsiStatus.RESERVATION_CONFLICT)
_INVALID_OPCODE = _check_result(SenseKey.ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE)


def _first_difference(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> int:
    """Offset of the first byte where ``a`` and ``b`` differ (they have the same length), or -1."""
    if a == b:
        return -1
    lo, hi = 0, len(a)
    ma, mb = memoryview(a), memoryview(b)
    while hi - lo > 64:  # narrow down by halves, comparing in C
        mid = (lo + hi) // 2
        if ma[lo:mid] != mb[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if ma[i] != mb[i]:
            return i
    return -1


@dataclass(slots=True)
class _SanitizeRun:
    """One sanitize operation (SBC-3 4.11): what it does, how far it got, how it ended."""

    action: SanitizeAction
    ause: bool  # unrestricted completion mode: EXIT FAILURE MODE may end a failure
    total: int  # units of work (logical blocks written or deallocated)
    done: int = 0
    failed: bool = False
    task: asyncio.Task[None] | None = None

    @property
    def progress(self) -> int:
        """PROGRESS INDICATION (SPC-4 4.5.2.4.4): the fraction done, in 65536ths."""
        return min(0xFFFF, self.done * 0x10000 // max(1, self.total))


def _miscompare(offset: int) -> CheckCondition:
    """MISCOMPARE / MISCOMPARE DURING VERIFY OPERATION, INFORMATION = offset of the first differing
    byte in the Data-Out buffer (SBC-3 5.3, 5.29)."""
    return CheckCondition(SenseKey.MISCOMPARE, MISCOMPARE_DURING_VERIFY, information=offset)


class LogicalUnit:
    """One SCSI logical unit (LUN 0 of a target) backed by a ``BlockStore``."""

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
    ) -> None:
        self.store = store
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
        self._sanitizing: _SanitizeRun | None = None
        self._sanitize_failed: _SanitizeRun | None = None
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
    def write_cache_enabled(self) -> bool:
        return self._mode.wce

    @write_cache_enabled.setter
    def write_cache_enabled(self, value: bool) -> None:
        if bool(value) != self._mode.wce:
            self._mode = modes.ModeState(wce=bool(value), swp=self._mode.swp)
            self._queue_ua_all(MODE_PARAMETERS_CHANGED)

    @property
    def capacity(self) -> int:
        """Number of logical blocks, read from the store each time (it can grow)."""
        return self.store.size // self._bs

    # ---- unit attentions (SAM-5 5.14, SPC-4 4.5.5) ----------------------------------------------

    def _queue_ua(self, nexus: Nexus, asc: Asc) -> None:
        queue = self._uas.setdefault(nexus, [])
        if asc.asc == 0x29:
            queue.clear()  # a reset supersedes what was pending (SAM-5 6.3.3)
        elif asc in queue:
            return
        queue.append(asc)
        del queue[:-MAX_PENDING_UAS]

    def _queue_ua_all(self, asc: Asc, *, except_nexus: Nexus | None = None) -> None:
        for nexus in list(self._uas):
            if nexus != except_nexus:
                self._queue_ua(nexus, asc)

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
        if gate & Gate.WRITES and self._mode.swp:
            raise CheckCondition(SenseKey.DATA_PROTECT, WRITE_PROTECTED)

    async def execute(self, req: ScsiRequest) -> ScsiResult:
        cdb = req.cdb
        if len(cdb) < 16:
            if not cdb:
                return _INVALID_OPCODE
            cdb = bytes(cdb).ljust(16, b"\0")
        op = cdb[0]
        cmd = _COMMANDS.get((op << 8) | (cdb[1] & 0x1F) if op in _SA_OPCODES else op)
        queue = self._uas.get(req.nexus)
        if queue is None:
            queue = self._uas[req.nexus] = []
        if queue and (cmd is None or not cmd.gate & Gate.UA_EXEMPT):
            return _check_result(SenseKey.UNIT_ATTENTION, queue.pop(0))
        if cmd is None:
            return _INVALID_OPCODE
        try:
            if cdb[cmd.length - 1] & 0x04:  # NACA: ACA is not supported (SAM-5 5.9.1)
                raise invalid_cdb(cmd.length - 1, 2)
            if self.reservations.conflicts(req.nexus, cdb):
                return _CONFLICT
            state = self._access_state
            if (
                self._sanitizing is not None
                or self._sanitize_failed is not None
                or state > _LAST_SERVING
                or self._mode.swp
            ):  # the uncommon states; the common path stays free of Flag arithmetic
                self._check_gates(cmd.gate, state)
            result = await cmd.handler(self, req, cdb)
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
            return _CONFLICT
        except StoreIOError as e:
            if e.errno == errno.ENOSPC:
                # A thin-provisioned LU out of space for good (until an administrator frees some):
                # SBC-3 4.7.3 resource exhaustion, DATA PROTECT / SPACE ALLOCATION FAILED WRITE
                # PROTECT. Linux turns it into ENOSPC for the writer; ESXi pauses the VM.
                return _check_result(SenseKey.DATA_PROTECT, SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
            if e.op in (StoreOp.READ, StoreOp.MAPPED_EXTENT):
                return _check_result(SenseKey.MEDIUM_ERROR, UNRECOVERED_READ_ERROR)
            return _check_result(SenseKey.MEDIUM_ERROR, WRITE_ERROR)
        except StoreClosed:
            return _check_result(SenseKey.NOT_READY, LU_NOT_READY_CAUSE_NOT_REPORTABLE)
        except StoreUnavailable:  # replicas did not acknowledge in time: retryable, never GOOD
            return _check_result(SenseKey.NOT_READY, LU_NOT_ACCESSIBLE_TRANSITION)
        except StoreRangeError:
            return _check_result(SenseKey.ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)

    # ---- helpers -----------------------------------------------------------------------------------

    def _blocks(self, r: BlockRange, length_byte: int, *, max_blocks: int | None = None) -> None:
        """PROTECT field, LBA range and transfer length checks shared by the block commands."""
        if r.flags & 0xE0:  # RDPROTECT/WRPROTECT/VRPROTECT/ORPROTECT: no protection information
            raise invalid_cdb(1, 7)
        check_range(r.lba, r.nblocks, self.capacity)
        if r.nblocks > (self._max_transfer if max_blocks is None else max_blocks):
            raise invalid_cdb(length_byte)

    async def _flush_if_needed(self, fua: bool) -> None:
        if fua or not self._mode.wce:
            await self.store.flush()

    def _payload(self, req: ScsiRequest, need: int) -> memoryview:
        """The Data-Out to write: the CDB's amount, or the whole blocks actually received when the
        initiator sent less (libiscsi test_write10_residuals: write only what arrived)."""
        data = memoryview(req.data_out).cast("B")
        if len(data) >= need:
            return data[:need] if len(data) > need else data
        return data[: len(data) - len(data) % self._bs]

    # ---- READ / WRITE (SBC-3 5.15-5.18, 5.40-5.43) -------------------------------------------------

    async def _hold(self, lba: int, nblocks: int) -> int:
        """A shared hold on ``nblocks`` blocks from ``lba`` (release with ``_ranges.release_shared``):
        O(1) and without awaiting unless some CAW/ORWRITE/WRITE ATOMIC/SANITIZE claims blocks."""
        ranges = self._ranges
        if ranges.uncontended:
            return ranges.add_shared(lba, lba + nblocks)
        return await ranges.acquire_shared(lba, lba + nblocks)

    async def _read_blocks(self, lba: int, nblocks: int) -> bytes:
        """Read whole blocks under a shared hold (READ(10)/(16) inline the same steps)."""
        ranges = self._ranges
        if ranges.uncontended:
            token = ranges.add_shared(lba, lba + nblocks)
        else:
            token = await ranges.acquire_shared(lba, lba + nblocks)
        try:
            return await self.store.read(lba * self._bs, nblocks * self._bs)
        finally:
            ranges.release_shared(token)

    async def _read(self, r: BlockRange, length_byte: int) -> ScsiResult:
        self._blocks(r, length_byte)
        need = r.nblocks * self._bs
        if not need:
            return _GOOD
        data = await self._read_blocks(r.lba, r.nblocks)
        return _make_result(ScsiStatus.GOOD, data, None, need)

    async def _write(
        self, req: ScsiRequest, r: BlockRange, length_byte: int, *, verify: bool = False
    ) -> ScsiResult:
        self._blocks(r, length_byte)
        need = r.nblocks * self._bs
        payload = self._payload(req, need)
        if len(payload):
            ranges = self._ranges
            lba, end = r.lba, r.lba + len(payload) // self._bs
            if ranges.uncontended:
                token = ranges.add_shared(lba, end)
            else:
                token = await ranges.acquire_shared(lba, end)
            try:
                await self.store.write(lba * self._bs, payload)
            finally:
                ranges.release_shared(token)
            # WRITE AND VERIFY reads back what is on the medium: make it durable first.
            await self._flush_if_needed(verify or bool(r.flags & 0x08))
        return ScsiResult(ScsiStatus.GOOD, b"", None, need)

    async def _read_6(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._read(rw6(cdb), 4)

    async def _read_10(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        lba, n = struct.unpack_from(">IxH", cdb, 2)
        return await self._read_common(cdb, lba, n, rw10, 7)

    async def _read_12(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._read(rw12(cdb), 6)

    async def _read_16(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        lba, n = struct.unpack_from(">QI", cdb, 2)
        return await self._read_common(cdb, lba, n, rw16, 10)

    async def _read_common(
        self, cdb: bytes, lba: int, n: int, decode: Callable[[bytes], BlockRange], length_byte: int
    ) -> ScsiResult:
        """READ(10)/(16). Hot path: an in-range, unprotected read decoded inline; anything else
        (protection bits, a range or length error) goes through ``_read``."""
        bs = self._bs
        if cdb[1] & 0xE0 or lba + n > self.store.size // bs or n > self._max_transfer:
            return await self._read(decode(cdb), length_byte)
        if not n:
            return _GOOD
        ranges = self._ranges
        if ranges.uncontended:  # no CAW/ORWRITE/WRITE ATOMIC/SANITIZE anywhere
            token = ranges.add_shared(lba, lba + n)
        else:
            token = await ranges.acquire_shared(lba, lba + n)
        try:
            data = await self.store.read(lba * bs, n * bs)
        finally:
            ranges.release_shared(token)
        return _make_result(ScsiStatus.GOOD, data, None, n * bs)

    async def _write_6(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._write(req, rw6(cdb), 4)

    async def _write_10(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        lba, n = struct.unpack_from(">IxH", cdb, 2)
        return await self._write_common(req, cdb, lba, n, rw10, 7)

    async def _write_12(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._write(req, rw12(cdb), 6)

    async def _write_16(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        lba, n = struct.unpack_from(">QI", cdb, 2)
        return await self._write_common(req, cdb, lba, n, rw16, 10)

    async def _write_common(
        self,
        req: ScsiRequest,
        cdb: bytes,
        lba: int,
        n: int,
        decode: Callable[[bytes], BlockRange],
        length_byte: int,
    ) -> ScsiResult:
        """WRITE(10)/(16). Hot path: a full, in-range, unprotected write decoded inline; anything
        else (protection bits, a range or length error, short Data-Out) goes through ``_write``."""
        bs = self._bs
        need = n * bs
        data = req.data_out
        if (
            cdb[1] & 0xE0
            or not n
            or lba + n > self.store.size // bs
            or n > self._max_transfer
            or len(data) != need
        ):
            return await self._write(req, decode(cdb), length_byte)
        ranges = self._ranges
        if ranges.uncontended:
            token = ranges.add_shared(lba, lba + n)
        else:
            token = await ranges.acquire_shared(lba, lba + n)
        try:
            await self.store.write(lba * bs, data)
        finally:
            ranges.release_shared(token)
        if cdb[1] & 0x08 or not self._mode.wce:  # FUA, or the write cache is off: durable first
            await self.store.flush()
        return _make_result(ScsiStatus.GOOD, b"", None, need)

    async def _write_verify_10(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._write(req, rw10(cdb), 7, verify=True)

    async def _write_verify_12(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._write(req, rw12(cdb), 6, verify=True)

    async def _write_verify_16(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._write(req, rw16(cdb), 10, verify=True)

    # ---- VERIFY (SBC-3 5.29-5.31) ---------------------------------------------------------------

    async def _verify(self, req: ScsiRequest, r: BlockRange, length_byte: int) -> ScsiResult:
        self._blocks(r, length_byte)
        bytchk = (r.flags >> 1) & 0x3
        bs = self._bs
        if bytchk == 0b10:
            raise invalid_cdb(1, 2)
        if bytchk == 0 or not r.nblocks:
            return _GOOD  # medium verification only: nothing can be wrong with our medium
        data = memoryview(req.data_out).cast("B")
        if bytchk == 0b01:
            need = r.nblocks * bs
            expected = data[: min(need, len(data) - len(data) % bs)]
        else:  # 11b: one block of Data-Out compared with every block
            need = bs
            if len(data) < bs:
                return ScsiResult(ScsiStatus.GOOD, b"", None, need)
            expected = memoryview(bytes(data[:bs]) * r.nblocks)
        if len(expected):
            medium = await self._read_blocks(r.lba, len(expected) // bs)
            at = _first_difference(expected, medium)
            if at >= 0:
                raise _miscompare(at)
        return ScsiResult(ScsiStatus.GOOD, b"", None, need)

    async def _verify_10(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._verify(req, rw10(cdb), 7)

    async def _verify_12(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._verify(req, rw12(cdb), 6)

    async def _verify_16(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._verify(req, rw16(cdb), 10)

    # ---- COMPARE AND WRITE, ORWRITE, WRITE ATOMIC (SBC-3 5.3, 5.8; SBC-4 5.48) -------------------

    async def _compare_and_write(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        r = BlockRange(u64(cdb, 2), cdb[13], cdb[1])
        self._blocks(r, 13, max_blocks=MAX_COMPARE_AND_WRITE_BLOCKS)
        need = r.nblocks * self._bs
        data = memoryview(req.data_out).cast("B")
        if len(data) != 2 * need:
            raise invalid_cdb(13)  # Data-Out must hold the verify and the write data exactly
        if not need:
            return _GOOD
        offset = r.lba * self._bs
        # SBC-3 5.3: read, compare and write are one atomic operation for every other command.
        token = await self._ranges.acquire_exclusive(r.lba, r.lba + r.nblocks)
        try:
            medium = await self.store.read(offset, need)
            at = _first_difference(data[:need], medium)
            if at >= 0:
                raise _miscompare(at)
            await self.store.write(offset, data[need:])
        finally:
            self._ranges.release_exclusive(token)
        await self._flush_if_needed(bool(r.flags & 0x08))
        return ScsiResult(ScsiStatus.GOOD, b"", None, 2 * need)

    async def _orwrite_16(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        r = rw16(cdb)
        self._blocks(r, 10)
        need = r.nblocks * self._bs
        payload = self._payload(req, need)
        if len(payload):
            offset = r.lba * self._bs
            token = await self._ranges.acquire_exclusive(r.lba, r.lba + len(payload) // self._bs)
            try:
                medium = await self.store.read(offset, len(payload))
                merged = int.from_bytes(medium, "big") | int.from_bytes(payload, "big")
                await self.store.write(offset, merged.to_bytes(len(payload), "big"))
            finally:
                self._ranges.release_exclusive(token)
            await self._flush_if_needed(bool(r.flags & 0x08))
        return ScsiResult(ScsiStatus.GOOD, b"", None, need)

    async def _write_atomic_16(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        r = BlockRange(u64(cdb, 2), u16(cdb, 12), cdb[1])
        if u16(cdb, 10):  # ATOMIC BOUNDARY: we advertise no boundary support
            raise invalid_cdb(10)
        self._blocks(r, 12, max_blocks=self.limits.max_atomic_transfer)
        need = r.nblocks * self._bs
        data = memoryview(req.data_out).cast("B")
        if len(data) < need:
            raise invalid_cdb(12)  # an atomic write is all or nothing
        if need:
            token = await self._ranges.acquire_exclusive(r.lba, r.lba + r.nblocks)
            try:
                await self.store.write(r.lba * self._bs, data[:need])
            finally:
                self._ranges.release_exclusive(token)
            await self._flush_if_needed(bool(r.flags & 0x08))
        return ScsiResult(ScsiStatus.GOOD, b"", None, need)

    # ---- WRITE SAME, UNMAP, GET LBA STATUS, SANITIZE (SBC-3 5.44-5.46, 5.28, 5.6, 5.30) ----------

    async def _write_same(
        self, req: ScsiRequest, lba: int, n: int, flags: int, length_byte: int
    ) -> ScsiResult:
        ndob = bool(flags & 0x01) and length_byte == 10
        unmap = bool(flags & 0x08)
        anchor = bool(flags & 0x10)
        if flags & 0xE0:
            raise invalid_cdb(1, 7)
        if anchor:
            raise invalid_cdb(1, 4)  # ANC_SUP=0 (and ANCHOR without UNMAP is invalid anyway)
        if unmap and not self._unmap:
            raise invalid_cdb(1, 3)
        capacity = self.capacity
        if lba > capacity:
            raise lba_out_of_range()
        if n == 0:  # WSNZ=0: up to the last logical block
            n = capacity - lba
        check_range(lba, n, capacity)
        if n > self.limits.max_write_same:
            raise invalid_cdb(length_byte)
        bs = self._bs
        data = memoryview(req.data_out).cast("B")
        if ndob:
            block = bytes(bs)
        elif len(data) != bs:
            raise invalid_cdb(length_byte)  # Data-Out must be exactly one logical block
        else:
            block = bytes(data)
        if n:
            offset, nbytes = lba * bs, n * bs
            token = await self._hold(lba, n)
            try:
                if unmap:
                    # SBC-3 4.7.3.4: UNMAP=1 asks for deallocation; the blocks then read back as
                    # zeros whatever the Data-Out held (as libiscsi's WriteSame*.UnmapUntilEnd and
                    # Linux expect: Linux sends its discard as WRITE SAME with UNMAP set).
                    await self.store.unmap(offset, nbytes)
                else:
                    chunk = block * max(1, min(n, WRITE_SAME_CHUNK // bs))
                    pos, end = offset, offset + nbytes
                    while pos < end:
                        take = min(len(chunk), end - pos)
                        await self.store.write(pos, chunk if take == len(chunk) else memoryview(chunk)[:take])
                        pos += take
            finally:
                self._ranges.release_shared(token)
            await self._flush_if_needed(False)
        return ScsiResult(ScsiStatus.GOOD, b"", None, 0 if ndob else bs)

    async def _write_same_10(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._write_same(req, u32(cdb, 2), u16(cdb, 7), cdb[1] & 0xFE, 7)

    async def _write_same_16(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._write_same(req, u64(cdb, 2), u32(cdb, 10), cdb[1], 10)

    async def _unmap_cmd(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        if not self._unmap:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE)
        if cdb[1] & 0x01:
            raise invalid_cdb(1, 0)  # ANCHOR: ANC_SUP=0
        plen = u16(cdb, 7)
        if plen == 0:
            return _GOOD
        if plen < 8:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        params = bytes(memoryview(req.data_out).cast("B")[:plen])
        if len(params) < 8:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        desc_len = min(u16(params, 2), len(params) - 8)
        count = desc_len // 16
        if count > MAX_UNMAP_DESCRIPTORS:
            raise invalid_param(2)
        capacity = self.capacity
        extents: list[tuple[int, int]] = []
        total = 0
        for i in range(count):
            lba, n = struct.unpack_from(">QI", params, 8 + 16 * i)
            check_range(lba, n, capacity)
            total += n
            if n:
                extents.append((lba, n))
        if total > MAX_UNMAP_LBA_COUNT:
            raise invalid_param(8)
        bs = self._bs
        if extents:
            first = min(lba for lba, _ in extents)
            token = await self._hold(first, max(lba + n for lba, n in extents) - first)
            try:
                for lba, n in extents:
                    await self.store.unmap(lba * bs, n * bs)
            finally:
                self._ranges.release_shared(token)
            await self._flush_if_needed(False)
        return ScsiResult(ScsiStatus.GOOD, b"", None, plen)

    async def _get_lba_status(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        lba = u64(cdb, 2)
        alloc = u32(cdb, 10)
        capacity = self.capacity
        if lba >= capacity:
            raise lba_out_of_range()
        bs = self._bs
        max_desc = max(1, min(256, (alloc - 8) // 16))
        descs: list[list[int]] = []  # [lba, count, provisioning status]
        block = lba
        calls = 0
        while block < capacity and len(descs) < max_desc and calls < 4 * max_desc + 64:
            mapped, nbytes = await self.store.mapped_extent(block * bs)
            calls += 1
            count = min(max(1, nbytes // bs), capacity - block)
            status = 0 if mapped else 1  # 0h mapped, 1h deallocated (SBC-3 table 57)
            if descs and descs[-1][2] == status and descs[-1][1] + count <= 0xFFFFFFFF:
                descs[-1][1] += count
            else:
                while count > 0xFFFFFFFF and len(descs) < max_desc:
                    descs.append([block, 0xFFFFFFFF, status])
                    block += 0xFFFFFFFF
                    count -= 0xFFFFFFFF
                if len(descs) >= max_desc:
                    break
                descs.append([block, count, status])
            block += count
        body = b"".join(struct.pack(">QIB3x", d[0], d[1], d[2]) for d in descs)
        data = struct.pack(">I4x", len(body) + 4) + body
        return _result(ScsiStatus.GOOD, truncate(data, alloc))

    # ---- SANITIZE (SBC-3 4.11, 5.30) ---------------------------------------------------------------

    @property
    def sanitize_in_progress(self) -> bool:
        return self._sanitizing is not None

    async def sanitize_done(self) -> None:
        """Wait until no sanitize operation is running (tests; an orderly shutdown)."""
        run = self._sanitizing
        if run is not None and run.task is not None:
            await asyncio.shield(run.task)

    def _sanitize_in_progress(self) -> CheckCondition:
        run = self._sanitizing
        return CheckCondition(
            SenseKey.NOT_READY,
            LU_NOT_READY_SANITIZE_IN_PROGRESS,
            progress=run.progress if run is not None else None,
        )

    async def _sanitize(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        """SANITIZE (SBC-3 5.30). The operation runs as a task of the logical unit, not of the
        command: an aborted command, a LUN or target reset, or the loss of the I_T nexus leaves it
        running (SBC-3 4.11.2); meanwhile every command but INQUIRY, REPORT LUNS and REQUEST SENSE
        gets NOT READY / SANITIZE IN PROGRESS with the progress in the sense data.

        Service actions: OVERWRITE writes the initialization pattern over every logical block,
        OVERWRITE COUNT times (alternating with its inverse when INVERT=1, the last pass writing the
        pattern itself). BLOCK ERASE deallocates every logical block (reads then return zeros).
        CRYPTO ERASE: Sparrow stores no encryption key, so there is no key to change; CRYPTO ERASE
        is carried out like BLOCK ERASE, by deallocating every block, which makes every block read
        as zeros and its old data unrecoverable through the logical unit. EXIT FAILURE MODE ends the
        failure mode of a failed sanitize that was started with AUSE=1.
        """
        if not self._unmap:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE)
        immed = bool(cdb[1] & 0x80)
        ause = bool(cdb[1] & 0x20)
        if cdb[1] & 0x40:
            raise invalid_cdb(1, 6)  # ZNR: not a zoned block device
        for i in range(2, 7):
            if cdb[i]:
                raise invalid_cdb(i)
        action = cdb[1] & 0x1F
        if action not in self._sanitize_actions:
            raise invalid_cdb(1, 4)
        plen = u16(cdb, 7)
        failed = self._sanitize_failed
        if action == SanitizeAction.EXIT_FAILURE_MODE:
            if plen:
                raise invalid_cdb(7)  # EXIT FAILURE MODE takes no parameter list
            if failed is not None:
                if not failed.ause:
                    # restricted completion mode: only a successful sanitize ends it (SBC-3 4.11.3)
                    raise invalid_cdb(1, 4)
                self._sanitize_failed = None
            return _GOOD
        if failed is not None and not failed.ause and ause:
            raise invalid_cdb(1, 5)  # restricted mode may not be left for unrestricted (4.11.3)
        capacity = self.capacity
        if action == SanitizeAction.OVERWRITE:
            pattern, passes, invert = self._overwrite_parameters(req, plen)
            run = _SanitizeRun(SanitizeAction(action), ause, total=capacity * passes)
            work = functools.partial(self._overwrite, run, capacity, pattern, passes, invert)
        else:
            if plen:
                raise invalid_cdb(7)  # BLOCK and CRYPTO ERASE take no parameter list
            run = _SanitizeRun(SanitizeAction(action), ause, total=capacity)
            work = functools.partial(self._deallocate_all, run, capacity)
        # From here on the logical unit is sanitizing: later commands see it at once.
        self._sanitizing = run
        run.task = asyncio.get_running_loop().create_task(self._run_sanitize(run, work))
        if not immed:
            # shield: if this command is aborted, the operation goes on (SBC-3 4.11.2)
            await asyncio.shield(run.task)
            if run.failed:
                raise CheckCondition(SenseKey.MEDIUM_ERROR, SANITIZE_COMMAND_FAILED)
        return ScsiResult(ScsiStatus.GOOD, b"", None, plen)

    def _overwrite_parameters(self, req: ScsiRequest, plen: int) -> tuple[bytes, int, bool]:
        """The OVERWRITE parameter list (SBC-3 5.30.2.2, table 78): (pattern, passes, invert)."""
        bs = self._bs
        if plen < 5 or plen > bs + 4:
            raise invalid_cdb(7)
        params = memoryview(req.data_out).cast("B")[:plen]
        if len(params) < plen:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        invert = bool(params[0] & 0x80)
        if params[0] & 0x60:
            raise invalid_param(0, 6)  # TEST: no test modes
        passes = params[0] & 0x1F
        if not passes:
            raise invalid_param(0, 4)  # OVERWRITE COUNT 0
        length = u16(params, 2)
        if not length or length > bs or length != plen - 4:
            raise invalid_param(2)  # INITIALIZATION PATTERN LENGTH
        return bytes(params[4 : 4 + length]), passes, invert

    async def _overwrite(
        self, run: _SanitizeRun, capacity: int, pattern: bytes, passes: int, invert: bool
    ) -> None:
        bs = self._bs
        block = (pattern * (bs // len(pattern) + 1))[:bs]
        inverse = bytes(b ^ 0xFF for b in block)
        per_chunk = max(1, SANITIZE_WRITE_CHUNK // bs)
        for n in range(passes):
            # INVERT: passes alternate, and the last one writes the pattern itself.
            data = (inverse if invert and (passes - n) % 2 == 0 else block) * per_chunk
            lba = 0
            while lba < capacity:
                count = min(per_chunk, capacity - lba)
                chunk = data if count == per_chunk else memoryview(data)[: count * bs]
                await self.store.write(lba * bs, chunk)
                lba += count
                run.done += count

    async def _deallocate_all(self, run: _SanitizeRun, capacity: int) -> None:
        bs = self._bs
        per_chunk = max(1, SANITIZE_UNMAP_CHUNK // bs)
        lba = 0
        while lba < capacity:
            count = min(per_chunk, capacity - lba)
            await self.store.unmap(lba * bs, count * bs)
            lba += count
            run.done += count

    async def _run_sanitize(self, run: _SanitizeRun, work: Callable[[], Awaitable[None]]) -> None:
        """The operation itself: waits for the commands already running to finish (an exclusive
        hold on every block), does the work, makes it durable. A failure puts the logical unit in
        failure mode (SBC-3 4.11.3): medium access commands then get SANITIZE COMMAND FAILED."""
        try:
            token = await self._ranges.acquire_exclusive(0, ALL_BLOCKS)
            try:
                await work()
                await self.store.flush()
            finally:
                self._ranges.release_exclusive(token)
        except (StoreError, OSError):
            run.failed = True
        finally:
            self._sanitizing = None
            self._sanitize_failed = run if run.failed else None

    # ---- cache (SBC-3 5.9, 5.10, 5.22, 5.23) ------------------------------------------------------

    async def _sync_cache(self, r: BlockRange) -> ScsiResult:
        check_range(r.lba, r.nblocks, self.capacity)
        await self.store.flush()
        return _GOOD

    async def _sync_cache_10(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._sync_cache(rw10(cdb))

    async def _sync_cache_16(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._sync_cache(rw16(cdb))

    async def _prefetch(self, r: BlockRange) -> ScsiResult:
        """PRE-FETCH: we keep no cache of our own to load the blocks into, so per SBC-3 5.10 (the
        cache cannot hold the blocks) the command completes with GOOD, not CONDITION MET."""
        check_range(r.lba, r.nblocks, self.capacity)
        return _GOOD

    async def _prefetch_10(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._prefetch(rw10(cdb))

    async def _prefetch_16(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return await self._prefetch(rw16(cdb))

    # ---- capacity, defects, medium (SBC-3 5.11, 5.12, 5.19, 5.20, 5.25) -------------------------

    async def _read_capacity_10(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        if not cdb[8] & 0x01 and u32(cdb, 2):
            raise invalid_cdb(2)
        last = self.capacity - 1
        return _result(ScsiStatus.GOOD, struct.pack(">II", min(last, 0xFFFFFFFF), self._bs))

    async def _read_capacity_16(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        if not cdb[14] & 0x01 and u64(cdb, 2):
            raise invalid_cdb(2)
        last = self.capacity - 1
        lbp = (0x80 if self._unmap else 0x00) | (0x40 if self._lbprz else 0x00)  # LBPME, LBPRZ
        data = struct.pack(">QIBBBB", last, self._bs, 0, self._lbppbe, lbp, 0).ljust(32, b"\0")
        return _result(ScsiStatus.GOOD, truncate(data, u32(cdb, 10)))

    async def _read_defect_data_10(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        data = struct.pack(">BBH", 0, cdb[2] & 0x1F, 0)  # empty PLIST/GLIST in the requested format
        return _result(ScsiStatus.GOOD, truncate(data, u16(cdb, 7)))

    async def _read_defect_data_12(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        data = struct.pack(">BBHI", 0, cdb[1] & 0x1F, 0, 0)
        return _result(ScsiStatus.GOOD, truncate(data, u32(cdb, 6)))

    async def _start_stop_unit(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        condition = cdb[4] >> 4
        if condition not in (0x0, 0x1, 0x2, 0x3, 0x7, 0xA, 0xB):
            raise invalid_cdb(4, 7)
        if condition:
            return _GOOD  # no power conditions to enter: nothing to do
        if cdb[4] & 0x02:
            raise invalid_cdb(4, 1)  # LOEJ: the medium is not removable
        if not cdb[4] & 0x01 and not cdb[4] & 0x04:
            await self.store.flush()  # stopping without NO_FLUSH writes the cache out
        return _GOOD

    async def _prevent_allow(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        if cdb[4] & 0x03 > 1:
            raise invalid_cdb(4, 1)
        return _GOOD  # not removable: prevention has no effect

    async def _test_unit_ready(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return _GOOD

    # ---- SPC-4 informational commands --------------------------------------------------------------

    async def _inquiry(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        if cdb[1] & 0x02:
            raise invalid_cdb(1, 1)  # CMDDT (obsolete)
        alloc = u16(cdb, 3)
        if not cdb[1] & 0x01:
            if cdb[2]:
                raise invalid_cdb(2)
            return _result(ScsiStatus.GOOD, truncate(standard_inquiry(self._vpd), alloc))
        page = vpd_page(cdb[2], self._vpd)
        if page is None:
            raise invalid_cdb(2)
        return _result(ScsiStatus.GOOD, truncate(page, alloc))

    async def _report_luns(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return report_luns(cdb)

    async def _request_sense(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        """REQUEST SENSE (SPC-4 6.39): a pending UA is returned and cleared; else SANITIZE IN
        PROGRESS with its progress, or SANITIZE COMMAND FAILED; else the NOT READY condition of the
        access state; else NO SENSE."""
        if cdb[1] & 0x01:
            raise invalid_cdb(1, 0)  # DESC: only fixed format sense data
        queue = self._uas.get(req.nexus)
        if queue:
            data = fixed_sense(SenseKey.UNIT_ATTENTION, queue.pop(0))
        elif self._sanitizing is not None:
            data = self._sanitize_in_progress().fixed_sense()  # with the progress (SBC-3 4.11.2)
        elif self._sanitize_failed is not None:
            data = fixed_sense(SenseKey.MEDIUM_ERROR, SANITIZE_COMMAND_FAILED)
        elif self._access_state in _ALUA_NOT_READY:
            data = fixed_sense(SenseKey.NOT_READY, _ALUA_NOT_READY[self._access_state])
        else:
            data = fixed_sense(SenseKey.NO_SENSE, NO_ADDITIONAL_SENSE)
        return _result(ScsiStatus.GOOD, truncate(data, cdb[4]))

    async def _mode_sense(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        alloc = u16(cdb, 7) if cdb[0] == Opcode.MODE_SENSE_10 else cdb[4]
        data = modes.mode_sense(cdb, self._mode, modes.Geometry(self.capacity, self._bs))
        return _result(ScsiStatus.GOOD, truncate(data, alloc))

    async def _mode_select(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        plen = u16(cdb, 7) if cdb[0] == Opcode.MODE_SELECT_10 else cdb[4]
        params = memoryview(req.data_out).cast("B")[:plen]
        new = modes.mode_select(cdb, params, self._mode, self._bs)
        if new != self._mode:
            self._mode = new
            # SPC-4 7.5.2: other I_T nexuses learn of the change through MODE PARAMETERS CHANGED.
            self._queue_ua_all(MODE_PARAMETERS_CHANGED, except_nexus=req.nexus)
        return ScsiResult(ScsiStatus.GOOD, b"", None, plen)

    async def _report_target_port_groups(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        """One target port group, numbered like our TPGT, holding our one port (SPC-4 6.37)."""
        fmt = cdb[1] >> 5
        if fmt not in (0, 1):
            raise invalid_cdb(1, 7)
        supported = 0x80 | 0x08 | 0x04 | 0x02 | 0x01  # T_SUP, U_SUP, S_SUP, AN_SUP, AO_SUP
        desc = struct.pack(">BBHBBBB", int(self._access_state), supported, self.tpgt, 0, 0, 0, 1)
        desc += struct.pack(">HH", 0, self.tpgt)
        if fmt == 1:
            data = struct.pack(">IBBH", len(desc) + 4, 0x10, 0, 0) + desc
        else:
            data = struct.pack(">I", len(desc)) + desc
        return _result(ScsiStatus.GOOD, truncate(data, u32(cdb, 6)))

    async def _report_supported_opcodes(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        return _result(ScsiStatus.GOOD, report_supported_operation_codes(cdb, self._table))

    # ---- reservations (SPC-4 5.13, 6.15, 6.16; SPC-2 RESERVE/RELEASE(6)) -------------------------

    async def _persistent_reserve_in(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        data = self.reservations.persistent_reserve_in(req.nexus, cdb)
        return _result(ScsiStatus.GOOD, truncate(data, u16(cdb, 7)))

    async def _persistent_reserve_out(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        plen = u32(cdb, 5)
        params = bytes(memoryview(req.data_out).cast("B")[:plen])
        outcome = self.reservations.persistent_reserve_out(req.nexus, cdb, params)
        for nexus, asc in outcome.unit_attentions:
            self._queue_ua(nexus, asc)
        if outcome.changed and self._on_reservations_changed is not None:
            try:
                await self._on_reservations_changed(self.reservations.to_record())
            except Exception as e:  # the new state is not durable: tell the initiator
                raise CheckCondition(SenseKey.HARDWARE_ERROR, INTERNAL_TARGET_FAILURE) from e
        return ScsiResult(ScsiStatus.GOOD, b"", None, plen)

    async def _reserve_6(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        self.reservations.reserve6(req.nexus)
        return _GOOD

    async def _release_6(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        self.reservations.release6(req.nexus)
        return _GOOD

    async def _reserve_10(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        """RESERVE(10) (SPC-2 7.21): RESERVE(6) for this initiator; third-party reservations (3RDPTY,
        LONGID) are not supported."""
        if cdb[1] & 0x12:
            raise invalid_cdb(1, 4 if cdb[1] & 0x10 else 1)
        return await self._reserve_6(req, cdb)

    async def _release_10(self, req: ScsiRequest, cdb: bytes) -> ScsiResult:
        """RELEASE(10) (SPC-2 7.17), without third-party reservations."""
        if cdb[1] & 0x12:
            raise invalid_cdb(1, 4 if cdb[1] & 0x10 else 1)
        return await self._release_6(req, cdb)


_SA_OPCODES = frozenset((Opcode.SERVICE_ACTION_IN_16, Opcode.MAINTENANCE_IN))

_W = Gate.WRITES | Gate.MEDIUM
_R = Gate.MEDIUM
_L = LogicalUnit
_COMMANDS: dict[int, _Command] = {
    Opcode.TEST_UNIT_READY: _Command(_L._test_unit_ready, Gate.NONE, 6),
    Opcode.REQUEST_SENSE: _Command(_L._request_sense, _G_INFO, 6),
    Opcode.READ_6: _Command(_L._read_6, _R, 6),
    Opcode.WRITE_6: _Command(_L._write_6, _W, 6),
    Opcode.INQUIRY: _Command(_L._inquiry, _G_INFO, 6),
    Opcode.MODE_SELECT_6: _Command(_L._mode_select, Gate.STANDBY_OK, 6),
    Opcode.RESERVE_6: _Command(_L._reserve_6, Gate.NONE, 6),
    Opcode.RELEASE_6: _Command(_L._release_6, Gate.NONE, 6),
    Opcode.RESERVE_10: _Command(_L._reserve_10, Gate.NONE, 10),
    Opcode.RELEASE_10: _Command(_L._release_10, Gate.NONE, 10),
    Opcode.MODE_SENSE_6: _Command(_L._mode_sense, _G_ANY_STATE, 6),
    Opcode.START_STOP_UNIT: _Command(_L._start_stop_unit, Gate.NONE, 6),
    Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL: _Command(_L._prevent_allow, Gate.NONE, 6),
    Opcode.READ_CAPACITY_10: _Command(_L._read_capacity_10, _G_ANY_STATE, 10),
    Opcode.READ_10: _Command(_L._read_10, _R, 10),
    Opcode.WRITE_10: _Command(_L._write_10, _W, 10),
    Opcode.WRITE_AND_VERIFY_10: _Command(_L._write_verify_10, _W, 10),
    Opcode.VERIFY_10: _Command(_L._verify_10, _R, 10),
    Opcode.PRE_FETCH_10: _Command(_L._prefetch_10, Gate.NONE, 10),
    Opcode.SYNCHRONIZE_CACHE_10: _Command(_L._sync_cache_10, Gate.NONE, 10),
    Opcode.READ_DEFECT_DATA_10: _Command(_L._read_defect_data_10, Gate.NONE, 10),
    Opcode.WRITE_SAME_10: _Command(_L._write_same_10, _W, 10),
    Opcode.UNMAP: _Command(_L._unmap_cmd, _W, 10),
    Opcode.SANITIZE: _Command(_L._sanitize, Gate.WRITES, 10),
    Opcode.MODE_SELECT_10: _Command(_L._mode_select, Gate.STANDBY_OK, 10),
    Opcode.MODE_SENSE_10: _Command(_L._mode_sense, _G_ANY_STATE, 10),
    Opcode.PERSISTENT_RESERVE_IN: _Command(_L._persistent_reserve_in, Gate.UA_EXEMPT | Gate.STANDBY_OK, 10),
    Opcode.PERSISTENT_RESERVE_OUT: _Command(_L._persistent_reserve_out, Gate.STANDBY_OK, 10),
    Opcode.READ_16: _Command(_L._read_16, _R, 16),
    Opcode.COMPARE_AND_WRITE: _Command(_L._compare_and_write, _W, 16),
    Opcode.WRITE_16: _Command(_L._write_16, _W, 16),
    Opcode.ORWRITE_16: _Command(_L._orwrite_16, _W, 16),
    Opcode.WRITE_AND_VERIFY_16: _Command(_L._write_verify_16, _W, 16),
    Opcode.VERIFY_16: _Command(_L._verify_16, _R, 16),
    Opcode.PRE_FETCH_16: _Command(_L._prefetch_16, Gate.NONE, 16),
    Opcode.SYNCHRONIZE_CACHE_16: _Command(_L._sync_cache_16, Gate.NONE, 16),
    Opcode.WRITE_SAME_16: _Command(_L._write_same_16, _W, 16),
    Opcode.WRITE_ATOMIC_16: _Command(_L._write_atomic_16, _W, 16),
    (Opcode.SERVICE_ACTION_IN_16 << 8) | ServiceActionIn16.READ_CAPACITY_16: _Command(
        _L._read_capacity_16, _G_ANY_STATE, 16
    ),
    (Opcode.SERVICE_ACTION_IN_16 << 8) | ServiceActionIn16.GET_LBA_STATUS: _Command(
        _L._get_lba_status, Gate.NONE, 16
    ),
    Opcode.REPORT_LUNS: _Command(_L._report_luns, _G_INFO, 12),
    (Opcode.MAINTENANCE_IN << 8) | MaintenanceIn.REPORT_TARGET_PORT_GROUPS: _Command(
        _L._report_target_port_groups, _G_ANY_STATE, 12
    ),
    (Opcode.MAINTENANCE_IN << 8) | MaintenanceIn.REPORT_SUPPORTED_OPERATION_CODES: _Command(
        _L._report_supported_opcodes, _G_ANY_STATE, 12
    ),
    Opcode.READ_12: _Command(_L._read_12, _R, 12),
    Opcode.WRITE_12: _Command(_L._write_12, _W, 12),
    Opcode.WRITE_AND_VERIFY_12: _Command(_L._write_verify_12, _W, 12),
    Opcode.VERIFY_12: _Command(_L._verify_12, _R, 12),
    Opcode.READ_DEFECT_DATA_12: _Command(_L._read_defect_data_12, Gate.NONE, 12),
}


# ---- LUNs with nothing behind them ---------------------------------------------------------------


def report_luns(cdb: bytes) -> ScsiResult:
    """REPORT LUNS (SPC-4 6.33): the target has exactly one logical unit, LUN 0."""
    select = cdb[2]
    if select in (0x00, 0x02):
        luns = bytes(8)
    elif select == 0x01:
        luns = b""  # well known logical units only: we have none
    else:
        raise invalid_cdb(2)
    data = struct.pack(">I4x", len(luns)) + luns
    return _result(ScsiStatus.GOOD, truncate(data, u32(cdb, 6)))


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
            return _result(ScsiStatus.GOOD, truncate(data, alloc))
        if cdb[0] == Opcode.REPORT_LUNS:
            return report_luns(cdb)
        if cdb[0] == Opcode.REQUEST_SENSE:
            data = fixed_sense(SenseKey.ILLEGAL_REQUEST, LOGICAL_UNIT_NOT_SUPPORTED)
            return _result(ScsiStatus.GOOD, truncate(data, cdb[4]))
    except CheckCondition as e:
        return ScsiResult(ScsiStatus.CHECK_CONDITION, sense=e.fixed_sense())
    return _check_result(SenseKey.ILLEGAL_REQUEST, LOGICAL_UNIT_NOT_SUPPORTED)
