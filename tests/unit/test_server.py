"""The asyncio layer over a real loopback socket: task management cancels executions that suspended.

The logical unit here blocks every WRITE on an ``asyncio.Event`` the test never sets, so a TMF
response can only arrive if the server cancels the execution. No sleeps: the test waits for events
and PDUs, under a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from frontend import internal_errors
from frontend.iscsi.pdu import (
    RESERVED_TAG,
    LoginRequest,
    LoginResponse,
    ScsiCommand,
    ScsiResponse,
    TargetPdu,
    TaskManagementRequest,
    TaskManagementResponse,
    encode_bytes,
    target_reader,
)
from frontend.scsi.lu import ResetKind
from frontend.scsi.types import Nexus, ScsiRequest, ScsiResult, ScsiStatus
from frontend.server import IscsiServer
from frontend.target import Target, TargetRegistry, TargetSettings

IQN = "iqn.2026-11.io.sparrow:srv"
BLOCK = 512
WRITE10 = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0])
TUR = bytes(6)
DEADLINE = 5.0

ABORT_TASK = 1
LUN_RESET = 5


@dataclass(frozen=True)
class _Identity:
    volume: str = "srv"


class BlockingLu:
    """WRITEs wait on ``release`` (never set unless a test sets it); other commands are GOOD."""

    def __init__(self, *, swallow_cancel: bool = False) -> None:
        self.identity = _Identity()
        self.release = asyncio.Event()
        self.started: asyncio.Queue[bytes] = asyncio.Queue()
        self.ended: list[str] = []          # how each blocked WRITE left execute()
        self.swallow_cancel = swallow_cancel

    async def execute(self, req: ScsiRequest) -> ScsiResult:
        if req.cdb[0] != 0x2A:
            return ScsiResult(ScsiStatus.GOOD)
        self.started.put_nowait(bytes(req.data_out[:1]))
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.ended.append("cancelled")
            if self.swallow_cancel:
                return ScsiResult(ScsiStatus.GOOD)
            raise
        except GeneratorExit:
            self.ended.append("closed")
            raise
        self.ended.append("finished")
        return ScsiResult(ScsiStatus.GOOD)

    def reset(self, kind: ResetKind, nexus: Nexus | None) -> None:
        pass

    def nexus_lost(self, nexus: Nexus) -> None:
        pass


class Client:
    """A tiny initiator over a real socket, built from the codec."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pdus = target_reader(max_data_segment_length=1 << 20)
        self.cmd_sn = 1
        self.next_itt = 1

    def itt(self) -> int:
        self.next_itt += 1
        return self.next_itt

    def send(self, *pdus: object) -> None:
        """All of ``pdus`` in one write (so the server may see them in one data_received)."""
        self.writer.write(b"".join(encode_bytes(p) for p in pdus))  # type: ignore[arg-type]

    async def receive(self) -> TargetPdu:
        while (pdu := self.pdus.next_pdu()) is None:
            data = await self.reader.read(65536)
            assert data, "the target closed the connection"
            self.pdus.feed(data)
        return pdu

    async def login(self) -> None:
        keys = {"InitiatorName": "iqn.1994-05.com.example:srv", "SessionType": "Normal", "TargetName": IQN,
                "HeaderDigest": "None", "DataDigest": "None", "ImmediateData": "Yes", "InitialR2T": "Yes"}
        text = b"".join(f"{k}={v}".encode() + b"\0" for k, v in keys.items())
        isid = 0x23D000000001
        self.send(LoginRequest(True, False, 1, 3, 0, 0, isid, 0, self.itt(), 0, self.cmd_sn, 0, text))
        resp = await self.receive()
        assert isinstance(resp, LoginResponse) and resp.status_class == 0

    def write(self, *, immediate: bool = False) -> ScsiCommand:
        cmd = ScsiCommand(immediate, True, False, True, 1, 0, self.itt(), BLOCK, self.cmd_sn, 0, WRITE10,
                          b"w" * BLOCK)
        if not immediate:
            self.cmd_sn += 1
        return cmd

    def tur(self) -> ScsiCommand:
        cmd = ScsiCommand(False, True, False, False, 1, 0, self.itt(), 0, self.cmd_sn, 0, TUR, b"")
        self.cmd_sn += 1
        return cmd

    def tmf(self, function: int, ref: ScsiCommand | None = None) -> TaskManagementRequest:
        ref_itt, ref_cmd_sn = (ref.itt, ref.cmd_sn) if ref is not None else (RESERVED_TAG, 0)
        return TaskManagementRequest(True, function, 0, self.itt(), ref_itt, self.cmd_sn, 0, ref_cmd_sn, 0)


@pytest.fixture
async def lu() -> BlockingLu:
    return BlockingLu()


