"""VolumeManager: create, list, resize, delete, reload, and what a damaged data dir does."""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from store.backing import BackingPolicy
from store.blockstore import StoreError
from store.metadata import read_record, write_record
from store.volumes import (
    VOLUME_SCHEMA_VERSION,
    BackingNotAllowed,
    ChapCredentials,
    InvalidVolume,
    VolumeExists,
    VolumeManager,
    VolumeNotFound,
    naa_from_uuid,
    serial_from_uuid,
)

MiB = 1 << 20


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[VolumeManager]:
    m = VolumeManager(tmp_path / "data")
    assert await m.load_all() == []
    yield m
    await m.close()


async def reopen(m: VolumeManager) -> tuple[VolumeManager, list[Any]]:
    await m.close()
    m2 = VolumeManager(m.data_dir)
    return m2, await m2.load_all()


async def test_create_writes_image_and_record(manager: VolumeManager) -> None:
    vol = await manager.create("vol1", 8 * MiB, block_size=4096)
    vdir = manager.data_dir / "volumes"
    assert sorted(p.name for p in vdir.iterdir()) == ["vol1.img", "vol1.json"]
    assert os.stat(vdir / "vol1.img").st_size == 8 * MiB
    meta = vol.meta
    assert (meta.name, meta.size, meta.block_size, meta.backing, meta.chap) == (
        "vol1",
        8 * MiB,
        4096,
        None,
        None,
    )
    assert meta.reservations == {}
    assert vol.store.size == 8 * MiB and vol.store.block_size == 4096
    rec = read_record(vdir / "vol1.json", "volume", VOLUME_SCHEMA_VERSION)
    assert rec.body["uuid"] == meta.uuid and rec.body["size"] == 8 * MiB
    assert manager.get("vol1") is vol
    assert manager.list() == [vol]


async def test_identifiers_derive_from_the_uuid(manager: VolumeManager) -> None:
    a = await manager.create("a", MiB)
    b = await manager.create("b", MiB)
    assert re.fullmatch(r"[0-9a-f]{32}", a.meta.uuid) and a.meta.uuid != b.meta.uuid
    assert a.meta.serial == a.meta.uuid[:16].upper() == serial_from_uuid(a.meta.uuid)
    assert re.fullmatch(r"6[0-9a-f]{31}", a.meta.naa) and a.meta.naa == naa_from_uuid(a.meta.uuid)
    assert a.meta.naa[1:7] == b.meta.naa[1:7]  # the fixed company id
    assert a.meta.naa != b.meta.naa


def test_naa_layout() -> None:
    u = "0123456789ab4def8123456789abcdef"  # version nibble '4' at index 12
    assert naa_from_uuid(u) == "60a5350" + "0123456789ab" + "def8123456789"


async def test_reload_gives_the_same_volumes(manager: VolumeManager) -> None:
    chap = ChapCredentials("user", "secret-123456", "tgt", "other-secret-1")
    vol = await manager.create("vol1", 4 * MiB, chap=chap)
    await vol.store.write(512, b"\x42" * 512)
    await vol.store.flush()
    await manager.create("vol2", 2 * MiB)
    m2, errors = await reopen(manager)
    try:
        assert errors == []
        assert [v.meta.name for v in m2.list()] == ["vol1", "vol2"]
        again = m2.get("vol1")
        assert again.meta == vol.meta
        assert again.meta.chap == chap
        assert await again.store.read(512, 512) == b"\x42" * 512
    finally:
        await m2.close()


@pytest.mark.parametrize("name", ["", "Vol", "-a", ".a", "a/b", "a_b", "a" * 64, "../x", "a b"])
async def test_invalid_names_are_refused(manager: VolumeManager, name: str) -> None:
    with pytest.raises(InvalidVolume):
        await manager.create(name, MiB)


async def test_longest_and_dotted_names_are_fine(manager: VolumeManager) -> None:
    await manager.create("a" * 63, MiB)
    await manager.create("db-1.prod", MiB)


