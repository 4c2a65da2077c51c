"""The SCSI commands a logical unit answered as unsupported (INVALID COMMAND OPERATION CODE).

An operator who sees an initiator misbehave needs to know what it asked for that Sparrow does not
implement (``sparrow volume explain``, docs/operations.md). :class:`UnsupportedCommands` counts, per
(opcode, service action), how many times the LU's dispatch found no command for a CDB, and which
initiator sent the last one. It is pure data on the event loop (no lock), bounded: it keeps the
:data:`MAX_KINDS` kinds seen most recently, so a fuzzer cannot make it grow.

The service action is the one the command table dispatches on (SPC-4 4.2.5.2: byte 1, bits 0-4)
for the opcodes that carry one there (:data:`SERVICE_ACTION_OPCODES`); None for the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

#: Opcodes whose CDB byte 1 bits 0-4 hold a service action (SPC-4 and SBC-3 tables of operation
#: codes): PERSISTENT RESERVE IN/OUT, EXTENDED COPY / RECEIVE COPY RESULTS, READ/WRITE ATTRIBUTE,
#: SERVICE ACTION IN/OUT(16), MAINTENANCE IN/OUT, SERVICE ACTION IN/OUT(12).
SERVICE_ACTION_OPCODES = frozenset({0x5E, 0x5F, 0x83, 0x84, 0x8C, 0x8D, 0x9E, 0x9F, 0xA3, 0xA4, 0xAB, 0xA9})
#: The most (opcode, service action) kinds one LU remembers (the oldest is forgotten first).
MAX_KINDS = 8


@dataclass(frozen=True, slots=True)
class Seen:
    """One kind of unsupported command: how often, and the last initiator that sent it (its iSCSI
    name). The cluster heartbeat carries it as ``sparrow.cluster.messages.UnsupportedCommand``."""

    opcode: int
    service_action: int | None
    count: int
    last_initiator: str


def command_kind(cdb: bytes | bytearray | memoryview) -> tuple[int, int | None]:
    """(opcode, service action or None) of a non-empty CDB."""
    opcode = cdb[0]
    if opcode in SERVICE_ACTION_OPCODES and len(cdb) > 1:
        return opcode, cdb[1] & 0x1F
    return opcode, None


def _order(seen: Seen) -> tuple[int, int]:
    return seen.opcode, -1 if seen.service_action is None else seen.service_action


class UnsupportedCommands:
    """Counts per (opcode, service action); see the module docstring. ``on_note`` (the node's
    Prometheus counter) is called with each one as it is counted."""

    def __init__(self, on_note: Callable[[int, int | None], None] | None = None) -> None:
        self._seen: dict[tuple[int, int | None], Seen] = {}
        self._on_note = on_note

    def note(self, cdb: bytes | bytearray | memoryview, initiator: str) -> None:
        """Count one CDB answered INVALID COMMAND OPERATION CODE, sent by ``initiator``."""
        if not cdb:
            return
        key = command_kind(cdb)
        old = self._seen.pop(key, None)  # re-inserted last: dict order is recency
        count = 1 if old is None else old.count + 1
        self._seen[key] = Seen(key[0], key[1], count, initiator)
        if len(self._seen) > MAX_KINDS:
            del self._seen[next(iter(self._seen))]
        if self._on_note is not None:
            self._on_note(*key)

    def snapshot(self) -> tuple[Seen, ...]:
        """What was seen, sorted by (opcode, service action)."""
        return tuple(
            sorted(
                self._seen.values(),
                key=lambda s: (s.opcode, -1 if s.service_action is None else s.service_action),
            )
        )

    def __len__(self) -> int:
        return len(self._seen)
