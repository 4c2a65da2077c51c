"""POST /v1/nodes/{id}/rekey (sparrow.master.nodekeys_api) and what forget does to a binding:
driven through the real app (aiohttp test client), no node processes."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from sparrow.auth import tokens
from sparrow.cluster.nodeidentity import NodeKey, NodeKeys, key_text
from sparrow.master.api import build_app
from tests.unit.test_master_api import TIMING, Master

OLD = NodeKey(b"o" * 32)
NEW = NodeKey(b"n" * 32)


@pytest.fixture
async def master(tmp_path: Path) -> AsyncIterator[Master]:
    m = Master(tmp_path)
    await m.client.close()  # rebuilt with the bindings
    m.api = dataclasses.replace(m.api, node_keys=NodeKeys())
    m.client = TestClient(TestServer(build_app(m.api)))
    await m.client.start_server()
    yield m
    await m.client.close()
    m.store.close()


def bound(master: Master, node_id: str, key: NodeKey) -> None:
    """``node_id`` said hello with ``key`` (the heartbeat server's admit and the recorder's upsert)."""
    master.node_reports(node_id, 1)
    assert master.api.node_keys is not None
    master.api.node_keys.rebind(node_id, key.public)
    hello = master.control.observations.hello(node_id)
    assert hello is not None
    master.store.upsert_hello(dataclasses.replace(hello, node_key=key.public), seen_at=1.0)


async def test_a_dead_node_is_pinned_to_its_new_key_or_unbound(master: Master) -> None:
    bound(master, "n1", OLD)
    answer: Any = await master.json("POST", "/v1/nodes/n1/rekey", {"key": key_text(NEW.public)}, status=409)
    assert "alive" in answer["error"]  # a live node keeps its identity
    assert master.api.node_keys is not None and master.api.node_keys.key("n1") == OLD.public

    master.clock.now += TIMING.dead_after + 1
    answer = await master.json("POST", "/v1/nodes/n1/rekey", {"key": key_text(NEW.public).upper()})
    assert answer == {"node_id": "n1", "node_key": key_text(NEW.public)}
    assert master.store.node_keys() == {"n1": NEW.public} and master.api.node_keys.key("n1") == NEW.public
    listed = (await master.json("GET", "/v1/nodes"))["nodes"]
    assert [n["node_key"] for n in listed] == [key_text(NEW.public)]

    answer = await master.json("POST", "/v1/nodes/n1/rekey", {})
    assert answer == {"node_id": "n1", "node_key": None}  # the next Hello binds on first use
    assert master.store.node_keys() == {} and master.api.node_keys.key("n1") is None


@pytest.mark.parametrize(
    ("node_id", "body", "status", "fragment"),
    [
        ("n9", {}, 404, "no node 'n9'"),
        ("n1", {"key": "ab" * 31}, 400, "64 hex digits"),
        ("n1", {"key": "zz" * 32}, 400, "hex"),
        ("n1", {"key": key_text(NEW.public), "extra": 1}, 400, "extra"),
    ],
)
async def test_a_bad_rekey_changes_nothing(
    master: Master, node_id: str, body: dict[str, Any], status: int, fragment: str
) -> None:
    bound(master, "n1", OLD)
    master.clock.now += TIMING.dead_after + 1
    answer = await master.json("POST", f"/v1/nodes/{node_id}/rekey", body, status=status)
    assert fragment in answer["error"]
    assert master.store.node_keys() == {"n1": OLD.public}


async def test_rekey_is_for_admins_only(master: Master) -> None:
    bound(master, "n1", OLD)
    master.clock.now += TIMING.dead_after + 1
    operator = tokens.mint("operator", created_at=1.0)
    master.store.add_token(operator.record)
    master.token = operator.plaintext
    await master.json("POST", "/v1/nodes/n1/rekey", {}, status=403)
    assert master.store.node_keys() == {"n1": OLD.public}


async def test_forgetting_a_node_drops_its_binding(master: Master) -> None:
    bound(master, "n1", OLD)
    master.clock.now += TIMING.dead_after + 1
    await master.json("DELETE", "/v1/nodes/n1", status=204)
    assert master.api.node_keys is not None and master.api.node_keys.key("n1") is None
    assert master.store.node_keys() == {}
