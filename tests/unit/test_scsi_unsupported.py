"""frontend.scsi.unsupported: the commands a LU answered INVALID COMMAND OPERATION CODE."""

from __future__ import annotations

from frontend.scsi.unsupported import MAX_KINDS, Seen, UnsupportedCommands, command_kind
from tests.unit.test_scsi_helpers import A, B, make_lu, run, sense, tur

ILLEGAL = 0x05


async def test_the_lu_counts_each_unsupported_opcode_and_service_action_with_the_last_initiator() -> None:
    lu, _ = make_lu()
    noted: list[tuple[int, int | None]] = []
    lu.unsupported = UnsupportedCommands(on_note=lambda op, sa: noted.append((op, sa)))
    assert sense(await run(lu, bytes([0xC7]) + bytes(15), nexus=A)) == (ILLEGAL, 0x20, 0x00)
    assert sense(await run(lu, bytes([0xC7]) + bytes(15), nexus=B)) == (ILLEGAL, 0x20, 0x00)
    # An unknown service action of SERVICE ACTION IN(16) is counted with its service action.
    assert sense(await run(lu, bytes([0x9E, 0x1F]) + bytes(14), nexus=A)) == (ILLEGAL, 0x20, 0x00)
    await run(lu, tur())  # a supported command is not counted
    await run(lu, bytes([0x9E, 0x10]) + bytes(14))  # READ CAPACITY(16): supported
    assert lu.unsupported.snapshot() == (
        Seen(0x9E, 0x1F, 1, A.initiator_name),
        Seen(0xC7, None, 2, B.initiator_name),
    )
    assert noted == [(0xC7, None), (0xC7, None), (0x9E, 0x1F)]


def test_only_opcodes_with_a_service_action_field_report_one() -> None:
    assert command_kind(bytes([0xA3, 0xEC])) == (0xA3, 0x0C)  # MAINTENANCE IN: bits 0-4
    assert command_kind(bytes([0xC7, 0xFF])) == (0xC7, None)
    assert command_kind(bytes([0x5F])) == (0x5F, None)  # too short to hold one


def test_the_tally_is_bounded_and_forgets_the_kind_seen_longest_ago() -> None:
    tally = UnsupportedCommands()
    tally.note(b"", "ignored")  # an empty CDB has no opcode
    for opcode in range(0xC0, 0xC0 + MAX_KINDS):
        tally.note(bytes([opcode]), "i")
    tally.note(bytes([0xC0]), "again")  # seen again: now the most recent
    tally.note(bytes([0xF0]), "new")
    kinds = {s.opcode for s in tally.snapshot()}
    assert len(tally) == MAX_KINDS
    assert 0xC1 not in kinds and {0xC0, 0xF0} <= kinds
