"""The fast path and the general path put the same bytes on the wire (frontend/iscsi/fastpath.py).

Two connections, one with the fast path and one without, each on its own LogicalUnit over a
MemoryBlockStore, are logged in alike and fed the same command streams in the same pieces (whole,
byte at a time, cut at random, mutated); what each sends back, the events it emits besides the SCSI
executions, and the blocks stored must be equal; with each combination of HeaderDigest and
DataDigest, digest errors included. No sockets, no sleeps.
"""

from __future__ import annotations

import struct
from collections.abc import Coroutine
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from frontend.iscsi.connection import CancelExecution, CloseConnection, Connection, ExecuteScsi, LoggedIn
from frontend.iscsi.fastpath import FAST_COMMANDS, READ_FLAGS, WRITE_FLAGS, plain_command
from frontend.iscsi.pdu import (
    DataOut,
    LoginRequest,
    NopOut,
    ScsiCommand,
    TaskManagementRequest,
    encode_bytes,
)
from frontend.iscsi.session import SessionTable
from frontend.scsi.commands import FAST_PATH_OPCODES
from frontend.scsi.lu import LogicalUnit, LuIdentity, no_such_lun
from frontend.scsi.types import ScsiResult
from frontend.target import Target, TargetRegistry, TargetSettings
from store.blockstore import StoreOp
from store.memstore import MemoryBlockStore

IQN = "iqn.2026-11.io.sparrow:fast"
BS = 512
SIZE = 1 << 20
LOGIN_KEYS = {
    "InitiatorName": "iqn.2026-11.test:fast", "TargetName": IQN, "SessionType": "Normal",
    "HeaderDigest": "None", "DataDigest": "None", "ImmediateData": "Yes", "InitialR2T": "No",
    "MaxRecvDataSegmentLength": "65536", "FirstBurstLength": "16384", "MaxBurstLength": "65536",
}


#: (HeaderDigest, DataDigest) negotiated as CRC32C: every combination.
Digests = tuple[bool, bool]
NONE: Digests = (False, False)
DIGESTS: tuple[Digests, ...] = (NONE, (True, False), (False, True), (True, True))
DIGEST_IDS = ("none", "header", "data", "both")


class Metrics:
    def __init__(self) -> None:
        self.done: list[tuple[str, str, int]] = []

    def command_done(self, volume: str, op: str, nbytes: int, seconds: float) -> None:
        self.done.append((volume, op, nbytes))

    def session_opened(self, kind: str) -> None:
        pass

    def session_closed(self, kind: str) -> None:
        pass

    def login_failed(self, reason: str) -> None:
        pass

    def internal_error(self, where: str) -> None:
        raise AssertionError(f"internal error in {where}")


def run_now(coro: Coroutine[Any, Any, ScsiResult]) -> ScsiResult:
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value  # type: ignore[no-any-return]
    raise AssertionError("the LU suspended over a memory store")


class Side:
    """One connection and its LU, driven as frontend/server.py drives them (metrics included)."""

    def __init__(self, fast: bool, digests: Digests = NONE) -> None:
        self.store = MemoryBlockStore(SIZE, BS)
        self.lu = LogicalUnit(self.store, LuIdentity("fast", "FAST0001", bytes.fromhex("6" + "0" * 31)))
        registry = TargetRegistry()
        registry.add(Target(IQN, "fast", self.lu))
        self.metrics = Metrics()
        self.conn = Connection(TargetSettings(nop_interval=0), registry, SessionTable(), now=0.0,
                               metrics=self.metrics, fast_path=fast)
        self.out = bytearray()
        self.executed = 0
        self.other_events: list[str] = []
        keys = {**LOGIN_KEYS, "HeaderDigest": "CRC32C" if digests[0] else "None",
                "DataDigest": "CRC32C" if digests[1] else "None"}
        text = b"".join(f"{k}={v}".encode() + b"\0" for k, v in keys.items())
        self.feed(encode_bytes(LoginRequest(True, False, 1, 3, 0, 0, 0x23D000000001, 0, 1, 0, 1, 0, text)))
        assert any(e.startswith("LoggedIn") for e in self.other_events)

    def feed(self, data: bytes) -> None:
        self.conn.receive_data(data, 1.0)
        while (ev := self.conn.next_event()) is not None:
            if isinstance(ev, ExecuteScsi):
                self.executed += 1
                result = no_such_lun(ev.request) if ev.lu is None else run_now(ev.lu.execute(ev.request))
                self.metrics.command_done("fast", "x", 0, 0.0)  # the server counts these (any label)
                self.conn.complete(ev.task_id, result, 1.0)
            elif isinstance(ev, LoggedIn):
                self.other_events.append("LoggedIn")
            elif isinstance(ev, CloseConnection):
                self.other_events.append(f"Close {ev.reason}")
            elif isinstance(ev, CancelExecution):  # task ids are the core's own numbering: count them
                self.other_events.append(f"Cancel {len(ev.task_ids)}")
            else:
                self.other_events.append(repr(ev))
        for piece in self.conn.data_to_send():
            self.out += piece


