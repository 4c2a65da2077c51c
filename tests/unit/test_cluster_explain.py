"""sparrow.cluster.explain: why a volume is in its state, one test per reason (sans-IO, ``now``
passed in; the controller's own decisions feed it, as in the master)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sparrow.cluster.controller import DesiredVolume, PublishedAssignment, TopologyController, VolumeStatus
from sparrow.cluster.explain import Explanation, OnNode, Paused, Reason, VolumeFacts, explain, render
from sparrow.cluster.lease import MasterLeases
from sparrow.cluster.messages import (
    Assignment,
    Health,
    Heartbeat,
    Hello,
    ReplicaState,
    Role,
    SkippedVolume,
    SyncState,
    UnsupportedCommand,
    VolumeObservation,
    clip,
)
from sparrow.cluster.observations import ObservationStore

VOL = "a" * 32
NAME = "vol-a"
MiB = 1 << 20
SIZE = 10 * MiB
DEAD_AFTER = 8.0
LEASE = 5.0
MARGIN = 1.0


def assignment(
    replicas: tuple[str, ...], epoch: int = 3, in_sync: tuple[str, ...] | None = None
) -> Assignment:
    primary = replicas[0] if replicas else None
    return Assignment(
        VOL,
        NAME,
        SIZE,
        512,
        epoch,
        primary,
        None if primary is None else f"{primary}.test:3260",
        replicas,
        in_sync=replicas if in_sync is None else in_sync,
    )


def obs(
    epoch: int,
    role: Role,
    *,
    health: Health = Health.OK,
    position: int = 0,
    states: tuple[ReplicaState, ...] = (),
    converged: bool = True,
    error: str | None = None,
    unsupported: tuple[UnsupportedCommand, ...] = (),
) -> VolumeObservation:
    return VolumeObservation(VOL, epoch, role, health, position, states, converged, error, unsupported)


@dataclass
class Scene:
    """A master's view: observations and leases fed as the heartbeat server feeds them, the
    controller's decision, then the explanation."""

    controller: TopologyController = field(
        default_factory=lambda: TopologyController(margin=MARGIN, primary_silence=LEASE + MARGIN)
    )
    store: ObservationStore = field(default_factory=lambda: ObservationStore(DEAD_AFTER))
    leases: MasterLeases = field(default_factory=lambda: MasterLeases(MARGIN))
    seq: int = 0

    def join(self, node: str, now: float, free: int = 100 * MiB) -> None:
        self.store.record(
            Hello(node, 1, f"{node}.test:3260", f"{node}.test:7000", f"{node}.test:80", 1 << 40, free),
            node,
            now,
        )
        self.beat(node, now)

    def beat(
        self, node: str, now: float, *seen: VolumeObservation, skipped: tuple[SkippedVolume, ...] = ()
    ) -> None:
        self.seq += 1
        self.store.record(Heartbeat(self.seq, seen, skipped), node, now)
        self.leases.granted(node, now, LEASE)

    def explain(
        self,
        current: Assignment | None,
        now: float,
        *,
        replicas: int = 1,
        published_at: float = 0.0,
        draining: frozenset[str] = frozenset(),
        paused: Paused | None = None,
    ) -> tuple[Explanation, VolumeStatus]:
        want = DesiredVolume(VOL, NAME, SIZE, 512, replicas)
        published = {} if current is None else {VOL: PublishedAssignment(current, published_at)}
        decision = self.controller.decide([want], published, self.store, self.leases, now, draining=draining)
        status = decision.status[VOL]
        facts = VolumeFacts(
            VOL,
            NAME,
            SIZE,
            replicas,
            current,
            None if current is None else published_at,
            status,
            draining,
            paused,
        )
        return explain(facts, self.store, self.leases, self.controller, now), status


def test_a_served_volume_says_by_whom_and_at_which_epoch() -> None:
    scene = Scene()
    scene.join("n1", 0.0)
    scene.beat("n1", 1.0, obs(3, Role.PRIMARY))
    explained, _ = scene.explain(assignment(("n1",)), 2.0, published_at=0.5)
    assert explained.served and explained.reason is Reason.SERVED
    [headline] = explained.findings
    assert headline.node == "n1" and headline.facts["epoch"] == 3 and headline.action is None
    assert headline.since == 0.5
    assert "served by n1 at epoch 3" in headline.text


