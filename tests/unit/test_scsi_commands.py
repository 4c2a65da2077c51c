"""The command table (frontend/scsi/commands.py): every entry complete, and the views derived from it
(dispatch, REPORT SUPPORTED OPERATION CODES, reservation classes, metrics) in agreement."""

from __future__ import annotations

import inspect
import struct
from collections import defaultdict

import pytest

from frontend.scsi import lu as lu_module
from frontend.scsi.cdb import cdb_length
from frontend.scsi.commands import (
    COMMANDS,
    DISPATCH,
    FAST_PATH_OPCODES,
    SA_DISPATCHED,
    Access,
    CommandSpec,
    Gate,
    MetricKind,
    command_access,
    command_table,
    dispatch_key,
    metric_kind,
    spec_for,
)
from frontend.scsi.lu import LogicalUnit
from frontend.scsi.opcodes import Opcode, SanitizeAction
from tests.unit.test_scsi_helpers import good, make_lu, rsoc, run, sense


def _cdb(spec: CommandSpec) -> bytes:
    sa = spec.service_action or 0
    return bytes((spec.opcode, sa)).ljust(spec.length, b"\0")


@pytest.mark.parametrize("spec", COMMANDS, ids=lambda s: s.name)
def test_every_entry_is_complete(spec: CommandSpec) -> None:
    assert spec.name
    assert spec.opcode in set(Opcode)
    handler = getattr(LogicalUnit, spec.handler, None)
    assert handler is not None and inspect.iscoroutinefunction(handler), spec.handler
    # CDB USAGE DATA: byte 0 is the opcode, its length is the group's CDB length (SPC-4 4.2.5.1).
    assert spec.usage[0] == spec.opcode
    assert spec.length == cdb_length(spec.opcode)
    assert spec.usage[-1] & 0x04 == 0  # NACA is never evaluated: ACA is not supported
    if spec.service_action is not None:
        assert spec.usage[1] & 0x1F == spec.service_action  # the SA field holds exactly its value
    assert isinstance(spec.gate, Gate)
    assert isinstance(spec.access, Access) and isinstance(spec.metric, MetricKind)
    assert spec.unmap_usage & spec.usage[1] == 0


def test_entries_are_unique_and_in_opcode_order() -> None:
    keys = [(s.opcode, s.service_action or 0) for s in COMMANDS]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert len({s.name for s in COMMANDS}) == len(COMMANDS)


def test_service_actions_are_all_or_nothing_per_opcode() -> None:
    by_opcode: dict[int, list[CommandSpec]] = defaultdict(list)
    for s in COMMANDS:
        by_opcode[s.opcode].append(s)
    for opcode, specs in by_opcode.items():
        with_sa = {s.service_action is not None for s in specs}
        assert len(with_sa) == 1, hex(opcode)
        if len(specs) > 1:
            assert with_sa == {True}, hex(opcode)
        if opcode in SA_DISPATCHED:
            assert with_sa == {True}
        else:
            # Dispatched by opcode: the handler decodes the service action, so every spec of the
            # opcode must say the same about everything the dispatcher and the checks use.
            first = specs[0]
            for s in specs[1:]:
                assert (s.handler, s.gate, s.length, s.access, s.access_of, s.metric, s.fast_path) == (
                    first.handler,
                    first.gate,
                    first.length,
                    first.access,
                    first.access_of,
                    first.metric,
                    first.fast_path,
                ), s.name
                assert (s.reserve6_exempt, s.compat_reservation, s.needs_unmap) == (
                    first.reserve6_exempt,
                    first.compat_reservation,
                    first.needs_unmap,
                ), s.name


def test_the_logical_unit_dispatches_exactly_the_table() -> None:
    commands = lu_module._COMMANDS
    assert commands.keys() == DISPATCH.keys()
    for key, spec in DISPATCH.items():
        cmd = commands[key]
        assert cmd.handler is getattr(LogicalUnit, spec.handler)
        assert (cmd.gate, cmd.length) == (int(spec.gate), spec.length)
        assert spec_for(_cdb(spec)) is spec
        assert dispatch_key(_cdb(spec)) == key
    assert {s.opcode for s in COMMANDS} == {k if k < 0x100 else k >> 8 for k in DISPATCH}


