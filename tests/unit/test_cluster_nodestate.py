"""sparrow.cluster.nodestate: the node's durable per-volume roles and its incarnation record."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

import store.metadata
from sparrow.cluster import nodestate
from sparrow.cluster.messages import Assignment, InvalidMessage, Role
from sparrow.cluster.nodestate import (
    NODE_RECORD_FILE,
    VOLUME_ROLE_KIND,
    VOLUME_ROLE_SCHEMA_VERSION,
    EpochConflict,
    EpochRegression,
    NodeIdentityMismatch,
    NodeRecord,
    NodeState,
    VolumeRole,
    VolumeStateUnreadable,
)
from store.metadata import CorruptRecord, RecordWriteError, read_record, write_record

VOL_A = "a" * 32
VOL_B = "b" * 32
VOL_C = "c" * 32


def role(volume_id: str = VOL_A, epoch: int = 1, which: Role = Role.PRIMARY, name: str = "vol") -> VolumeRole:
    primary = "n1" if which is Role.PRIMARY else "n2"
    replicas = ("n1",) if which is Role.PRIMARY else ("n2", "n1") if which is Role.REPLICA else ("n2",)
    return VolumeRole(
        volume_id=volume_id,
        name=name,
        epoch=epoch,
        role=which,
        primary=primary,
        primary_portal=f"10.0.0.{primary[1]}:3260",
        replicas=replicas,
        size=1 << 20,
        block_size=512,
    )


def loaded(tmp_path: Path) -> NodeState:
    state = NodeState(tmp_path)
    assert state.load() == ()
    return state


# ---- VolumeRole ---------------------------------------------------------------------------------


def test_from_assignment_gives_this_nodes_role() -> None:
    a = Assignment(VOL_A, "vol", 1 << 20, 512, 4, "n1", "10.0.0.1:3260", ("n1", "n2"))
    assert VolumeRole.from_assignment(a, "n1").role is Role.PRIMARY
    assert VolumeRole.from_assignment(a, "n2").role is Role.REPLICA
    assert VolumeRole.from_assignment(a, "n3").role is Role.NONE
    r = VolumeRole.from_assignment(a, "n2")
    assert r.as_assignment() == a
    assert r.restored_epoch.value == 4


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("volume_id", "not-hex"),
        ("epoch", -1),
        ("epoch", True),
        ("role", "primary"),
        ("block_size", 1000),
        ("replicas", ("n2", "n2")),
    ],
)
def test_volume_role_validates(field: str, value: Any) -> None:
    fields = role().to_record() | {"role": Role.PRIMARY, "replicas": ("n1",)}
    fields[field] = value
    with pytest.raises(InvalidMessage):
        VolumeRole(**fields)


def test_primary_role_needs_a_primary() -> None:
    with pytest.raises(InvalidMessage, match="role"):
        VolumeRole(VOL_A, "vol", 1, Role.PRIMARY, None, None, ("n1",), 1 << 20, 512)


# ---- round trip ---------------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    state = loaded(tmp_path)
    roles = [role(VOL_A, 3, Role.PRIMARY), role(VOL_B, 7, Role.REPLICA), role(VOL_C, 2, Role.NONE)]
    for r in roles:
        state.persist(r)
    assert dict(state.roles) == {r.volume_id: r for r in roles}

    again = NodeState(tmp_path)
    assert again.load() == ()
    assert dict(again.roles) == {r.volume_id: r for r in roles}
    assert again.unreadable == {}


def test_record_layout(tmp_path: Path) -> None:
    state = loaded(tmp_path)
    state.persist(role(VOL_A, 3))
    path = tmp_path / "cluster" / f"{VOL_A}.json"
    assert state.path_of(VOL_A) == path
    record = read_record(path, "cluster-volume", 1)
    assert record.schema_version == VOLUME_ROLE_SCHEMA_VERSION == 1
    assert record.body["epoch"] == 3
    assert record.body["role"] == "primary"
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)


def test_load_creates_the_directory(tmp_path: Path) -> None:
    state = NodeState(tmp_path / "data")
    assert state.load() == ()
    assert (tmp_path / "data" / "cluster").is_dir()
    assert state.roles == {}


# ---- the epoch floor ----------------------------------------------------------------------------


def test_lower_epoch_is_refused_and_the_record_is_unchanged(tmp_path: Path) -> None:
    state = loaded(tmp_path)
    state.persist(role(VOL_A, 5))
    before = state.path_of(VOL_A).read_bytes()
    with pytest.raises(EpochRegression) as info:
        state.persist(role(VOL_A, 4, Role.REPLICA))
    assert (info.value.persisted, info.value.offered) == (5, 4)
    assert state.path_of(VOL_A).read_bytes() == before
    assert state.get(VOL_A) == role(VOL_A, 5)


def test_same_epoch_same_role_is_a_no_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = loaded(tmp_path)
    state.persist(role(VOL_A, 5))
    writes: list[object] = []
    monkeypatch.setattr(nodestate, "write_record", lambda *args: writes.append(args))
    state.persist(role(VOL_A, 5))
    assert writes == []


def test_same_epoch_different_role_is_a_conflict(tmp_path: Path) -> None:
    state = loaded(tmp_path)
    state.persist(role(VOL_A, 5))
    with pytest.raises(EpochConflict):
        state.persist(role(VOL_A, 5, Role.REPLICA))
    assert state.get(VOL_A) == role(VOL_A, 5)


def test_higher_epoch_replaces(tmp_path: Path) -> None:
    state = loaded(tmp_path)
    state.persist(role(VOL_A, 5))
    state.persist(role(VOL_A, 6, Role.REPLICA))
    again = loaded(tmp_path)
    assert again.get(VOL_A) == role(VOL_A, 6, Role.REPLICA)


# ---- corrupt records ----------------------------------------------------------------------------


def _corrupt_garbage(path: Path) -> None:
    path.write_bytes(b"\x00not json")


def _corrupt_checksum(path: Path) -> None:
    envelope = json.loads(path.read_bytes())
    envelope["body"]["epoch"] += 1
    path.write_text(json.dumps(envelope))


def _corrupt_body(path: Path) -> None:
    body = role(VOL_B).to_record() | {"role": "boss"}
    write_record(path, VOLUME_ROLE_KIND, 1, body)


def _corrupt_missing_field(path: Path) -> None:
    body = role(VOL_B).to_record()
    del body["size"]
    write_record(path, VOLUME_ROLE_KIND, 1, body)


def _wrong_volume(path: Path) -> None:
    write_record(path, VOLUME_ROLE_KIND, 1, role(VOL_C).to_record())


def _too_new(path: Path) -> None:
    write_record(path, VOLUME_ROLE_KIND, 2, role(VOL_B).to_record())


def _wrong_kind(path: Path) -> None:
    write_record(path, "volume", 1, role(VOL_B).to_record())


@pytest.mark.parametrize(
    "damage",
    [
        _corrupt_garbage,
        _corrupt_checksum,
        _corrupt_body,
        _corrupt_missing_field,
        _wrong_volume,
        _too_new,
        _wrong_kind,
    ],
)
def test_a_corrupt_record_is_reported_and_the_others_load(tmp_path: Path, damage: Any) -> None:
    state = loaded(tmp_path)
    for r in (role(VOL_A, 3), role(VOL_B, 4), role(VOL_C, 5, Role.REPLICA)):
        state.persist(r)
    damage(state.path_of(VOL_B))

    again = NodeState(tmp_path)
    problems = again.load()
    assert [p.volume_id for p in problems] == [VOL_B]
    assert problems[0].path == str(again.path_of(VOL_B))
    assert problems[0].reason
    assert set(again.roles) == {VOL_A, VOL_C}
    assert again.get(VOL_A) == role(VOL_A, 3)
    assert set(again.unreadable) == {VOL_B}


def test_an_unreadable_volume_is_never_overwritten(tmp_path: Path) -> None:
    state = loaded(tmp_path)
    state.persist(role(VOL_B, 9))
    _corrupt_checksum(state.path_of(VOL_B))
    damaged = state.path_of(VOL_B).read_bytes()
    again = NodeState(tmp_path)
    assert len(again.load()) == 1
    with pytest.raises(VolumeStateUnreadable):
        again.persist(role(VOL_B, 1))
    assert again.path_of(VOL_B).read_bytes() == damaged


def test_load_removes_temp_files_and_ignores_strangers(tmp_path: Path) -> None:
    state = loaded(tmp_path)
    state.persist(role(VOL_A, 1))
    leftover = state.directory / f".{VOL_A}.json.tmp-0badc0de"
    leftover.write_bytes(b"half a rec")
    stranger = state.directory / "README.txt"
    stranger.write_text("hello")
    again = NodeState(tmp_path)
    assert again.load() == ()
    assert not leftover.exists()
    assert stranger.exists()
    assert set(again.roles) == {VOL_A}


# ---- atomicity ----------------------------------------------------------------------------------


def test_failed_rename_leaves_the_old_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = loaded(tmp_path)
    state.persist(role(VOL_A, 1))

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(RecordWriteError):
        state.persist(role(VOL_A, 2, Role.REPLICA))
    monkeypatch.undo()

    assert state.get(VOL_A) == role(VOL_A, 1)  # memory follows the disk, not the attempt
    assert os.listdir(state.directory) == [f"{VOL_A}.json"]  # no temp file left behind
    assert loaded(tmp_path).get(VOL_A) == role(VOL_A, 1)


def test_crash_mid_write_leaves_the_old_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed after the temporary file is written and before the rename."""
    state = loaded(tmp_path)
    state.persist(role(VOL_A, 1))

    class Killed(BaseException):
        pass

    real_replace = os.replace
    survivors: list[str] = []

    def killed(src: Any, dst: Any) -> None:
        survivors.extend(os.listdir(state.directory))
        raise Killed

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(Killed):
        state.persist(role(VOL_A, 2))
    monkeypatch.setattr(os, "replace", real_replace)
    # At the instant of the "kill" the new bytes were complete in a temporary file only.
    temp = [name for name in survivors if name != f"{VOL_A}.json"]
    assert len(temp) == 1 and store.metadata.is_temp_file(temp[0])
    # Recreate what a real kill leaves behind (the writer's cleanup never ran).
    (state.directory / temp[0]).write_bytes(b'{"kind": "cluster-volume", "trunc')

    again = NodeState(tmp_path)
    assert again.load() == ()
    assert again.get(VOL_A) == role(VOL_A, 1)
    assert os.listdir(again.directory) == [f"{VOL_A}.json"]