def both(digests: Digests = NONE) -> tuple[Side, Side]:
    return Side(True, digests), Side(False, digests)


def feed_both(sides: tuple[Side, Side], stream: bytes, cuts: list[int]) -> None:
    prev = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        if cut <= prev or cut > len(stream):
            continue
        for side in sides:
            side.feed(stream[prev:cut])
        prev = cut


def assert_same(sides: tuple[Side, Side]) -> None:
    fast, general = sides
    assert bytes(fast.out) == bytes(general.out)
    assert fast.other_events == general.other_events
    assert fast.store._blocks == general.store._blocks
    assert fast.conn.exp_cmd_sn == general.conn.exp_cmd_sn and fast.conn.stat_sn == general.conn.stat_sn
    assert not fast.conn.internal_errors and not general.conn.internal_errors
    assert len(fast.metrics.done) == len(general.metrics.done)


# --- command streams ---------------------------------------------------------------------------------


def rw(op: int, lba: int, blocks: int, flags: int = 0, control: int = 0) -> bytes:
    if op in (0x28, 0x2A):
        return struct.pack(">BBIBHB", op, flags, lba, 0, blocks, control)
    return struct.pack(">BBQIBB", op, flags, lba, blocks, 0, control)


class Stream:
    """Builds PDUs with consecutive CmdSNs and ITTs (the login used CmdSN 1 without consuming it)."""

    def __init__(self, digests: Digests = NONE) -> None:
        self.digests = digests
        self.cmd_sn = 1
        self.itt = 0x100
        self.pdus: list[bytes] = []

    def _next(self) -> tuple[int, int]:
        sn, itt = self.cmd_sn, self.itt
        self.cmd_sn += 1
        self.itt += 1
        return sn, itt

    def command(self, cdb: bytes, *, read: bool, write: bool, edtl: int, data: bytes = b"",
                final: bool = True, immediate: bool = False, attr: int = 1, itt: int | None = None,
                cmd_sn: int | None = None) -> int:
        sn, new_itt = self._next()
        if immediate:
            self.cmd_sn -= 1
        itt = new_itt if itt is None else itt
        self._add(ScsiCommand(immediate, final, read, write, attr, 0, itt, edtl,
                              sn if cmd_sn is None else cmd_sn, 0, cdb.ljust(16, b"\0"), data))
        return itt

    def read(self, op: int, lba: int, blocks: int, **kw: Any) -> int:
        edtl = kw.pop("edtl", blocks * BS)
        return self.command(rw(op, lba, blocks), read=True, write=False, edtl=edtl, **kw)

    def write(self, op: int, lba: int, blocks: int, flags: int = 0, **kw: Any) -> int:
        pattern = bytes([lba & 0xFF, blocks & 0xFF, 0x5A]) * (blocks * BS // 3) + b"\1" * (blocks * BS % 3)
        data = kw.pop("data", pattern)
        return self.command(rw(op, lba, blocks, flags), read=False, write=True,
                            edtl=kw.pop("edtl", blocks * BS), data=data, **kw)

    def nop(self) -> None:
        sn, itt = self._next()
        self.cmd_sn -= 1
        self._add(NopOut(True, 0, itt, 0xFFFFFFFF, sn, 0, b"ping"))

    def tmf(self, function: int, ref_itt: int = 0xFFFFFFFF) -> None:
        sn, itt = self._next()
        self.cmd_sn -= 1
        self._add(TaskManagementRequest(True, function, 0, itt, ref_itt, sn, 0, sn, 0))

    def data_out(self, itt: int, offset: int, data: bytes, final: bool = True) -> None:
        self._add(DataOut(final, 0, itt, 0xFFFFFFFF, 0, 0, offset, data))

    def _add(self, pdu: ScsiCommand | NopOut | TaskManagementRequest | DataOut) -> None:
        hd, dd = self.digests
        self.pdus.append(encode_bytes(pdu, header_digest=hd, data_digest=dd))

    def bytes(self) -> bytes:
        return b"".join(self.pdus)


def plain_stream(count: int = 48, digests: Digests = NONE) -> bytes:
    s = Stream(digests)
    for i in range(count):
        op = (0x28, 0x2A, 0x88, 0x8A)[i % 4]
        lba, blocks = (i * 7) % 200, 1 + i % 8
        if op in (0x2A, 0x8A):
            s.write(op, lba, blocks)
        else:
            s.read(op, lba, blocks)
    return s.bytes()


#: Steps a random stream is made of: the plain case and the ways a command leaves it.
STEPS = (
    "read10", "write10", "read16", "write16", "fua", "protect", "naca", "beyond", "short_edtl",
    "long_edtl", "zero", "nop", "abort_last", "lun_reset", "dup_itt", "immediate", "ordered",
    "r2t_write", "tur", "unsolicited", "gap",
)


def build(steps: list[tuple[str, int]], digests: Digests = NONE) -> bytes:
    s = Stream(digests)
    last = 0x100
    for step, k in steps:
        lba, blocks = k % 300, 1 + k % 6
        if step == "read10":
            last = s.read(0x28, lba, blocks)
        elif step == "write10":
            last = s.write(0x2A, lba, blocks)
        elif step == "read16":
            last = s.read(0x88, lba, blocks)
        elif step == "write16":
            last = s.write(0x8A, lba, blocks)
        elif step == "fua":
            last = s.write(0x2A, lba, blocks, flags=0x08)
        elif step == "protect":
            last = s.read(0x28, lba, blocks) if k % 2 else s.write(0x2A, lba, blocks, flags=0x20)
        elif step == "naca":
            last = s.command(rw(0x28, lba, blocks, control=0x04), read=True, write=False, edtl=blocks * BS)
        elif step == "beyond":
            last = s.read(0x28, SIZE // BS - 1, blocks + 1) if k % 2 else s.write(0x8A, SIZE // BS, 1)
        elif step == "short_edtl":
            last = s.read(0x28, lba, blocks, edtl=(blocks - 1) * BS + 4)
        elif step == "long_edtl":
            last = s.read(0x88, lba, blocks, edtl=(blocks + 1) * BS)
        elif step == "zero":
            last = s.read(0x28, lba, 0, edtl=0)
        elif step == "nop":
            s.nop()
        elif step == "abort_last":
            s.tmf(1, last)
        elif step == "lun_reset":
            s.tmf(5)
        elif step == "dup_itt":
            s.write(0x2A, lba, 1, itt=last)
        elif step == "immediate":
            last = s.read(0x28, lba, blocks, immediate=True)
        elif step == "ordered":
            last = s.read(0x28, lba, blocks, attr=2)
        elif step == "r2t_write":
            last = s.command(rw(0x2A, lba, 2), read=False, write=True, edtl=2 * BS, data=b"\7" * BS)
        elif step == "unsolicited":
            last = s.command(rw(0x2A, lba, 2), read=False, write=True, edtl=2 * BS, data=b"\3" * BS,
                             final=False)
            s.data_out(last, BS, b"\4" * BS)
        elif step == "tur":
            last = s.command(bytes(6), read=False, write=False, edtl=0)
        elif step == "gap":
            s.cmd_sn += 1  # a CmdSN never sent: what follows waits in the window
    return s.bytes()


# --- tests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("digests", DIGESTS, ids=DIGEST_IDS)
def test_plain_commands_take_the_fast_path_and_answer_alike(digests: Digests) -> None:
    sides = both(digests)
    feed_both(sides, plain_stream(digests=digests), [])
    fast, general = sides
    assert fast.executed == 0 and general.executed == 48   # the fast side never built a task
    assert_same(sides)
    assert {op for _, op, _ in fast.metrics.done} == {"read", "write"}


@pytest.mark.parametrize("digests", DIGESTS, ids=DIGEST_IDS)
def test_byte_at_a_time(digests: Digests) -> None:
    stream = plain_stream(12, digests)
    sides = both(digests)
    feed_both(sides, stream, list(range(1, len(stream))))
    assert sides[0].executed == 0
    assert_same(sides)


@pytest.mark.parametrize("digests", DIGESTS, ids=DIGEST_IDS)
def test_every_step_alone_then_plain(digests: Digests) -> None:
    """Each way of leaving the plain case, between plain commands, fed whole."""
    for step in STEPS:
        sides = both(digests)
        steps = [("write10", 3), (step, 3), ("read10", 3), ("write16", 5), ("read16", 5)]
        feed_both(sides, build(steps, digests), [])
        assert_same(sides)


def test_store_failure_answers_through_the_general_path() -> None:
    sides = both()
    for side in sides:
        side.store.fail_next(StoreOp.READ)
    s = Stream()
    s.read(0x28, 0, 1)
    s.read(0x28, 1, 1)
    feed_both(sides, s.bytes(), [])
    assert sides[0].executed == 2  # the armed failure sends both commands to the general path
    assert_same(sides)


def test_a_unit_attention_is_reported_as_the_general_path_reports_it() -> None:
    sides = both()
    for side in sides:
        side.lu.capacity_changed()
    feed_both(sides, plain_stream(4), [])
    assert_same(sides)


def test_the_fast_opcodes_come_from_the_command_table() -> None:
    assert set(FAST_COMMANDS) == FAST_PATH_OPCODES
    assert FAST_COMMANDS == {0x28: (False, 10), 0x2A: (True, 10), 0x88: (False, 16), 0x8A: (True, 16)}


def test_plain_command_decoding() -> None:
    bhs = bytearray(48)
    bhs[32:42] = rw(0x2A, 7, 3)
    assert plain_command(bhs, WRITE_FLAGS) == (True, 7, 3)
    assert plain_command(bhs, READ_FLAGS) is None          # WRITE with the R bit
    bhs[32:48] = rw(0x88, 1 << 40, 9)
    assert plain_command(bhs, READ_FLAGS) == (False, 1 << 40, 9)
    bhs[33] = 0x08                                         # FUA: fine on a read
    assert plain_command(bhs, READ_FLAGS) == (False, 1 << 40, 9)
    bhs[33] = 0x20                                         # RDPROTECT
    assert plain_command(bhs, READ_FLAGS) is None
    bhs[32] = 0x12                                         # INQUIRY
    assert plain_command(bhs, READ_FLAGS) is None


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.sampled_from(STEPS), st.integers(0, 1000)), min_size=1, max_size=14),
    st.lists(st.integers(1, 6000), max_size=6),
    st.sampled_from(DIGESTS),
)
def test_random_streams_random_cuts(steps: list[tuple[str, int]], cuts: list[int], digests: Digests) -> None:
    sides = both(digests)
    feed_both(sides, build(steps, digests), cuts)
    assert_same(sides)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_streams(data: st.DataObject) -> None:
    """Mutated bytes; with digests most mutations are digest errors, which both paths must meet
    alike (a header digest error closes the connection, a data digest error is a Reject)."""
    digests = data.draw(st.sampled_from(DIGESTS))
    stream = bytearray(plain_stream(6, digests))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(stream) - 1))
        stream[at] = data.draw(st.integers(0, 255))
    cuts = data.draw(st.lists(st.integers(1, len(stream)), max_size=4))
    sides = both(digests)
    feed_both(sides, bytes(stream), cuts)
    assert_same(sides)


@pytest.mark.parametrize("where", ["header", "data"])
def test_a_digest_error_after_fast_commands(where: str) -> None:
    """Fast commands, then a PDU whose header digest (or a write's data digest) is wrong, fed whole
    and cut after the first two: both paths meet the error alike (a PDU error turns the fast
    commands taken from the same bytes into general tasks first)."""
    s = Stream((True, True))
    s.read(0x28, 0, 1)
    s.write(0x2A, 1, 2)
    s.write(0x2A, 3, 1)
    s.read(0x28, 1, 2)
    stream = bytearray(s.bytes())
    first_two = len(s.pdus[0]) + len(s.pdus[1])
    stream[first_two + (48 if where == "header" else 60)] ^= 0x01  # its header digest, or its data
    for cuts in ([], [first_two]):
        sides = both((True, True))
        feed_both(sides, bytes(stream), cuts)
        assert_same(sides)
        closed = [e for e in sides[0].other_events if e.startswith("Close")]
        assert closed == (["Close header digest error"] if where == "header" else [])
        if cuts:
            assert sides[0].executed < sides[1].executed  # the first two took the fast path
