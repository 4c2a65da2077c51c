"""Every daemon loop reports an exception to its TaskSupervisor and goes on (issue 7): the master's
node recorder and control loop, the node's heartbeat client, convergence worker and fence timer."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sparrow.cluster.authority import AuthorityStore
from sparrow.cluster.channel import (
    Channel,
    ClusterSecret,
    Established,
    HandshakeBytes,
    Plaintext,
    Purpose,
    Side,
)
from sparrow.cluster.heartbeat import FrameDecoder, encode
from sparrow.cluster.lease import LeaseClock
from sparrow.cluster.messages import Ack, Heartbeat, Hello
from sparrow.master.control import StepResult
from sparrow.master.daemon import CONTROL_TASK, NodeRecorder, control_task
from sparrow.node.heartbeat_client import TASK as HEARTBEAT_TASK
from sparrow.node.heartbeat_client import Backoff, HeartbeatClient, HeartbeatSession
from sparrow.supervision import TaskSupervisor
from tests.tools import FAKE_MASTER

SECRET = ClusterSecret.from_text(b"a-cluster-secret-of-at-least-32-characters")


def _hello(node_id: str, capacity: int) -> Hello:
    return Hello(node_id, 1, "127.0.0.1:3260", "127.0.0.1:3291", "127.0.0.1:3281", capacity, 0)


async def test_the_node_recorder_survives_an_upsert_that_raises(tmp_path: Path) -> None:
    """Finding 4: one Hello whose capacity overflows SQLite killed the recorder without a log line,
    and no node was recorded after it."""
    store = AuthorityStore.open_in(tmp_path)
    supervisor = TaskSupervisor()
    recorder = NodeRecorder(store, supervisor)
    real_upsert = store.upsert_hello

    def upsert(hello: Hello, *, seen_at: float, approve: bool = False) -> object:
        if hello.node_id == "evil":
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        return real_upsert(hello, seen_at=seen_at, approve=approve)

    store.upsert_hello = upsert  # type: ignore[method-assign]
    recorder.start()
    recorder.hello(_hello("evil", 1 << 40))
    recorder.hello(_hello("n1", 1 << 40))
    await recorder.close(5.0)
    try:
        assert [n.node_id for n in store.nodes()] == ["n1"]
        # n1 recorded fine after the failure: the recorder recovered.
        assert supervisor.failures() == ()
        assert supervisor.counter.labels(task=NodeRecorder.TASK)._value.get() == 1.0
    finally:
        store.close()


async def test_the_control_loop_reports_a_failed_step_and_steps_on() -> None:
    supervisor = TaskSupervisor()
    stop = asyncio.Event()
    steps = 0
    failures_seen: list[tuple[str, ...]] = []

    class Control:
        async def step_async(self, clock: object) -> StepResult:
            nonlocal steps
            steps += 1
            failures_seen.append(tuple(f.task for f in supervisor.failures()))
            if steps == 1:
                raise RuntimeError("database disk image is malformed")
            if steps == 3:
                stop.set()
            return None  # type: ignore[return-value]

        def next_step_at(self, now: float, interval: float) -> float:
            return now + interval

    async with asyncio.timeout(5):
        await control_task(Control(), lambda: 0.0, 0.001, stop, supervisor)  # type: ignore[arg-type]
    assert steps == 3
    assert failures_seen == [(), (CONTROL_TASK,), ()]  # reported after step 1, recovered by step 2


async def test_the_heartbeat_client_reports_a_bug_and_reconnects() -> None:
    """An exception applying an Ack (a bug, not a socket error) used to end the heartbeat task for
    good, silently; now it is reported, the client reconnects, and a good Ack recovers it."""
    supervisor = TaskSupervisor()
    second = asyncio.Event()
    connections = 0

    async def master(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        if connections == 2:
            second.set()
        decoder = FrameDecoder()
        channel = Channel(SECRET, Side.SERVER, Purpose.HEARTBEAT, 0.0)
        while data := await reader.read(65536):
            for event in channel.feed(data, 0.0):
                if isinstance(event, HandshakeBytes):
                    writer.write(event.data)
                elif isinstance(event, Established):
                    writer.write(channel.send(encode(FAKE_MASTER.hello(channel.binding))))
                elif isinstance(event, Plaintext):
                    decoder.feed(event.data)
            while (msg := decoder.next_message()) is not None:
                if isinstance(msg, Heartbeat):
                    writer.write(channel.send(encode(Ack(msg.seq, 5.0, ()))))
        writer.close()

    acks = 0
    recovered = asyncio.Event()
    reported: list[tuple[str, str]] = []

    def on_ack(ack: Ack) -> None:
        nonlocal acks
        acks += 1
        if acks == 1:
            raise KeyError("a bug in applying the Ack")
        if not recovered.is_set():  # the first Ack of the next connection
            reported.extend((f.task, f.error) for f in supervisor.failures())
            recovered.set()

    server = await asyncio.start_server(master, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = HeartbeatClient(
        ("127.0.0.1", port), HeartbeatSession(LeaseClock()), secret=SECRET,
        hello=lambda: _hello("n1", 1 << 40),
        observations=lambda now: (), on_ack=on_ack, interval=0.02,
        backoff=Backoff(initial=0.01, maximum=0.02), supervisor=supervisor,
    )  # fmt: skip
    client.start()
    try:
        async with asyncio.timeout(10):
            await second.wait()
            await recovered.wait()
        assert reported == [(HEARTBEAT_TASK, "KeyError: 'a bug in applying the Ack'")]
        assert supervisor.failures() == ()
    finally:
        await client.stop()
        server.close()
        await server.wait_closed()