# ---- async wrappers -----------------------------------------------------------------------------


async def test_async_persist_writes_off_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = NodeState(tmp_path)
    assert await state.load_async() == ()
    threads: list[int] = []
    real = store.metadata.write_record

    def spy(*args: Any) -> None:
        threads.append(threading.get_ident())
        real(*args)

    monkeypatch.setattr(nodestate, "write_record", spy)
    await state.persist_async(role(VOL_A, 2))
    await state.persist_async(role(VOL_A, 2))  # already persisted: no write
    assert len(threads) == 1 and threads[0] != threading.get_ident()
    with pytest.raises(EpochRegression):
        await state.persist_async(role(VOL_A, 1))
    again = NodeState(tmp_path)
    assert await again.load_async() == ()
    assert again.get(VOL_A) == role(VOL_A, 2)


# ---- forget (the master deleted the volume) -----------------------------------------------------


class FsyncSpy:
    """Stands in for ``fsync_dir``; records each call with the files the directory held then."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[Path, list[str]]] = []
        self.fail = fail

    def __call__(self, path: Any) -> None:
        self.calls.append((Path(path), sorted(os.listdir(path))))
        if self.fail:
            raise OSError(5, "Input/output error")


def test_forget_removes_the_record_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = loaded(tmp_path)
    state.persist(role(VOL_A, 3))
    state.persist(role(VOL_B, 1))
    spy = FsyncSpy()
    monkeypatch.setattr(nodestate, "fsync_dir", spy)
    state.forget(VOL_A)
    # The directory was fsynced after the unlink (so the removal survives a power loss).
    assert spy.calls == [(state.directory, [f"{VOL_B}.json"])]
    assert state.get(VOL_A) is None and set(state.roles) == {VOL_B}
    again = loaded(tmp_path)
    assert set(again.roles) == {VOL_B}
    # The epoch floor went with the record: the volume id could be assigned afresh.
    again.persist(role(VOL_A, 1))
    assert again.get(VOL_A) == role(VOL_A, 1)


def test_forget_is_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = loaded(tmp_path)
    state.persist(role(VOL_A, 1))
    state.forget(VOL_A)
    spy = FsyncSpy()
    monkeypatch.setattr(nodestate, "fsync_dir", spy)
    state.forget(VOL_A)  # already gone
    state.forget(VOL_C)  # never known
    assert spy.calls == []
    assert dict(state.roles) == {} and os.listdir(state.directory) == []


def test_forget_removes_an_unreadable_record(tmp_path: Path) -> None:
    state = loaded(tmp_path)
    state.persist(role(VOL_A, 4))
    state.path_of(VOL_A).write_bytes(b"garbage")
    broken = NodeState(tmp_path)
    assert [p.volume_id for p in broken.load()] == [VOL_A]
    broken.forget(VOL_A)
    assert dict(broken.unreadable) == {} and not broken.path_of(VOL_A).exists()
    assert loaded(tmp_path).roles == {}
    broken.persist(role(VOL_A, 1))  # no longer refused as unreadable


def test_a_failed_unlink_keeps_the_role(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = loaded(tmp_path)
    state.persist(role(VOL_A, 2))

    def broken_unlink(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "unlink", broken_unlink)
    with pytest.raises(RecordWriteError):
        state.forget(VOL_A)
    monkeypatch.undo()
    assert state.get(VOL_A) == role(VOL_A, 2)
    assert loaded(tmp_path).get(VOL_A) == role(VOL_A, 2)


def test_a_failed_fsync_keeps_the_role_and_a_retry_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = loaded(tmp_path)
    state.persist(role(VOL_A, 2))
    monkeypatch.setattr(nodestate, "fsync_dir", FsyncSpy(fail=True))
    with pytest.raises(RecordWriteError):
        state.forget(VOL_A)
    # Unlinked, but not known to be durable: the in-memory view keeps the role (and its floor).
    assert not state.path_of(VOL_A).exists() and state.get(VOL_A) == role(VOL_A, 2)
    spy = FsyncSpy()
    monkeypatch.setattr(nodestate, "fsync_dir", spy)
    state.forget(VOL_A)  # the file is gone already; the directory is fsynced this time
    assert spy.calls == [(state.directory, [])]
    assert state.get(VOL_A) is None


@pytest.mark.parametrize("volume_id", ["../" + "a" * 29, "A" * 32, ""])
def test_forget_refuses_a_malformed_volume_id(tmp_path: Path, volume_id: str) -> None:
    state = loaded(tmp_path)
    with pytest.raises(InvalidMessage):
        state.forget(volume_id)


async def test_async_forget_runs_off_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = NodeState(tmp_path)
    assert await state.load_async() == ()
    await state.persist_async(role(VOL_A, 2))
    await state.persist_async(role(VOL_B, 1))
    threads: list[int] = []
    real = store.metadata.fsync_dir

    def spy(path: Any) -> None:
        threads.append(threading.get_ident())
        real(path)

    monkeypatch.setattr(nodestate, "fsync_dir", spy)
    await state.forget_async(VOL_A)
    await state.forget_async(VOL_A)  # gone: nothing to do
    assert len(threads) == 1 and threads[0] != threading.get_ident()
    assert set(state.roles) == {VOL_B}
    again = NodeState(tmp_path)
    assert await again.load_async() == ()
    assert set(again.roles) == {VOL_B}
    with pytest.raises(InvalidMessage):
        await state.forget_async("not-a-volume-id")


# ---- incarnation --------------------------------------------------------------------------------


def test_incarnation_grows_even_if_the_clock_goes_back(tmp_path: Path) -> None:
    state = NodeState(tmp_path)
    first = state.begin_incarnation("n1", 1_000)
    assert first == NodeRecord("n1", 1_000)
    assert NodeState(tmp_path).begin_incarnation("n1", 500).incarnation == 1_001
    assert NodeState(tmp_path).begin_incarnation("n1", 5_000).incarnation == 5_000
    record = read_record(tmp_path / NODE_RECORD_FILE, "cluster-node", 1)
    assert record.body == {"node_id": "n1", "incarnation": 5_000}


def test_incarnation_refuses_another_nodes_data_dir(tmp_path: Path) -> None:
    NodeState(tmp_path).begin_incarnation("n1", 1)
    with pytest.raises(NodeIdentityMismatch):
        NodeState(tmp_path).begin_incarnation("n2", 2)
    assert read_record(tmp_path / NODE_RECORD_FILE, "cluster-node", 1).body["node_id"] == "n1"


def test_corrupt_incarnation_record_is_an_error(tmp_path: Path) -> None:
    (tmp_path / NODE_RECORD_FILE).write_text("{}")
    with pytest.raises(CorruptRecord):
        NodeState(tmp_path).begin_incarnation("n1", 1)


async def test_incarnation_async(tmp_path: Path) -> None:
    record = await NodeState(tmp_path).begin_incarnation_async("n1", 42)
    assert record.incarnation == 42