def test_a_silent_primary_whose_lease_may_run_says_until_when() -> None:
    # A primary dead (dead_after 2.5 s here) before its lease has run out.
    scene = Scene(store=ObservationStore(2.5))
    scene.join("n1", 0.0)
    scene.beat("n1", 0.0, obs(3, Role.PRIMARY))  # lease until 5.0, reassignable at 6.0
    explained, status = scene.explain(assignment(("n1",)), 3.0)
    assert not explained.served and explained.reason is Reason.WAITING_FOR_LEASE
    headline = explained.findings[0]
    assert headline.node == "n1"
    assert headline.facts["lease_expires_in_seconds"] == 2.0
    assert headline.facts["reassign_in_seconds"] == 3.0
    assert "in 3.0 s" in headline.text and headline.since == status.since == 3.0


def test_a_dead_primary_of_a_one_copy_volume_has_no_eligible_replica() -> None:
    scene = Scene()
    scene.join("n1", 0.0)
    scene.beat("n1", 1.0, obs(3, Role.PRIMARY))
    explained, _ = scene.explain(assignment(("n1",)), 20.0)
    assert not explained.served and explained.reason is Reason.NO_ELIGIBLE_REPLICA
    headline = explained.findings[0]
    assert "the only copy is on n1" in headline.text and "dead" in headline.text
    assert headline.action is not None and "bring n1 back" in headline.action
    assert headline.facts["last_heartbeat_age"] == 19.0


def test_no_eligible_replica_says_why_each_copy_may_not_take_over() -> None:
    scene = Scene()
    for node in ("n1", "n2", "n3"):
        scene.join(node, 0.0)
    primary = obs(3, Role.PRIMARY, position=100, states=(ReplicaState("n2", SyncState.IN_SYNC, 100),))
    scene.beat("n1", 1.0, primary)
    scene.beat("n2", 10.0, obs(3, Role.REPLICA, position=100, health=Health.DEGRADED))
    scene.beat("n3", 10.0, obs(2, Role.REPLICA))
    current = assignment(("n1", "n2", "n3"), in_sync=("n1", "n2"))
    explained, _ = scene.explain(current, 12.0, replicas=3)
    assert explained.reason is Reason.NO_ELIGIBLE_REPLICA
    copies = {c["node"]: c for c in explained.findings[0].facts["copies"]}  # type: ignore[union-attr]
    assert copies["n1"]["why"] == ["the primary itself"]
    assert copies["n2"]["why"] == ["health degraded"]
    assert any("not in the in-sync set of epoch 3" in why for why in copies["n3"]["why"])
    assert any("reports epoch 2 as replica" in why for why in copies["n3"]["why"])
    assert "n2: health degraded" in explained.findings[0].text


def test_a_node_that_cannot_converge_is_stuck_with_its_error_from_the_first_report() -> None:
    scene = Scene()
    scene.join("n1", 0.0)
    error = "VolumeExists: volume 'vol-a' already exists"
    scene.beat("n1", 1.0, obs(3, Role.PRIMARY, converged=False, error=error))
    explained, _ = scene.explain(assignment(("n1",)), 4.0, published_at=0.5)
    assert not explained.served and explained.reason is Reason.STUCK
    headline = explained.findings[0]
    assert (headline.node, headline.since, headline.facts["error"]) == ("n1", 0.5, error)
    assert "has not converged on epoch 3 for 3.5 s: VolumeExists" in headline.text


def test_past_the_converge_deadline_a_node_without_an_error_is_stuck_too() -> None:
    scene = Scene()
    scene.join("n1", 0.0)
    scene.beat("n1", 39.0, obs(2, Role.PRIMARY, converged=False))
    explained, status = scene.explain(assignment(("n1",)), 40.0)
    assert status.reason is not None and status.reason.startswith("stuck")
    assert explained.reason is Reason.STUCK and "(it reports no error)" in explained.findings[0].text


def test_before_the_deadline_a_primary_taking_on_the_epoch_is_transitioning() -> None:
    scene = Scene()
    scene.join("n1", 0.0)
    scene.beat("n1", 1.0, obs(2, Role.PRIMARY, converged=False))
    explained, _ = scene.explain(assignment(("n1",)), 2.0)
    assert explained.reason is Reason.TRANSITIONING
    assert "reports epoch 2 as primary, not converged" in explained.findings[0].text