@pytest.fixture
async def client(lu: BlockingLu) -> AsyncIterator[Client]:
    registry = TargetRegistry()
    registry.add(Target(IQN, "srv", lu))  # type: ignore[arg-type]
    server = IscsiServer(registry, TargetSettings(nop_interval=0))
    await server.start("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    c = Client(reader, writer)
    await asyncio.wait_for(c.login(), DEADLINE)
    yield c
    writer.close()
    await server.shutdown(timeout=1.0)


async def _answers(c: Client, n: int) -> list[TargetPdu]:
    return [await asyncio.wait_for(c.receive(), DEADLINE) for _ in range(n)]


async def test_abort_task_cancels_a_suspended_execution(client: Client, lu: BlockingLu) -> None:
    write = client.write()
    client.send(write)
    await asyncio.wait_for(lu.started.get(), DEADLINE)
    tmf = client.tmf(ABORT_TASK, write)
    client.send(tmf)
    (resp,) = await _answers(client, 1)
    assert isinstance(resp, TaskManagementResponse) and (resp.itt, resp.response) == (tmf.itt, 0)
    assert lu.ended == ["cancelled"]          # the execution had ended before the response left
    tur = client.tur()
    client.send(tur)
    (resp,) = await _answers(client, 1)
    assert isinstance(resp, ScsiResponse) and resp.itt == tur.itt    # none for the write


async def test_abort_in_the_same_segment_as_an_immediate_command(client: Client, lu: BlockingLu) -> None:
    """The immediate command starts at once and suspends; the TMF read in the same data_received
    cancels its Task before the Task ever ran, so the server must end the execution itself."""
    write = client.write(immediate=True)
    tmf = client.tmf(ABORT_TASK, write)
    client.send(write, tmf)
    (resp,) = await _answers(client, 1)
    assert isinstance(resp, TaskManagementResponse) and (resp.itt, resp.response) == (tmf.itt, 0)
    assert lu.ended == ["closed"]
    tur = client.tur()
    client.send(tur)
    (resp,) = await _answers(client, 1)
    assert isinstance(resp, ScsiResponse) and resp.itt == tur.itt


async def test_lun_reset_answers_after_every_execution_is_cancelled(client: Client, lu: BlockingLu) -> None:
    client.send(client.write(), client.write())
    await asyncio.wait_for(lu.started.get(), DEADLINE)
    await asyncio.wait_for(lu.started.get(), DEADLINE)
    tmf = client.tmf(LUN_RESET)
    client.send(tmf)
    (resp,) = await _answers(client, 1)
    assert isinstance(resp, TaskManagementResponse) and (resp.itt, resp.response) == (tmf.itt, 0)
    assert lu.ended == ["cancelled", "cancelled"]


async def test_an_execution_that_finishes_anyway_sends_no_response(client: Client, lu: BlockingLu) -> None:
    """An LU that catches the cancellation and returns a result reports through ``complete``."""
    lu.swallow_cancel = True
    write = client.write()
    client.send(write)
    await asyncio.wait_for(lu.started.get(), DEADLINE)
    tmf = client.tmf(ABORT_TASK, write)
    client.send(tmf)
    (resp,) = await _answers(client, 1)
    assert isinstance(resp, TaskManagementResponse) and resp.itt == tmf.itt
    assert lu.ended == ["cancelled"]
    tur = client.tur()
    client.send(tur)
    (resp,) = await _answers(client, 1)
    assert isinstance(resp, ScsiResponse) and resp.itt == tur.itt    # none for the write


async def test_commands_that_are_not_aborted_still_complete(client: Client, lu: BlockingLu) -> None:
    write = client.write()
    client.send(write)
    await asyncio.wait_for(lu.started.get(), DEADLINE)
    lu.release.set()
    (resp,) = await _answers(client, 1)
    assert isinstance(resp, ScsiResponse) and resp.itt == write.itt and resp.status == 0
    assert lu.ended == ["finished"]


class CrashingLu(BlockingLu):
    """TEST UNIT READY raises: a bug in the SCSI layer."""

    async def execute(self, req: ScsiRequest) -> ScsiResult:
        if req.cdb[0] == 0x00:
            raise RuntimeError("a bug in the SCSI layer")
        return await super().execute(req)


@pytest.mark.internal_errors_expected
@pytest.mark.parametrize("lu", [CrashingLu()])
async def test_a_crashing_command_is_answered_logged_and_counted(client: Client, lu: BlockingLu) -> None:
    before = internal_errors.count()
    tur = client.tur()
    client.send(tur)
    (resp,) = await _answers(client, 1)
    assert isinstance(resp, ScsiResponse) and resp.itt == tur.itt and resp.status == 0x02  # CHECK CONDITION
    assert resp.data[2] & 0x0F == 0x04                                                   # HARDWARE ERROR
    assert internal_errors.count() == before + 1