@pytest.mark.parametrize(
    ("size", "block_size"), [(0, 512), (-512, 512), (1000, 512), (512, 4096), (MiB, 1024), (None, 512)]
)
async def test_invalid_sizes_are_refused(manager: VolumeManager, size: int | None, block_size: int) -> None:
    with pytest.raises(InvalidVolume):
        await manager.create("v", size, block_size=block_size)
    assert not (manager.data_dir / "volumes" / "v.img").exists()


async def test_invalid_chap_is_refused(manager: VolumeManager) -> None:
    for chap in (
        ChapCredentials("", "secret"),
        ChapCredentials("u", "secret", "t", None),
        ChapCredentials("u", "same-secret", "t", "same-secret"),
    ):
        with pytest.raises(InvalidVolume):
            await manager.create("v", MiB, chap=chap)


async def test_duplicate_name_is_refused(manager: VolumeManager) -> None:
    await manager.create("v", MiB)
    with pytest.raises(VolumeExists):
        await manager.create("v", 2 * MiB)
    assert manager.get("v").meta.size == MiB


async def test_get_unknown_volume(manager: VolumeManager) -> None:
    with pytest.raises(VolumeNotFound, match="'nope'"):
        manager.get("nope")
    with pytest.raises(VolumeNotFound):
        await manager.delete("nope")
    with pytest.raises(VolumeNotFound):
        await manager.resize("nope", MiB)


async def test_resize_grows_durably(manager: VolumeManager) -> None:
    vol = await manager.create("v", MiB)
    resized = await manager.resize("v", 3 * MiB)
    assert resized is vol and vol.meta.size == 3 * MiB and vol.store.size == 3 * MiB
    m2, _ = await reopen(manager)
    try:
        assert m2.get("v").meta.size == 3 * MiB
        assert m2.get("v").meta.uuid == vol.meta.uuid
    finally:
        await m2.close()