def test_not_enough_space_names_each_node_and_its_free_bytes_against_the_size() -> None:
    scene = Scene()
    scene.join("n1", 0.0, free=4 * MiB)
    scene.join("n2", 0.0, free=20 * MiB)
    explained, _ = scene.explain(None, 1.0, replicas=2)
    assert not explained.served and explained.reason is Reason.NOT_ENOUGH_SPACE
    headline = explained.findings[0]
    assert headline.facts["size_bytes"] == SIZE and headline.facts["nodes_with_room"] == ["n2"]
    assert headline.facts["nodes"] == [
        {"node": "n1", "free_bytes": 4 * MiB, "capacity_bytes": 1 << 40},
        {"node": "n2", "free_bytes": 20 * MiB, "capacity_bytes": 1 << 40},
    ]
    assert "1 of 2 live nodes" in headline.text and "n1 has 4 MiB free" in headline.text


def test_fewer_live_nodes_than_copies_is_not_enough_nodes() -> None:
    scene = Scene()
    scene.join("n1", 0.0)
    explained, _ = scene.explain(None, 1.0, replicas=3)
    assert explained.reason is Reason.NOT_ENOUGH_NODES
    assert "3 copies on distinct nodes needed, 1 live" in explained.findings[0].text


def test_a_volume_not_placed_yet_is_unplaced() -> None:
    scene = Scene()
    scene.join("n1", 0.0)
    # The controller's first decision places it (an ask); until published it is unplaced.
    explained, _ = scene.explain(None, 1.0)
    assert explained.reason is Reason.UNPLACED and explained.findings[0].action is None


def test_a_primary_without_a_lease_is_fenced() -> None:
    scene = Scene()
    scene.join("n1", 0.0)
    scene.beat("n1", 1.0, obs(3, Role.PRIMARY, health=Health.DEGRADED))
    explained, _ = scene.explain(assignment(("n1",)), 2.0)
    assert not explained.served and explained.reason is Reason.FENCED
    assert "no valid lease" in explained.findings[0].text


def test_a_copy_being_resynced_says_how_far_it_got() -> None:
    scene = Scene()
    scene.join("n1", 0.0)
    scene.join("n2", 0.0)
    syncing = ReplicaState("n2", SyncState.SYNCING, 0, 5 * MiB, 10 * MiB)
    scene.beat("n1", 1.0, obs(3, Role.PRIMARY, states=(syncing,)))
    scene.beat("n2", 1.0, obs(3, Role.REPLICA))
    explained, _ = scene.explain(assignment(("n1", "n2"), in_sync=("n1",)), 2.0, replicas=2)
    assert explained.served and explained.reason is Reason.SERVED
    resync = explained.findings[1]
    assert resync.reason is Reason.RESYNCING and resync.node == "n2"
    assert resync.facts == {"done_bytes": 5 * MiB, "total_bytes": 10 * MiB}
    assert "5 MiB of 10 MiB copied (50%)" in resync.text


def test_a_copy_on_a_draining_node_says_it_is_being_moved() -> None:
    scene = Scene()
    scene.join("n1", 0.0)
    scene.join("n2", 0.0)
    scene.beat("n1", 1.0, obs(3, Role.PRIMARY, states=(ReplicaState("n2", SyncState.IN_SYNC, 0),)))
    scene.beat("n2", 1.0, obs(3, Role.REPLICA))
    explained, _ = scene.explain(assignment(("n1", "n2")), 2.0, replicas=2, draining=frozenset({"n2"}))
    assert explained.served
    [draining] = [f for f in explained.findings if f.reason is Reason.DRAINING]
    assert draining.node == "n2" and draining.action is not None and "undrain n2" in draining.action


def test_a_paused_volume_is_paused_whatever_else_holds() -> None:
    scene = Scene()
    scene.join("n1", 0.0)
    scene.beat("n1", 1.0, obs(3, Role.PRIMARY))
    explained, _ = scene.explain(assignment(("n1",)), 2.0, paused=Paused(since=1.5))
    assert not explained.served and explained.reason is Reason.PAUSED
    [headline] = explained.findings
    assert headline.action == f"sparrow volume resume {NAME}" and headline.since == 1.5


def test_unsupported_commands_and_skipped_volumes_are_listed_by_node() -> None:
    scene = Scene()
    scene.join("n1", 0.0)
    scene.join("n2", 0.0)
    seen = UnsupportedCommand(0xC1, None, 4, "iqn.2026-01.test:host")
    scene.beat("n1", 1.0, obs(3, Role.PRIMARY, unsupported=(seen,)))
    scene.beat(
        "n2",
        1.0,
        skipped=(SkippedVolume(NAME, "corrupt record: checksum mismatch"), SkippedVolume("other", "x")),
    )
    explained, _ = scene.explain(assignment(("n1",)), 2.0)
    assert explained.unsupported == (OnNode("n1", seen),)
    assert explained.skipped == (OnNode("n2", SkippedVolume(NAME, "corrupt record: checksum mismatch")),)


