"""The master's node recorder survives a failing upsert (issue 7, finding 4)."""

from __future__ import annotations

from typing import Any, cast

import structlog

from sparrow.cluster.authority import AuthorityStore
from sparrow.cluster.messages import Hello
from sparrow.master.daemon import NodeRecorder


def hello(node_id: str) -> Hello:
    return Hello(node_id, 1, "127.0.0.1:3260", "127.0.0.1:3291", "127.0.0.1:3281", 2**40, 2**39)


class FlakyStore:
    """Fails the first upsert the way SQLite did on a 2**63 capacity; records the rest."""

    def __init__(self) -> None:
        self.recorded: list[str] = []

    def upsert_hello(self, hello: Hello, *, seen_at: float) -> None:
        if not self.recorded and hello.node_id == "bad":
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        self.recorded.append(hello.node_id)


async def test_an_exception_is_logged_with_its_traceback_and_later_hellos_are_recorded() -> None:
    store = FlakyStore()
    recorder = NodeRecorder(cast(AuthorityStore, store))
    with structlog.testing.capture_logs() as logs:
        recorder.start()
        recorder.hello(hello("bad"))
        recorder.hello(hello("good"))
        await recorder.close(5.0)
    assert store.recorded == ["good"]
    assert recorder.failures == 1
    failed: list[dict[str, Any]] = [e for e in logs if e["event"] == "recording node failed"]
    assert failed and failed[0]["node"] == "bad" and failed[0]["exc_info"] is True
    assert failed[0]["log_level"] == "error"
