"""``sparrow top``'s core (sparrow.top.snapshot) and its frame (sparrow.top.render): no sockets,
``now`` passed in. The inputs are what the real producers emit: the master's API answers from a
real control loop (tests.unit.test_master_api.Master) and a real node metrics registry's text."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparrow.cluster.messages import Health, ReplicaState, Role, SyncState, VolumeObservation
from sparrow.metrics import PrometheusMetrics
from sparrow.top.render import frame, plain_text
from sparrow.top.snapshot import (
    CopyRow,
    IoCounter,
    IoRate,
    NodeRow,
    Snapshot,
    VolumeRow,
    counters_from_metrics,
    io_rates,
    metrics_targets,
    snapshot,
)
from tests.unit.test_master_api import Master

MiB = 1 << 20


def metrics_text(writes: int, reads: int = 0, volume: str = "v") -> str:
    """A node's /metrics after ``writes`` 4 KiB writes and ``reads`` 64 KiB reads of ``volume``."""
    m = PrometheusMetrics()
    m.volume_served(volume, 64 * MiB)
    for _ in range(writes):
        m.command_done(volume, "write", 4096, 0.001)
    for _ in range(reads):
        m.command_done(volume, "read", 65536, 0.001)
    m.command_done(volume, "other", 0, 0.001)  # not I/O: never in a rate
    return m.render()[0].decode()


def snap(now: float, **counters: tuple[float, float]) -> Snapshot:
    """A snapshot with write counters ``{"NODE__VOLUME": (commands, bytes)}``."""
    parsed = {}
    for key, (commands, nbytes) in counters.items():
        node, volume = key.split("__")
        parsed[(node, volume, "write")] = IoCounter(commands, nbytes)
    return Snapshot(taken_at=now, volumes=(), counters=parsed)


# --- reading the producers' output ---------------------------------------------------------------


def test_the_counters_are_read_from_a_real_node_registry() -> None:
    counters = counters_from_metrics("n1", metrics_text(writes=3, reads=2))
    assert counters == {
        ("n1", "v", "write"): IoCounter(3, 3 * 4096),
        ("n1", "v", "read"): IoCounter(2, 2 * 65536),
    }


def test_a_node_answer_that_is_not_metrics_is_a_scrape_error_not_a_crash() -> None:
    s = snapshot(5.0, {"volumes": []}, scrapes={"n1": "<html>{{{ not metrics", "n2": metrics_text(1)})
    assert set(s.scrape_errors) == {"n1"} and "unreadable /metrics" in s.scrape_errors["n1"]
    assert ("n2", "v", "write") in s.counters


async def test_the_masters_real_answers_become_rows(master: Master) -> None:
    master.node_reports("n1", 1)
    master.node_reports("n2", 1)
    created = await master.json("POST", "/v1/volumes", {"name": "two", "size": 64 * MiB, "replicas": 2}, 201)
    vid = created["volume_id"]
    master.clock.now = 11.0
    master.control.step(11.0)
    await master.json("POST", "/v1/nodes/n2/drain", None, 200)
    master.clock.now = 12.0
    syncing = ReplicaState("n2", SyncState.SYNCING, 0, 16 * MiB, 64 * MiB)
    master.node_reports("n1", 201, VolumeObservation(vid, 1, Role.PRIMARY, Health.OK, 0, (syncing,), True))
    master.control.step(12.0)
    master.clock.now = 13.0
    master.node_reports("n1", 401, VolumeObservation(vid, 2, Role.PRIMARY, Health.OK, 0, (syncing,), True))
    master.control.step(13.0)

    s = snapshot(13.0, await master.json("GET", "/v1/volumes"), await master.json("GET", "/v1/nodes"))
    (volume,) = s.volumes
    assert (volume.name, volume.size, volume.epoch, volume.primary) == ("two", 64 * MiB, 2, "n1")
    assert volume.replicas_wanted == 2
    assert volume.copies == (
        CopyRow("n1", primary=True, alive=True, sync="in_sync"),
        CopyRow("n2", primary=False, alive=True, sync="syncing", resync_done=16 * MiB, resync_total=64 * MiB),
    )
    n1, n2 = s.nodes
    assert (n1.node_id, n1.state, n1.capacity_bytes, n1.free_bytes, n1.draining) == (
        "n1", "alive", 1 << 40, 1 << 30, False,
    )  # fmt: skip
    assert n2.draining and n2.drain_status is not None
    assert n1.heartbeat_age is not None
    assert metrics_targets(s.nodes) == {
        "n1": "http://192.0.2.1:8080/metrics",
        "n2": "http://192.0.2.1:8080/metrics",
    }


def test_a_wildcard_http_address_is_dialled_at_the_portals_host() -> None:
    node = NodeRow("n1", "alive", http="0.0.0.0:3281", iscsi_portal="10.0.0.7:3260")
    assert node.metrics_url() == "http://10.0.0.7:3281/metrics"
    assert NodeRow("n1", "alive", http="0.0.0.0:3281", iscsi_portal="0.0.0.0:3260").metrics_url() is None
    assert NodeRow("n1", "alive").metrics_url() is None
    assert metrics_targets([NodeRow("n1", "dead", http="127.0.0.1:1")]) == {}  # not scraped


