"""The HTTP API on a real VolumeService (real VolumeManager in tmp_path, real LUs and registry)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from frontend.scsi.sense import CAPACITY_DATA_CHANGED
from frontend.scsi.types import Nexus, ScsiRequest
from frontend.target import Portal, TargetRegistry
from sparrow.api import build_app
from sparrow.metrics import PrometheusMetrics
from sparrow.service import VolumeService
from store.volumes import VolumeManager

MiB = 1024**2
BASE = "iqn.2026-11.io.sparrow"


class Stack:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.manager = VolumeManager(data_dir)
        self.registry = TargetRegistry()
        self.metrics = PrometheusMetrics()
        self.service = VolumeService(
            self.manager,
            self.registry,
            base_iqn=BASE,
            portals=(Portal("127.0.0.1", 3260),),
            metrics=self.metrics,
        )
        self.client: TestClient[Any, Any] | None = None

    async def start(self) -> TestClient[Any, Any]:
        await self.service.open_all()
        self.client = TestClient(TestServer(build_app(self.service, self.metrics)))
        await self.client.start_server()
        return self.client

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        await self.service.close()


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(tmp_path / "data")
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
def client(stack: Stack) -> TestClient[Any, Any]:
    assert stack.client is not None
    return stack.client


async def call(client: TestClient[Any, Any], method: str, path: str, body: Any = None) -> tuple[int, Any]:
    kwargs: dict[str, Any] = {}
    if body is not None:
        kwargs["data"] = body if isinstance(body, str | bytes) else json.dumps(body)
        kwargs["headers"] = {"Content-Type": "application/json"}
    resp = await client.request(method, path, **kwargs)
    raw = await resp.read()
    return resp.status, (json.loads(raw) if raw else None)


async def test_create_returns_the_volume_and_exports_it(stack: Stack, client: TestClient[Any, Any]) -> None:
    status, body = await call(client, "POST", "/v1/volumes", {"name": "vol1", "size": "64MiB"})
    assert status == 201
    assert body["name"] == "vol1"
    assert body["size"] == 64 * MiB
    assert body["block_size"] == 512
    assert body["iqn"] == f"{BASE}:vol1"
    assert body["lun"] == 0
    assert body["portals"] == ["127.0.0.1:3260"]
    assert body["url"] == f"iscsi://127.0.0.1:3260/{BASE}:vol1/0"
    assert len(body["serial"]) == 16 and len(body["naa"]) == 32
    assert body["chap"] is None and body["backing"] is None and body["sessions"] == 0
    assert body["created_at"].endswith("+00:00")
    target = stack.registry.get(f"{BASE}:vol1")
    assert target is not None and target.volume == "vol1" and target.chap is None
    assert target.lu.identity.naa == bytes.fromhex(body["naa"])
    assert (stack.data_dir / "volumes" / "vol1.img").stat().st_size == 64 * MiB


async def test_size_as_integer_and_block_size(client: TestClient[Any, Any]) -> None:
    status, body = await call(
        client, "POST", "/v1/volumes", {"name": "v4k", "size": 8 * MiB, "block_size": 4096}
    )
    assert status == 201
    assert (body["size"], body["block_size"]) == (8 * MiB, 4096)


async def test_chap_is_stored_but_secrets_never_returned(stack: Stack, client: TestClient[Any, Any]) -> None:
    request = {
        "name": "secure",
        "size": "1MiB",
        "chap_user": "alice",
        "chap_secret": "alice-secret-1",
        "chap_mutual_user": "target",
        "chap_mutual_secret": "target-secret-2",
    }
    status, body = await call(client, "POST", "/v1/volumes", request)
    assert status == 201
    assert body["chap"] == {"user": "alice", "mutual_user": "target"}
    for path in ("/v1/volumes", "/v1/volumes/secure"):
        resp = await client.get(path)
        text = await resp.text()
        assert "alice-secret-1" not in text and "target-secret-2" not in text
    target = stack.registry.get(f"{BASE}:secure")
    assert target is not None and target.chap is not None
    assert (target.chap.initiator.user, target.chap.initiator.secret) == ("alice", "alice-secret-1")
    assert target.chap.target is not None
    assert (target.chap.target.user, target.chap.target.secret) == ("target", "target-secret-2")


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"name": "v", "size": "12X"}, 400, "invalid size '12X'"),
        ({"name": "v", "size": 0}, 400, "greater than zero"),
        ({"name": "v", "size": True}, 400, "size must be an integer"),
        ({"name": "v", "size": 1.5}, 400, "size must be an integer"),
        ({"name": "v"}, 400, "missing field 'size'"),
        ({"size": "1MiB"}, 400, "missing field 'name'"),
        ({"name": 7, "size": "1MiB"}, 400, "name must be a non-empty string"),
        ({"name": "Bad_Name", "size": "1MiB"}, 400, "invalid volume name 'Bad_Name'"),
        ({"name": "v", "size": "1MiB", "block_size": 1000}, 400, "block size must be 512 or 4096"),
        ({"name": "v", "size": "1MiB", "block_size": "512"}, 400, "block_size must be an integer"),
        ({"name": "v", "size": 1000}, 400, "not a positive multiple of the block size"),
        ({"name": "v", "size": "1MiB", "chap_user": "u"}, 400, "both chap_user and chap_secret"),
        (
            {"name": "v", "size": "1MiB", "chap_mutual_user": "m", "chap_mutual_secret": "s"},
            400,
            "needs one-way CHAP too",
        ),
        (
            {
                "name": "v",
                "size": "1MiB",
                "chap_user": "u",
                "chap_secret": "same-secret",
                "chap_mutual_user": "m",
                "chap_mutual_secret": "same-secret",
            },
            400,
            "must differ",
        ),
        ({"name": "v", "size": "1MiB", "colour": "red"}, 400, "unknown field 'colour'"),
        ([1, 2], 400, "must be a JSON object"),
        ("{not json", 400, "not valid JSON"),
        ("", 400, "must be a JSON object"),
    ],
)
async def test_create_rejects_bad_requests(
    stack: Stack, client: TestClient[Any, Any], body: Any, status: int, fragment: str
) -> None:
    got_status, got = await call(client, "POST", "/v1/volumes", body)
    assert got_status == status
    assert set(got) == {"error"} and fragment in got["error"]
    assert len(stack.registry) == 0 and stack.manager.list() == []


async def test_duplicate_name_is_a_conflict(client: TestClient[Any, Any]) -> None:
    assert (await call(client, "POST", "/v1/volumes", {"name": "dup", "size": "1MiB"}))[0] == 201
    status, body = await call(client, "POST", "/v1/volumes", {"name": "dup", "size": "2MiB"})
    assert status == 409
    assert body == {"error": "volume 'dup' already exists"}


async def test_get_and_list(client: TestClient[Any, Any]) -> None:
    for name in ("zeta", "alpha"):
        await call(client, "POST", "/v1/volumes", {"name": name, "size": "1MiB"})
    status, body = await call(client, "GET", "/v1/volumes")
    assert status == 200
    assert [v["name"] for v in body["volumes"]] == ["alpha", "zeta"]
    status, one = await call(client, "GET", "/v1/volumes/zeta")
    assert status == 200 and one == body["volumes"][1]


async def test_missing_volume_is_404(client: TestClient[Any, Any]) -> None:
    for method, path, req in (
        ("GET", "/v1/volumes/ghost", None),
        ("POST", "/v1/volumes/ghost/resize", {"size": "2MiB"}),
        ("DELETE", "/v1/volumes/ghost", None),
    ):
        status, body = await call(client, method, path, req)
        assert (status, body) == (404, {"error": "no volume named 'ghost'"}), (method, path)


async def test_resize_grows_and_tells_the_lu(stack: Stack, client: TestClient[Any, Any]) -> None:
    await call(client, "POST", "/v1/volumes", {"name": "grow", "size": "1MiB"})
    target = stack.registry.get(f"{BASE}:grow")
    assert target is not None
    lu = target.lu
    nexus = Nexus("iqn.2026-01.test:init", 1, target.iqn, 1)
    tur = ScsiRequest(nexus, 0, bytes(6), b"", 0)
    for _ in range(5):  # make the nexus known and drain any power-on unit attention
        await lu.execute(tur)
    assert lu.pending_unit_attentions(nexus) == ()

    status, body = await call(client, "POST", "/v1/volumes/grow/resize", {"size": "2MiB"})
    assert status == 200 and body["size"] == 2 * MiB
    assert lu.store.size == 2 * MiB
    assert CAPACITY_DATA_CHANGED in lu.pending_unit_attentions(nexus)
    assert (await call(client, "GET", "/v1/volumes/grow"))[1]["size"] == 2 * MiB


async def test_resize_never_shrinks(stack: Stack, client: TestClient[Any, Any]) -> None:
    await call(client, "POST", "/v1/volumes", {"name": "v", "size": "2MiB"})
    status, body = await call(client, "POST", "/v1/volumes/v/resize", {"size": "1MiB"})
    assert status == 400 and "cannot shrink" in body["error"]
    assert stack.manager.get("v").meta.size == 2 * MiB


@pytest.mark.parametrize(
    ("req", "fragment"),
    [
        ({}, "missing field 'size'"),
        ({"size": "big"}, "invalid size 'big'"),
        ({"size": 1, "x": 1}, "unknown field 'x'"),
    ],
)
async def test_resize_rejects_bad_requests(client: TestClient[Any, Any], req: Any, fragment: str) -> None:
    await call(client, "POST", "/v1/volumes", {"name": "v", "size": "1MiB"})
    status, body = await call(client, "POST", "/v1/volumes/v/resize", req)
    assert status == 400 and fragment in body["error"]


async def test_delete_unexports_then_removes(stack: Stack, client: TestClient[Any, Any]) -> None:
    await call(client, "POST", "/v1/volumes", {"name": "gone", "size": "1MiB"})
    await call(client, "POST", "/v1/volumes", {"name": "kept", "size": "1MiB"})
    status, body = await call(client, "DELETE", "/v1/volumes/gone")
    assert (status, body) == (204, None)
    assert stack.registry.get(f"{BASE}:gone") is None
    assert stack.registry.get(f"{BASE}:kept") is not None
    assert not (stack.data_dir / "volumes" / "gone.img").exists()
    assert not (stack.data_dir / "volumes" / "gone.json").exists()
    assert (await call(client, "GET", "/v1/volumes/gone"))[0] == 404
    # the name is free again
    assert (await call(client, "POST", "/v1/volumes", {"name": "gone", "size": "1MiB"}))[0] == 201


async def test_volumes_survive_a_restart(tmp_path: Path) -> None:
    first = Stack(tmp_path / "data")
    client = await first.start()
    _, created = await call(
        client,
        "POST",
        "/v1/volumes",
        {"name": "keep", "size": "3MiB", "chap_user": "u", "chap_secret": "secret-12345"},
    )
    await first.stop()

    second = Stack(tmp_path / "data")
    client = await second.start()
    try:
        status, body = await call(client, "GET", "/v1/volumes/keep")
        assert status == 200
        assert body == created
        target = second.registry.get(f"{BASE}:keep")
        assert (
            target is not None and target.chap is not None and target.chap.initiator.secret == "secret-12345"
        )
    finally:
        await second.stop()


async def test_healthz_reports_offline_volumes_and_the_rest_serve(tmp_path: Path) -> None:
    first = Stack(tmp_path / "data")
    client = await first.start()
    status, body = await call(client, "GET", "/healthz")
    assert (status, body) == (200, {"status": "ok", "volumes": 0, "offline": []})
    await call(client, "POST", "/v1/volumes", {"name": "good", "size": "1MiB"})
    await call(client, "POST", "/v1/volumes", {"name": "bad", "size": "1MiB"})
    await first.stop()
    (tmp_path / "data" / "volumes" / "bad.json").write_text("{ corrupt")

    second = Stack(tmp_path / "data")
    client = await second.start()
    try:
        status, body = await call(client, "GET", "/healthz")
        assert status == 200
        assert body["status"] == "degraded" and body["volumes"] == 1
        [offline] = body["offline"]
        assert offline["name"] == "bad" and offline["path"].endswith("bad.json") and offline["reason"]
        assert second.registry.get(f"{BASE}:good") is not None
        assert second.registry.get(f"{BASE}:bad") is None
        metrics = await (await client.get("/metrics")).text()
        assert "sparrow_volumes_offline 1.0" in metrics
        # an offline volume can be deleted, which clears it from /healthz
        assert (await call(client, "DELETE", "/v1/volumes/bad"))[0] == 204
        status, body = await call(client, "GET", "/healthz")
        assert body == {"status": "ok", "volumes": 1, "offline": []}
    finally:
        await second.stop()


async def test_metrics(stack: Stack, client: TestClient[Any, Any]) -> None:
    await call(client, "POST", "/v1/volumes", {"name": "m1", "size": "1MiB"})
    stack.metrics.command_done("m1", "read", 4096, 0.0002)
    stack.metrics.session_opened("normal")
    stack.metrics.login_failed("authentication")
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    text = await resp.text()
    assert 'sparrow_volume_size_bytes{volume="m1"} 1.048576e+06' in text
    assert 'sparrow_scsi_commands_total{op="read",volume="m1"} 1.0' in text
    assert 'sparrow_scsi_bytes_total{op="read",volume="m1"} 4096.0' in text
    assert 'sparrow_scsi_command_seconds_bucket{le="0.00025",op="read",volume="m1"} 1.0' in text
    assert 'sparrow_iscsi_sessions{kind="normal"} 1.0' in text
    assert 'sparrow_iscsi_login_failures_total{reason="authentication"} 1.0' in text
    await call(client, "DELETE", "/v1/volumes/m1")
    text = await (await client.get("/metrics")).text()
    assert 'volume="m1"' not in text  # a deleted volume's series are dropped


async def test_metrics_registries_are_separate() -> None:
    a, b = PrometheusMetrics(), PrometheusMetrics()
    a.command_done("v", "write", 512, 0.001)
    assert b'sparrow_scsi_commands_total{op="write",volume="v"}' in a.render()[0]
    assert b'volume="v"' not in b.render()[0]


async def test_unknown_routes_and_methods_answer_json(client: TestClient[Any, Any]) -> None:
    status, body = await call(client, "GET", "/v2/nothing")
    assert status == 404 and body == {"error": "no such endpoint: GET /v2/nothing"}
    status, body = await call(client, "PUT", "/v1/volumes")
    assert status == 405 and body == {"error": "method PUT not allowed on /v1/volumes"}


async def test_oversized_body_is_refused(client: TestClient[Any, Any]) -> None:
    status, body = await call(client, "POST", "/v1/volumes", "x" * (1024 * 1024))
    assert status == 413 and body == {"error": "request body too large"}


async def test_persistent_reservations_are_saved_through_the_manager(tmp_path: Path) -> None:
    """The LU's on_reservations_changed is wired to VolumeManager.save_reservations (APTPL survives
    a restart, SPC-4 5.13.5)."""
    first = Stack(tmp_path / "data")
    client = await first.start()
    await call(client, "POST", "/v1/volumes", {"name": "pr", "size": "1MiB"})
    target = first.registry.get(f"{BASE}:pr")
    assert target is not None
    nexus = Nexus("iqn.2026-01.test:init", 0x23D000000001, target.iqn, 1)
    params = bytearray(24)
    params[8:16] = (0x1234).to_bytes(8, "big")  # SERVICE ACTION RESERVATION KEY
    params[20] = 0x01  # APTPL
    register = bytes([0x5F, 0x00, 0, 0, 0, 0, 0, 0, len(params), 0])  # PERSISTENT RESERVE OUT, REGISTER
    req = ScsiRequest(nexus, 0, register, bytes(params), len(params), write=True)
    for _ in range(3):  # a power-on unit attention may come first
        result = await target.lu.execute(req)
        if result.status == 0:
            break
    assert target.lu.reservations.registered_key(nexus) == 0x1234
    await first.stop()

    second = Stack(tmp_path / "data")
    await second.start()
    try:
        restored = second.registry.get(f"{BASE}:pr")
        assert restored is not None
        assert restored.lu.reservations.registered_key(nexus) == 0x1234
    finally:
        await second.stop()


async def test_physical_block_size_reaches_read_capacity_16(tmp_path: Path) -> None:
    """A 512e volume (512-byte blocks, 4 KiB physical) reports LBPPBE=3 to initiators."""
    from frontend.scsi.types import Nexus, ScsiRequest
    from frontend.target import TargetRegistry
    from sparrow.service import VolumeService, VolumeSpec
    from store.volumes import VolumeManager

    manager = VolumeManager(tmp_path / "data")
    await manager.load_all()
    service = VolumeService(manager, TargetRegistry(), base_iqn="iqn.2026-11.io.sparrow")
    try:
        info = await service.create(VolumeSpec("e512", 1 << 20, block_size=512, physical_block_size=4096))
        assert info.physical_block_size == 4096
        target = service.registry.get(info.iqn)
        assert target is not None
        cdb = bytes([0x9E, 0x10]) + bytes(8) + (32).to_bytes(4, "big") + bytes(2)
        nexus = Nexus("iqn.2026-11.test:host", 1, info.iqn, 1)
        result = await target.lu.execute(ScsiRequest(nexus, 0, cdb, b"", 32, read=True))
        assert bytes(result.data)[13] & 0x0F == 3  # LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT
    finally:
        await service.close()