async def test_every_dispatched_command_is_reported_with_its_length_and_usage() -> None:
    """Each (opcode, service action) of the table, asked for one at a time, is reported as supported
    by an LU that offers everything, with the table's CDB length and usage data."""
    lu, _ = make_lu()  # supports UNMAP, offers every SANITIZE action
    for spec in COMMANDS:
        sa = spec.service_action or 0
        option = 2 if spec.service_action is not None else 1
        data = bytes(good(await run(lu, rsoc(option=option, opcode=spec.opcode, sa=sa))).data)
        assert data[1] & 0x07 == 0x03, spec.name  # SUPPORT 011b: supported as the standard says
        (length,) = struct.unpack_from(">H", data, 2)
        assert length == spec.length and data[4 : 4 + length] == spec.usage_for(True), spec.name


async def test_commands_offered_only_with_unmap_are_hidden_without_it() -> None:
    lu, _ = make_lu(supports_unmap=False)
    for spec in COMMANDS:
        sa = spec.service_action or 0
        option = 2 if spec.service_action is not None else 1
        data = bytes(good(await run(lu, rsoc(option=option, opcode=spec.opcode, sa=sa))).data)
        assert (data[1] & 0x07 == 0x03) is not spec.needs_unmap, spec.name
        if not spec.needs_unmap:
            assert data[4 : 4 + spec.length] == spec.usage_for(False), spec.name
    assert len(command_table(supports_unmap=False)) == sum(not s.needs_unmap for s in COMMANDS)


def test_report_lists_the_table_in_order() -> None:
    assert [(c.opcode, c.service_action) for c in command_table(supports_unmap=True)] == [
        (s.opcode, s.service_action) for s in COMMANDS
    ]
    offered = (SanitizeAction.BLOCK_ERASE,)
    sanitize = [c for c in command_table(supports_unmap=True, sanitize_actions=offered) if c.opcode == 0x48]
    assert [c.service_action for c in sanitize] == [SanitizeAction.BLOCK_ERASE]


@pytest.mark.parametrize("spec", COMMANDS, ids=lambda s: s.name)
def test_every_command_has_a_reservation_class(spec: CommandSpec) -> None:
    assert command_access(_cdb(spec)) is spec.access_for(_cdb(spec))
    if spec.gate & Gate.WRITES:
        assert spec.access is Access.WRITE  # what changes the medium is never let through
    if spec.metric is MetricKind.READ:
        assert spec.access is Access.READ
    if spec.metric is MetricKind.WRITE:
        assert spec.access is Access.WRITE and spec.gate & Gate.WRITES


def test_metric_kinds() -> None:
    """The read and write kinds that /metrics counted before the table (server.py's two sets)."""
    reads = {s.opcode for s in COMMANDS if s.metric is MetricKind.READ}
    writes = {s.opcode for s in COMMANDS if s.metric is MetricKind.WRITE}
    assert reads == {0x08, 0x28, 0xA8, 0x88}
    assert writes == {0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E, 0x89, 0x8B, 0x9C}
    for spec in COMMANDS:
        assert metric_kind(_cdb(spec)) is spec.metric
    assert metric_kind(b"") is MetricKind.OTHER and metric_kind(b"\xc0" + bytes(15)) is MetricKind.OTHER


def test_fast_path_is_the_plain_reads_and_writes() -> None:
    fast = {s.opcode for s in COMMANDS if s.fast_path}
    assert fast == FAST_PATH_OPCODES == {Opcode.READ_10, Opcode.WRITE_10, Opcode.READ_16, Opcode.WRITE_16}
    for s in COMMANDS:
        if s.fast_path:
            assert s.metric is not MetricKind.OTHER and s.service_action is None


async def test_an_unknown_service_action_of_a_dispatched_opcode_is_an_invalid_opcode() -> None:
    lu, _ = make_lu()
    for opcode in SA_DISPATCHED:
        known = {s.service_action for s in COMMANDS if s.opcode == opcode}
        sa = next(a for a in range(32) if a not in known)
        assert sense(await run(lu, bytes((opcode, sa)).ljust(16, b"\0")))[:2] == (0x05, 0x20)