def test_garbage_answers_give_empty_rows_not_exceptions() -> None:
    s = snapshot(
        1.0,
        {"volumes": [None, {"name": 3}, {"name": "ok", "replicas": [1, {"node_id": None}]}]},
        {"nodes": "nope"},
    )
    assert [v.name for v in s.volumes] == ["ok"] and s.volumes[0].copies == ()
    assert s.nodes == ()
    assert snapshot(1.0, None).volumes == ()


# --- rates ---------------------------------------------------------------------------------------


def test_rates_are_the_increase_per_second_between_two_snapshots() -> None:
    first = snapshot(100.0, {"volumes": []}, scrapes={"n1": metrics_text(writes=10, reads=1)})
    second = snapshot(102.0, {"volumes": []}, scrapes={"n1": metrics_text(writes=30, reads=5)})
    assert io_rates(first, second) == {
        "v": IoRate(read_ops=2.0, write_ops=10.0, read_bytes=2 * 65536, write_bytes=10 * 4096)
    }


def test_rates_sum_every_node_that_counted_the_volume() -> None:
    # A failover between the snapshots: n1 counted some writes, then n2 took over.
    before = snap(10.0, n1__v=(100, 409600), n2__v=(0, 0))
    after = snap(11.0, n1__v=(150, 614400), n2__v=(50, 204800))
    assert io_rates(before, after) == {"v": IoRate(write_ops=100.0, write_bytes=409600.0)}


def test_a_counter_that_went_down_was_reset() -> None:
    # The node restarted between the snapshots: its counters began again at 0 and now say 40.
    assert io_rates(snap(0.0, n1__v=(1000, 4096000)), snap(2.0, n1__v=(40, 163840))) == {
        "v": IoRate(write_ops=20.0, write_bytes=81920.0)
    }


def test_a_series_in_only_one_snapshot_has_no_rate() -> None:
    rates = io_rates(snap(0.0, n1__old=(5, 5)), snap(1.0, n1__new=(9, 9)))
    assert rates == {}  # neither volume has a rate: unknown, not zero
    assert io_rates(snap(0.0, n1__v=(5, 5)), snap(1.0, n1__v=(5, 5))) == {"v": IoRate()}


@pytest.mark.parametrize("later", [0.0, -1.0])
def test_no_rate_when_no_time_passed(later: float) -> None:
    assert io_rates(snap(5.0, n1__v=(1, 1)), snap(5.0 + later, n1__v=(9, 9))) == {}


# --- the frame -----------------------------------------------------------------------------------


def _frame_text(s: Snapshot, rates: dict[str, IoRate] | None, live: bool = False) -> str:
    return plain_text(
        frame(
            s, rates, source="http://m:3280", clock_text="2026-12-02 12:00:00 UTC", interval=2.0, live=live
        ),
        width=160,
    )


VOLUMES = (
    VolumeRow(
        name="busy",
        size=64 * MiB,
        epoch=3,
        primary="n1",
        copies=(
            CopyRow("n1", primary=True, alive=True, sync="in_sync"),
            CopyRow(
                "n2", primary=False, alive=True, sync="syncing", resync_done=21 * MiB, resync_total=50 * MiB
            ),
            CopyRow("n3", primary=False, alive=False, sync="stale"),
        ),
        replicas_wanted=3,
        served=True,
    ),
    VolumeRow(
        name="lost",
        size=1 << 30,
        epoch=7,
        primary=None,
        copies=(),
        replicas_wanted=1,
        served=False,
        status="no eligible replica",
    ),
)
NODES = (
    NodeRow("n1", "alive", 0.25, 100 << 30, 40 << 30),
    NodeRow("n2", "alive", 0.5, 100 << 30, 90 << 30, draining=True, drain_status="waiting for a spare"),
    NodeRow("n3", "dead", 12.0, 100 << 30, None),
)


def test_the_frame_shows_nodes_volumes_copies_and_rates() -> None:
    s = Snapshot(taken_at=1.0, volumes=VOLUMES, nodes=NODES, scrape_errors={"n3": "connection refused"})
    rates = {"busy": IoRate(read_ops=1.5, write_ops=1234.0, read_bytes=6144.0, write_bytes=5 * MiB)}
    lines = _frame_text(s, rates).splitlines()
    assert lines[0] == "sparrow top  http://m:3280  2026-12-02 12:00:00 UTC"
    assert lines[1] == "nodes 2/3 alive  volumes 1/2 served  rates over 2s"

    def row(first: str) -> list[str]:
        (line,) = [x for x in lines if x.split()[:1] == [first]]
        return line.split()

    assert row("n1") == ["n1", "alive", "0.2s", "ago", "100", "GiB", "40", "GiB", "no"]
    assert row("n2")[-5:] == ["yes:", "waiting", "for", "a", "spare"]
    assert row("n3") == ["n3", "dead", "12.0s", "ago", "100", "GiB", "-", "no"]
    busy = " ".join(row("busy"))
    assert busy == (
        "busy 64 MiB 3 n1 n1* in sync, n2 syncing 42%, n3 stale (dead) served 1.5 1234 6.0 KiB/s 5.0 MiB/s"
    )
    assert " ".join(row("lost")) == "lost 1 GiB 7 - - not served: no eligible replica - - - -"
    assert lines[-1] == "no I/O figures from n3: connection refused"