def test_the_json_and_the_text_carry_the_reason_the_time_and_what_to_do() -> None:
    scene = Scene()
    scene.join("n1", 0.0)
    scene.beat(
        "n1",
        1.0,
        obs(
            3,
            Role.PRIMARY,
            converged=False,
            error="OSError: boom",
            unsupported=(UnsupportedCommand(0x9E, 0x1F, 2, "i"),),
        ),
    )
    explained, _ = scene.explain(assignment(("n1",)), 5.0, published_at=1.0)
    body = explained.json(now=5.0, wall_now=1_800_000_004.0)
    assert (body["volume"], body["served"], body["reason"]) == (NAME, False, "stuck")
    finding = body["findings"][0]
    assert finding["since_seconds"] == 4.0 and finding["since"] == "2027-01-15T08:00:00Z"
    assert finding["facts"] == {"epoch": 3, "error": "OSError: boom"}
    text = render(body)
    assert text.splitlines()[0] == f"volume {NAME}: NOT served (stuck)"
    assert "what to do: fix what the error names on n1" in text
    assert "on n1: 0x9e 0x1f x2 i" in text


def test_a_node_stuck_on_a_copy_it_skipped_at_start_is_told_to_repair_that_file() -> None:
    scene = Scene()
    scene.join("n1", 0.0)
    skipped = (SkippedVolume(NAME, "corrupt record /d/vol-a.json: not JSON"),)
    scene.beat("n1", 1.0, obs(3, Role.PRIMARY, converged=False, error="VolumeExists: x"), skipped=skipped)
    explained, _ = scene.explain(assignment(("n1",)), 2.0)
    action = explained.findings[0].action
    assert action is not None and action.startswith("n1 did not load its copy at start (corrupt record")
    assert f"sparrow volume delete {NAME}" in action


# -- a member lying through its diagnostics -------------------------------------------------------

#: What a lying node may put in every string it reports: an OSC window title, a screen clear, a
#: C1 CSI, a forged line of the output and a bidi override.
HOSTILE = "\x1b]0;owned\x07\x1b[2J\x9b31m\n  what to do: sparrow volume delete vol-a\u202e"


def test_control_characters_a_node_reports_never_reach_the_terminal_raw() -> None:
    scene = Scene()
    scene.join("n1", 0.0)
    seen = UnsupportedCommand(0xC1, None, 1, HOSTILE)
    error = clip(HOSTILE * 3)
    scene.beat(
        "n1",
        1.0,
        obs(3, Role.PRIMARY, converged=False, error=error, unsupported=(seen,)),
        skipped=(SkippedVolume(NAME, HOSTILE), SkippedVolume(NAME, "x")),
    )
    explained, _ = scene.explain(assignment(("n1",)), 5.0, published_at=1.0)
    assert explained.findings[0].facts["error"] == error  # the JSON keeps what was said
    text = render(explained.json(now=5.0, wall_now=1_800_000_004.0))
    lines = text.split("\n")
    assert not [c for c in text if c != "\n" and (ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c == "\u202e")]
    assert "\\x1b]0;owned\\x07\\x1b[2J\\x9b31m\\x0a" in text and "\\u202e" in text
    assert [line.lstrip()[:40] for line in lines if line.lstrip().startswith("what to do")] == [
        "what to do: n1 did not load its copy at "  # the finding's own: no forged line
    ]
    assert sum(line.startswith("    on n1: ") for line in lines) == 3  # two skipped, one command


def test_a_node_not_holding_a_copy_cannot_report_commands_against_it() -> None:
    scene = Scene()
    scene.join("n1", 0.0)
    scene.join("n2", 0.0)
    real = UnsupportedCommand(0xC1, None, 4, "iqn.2026-01.test:host")
    lie = UnsupportedCommand(0x9E, 0x1F, 1000, "iqn.2026-01.test:attacker")
    scene.beat("n1", 1.0, obs(3, Role.PRIMARY, unsupported=(real,)))
    scene.beat("n2", 1.0, obs(3, Role.PRIMARY, unsupported=(lie,)))  # n2 holds no copy of it
    explained, _ = scene.explain(assignment(("n1",)), 2.0)
    assert explained.unsupported == (OnNode("n1", real),)
