"""Durable records: envelope, checksum, schema version, atomic replace."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import crc32c
import pytest

from store.blockstore import StoreError
from store.metadata import (
    CorruptRecord,
    Record,
    RecordMissing,
    RecordWriteError,
    SchemaTooNew,
    canonical_json,
    is_temp_file,
    read_record,
    read_record_async,
    write_record,
    write_record_async,
)

BODY: dict[str, Any] = {"name": "vol1", "size": 1 << 30, "nested": {"b": [1, 2], "a": None}, "t": 1.5}


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_record(path, "volume", 1, BODY)
    assert read_record(path, "volume", 1) == Record("volume", 1, BODY)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


def test_envelope_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_record(path, "volume", 3, BODY)
    env = json.loads(path.read_text())
    assert set(env) == {"kind", "schema_version", "crc32c", "body"}
    assert (env["kind"], env["schema_version"], env["body"]) == ("volume", 3, BODY)
    canon = json.dumps(BODY, sort_keys=True, separators=(",", ":")).encode()
    assert canonical_json(BODY) == canon
    assert env["crc32c"] == crc32c.crc32c(canon)
    assert path.stat().st_mode & 0o777 == 0o600


async def test_async_wrappers(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    await write_record_async(path, "volume", 1, BODY)
    assert (await read_record_async(path, "volume", 1)).body == BODY


def test_replace_keeps_only_the_new_record(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_record(path, "volume", 1, {"v": 1})
    write_record(path, "volume", 1, {"v": 2})
    assert read_record(path, "volume", 1).body == {"v": 2}


@pytest.mark.parametrize("fail_in", ["write", "fsync", "replace"])
def test_crash_mid_write_leaves_the_old_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_in: str
) -> None:
    path = tmp_path / "r.json"
    write_record(path, "volume", 1, {"v": 1})

    def crash(*args: Any) -> Any:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, fail_in, crash)
    with pytest.raises(RecordWriteError) as info:
        write_record(path, "volume", 1, {"v": 2})
    monkeypatch.undo()
    assert isinstance(info.value, StoreError)
    assert read_record(path, "volume", 1).body == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_process_death_mid_write_leaves_a_temp_file_and_the_old_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash is not an exception: the cleanup never runs. Simulate it with an exception that the
    writer's cleanup does not see (unlink also fails)."""
    path = tmp_path / "r.json"
    write_record(path, "volume", 1, {"v": 1})

    def crash(*args: Any) -> Any:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", crash)
    monkeypatch.setattr(os, "unlink", crash)
    with pytest.raises(RecordWriteError):
        write_record(path, "volume", 1, {"v": 2})
    monkeypatch.undo()
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert len(leftovers) == 2 and leftovers[1] == "r.json"
    assert is_temp_file(leftovers[0]) and not is_temp_file("r.json")
    assert read_record(path, "volume", 1).body == {"v": 1}


def _tamper(path: Path, **changes: Any) -> None:
    env = json.loads(path.read_text())
    env.update(changes)
    path.write_text(json.dumps(env))


def test_checksum_mismatch_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_record(path, "volume", 1, BODY)
    _tamper(path, body={**BODY, "size": 2 << 30})
    with pytest.raises(CorruptRecord, match="checksum"):
        read_record(path, "volume", 1)


def test_flipped_byte_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_record(path, "volume", 1, BODY)
    raw = path.read_bytes().replace(b"vol1", b"vol2")
    path.write_bytes(raw)
    with pytest.raises(CorruptRecord):
        read_record(path, "volume", 1)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "not JSON"),
        (b'{"kind": ', "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"kind": "volume", "schema_version": 1, "body": {}}', "missing field 'crc32c'"),
        (b'{"kind": "volume", "schema_version": 1, "crc32c": 0}', "missing field 'body'"),
        (b'{"kind": "volume", "schema_version": "1", "crc32c": 0, "body": {}}', "'schema_version' is not"),
        (b'{"kind": "volume", "schema_version": true, "crc32c": 0, "body": {}}', "'schema_version' is not"),
        (b'{"kind": "volume", "schema_version": 0, "crc32c": 0, "body": {}}', "schema version 0"),
    ],
)
def test_malformed_records_are_corrupt(tmp_path: Path, raw: bytes, reason: str) -> None:
    path = tmp_path / "r.json"
    path.write_bytes(raw)
    with pytest.raises(CorruptRecord, match=reason) as info:
        read_record(path, "volume", 1)
    assert info.value.path == str(path)


def test_wrong_kind_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_record(path, "snapshot", 1, BODY)
    with pytest.raises(CorruptRecord, match="kind"):
        read_record(path, "volume", 1)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_record(path, "volume", 2, BODY)
    assert read_record(path, "volume", 2).schema_version == 2
    with pytest.raises(SchemaTooNew) as info:
        read_record(path, "volume", 1)
    assert (info.value.found, info.value.supported) == (2, 1)


def test_missing_record(tmp_path: Path) -> None:
    with pytest.raises(RecordMissing):
        read_record(tmp_path / "nope.json", "volume", 1)
