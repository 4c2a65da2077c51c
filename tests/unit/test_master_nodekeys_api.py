"""POST /v1/nodes/{id}/rekey and /approve (sparrow.master.nodekeys_api) and what forget does to a
binding and an approval: driven through the real app (aiohttp test client), no node processes."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sparrow.auth import tokens
from sparrow.cluster.nodeidentity import Admission, AdmissionPolicy, NodeKey, NodeKeys, key_text
from tests.unit.test_master_api import TIMING, Master

OLD = NodeKey(b"o" * 32)
NEW = NodeKey(b"n" * 32)


@pytest.fixture
async def master(tmp_path: Path) -> AsyncIterator[Master]:
    m = Master(tmp_path)
    m.control.node_keys = NodeKeys(policy=AdmissionPolicy.APPROVE)
    await m.client.start_server()
    yield m
    await m.client.close()
    m.store.close()


def bound(master: Master, node_id: str, key: NodeKey) -> None:
    """``node_id`` said hello with ``key`` (the heartbeat server's admit and the recorder's upsert)."""
    master.node_reports(node_id, 1)
    master.control.node_keys.rebind(node_id, key.public)
    hello = master.control.observations.hello(node_id)
    assert hello is not None
    master.store.upsert_hello(dataclasses.replace(hello, node_key=key.public), seen_at=1.0)


async def test_a_dead_node_is_pinned_to_its_new_key_or_unbound(master: Master) -> None:
    bound(master, "n1", OLD)
    answer: Any = await master.json("POST", "/v1/nodes/n1/rekey", {"key": key_text(NEW.public)}, status=409)
    assert "alive" in answer["error"]  # a live node keeps its identity
    assert master.control.node_keys.key("n1") == OLD.public

    master.clock.now += TIMING.dead_after + 1
    answer = await master.json("POST", "/v1/nodes/n1/rekey", {"key": key_text(NEW.public).upper()})
    assert answer == {"node_id": "n1", "node_key": key_text(NEW.public)}
    assert master.store.node_keys() == {"n1": NEW.public} and master.control.node_keys.key("n1") == NEW.public
    listed = (await master.json("GET", "/v1/nodes"))["nodes"]
    assert [n["node_key"] for n in listed] == [key_text(NEW.public)]

    answer = await master.json("POST", "/v1/nodes/n1/rekey", {})
    assert answer == {"node_id": "n1", "node_key": None}  # the next Hello binds on first use
    assert master.store.node_keys() == {} and master.control.node_keys.key("n1") is None


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
    assert master.control.node_keys.key("n1") is None
    assert master.store.node_keys() == {}


ROGUE = NodeKey(b"r" * 32)


def said_hello(master: Master, node_id: str, key: NodeKey) -> None:
    """``node_id`` said Hello proving ``key`` with no approval: what the heartbeat server's admit
    (a first use under the approve policy) and the recorder's upsert leave."""
    master.node_reports(node_id, 1)
    hello = master.control.observations.hello(node_id)
    assert hello is not None
    master.control.node_keys._keys[node_id] = key.public  # NodeKeys.admit's first-use binding
    assert master.control.node_keys.admission(node_id) is Admission.PENDING
    master.store.upsert_hello(dataclasses.replace(hello, node_key=key.public), seen_at=1.0)


async def test_a_pending_node_is_listed_pending_and_approved_with_the_key_it_proved(master: Master) -> None:
    said_hello(master, "n1", OLD)
    (listed,) = (await master.json("GET", "/v1/nodes"))["nodes"]
    assert (listed["admission"], listed["node_key"]) == ("pending", key_text(OLD.public))
    answer: Any = await master.json("POST", "/v1/nodes/n1/approve", {})
    assert answer == {"node_id": "n1", "node_key": key_text(OLD.public), "admission": "approved"}
    assert master.control.node_keys.admission("n1") is Admission.APPROVED
    assert master.store.approvals() == {"n1": OLD.public}
    (listed,) = (await master.json("GET", "/v1/nodes"))["nodes"]
    assert listed["admission"] == "approved"
    again = await master.json("POST", "/v1/nodes/n1/approve", {"key": key_text(OLD.public)})
    assert again == answer  # the same approval again changes nothing
    refused = await master.json("POST", "/v1/nodes/n1/approve", {"key": key_text(NEW.public)}, status=409)
    assert "sparrow node rekey n1" in refused["error"]  # another key for a member is a rekey
    assert master.store.approvals() == {"n1": OLD.public}


async def test_a_node_approved_ahead_is_pinned_to_that_key(master: Master) -> None:
    answer: Any = await master.json("POST", "/v1/nodes/n2/approve", {}, status=404)
    assert "--key" in answer["error"]  # never said Hello: the operator must name the key
    answer = await master.json("POST", "/v1/nodes/n2/approve", {"key": key_text(NEW.public)})
    assert answer == {"node_id": "n2", "node_key": key_text(NEW.public), "admission": "approved"}
    assert master.control.node_keys.key("n2") == NEW.public  # a Hello with another key is refused
    assert master.store.approvals() == {"n2": NEW.public}
    # A pending node whose proved key is not the one the operator names: the named one wins.
    said_hello(master, "n3", ROGUE)
    await master.json("POST", "/v1/nodes/n3/approve", {"key": key_text(NEW.public)})
    assert master.control.node_keys.key("n3") == NEW.public
    assert master.store.node_keys()["n3"] == NEW.public
    # Forgetting drops an approval, also one made ahead of any Hello.
    master.clock.now += TIMING.dead_after + 1
    await master.json("DELETE", "/v1/nodes/n2", status=204)
    await master.json("DELETE", "/v1/nodes/n3", status=204)
    assert master.store.approvals() == {} and master.control.node_keys.admission("n2") is None


@pytest.mark.parametrize(
    ("body", "fragment"),
    [({"key": "ab" * 31}, "64 hex digits"), ({"key": "zz" * 32}, "hex"), ({"extra": 1}, "extra")],
)
async def test_a_bad_approval_changes_nothing(master: Master, body: dict[str, Any], fragment: str) -> None:
    said_hello(master, "n1", OLD)
    answer = await master.json("POST", "/v1/nodes/n1/approve", body, status=400)
    assert fragment in answer["error"]
    assert master.store.approvals() == {}
    assert master.control.node_keys.admission("n1") is Admission.PENDING


async def test_approve_is_for_admins_only(master: Master) -> None:
    said_hello(master, "n1", OLD)
    operator = tokens.mint("operator", created_at=1.0)
    master.store.add_token(operator.record)
    master.token = operator.plaintext
    await master.json("POST", "/v1/nodes/n1/approve", {}, status=403)
    assert master.store.approvals() == {}
    assert master.control.node_keys.admission("n1") is Admission.PENDING


async def test_rekey_to_a_key_approves_it_and_to_none_drops_the_approval(master: Master) -> None:
    said_hello(master, "n1", OLD)
    await master.json("POST", "/v1/nodes/n1/approve", {})
    master.clock.now += TIMING.dead_after + 1
    await master.json("POST", "/v1/nodes/n1/rekey", {"key": key_text(NEW.public)})
    assert master.store.approvals() == {"n1": NEW.public}
    assert master.control.node_keys.admission("n1") is Admission.APPROVED
    await master.json("POST", "/v1/nodes/n1/rekey", {})
    assert master.store.approvals() == {} and master.control.node_keys.approved_key("n1") is None
