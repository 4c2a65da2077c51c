"""The final gate's judge (tests/integration/gate.py): what counts as a lost write, and the block
format the C writer produces, decoded by the Python side. No sockets, no processes."""

from __future__ import annotations

from tests.integration.gate import (
    BLOCK,
    MAGIC,
    PAD,
    RECORDS,
    Content,
    Journal,
    Written,
    decode_block,
    fnv1a64,
)


def block(number: int, counter: int, run_id: int = 7) -> bytes:
    head = MAGIC + number.to_bytes(8, "little") + counter.to_bytes(8, "little") + run_id.to_bytes(8, "little")
    return (head + fnv1a64(head).to_bytes(8, "little")) * RECORDS + PAD


def journal(*lines: str) -> Journal:
    j = Journal(run_id=7)
    for line in ("I 3 512", *lines):
        j.feed(line)
    return j


def test_a_block_decodes_to_its_counter_and_run_and_anything_else_is_bad() -> None:
    assert decode_block(block(2, 41), 2) == Written(41, 7)
    assert decode_block(bytes(BLOCK), 2) == "zero"
    assert decode_block(block(2, 41), 3) == "bad"  # another block's write
    torn = bytearray(block(2, 41))
    torn[BLOCK // 2 :] = block(2, 42)[BLOCK // 2 :]
    assert decode_block(bytes(torn), 2) == "bad"
    flipped = bytearray(block(2, 41))
    flipped[20] ^= 1
    assert decode_block(bytes(flipped), 2) == "bad"


def test_the_latest_ack_or_a_later_unacknowledged_send_is_kept_anything_older_is_a_loss() -> None:
    j = journal("A 0 1 0", "A 0 3 0", "X 0 4", "A 1 2 0", "X 2 5")
    ok: dict[int, Content] = {0: Written(3, 7), 1: Written(2, 7), 2: "zero"}
    assert j.check(ok, "copy") == []
    assert j.check({**ok, 0: Written(4, 7), 2: Written(5, 7)}, "copy") == []  # sent, may have landed
    lost = j.check({0: Written(1, 7), 1: "zero", 2: Written(9, 7)}, "copy")
    assert len(lost) == 3 and all(p.startswith("copy: block") for p in lost), lost
    assert j.check({**ok, 1: Written(2, 8)}, "copy") != []  # another run's data
    assert j.check({**ok, 1: "bad"}, "copy") != []


def test_a_send_older_than_the_latest_ack_is_a_loss_even_if_it_was_unacknowledged() -> None:
    j = journal("X 0 1", "A 0 2 0")
    assert j.check({0: Written(1, 7), 1: "zero", 2: "zero"}, "copy") != []
    assert j.durable == 0
    j.feed("F 1")
    j.feed("A 1 3 1")
    assert j.durable == 1 and j.fua == 1 and j.acks == [(0, 2), (1, 3)]


def test_each_ack_keeps_its_wall_clock_time() -> None:
    j = journal("A 0 1 0 1764670000.250000", "A 1 2 1 1764670000.500000")
    assert j.ack_times == [1764670000.25, 1764670000.5]


def test_a_reconnect_marks_where_the_new_sessions_acks_begin() -> None:
    j = journal("A 0 1 0 1.0", "R 1 0.5", "A 1 2 0 3.0", "R 2 0.1")
    assert j.reconnect_acks == [1, 2]
    assert j.ack_times[j.reconnect_acks[0]] == 3.0