def test_the_first_frame_has_no_rates_and_the_live_one_says_how_to_quit() -> None:
    text = _frame_text(Snapshot(taken_at=1.0, volumes=VOLUMES[:1], nodes=NODES), None, live=True)
    assert "(q or Ctrl-C quits)" in text.splitlines()[1]
    (busy,) = [x for x in text.splitlines() if x.startswith(" busy")]
    assert busy.split()[-4:] == ["-", "-", "-", "-"]


def test_a_tenant_sees_volumes_and_why_there_are_no_nodes() -> None:
    s = Snapshot(taken_at=1.0, volumes=(), nodes_error="forbidden: a tenant token sees no nodes")
    lines = _frame_text(s, {}).splitlines()
    assert lines[1] == "volumes 0/0 served  rates over 2s"
    assert "nodes: forbidden: a tenant token sees no nodes" in lines
    assert any(x.split()[:1] == ["(none)"] for x in lines)


# --- whatever the answers hold -------------------------------------------------------------------

FIELDS = (
    "name", "node_id", "state", "size", "epoch", "primary", "replicas", "role", "sync", "resync",
    "done_bytes", "total_bytes", "served", "status", "last_heartbeat_age", "capacity_bytes",
    "free_bytes", "draining", "drain_status", "http", "iscsi_portal", "replicas_wanted",
)  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=8),
    max_leaves=40,
)


@settings(max_examples=100, deadline=None)
@given(volumes=st.lists(JSON, max_size=4), nodes=st.lists(JSON, max_size=4), metrics=st.text(max_size=200))
def test_any_json_answer_gives_a_frame_never_an_exception(
    volumes: list[object], nodes: list[object], metrics: str
) -> None:
    """Only what the master's JSON can hold (a half-upgraded master, a proxy's error page as metrics)."""
    s = snapshot(1.0, {"volumes": volumes}, {"nodes": nodes}, scrapes={"n1": metrics})
    assert plain_text(frame(s, io_rates(s, s), source="m", clock_text="t", interval=1.0), width=120)


def test_the_interval_is_checked_like_every_other_flag() -> None:
    from sparrow import cli

    err = io.StringIO()
    assert cli.main(["top", "--interval", "0"], out=io.StringIO(), err=err) == 2
    assert "--interval must be 0.1..3600 seconds" in err.getvalue()
    assert err.getvalue().count("\n") == 1


# --- a member (or anything on the network) lying -------------------------------------------------


def test_control_characters_in_any_answer_never_reach_the_terminal_raw() -> None:
    hostile = "\x1b]0;owned\x07\x1b[2J\x9b31m\nforged\u202e"
    s = snapshot(
        1.0,
        {"volumes": [{"name": "v", "status": hostile, "replicas": [{"node_id": "n1", "sync": hostile}]}]},
        {"nodes": [{"node_id": "n1", "state": hostile, "draining": True, "drain_status": hostile}]},
        nodes_error=None,
        scrapes={"n2": "sparrow_x{a=\"" + hostile + "\" 1\n"},
        scrape_errors={"n3": hostile},
    )
    text = plain_text(frame(s, None, source="http://m", clock_text="t", interval=1.0), 400)
    assert not [c for c in text if c != "\n" and (ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c == "\u202e")]
    assert "\\x1b]0;owned" in text and not [line for line in text.splitlines() if line.startswith("forged")]


def test_a_node_address_is_a_host_and_port_or_nothing() -> None:
    # The master checks a Hello's http (split_portal); top does not trust the answer more than that.
    for http in ("evil.test/x#:80", "user@evil.test:80", "evil.test:80/x", "a b:80", "evil.test:0"):
        assert NodeRow("n1", "alive", http=http).metrics_url() is None, http
    assert NodeRow("n1", "alive", http="[::1]:3281").metrics_url() == "http://[::1]:3281/metrics"


def test_a_node_holding_no_copy_of_a_volume_adds_nothing_to_its_rate() -> None:
    # n3 answers /metrics with counters for v, a volume whose copies are on n1 and n2 only.
    volumes = {"volumes": [{"name": "v", "replicas": [{"node_id": "n1"}, {"node_id": "n2"}]}]}
    first = snapshot(0.0, volumes, scrapes={"n1": metrics_text(writes=0), "n3": metrics_text(writes=0)})
    second = snapshot(1.0, volumes, scrapes={"n1": metrics_text(writes=4), "n3": metrics_text(writes=1000)})
    assert io_rates(first, second) == {"v": IoRate(write_ops=4.0, write_bytes=4 * 4096)}
