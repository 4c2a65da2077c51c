"""sparrow.master.audit: what a line holds (no secret), durable appends, the reader, and the
Publisher's hook: an epoch the audit log cannot hold is never minted."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from sparrow.cluster.authority import AuthorityStore
from sparrow.cluster.lease import LeaseConfig
from sparrow.cluster.messages import Assignment
from sparrow.cluster.publisher import Publisher
from sparrow.master.api import MasterApi, MasterMetrics, build_app
from sparrow.master.audit import (
    VERBS,
    AuditError,
    AuditLog,
    call_args,
    format_record,
    parse_time,
    read_records,
    scrub,
    select,
    verb,
)
from sparrow.master.control import restore
from store.migrations import AUTHORITY_FILE
from tests.unit.test_cluster_publisher import VOL_A, Ask, committed, seed

SECRET = "chap-secret-0123456789ab"


def test_only_public_fields_are_logged_and_secret_values_are_cut_from_messages() -> None:
    body = json.dumps(
        {
            "name": "db",
            "size": "64MiB",
            "chap_user": "u",
            "chap_secret": SECRET,
            "chap_mutual_secret": "mutual-secret-xyz",
            "future_field": {"nested": "hidden-value"},
        }
    ).encode()
    parsed = call_args({"name": "db"}, {"wait": "10", "token": "t"}, body)
    assert parsed.args == {"name": "db", "size": "64MiB", "chap_user": "u", "wait": "10"}
    assert parsed.redacted == ("chap_secret", "chap_mutual_secret", "future_field")
    assert SECRET not in json.dumps(parsed.args)
    message = f"chap_secret {SECRET} must differ from mutual-secret-xyz; hidden-value"
    assert scrub(message, parsed.secrets) == "chap_secret <redacted> must differ from <redacted>; <redacted>"
    garbage = call_args({}, {}, b"not json " + SECRET.encode())
    assert garbage.args == {} and garbage.redacted == ("<body: not a JSON object>",)
    assert SECRET not in scrub("echo: not json " + SECRET, garbage.secrets)


def test_verbs_name_known_routes_and_fall_back_to_method_and_route() -> None:
    assert verb("POST", "/v1/volumes") == "volume.create"
    assert verb("DELETE", "/v1/tokens/{id}") == "token.revoke"
    assert verb("POST", "/v1/volumes/{name}/pause") == "volume.pause"
    assert verb("PATCH", "/v1/volumes/{name}") == "volume.update"
    assert verb("POST", "/v1/volumes/{name}/nope") == "POST /v1/volumes/{name}/nope"


def test_every_mutating_route_of_the_api_has_a_verb(tmp_path: Path) -> None:
    """A route added without a VERBS row would be audited as "METHOD /route": name it."""
    control = restore(AuthorityStore.open_in(tmp_path), LeaseConfig(), 100.0)
    api = MasterApi(control=control, metrics=MasterMetrics(), clock=lambda: 100.0, base_iqn="iqn.x")
    app = build_app(api)
    mutating = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method in {"POST", "PUT", "PATCH", "DELETE"} and route.resource is not None
    }
    assert mutating, "no mutating route found"
    assert mutating - set(VERBS) == set()


def test_appends_are_whole_lines_in_a_0600_file_and_the_reader_joins_calls_with_results(
    tmp_path: Path,
) -> None:
    (tmp_path / "audit.jsonl").write_text("")
    os.chmod(tmp_path / "audit.jsonl", 0o644)
    clock = iter([1_000.0, 1_001.0, 1_002.0, 1_003.0]).__next__
    log = AuditLog.open_in(tmp_path, wall_clock=clock)
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600
    log.append({"type": "call", "id": "c1", "who": "t1", "verb": "volume.create", "volume": "a"})
    log.append({"type": "call", "id": "c2", "who": None, "verb": "volume.delete", "volume": "b",
                "status": 401})  # fmt: skip
    log.append({"type": "result", "id": "c1", "status": 201, "error": None})
    log.append({"type": "epoch", "volume": "a", "epoch": 1, "primary": "n1", "copies": ["n1"], "reason": "r"})
    with log.path.open("a") as f:
        f.write('{"time": "1970-01-01T00:20:00.000Z", "type": "call", "id": "torn"')  # a crash mid-line
    records = read_records(log.path)
    assert [(r.type, r.fields.get("id"), r.fields.get("status")) for r in records] == [
        ("call", "c1", 201),
        ("call", "c2", 401),
        ("epoch", None, None),
    ]
    assert records[0].time == "1970-01-01T00:16:40.000Z"
    assert [r.fields.get("id") for r in select(records, since=None, volume="b")] == ["c2"]
    assert [r.type for r in select(records, since="1970-01-01T00:16:43.000Z", volume=None)] == ["epoch"]
    assert "201  t1  volume.create" in format_record(records[0])
    assert "epoch  a epoch 1 primary n1" in format_record(records[2])


def test_since_takes_iso_times_and_durations() -> None:
    assert parse_time("2026-12-02T09:00:00Z", 0) == "2026-12-02T09:00:00.000Z"
    assert parse_time("2026-12-02T10:00:00+01:00", 0) == "2026-12-02T09:00:00.000Z"
    assert parse_time("15m", 3600.0) == "1970-01-01T00:45:00.000Z"
    with pytest.raises(ValueError, match="duration"):
        parse_time("yesterday", 0)


def test_a_removed_or_unwritable_log_raises_audit_error(tmp_path: Path) -> None:
    log = AuditLog.open_in(tmp_path)
    log.path.unlink()
    with pytest.raises(AuditError, match="cannot write the audit log"):
        log.append({"type": "call"})
    assert not log.path.exists()  # never recreated in silence
    os.symlink("/dev/full", log.path)
    with pytest.raises(AuditError, match="No space left on device"):
        log.append({"type": "call"})


def test_the_publisher_records_each_epoch_before_commit_and_mints_nothing_it_could_not_record(
    tmp_path: Path,
) -> None:
    path = tmp_path / AUTHORITY_FILE
    seed(path)
    seen: list[tuple[int, str, dict[str, object]]] = []

    def on_mint(assignment: Assignment, reason: str) -> None:
        seen.append((assignment.epoch, reason, committed(path)))  # what another reader sees then

    with AuthorityStore.open(path) as store:
        publisher = Publisher(store, on_mint=on_mint)
        publisher.publish(Ask(VOL_A, "n1", ("n1",), reason="placed"))
        publisher.resize(VOL_A, 2 << 20)
        assert [(e, r) for e, r, _ in seen] == [(1, "placed"), (2, f"resized to {2 << 20} bytes")]
        assert seen[0][2] == {} and seen[1][2] == {VOL_A: [(1, "n1")]}  # called before COMMIT

        def full(assignment: Assignment, reason: str) -> None:
            raise AuditError("cannot write the audit log: No space left on device")

        broken = Publisher(store, on_mint=full)
        with pytest.raises(AuditError):
            broken.publish(Ask(VOL_A, "n2", ("n2",)))
        with pytest.raises(AuditError):
            broken.resize(VOL_A, 4 << 20)
        assert committed(path) == {VOL_A: [(1, "n1"), (2, "n1")]}
        assert store.volume(VOL_A).size == 2 << 20  # type: ignore[union-attr]


def test_the_epoch_line_names_the_volume_its_copies_and_the_reason(tmp_path: Path) -> None:
    path = tmp_path / AUTHORITY_FILE
    seed(path)
    log = AuditLog.open_in(tmp_path)
    with AuthorityStore.open(path) as store:
        Publisher(store, on_mint=log.epoch_minted).publish(Ask(VOL_A, "n1", ("n1", "n2"), reason="placed"))
    (line,) = [json.loads(x) for x in log.path.read_text().splitlines()]
    assert {k: v for k, v in line.items() if k != "time"} == {
        "type": "epoch",
        "volume": "vol0",
        "volume_id": VOL_A,
        "epoch": 1,
        "primary": "n1",
        "copies": ["n1", "n2"],
        "in_sync": ["n1", "n2"],
        "reason": "placed",
    }