async def test_resize_refuses_shrink_and_unaligned(manager: VolumeManager) -> None:
    await manager.create("v", MiB, block_size=4096)
    with pytest.raises(InvalidVolume, match="shrink"):
        await manager.resize("v", MiB // 2)
    with pytest.raises(InvalidVolume):
        await manager.resize("v", 2 * MiB + 512)
    assert manager.get("v").meta.size == MiB


async def test_delete_removes_record_and_image(manager: VolumeManager) -> None:
    vol = await manager.create("v", MiB)
    await manager.create("w", MiB)
    await manager.delete("v")
    assert sorted(p.name for p in (manager.data_dir / "volumes").iterdir()) == ["w.img", "w.json"]
    with pytest.raises(VolumeNotFound):
        manager.get("v")
    with pytest.raises(StoreError):
        await vol.store.read(0, 512)  # closed
    m2, errors = await reopen(manager)
    try:
        assert errors == [] and [v.meta.name for v in m2.list()] == ["w"]
    finally:
        await m2.close()


async def test_recreate_after_delete_is_a_new_empty_volume(manager: VolumeManager) -> None:
    old = await manager.create("v", MiB)
    await old.store.write(0, b"\x01" * 512)
    await manager.delete("v")
    new = await manager.create("v", MiB)
    assert new.meta.uuid != old.meta.uuid
    assert await new.store.read(0, 512) == bytes(512)


async def test_backing_file_is_used_and_never_deleted(manager: VolumeManager, tmp_path: Path) -> None:
    manager.backing_policy = BackingPolicy.of([str(tmp_path)])
    backing = tmp_path / "disk.raw"
    backing.write_bytes(b"\x77" * 4096)
    os.truncate(backing, 2 * MiB)
    vol = await manager.create("v", None, backing=str(backing))
    assert vol.meta.size == 2 * MiB and vol.meta.backing == str(backing)
    assert await vol.store.read(0, 4096) == b"\x77" * 4096
    assert not (manager.data_dir / "volumes" / "v.img").exists()
    with pytest.raises(InvalidVolume, match="already used"):
        await manager.create("w", None, backing=str(backing))
    m2, errors = await reopen(manager)
    assert errors == [] and m2.get("v").meta.backing == str(backing)
    await m2.delete("v")
    await m2.close()
    assert backing.read_bytes()[:4096] == b"\x77" * 4096


async def test_missing_backing_is_invalid(manager: VolumeManager, tmp_path: Path) -> None:
    manager.backing_policy = BackingPolicy.of([str(tmp_path)])
    with pytest.raises(InvalidVolume, match="No such file"):
        await manager.create("v", None, backing=str(tmp_path / "absent"))
    assert not (tmp_path / "absent").exists()  # never created


# --- backing paths: only under the allowed prefixes, never grown (issue 7, finding 1) ------------


def backing_file(path: Path, size: int, fill: bytes = b"\x5a") -> bytes:
    data = fill * size
    path.write_bytes(data)
    return data


async def test_no_backing_is_allowed_by_default(manager: VolumeManager, tmp_path: Path) -> None:
    data = backing_file(tmp_path / "disk.raw", MiB)
    with pytest.raises(BackingNotAllowed, match="no backing path is allowed"):
        await manager.create("v", MiB, backing=str(tmp_path / "disk.raw"))
    with pytest.raises(BackingNotAllowed):
        await manager.probe_backing(str(tmp_path / "disk.raw"), block_size=512, size=None)
    assert (tmp_path / "disk.raw").read_bytes() == data and manager.list() == []


async def test_a_backing_outside_the_prefixes_or_through_a_symlink_out_is_refused(
    manager: VolumeManager, tmp_path: Path
) -> None:
    allowed, outside = tmp_path / "disks", tmp_path / "secret"
    allowed.mkdir()
    outside.mkdir()
    data = backing_file(outside / "file", MiB)
    (allowed / "link").symlink_to(outside / "file")
    backing_file(tmp_path / "disks2", MiB)  # a sibling whose name merely starts with the prefix
    manager.backing_policy = BackingPolicy.of([str(allowed)])
    for path in (outside / "file", allowed / "link", allowed / ".." / "secret" / "file", tmp_path / "disks2"):
        with pytest.raises(BackingNotAllowed, match="not under an allowed backing prefix"):
            await manager.create("v", MiB, backing=str(path))
    assert (outside / "file").read_bytes() == data and manager.list() == []


async def test_a_backing_in_the_data_directory_is_refused(manager: VolumeManager, tmp_path: Path) -> None:
    await manager.create("a", MiB)
    manager.backing_policy = BackingPolicy.of([str(tmp_path)])
    with pytest.raises(InvalidVolume, match="inside the data directory"):
        await manager.create("b", MiB, backing=str(manager.data_dir / "volumes" / "a.img"))


async def test_a_backing_file_of_another_size_is_refused_never_grown_or_cut(
    manager: VolumeManager, tmp_path: Path
) -> None:
    manager.backing_policy = BackingPolicy.of([str(tmp_path)])
    path = tmp_path / "disk.raw"
    data = backing_file(path, MiB)
    for size in (2 * MiB, MiB // 2):
        with pytest.raises(InvalidVolume, match="needs exactly"):
            await manager.create("v", size, backing=str(path))
        with pytest.raises(InvalidVolume, match="needs exactly"):
            await manager.probe_backing(str(path), block_size=512, size=size)
    assert path.read_bytes() == data
    vol = await manager.create("v", MiB, backing=str(path))  # exactly its size: fine
    assert vol.meta.size == MiB and vol.meta.backing == str(path)
    with pytest.raises(InvalidVolume, match="never grown"):
        await manager.resize("v", 2 * MiB)
    assert path.read_bytes() == data and vol.meta.size == MiB


async def test_a_backing_that_is_not_a_file_or_device_is_refused(
    manager: VolumeManager, tmp_path: Path
) -> None:
    manager.backing_policy = BackingPolicy.of([str(tmp_path)])
    (tmp_path / "dir").mkdir()
    with pytest.raises(InvalidVolume, match="not a regular file or a block device"):
        await manager.create("v", MiB, backing=str(tmp_path / "dir"))


async def test_save_reservations_is_durable(manager: VolumeManager) -> None:
    vol = await manager.create("v", MiB)
    record = {"generation": 3, "registrations": [{"port": "iqn.x,i,0x1", "key": 17}]}
    await manager.save_reservations("v", record)
    assert vol.meta.reservations == record
    body = read_record(manager.data_dir / "volumes" / "v.json", "volume", VOLUME_SCHEMA_VERSION).body
    assert body["reservations"] == record


async def test_corrupt_record_fails_only_that_volume(manager: VolumeManager) -> None:
    await manager.create("good", MiB)
    await manager.create("bad", MiB)
    bad = manager.data_dir / "volumes" / "bad.json"
    env = json.loads(bad.read_text())
    env["body"]["size"] = 2 * MiB  # checksum no longer matches
    bad.write_text(json.dumps(env))
    m2, errors = await reopen(manager)
    try:
        assert [v.meta.name for v in m2.list()] == ["good"]
        assert len(errors) == 1
        assert (errors[0].name, errors[0].path) == ("bad", str(bad))
        assert "checksum" in errors[0].reason
        with pytest.raises(VolumeExists):
            await m2.create("bad", MiB)  # would overwrite a record someone may want to recover
        await m2.delete("bad")  # but it can be removed
        assert not bad.exists() and not bad.with_suffix(".img").exists()
    finally:
        await m2.close()


async def test_unopenable_data_and_bad_fields_are_reported(manager: VolumeManager) -> None:
    await manager.create("noimg", MiB)
    await manager.create("good", MiB)
    vdir = manager.data_dir / "volumes"
    (vdir / "noimg.img").unlink()
    body = read_record(vdir / "good.json", "volume", VOLUME_SCHEMA_VERSION).body
    write_record(vdir / "renamed.json", "volume", VOLUME_SCHEMA_VERSION, body)  # record names another volume
    bad_fields = {**body, "name": "fields", "block_size": "512"}
    write_record(vdir / "fields.json", "volume", VOLUME_SCHEMA_VERSION, bad_fields)
    m2, errors = await reopen(manager)
    try:
        assert [v.meta.name for v in m2.list()] == ["good"]
        reasons = {e.name: e.reason for e in errors}
        assert set(reasons) == {"noimg", "renamed", "fields"}
        assert "No such file" in reasons["noimg"]
        assert "'good'" in reasons["renamed"]
        assert "block_size" in reasons["fields"]
    finally:
        await m2.close()


async def test_newer_schema_is_reported(manager: VolumeManager) -> None:
    await manager.create("v", MiB)
    path = manager.data_dir / "volumes" / "v.json"
    write_record(path, "volume", 3, read_record(path, "volume", 2).body)
    m2, errors = await reopen(manager)
    try:
        assert m2.list() == [] and len(errors) == 1 and "schema version 3" in errors[0].reason
    finally:
        await m2.close()


async def test_interrupted_create_leaves_an_orphan_that_is_reported_then_replaced(
    manager: VolumeManager,
) -> None:
    vdir = manager.data_dir / "volumes"
    (vdir / "v.img").write_bytes(b"stale" * 1000)  # the data file written, the record never was
    (vdir / ".v.json.tmp-deadbeef").write_text("{half a record")
    m2, errors = await reopen(manager)
    try:
        assert m2.list() == []
        assert [(e.name, e.path) for e in errors] == [("v", str(vdir / "v.img"))]
        assert "orphan" in errors[0].reason
        assert not (vdir / ".v.json.tmp-deadbeef").exists()  # temporary leftovers are removed
        vol = await m2.create("v", MiB)
        assert await vol.store.read(0, 512) == bytes(512)  # none of the stale data shows through
    finally:
        await m2.close()


async def test_failed_record_write_undoes_the_create(
    manager: VolumeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StoreError, match="No space left"):
        await manager.create("v", MiB)
    monkeypatch.undo()
    assert manager.list() == []
    assert list((manager.data_dir / "volumes").iterdir()) == []
    await manager.create("v", MiB)


async def test_physical_block_size_is_stored_and_validated(manager: VolumeManager) -> None:
    vol = await manager.create("e512", 4 * MiB, block_size=512, physical_block_size=4096)
    assert vol.meta.physical_block_size == 4096
    for block, physical in ((4096, 512), (512, 1024), (512, 8192)):
        with pytest.raises(InvalidVolume):
            await manager.create(
                f"bad{block}-{physical}", 4 * MiB, block_size=block, physical_block_size=physical
            )
    m2, errors = await reopen(manager)
    try:
        assert errors == []
        assert m2.get("e512").meta.physical_block_size == 4096
    finally:
        await m2.close()


async def test_older_schema_is_refused_with_the_migrate_command(manager: VolumeManager) -> None:
    await manager.create("old", MiB)
    path = manager.data_dir / "volumes" / "old.json"
    body = read_record(path, "volume", 2).body
    del body["volume_id"]
    write_record(path, "volume", 1, body)  # as a v1 Sparrow wrote it
    m2, errors = await reopen(manager)
    try:
        assert m2.list() == [] and len(errors) == 1
        assert "sparrow migrate" in errors[0].reason and "version 1" in errors[0].reason
    finally:
        await m2.close()


async def test_volume_id_given_by_the_master_fixes_the_identity(manager: VolumeManager) -> None:
    vid = "0123456789abcdef0123456789abcdef"
    vol = await manager.create("cluster", MiB, volume_id=vid)
    assert (vol.meta.volume_id, vol.meta.uuid) == (vid, vid)
    assert vol.meta.serial == serial_from_uuid(vid) and vol.meta.naa == naa_from_uuid(vid)
    with pytest.raises(InvalidVolume):
        await manager.create("bad-id", MiB, volume_id="not-hex")


async def test_close_volume_keeps_the_data_and_open_volume_brings_it_back(manager: VolumeManager) -> None:
    vol = await manager.create("idle", 4 * MiB)
    await vol.store.write(0, b"\x17" * 512)
    await manager.close_volume("idle")
    with pytest.raises(VolumeNotFound):
        manager.get("idle")
    with pytest.raises(VolumeExists):  # still on disk: not a name to create again
        await manager.create("idle", 4 * MiB)
    again = await manager.open_volume("idle")
    assert again.meta == vol.meta
    assert await again.store.read(0, 512) == b"\x17" * 512
    assert await manager.open_volume("idle") is again
    with pytest.raises(VolumeNotFound):
        await manager.open_volume("never-created")
    with pytest.raises(VolumeNotFound):
        await manager.close_volume("never-created")


async def test_a_symlink_inside_the_prefix_is_recorded_as_given(
    manager: VolumeManager, tmp_path: Path
) -> None:
    """A stable name (as /dev/disk/by-id/... is) stays the recorded backing; what it resolves to is
    checked and opened."""
    disks = tmp_path / "disks"
    disks.mkdir()
    backing_file(disks / "sdb", MiB)
    (disks / "by-id").mkdir()
    (disks / "by-id" / "wwn-1").symlink_to(disks / "sdb")
    manager.backing_policy = BackingPolicy.of([str(disks)])
    vol = await manager.create("v", None, backing=str(disks / "by-id" / "wwn-1"))
    assert vol.meta.backing == str(disks / "by-id" / "wwn-1") and vol.meta.size == MiB
    m2, errors = await reopen(manager)
    assert errors == [] and m2.get("v").meta.size == MiB
    await m2.close()
