"""Tests for frontend.scsi.reservations: PERSISTENT RESERVE IN/OUT, RESERVE(6)/RELEASE(6), conflicts.

Scenarios named ``test_libiscsi_*`` replay, step by step, what the matching iscsi-test-cu case
(libiscsi test-tool/test_prout_*.c, test_prin_*.c, test_reserve6_*.c) sends and checks.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from frontend.scsi.commands import Access, command_access
from frontend.scsi.reservations import (
    MAX_REGISTRATIONS,
    PrInAction,
    PrOutAction,
    PrOutOutcome,
    PrType,
    ReservationConflict,
    Reservations,
    iscsi_transport_id,
    parse_iscsi_transport_id,
)
from frontend.scsi.sense import (
    INSUFFICIENT_REGISTRATION_RESOURCES,
    INVALID_FIELD_IN_CDB,
    INVALID_FIELD_IN_PARAMETER_LIST,
    INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
    PARAMETER_LIST_LENGTH_ERROR,
    REGISTRATIONS_PREEMPTED,
    RESERVATIONS_PREEMPTED,
    RESERVATIONS_RELEASED,
    Asc,
    CheckCondition,
    SenseKey,
)
from frontend.scsi.types import Nexus, ScsiStatus

TARGET = "iqn.2024-05.org.sparrow:vol0"
A = Nexus("iqn.2024-05.org.example:host-a", 0x23D000000001, TARGET, 1)
B = Nexus("iqn.2024-05.org.example:host-b", 0x23D000000002, TARGET, 1)
C = Nexus("iqn.2024-05.org.example:host-c", 0x23D000000003, TARGET, 1)
A_OTHER_ISID = Nexus(A.initiator_name, 0x23D000000099, TARGET, 1)  # second session, same initiator
A_OTHER_PORT = Nexus(A.initiator_name, A.isid, TARGET, 2)  # same initiator port via another TPG

ALL_TYPES = list(PrType)
NON_SHARED_TYPES = [t for t in PrType if not t.all_registrants]

# ------------------------------------------------------------------------------------------------
# CDB and parameter builders (independent of the module under test)


def pr_out_cdb(action: int, *, scope: int = 0, pr_type: int = 0, length: int = 24) -> bytes:
    return bytes([0x5F, action, scope << 4 | pr_type, 0, 0]) + struct.pack(">I", length) + b"\x00"


def basic_params(
    rk: int = 0, sark: int = 0, *, aptpl: bool = False, spec_i_pt: bool = False, all_tg_pt: bool = False
) -> bytes:
    flags = (0x08 if spec_i_pt else 0) | (0x04 if all_tg_pt else 0) | (0x01 if aptpl else 0)
    return struct.pack(">QQ4sBBH", rk, sark, b"", flags, 0, 0)


def transport_id(name: str, isid: int | None, *, fmt: int = 1, protocol: int = 5) -> bytes:
    text = name if isid is None else f"{name},i,0x{isid:012x}"
    body = text.encode() + b"\x00"
    body += b"\x00" * (-len(body) % 4)
    return bytes([fmt << 6 | protocol, 0]) + struct.pack(">H", len(body)) + body


def move_params(
    rk: int, sark: int, tid: bytes, *, rtpi: int = 1, unreg: bool = False, aptpl: bool = False
) -> bytes:
    flags = (0x02 if unreg else 0) | (0x01 if aptpl else 0)
    return struct.pack(">QQBBHI", rk, sark, 0, flags, rtpi, len(tid)) + tid


def pr_in_cdb(action: int, allocation_length: int = 16384) -> bytes:
    return bytes([0x5E, action, 0, 0, 0, 0, 0]) + struct.pack(">H", allocation_length) + b"\x00"


def prout(
    r: Reservations,
    nexus: Nexus,
    action: PrOutAction,
    rk: int = 0,
    sark: int = 0,
    pr_type: int = 0,
    **flags: bool,
) -> PrOutOutcome:
    return r.persistent_reserve_out(
        nexus, pr_out_cdb(action, pr_type=pr_type), basic_params(rk, sark, **flags)
    )


def register(r: Reservations, nexus: Nexus, key: int, *, aptpl: bool = False) -> PrOutOutcome:
    """libiscsi prout_register_and_ignore."""
    return prout(r, nexus, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, 0, key, aptpl=aptpl)


def unregister(r: Reservations, nexus: Nexus, key: int) -> PrOutOutcome:
    """libiscsi prout_register_key(sd, 0, key)."""
    return prout(r, nexus, PrOutAction.REGISTER, key, 0)


def reserve(r: Reservations, nexus: Nexus, key: int, pr_type: PrType) -> PrOutOutcome:
    return prout(r, nexus, PrOutAction.RESERVE, key, 0, pr_type)


def release(r: Reservations, nexus: Nexus, key: int, pr_type: PrType) -> PrOutOutcome:
    return prout(r, nexus, PrOutAction.RELEASE, key, 0, pr_type)


def read_keys(r: Reservations, nexus: Nexus = A) -> tuple[int, list[int]]:
    data = r.persistent_reserve_in(nexus, pr_in_cdb(PrInAction.READ_KEYS))
    generation, length = struct.unpack_from(">II", data)
    assert len(data) == 8 + length
    return generation, [struct.unpack_from(">Q", data, 8 + 8 * i)[0] for i in range(length // 8)]


def read_reservation(r: Reservations) -> tuple[int, PrType] | None:
    data = r.persistent_reserve_in(A, pr_in_cdb(PrInAction.READ_RESERVATION))
    _, length = struct.unpack_from(">II", data)
    assert len(data) == 8 + length
    if length == 0:
        return None
    assert length == 16
    key = struct.unpack_from(">Q", data, 8)[0]
    assert data[21] >> 4 == 0  # LU_SCOPE
    return key, PrType(data[21] & 0x0F)


@dataclass(frozen=True)
class FullStatus:
    key: int
    all_tg_pt: bool
    holder: bool
    scope_type: int
    rtpi: int
    transport_id: bytes


def read_full_status(r: Reservations) -> tuple[int, list[FullStatus]]:
    data = r.persistent_reserve_in(A, pr_in_cdb(PrInAction.READ_FULL_STATUS))
    generation, length = struct.unpack_from(">II", data)
    assert len(data) == 8 + length
    out: list[FullStatus] = []
    offset = 8
    while offset < len(data):
        key = struct.unpack_from(">Q", data, offset)[0]
        flags, scope_type = data[offset + 12], data[offset + 13]
        rtpi = struct.unpack_from(">H", data, offset + 18)[0]
        tid_len = struct.unpack_from(">I", data, offset + 20)[0]
        tid = data[offset + 24 : offset + 24 + tid_len]
        assert len(tid) == tid_len
        out.append(FullStatus(key, bool(flags & 2), bool(flags & 1), scope_type, rtpi, tid))
        offset += 24 + tid_len
    assert offset == len(data)
    return generation, out


def check(exc: pytest.ExceptionInfo[CheckCondition], code: Asc) -> None:
    assert exc.value.key is SenseKey.ILLEGAL_REQUEST
    assert exc.value.code == code


READ10 = bytes([0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0])
WRITE10 = bytes([0x2A, 0, 0, 0, 0, 1, 0, 0, 1, 0])
INQUIRY = bytes([0x12, 0, 0, 0, 0xFF, 0])
TUR = bytes(6)
REPORT_LUNS = bytes([0xA0]) + bytes(11)
REQUEST_SENSE = bytes([0x03, 0, 0, 0, 18, 0])
MODE_SENSE6 = bytes([0x1A, 0, 0x3F, 0, 0xFF, 0])
READ_CAPACITY10 = bytes([0x25]) + bytes(9)
RESERVE6_CDB = bytes([0x16]) + bytes(5)
RELEASE6_CDB = bytes([0x17]) + bytes(5)


# ------------------------------------------------------------------------------------------------
# PERSISTENT RESERVE IN


def test_read_keys_empty() -> None:
    r = Reservations()
    data = r.persistent_reserve_in(A, pr_in_cdb(PrInAction.READ_KEYS))
    assert data == bytes(8)


def test_read_keys_lists_every_registration_in_order() -> None:
    r = Reservations()
    register(r, A, 0x1111)
    register(r, B, 0x2222)
    register(r, C, 0x1111)  # keys need not be unique
    assert read_keys(r) == (3, [0x1111, 0x2222, 0x1111])


def test_libiscsi_prin_read_keys_simple_additional_length_matches() -> None:
    r = Reservations()
    register(r, A, 5)
    data = r.persistent_reserve_in(A, pr_in_cdb(PrInAction.READ_KEYS, 16384))
    assert struct.unpack_from(">I", data, 4)[0] == len(data) - 8 == 8


@pytest.mark.parametrize("allocation_length", [0, 1, 7, 8, 12, 15, 16, 23, 24, 25])
def test_truncation_keeps_true_additional_length(allocation_length: int) -> None:
    r = Reservations()
    register(r, A, 0xAAAA)
    register(r, B, 0xBBBB)
    full = r.persistent_reserve_in(A, pr_in_cdb(PrInAction.READ_KEYS))
    data = r.persistent_reserve_in(A, pr_in_cdb(PrInAction.READ_KEYS, allocation_length))
    assert data == full[:allocation_length]
    if allocation_length >= 8:
        # libiscsi PrinReadKeys.Truncate: ADDITIONAL LENGTH is not altered by the allocation length
        assert struct.unpack_from(">I", data, 4)[0] == 16


@pytest.mark.parametrize("action", list(PrInAction))
def test_every_prin_action_truncates(action: PrInAction) -> None:
    r = Reservations()
    register(r, A, 1)
    reserve(r, A, 1, PrType.EXCLUSIVE_ACCESS)
    full = r.persistent_reserve_in(A, pr_in_cdb(action))
    assert len(full) >= 8
    for n in range(len(full) + 2):
        assert r.persistent_reserve_in(A, pr_in_cdb(action, n)) == full[:n]


def test_read_reservation_none_then_holder_key() -> None:
    r = Reservations()
    assert r.persistent_reserve_in(A, pr_in_cdb(PrInAction.READ_RESERVATION)) == bytes(8)
    register(r, A, 0x0102030405060708)
    reserve(r, A, 0x0102030405060708, PrType.WRITE_EXCLUSIVE)
    data = r.persistent_reserve_in(B, pr_in_cdb(PrInAction.READ_RESERVATION))
    assert data == (
        struct.pack(">II", 1, 16) + bytes.fromhex("0102030405060708") + bytes(4) + b"\x00\x01" + bytes(2)
    )


@pytest.mark.parametrize("pr_type", ALL_TYPES)
def test_read_reservation_reports_type_and_zero_key_for_all_registrants(pr_type: PrType) -> None:
    r = Reservations()
    register(r, A, 77)
    reserve(r, A, 77, pr_type)
    assert read_reservation(r) == (0 if pr_type.all_registrants else 77, pr_type)


def test_read_reservation_follows_holder_key_change() -> None:
    r = Reservations()
    register(r, A, 1)
    reserve(r, A, 1, PrType.EXCLUSIVE_ACCESS)
    prout(r, A, PrOutAction.REGISTER, 1, 9)
    assert read_reservation(r) == (9, PrType.EXCLUSIVE_ACCESS)


def test_report_capabilities_bytes() -> None:
    r = Reservations()
    data = r.persistent_reserve_in(A, pr_in_cdb(PrInAction.REPORT_CAPABILITIES))
    # LENGTH=8; PTPL_C; TMV + ALLOW COMMANDS=011b; type mask of all six types
    assert data == bytes([0x00, 0x08, 0x01, 0xB0, 0xEA, 0x01, 0x00, 0x00])
    register(r, A, 1, aptpl=True)
    data = r.persistent_reserve_in(A, pr_in_cdb(PrInAction.REPORT_CAPABILITIES))
    assert data[3] == 0xB1  # PTPL_A


def test_libiscsi_prin_report_caps_fields() -> None:
    data = Reservations().persistent_reserve_in(A, pr_in_cdb(PrInAction.REPORT_CAPABILITIES))
    length, _, byte3, mask = struct.unpack(">HBBH", data[:6])
    assert length == 8
    assert byte3 & 0x80  # TMV
    assert (byte3 >> 4) & 0x7 <= 5  # ALLOW COMMANDS
    assert mask & ~0xEA01 == 0  # SCSI_PR_TYPE_MASK_ALL
    assert mask == 0xEA01  # and every type is there


def test_read_full_status_descriptors() -> None:
    r = Reservations()
    register(r, A, 0xA)
    register(r, B, 0xB)
    reserve(r, B, 0xB, PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    generation, descriptors = read_full_status(r)
    assert generation == 2
    assert [(d.key, d.holder, d.all_tg_pt, d.rtpi) for d in descriptors] == [
        (0xA, False, False, 1),
        (0xB, True, False, 1),
    ]
    assert descriptors[0].scope_type == 0
    assert descriptors[1].scope_type == 0x05
    assert descriptors[1].transport_id == transport_id(B.initiator_name, B.isid)


def test_read_full_status_all_registrants_are_holders() -> None:
    r = Reservations()
    register(r, A, 1)
    register(r, B, 2)
    reserve(r, B, 2, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)
    _, descriptors = read_full_status(r)
    assert [(d.holder, d.scope_type) for d in descriptors] == [(True, 0x08), (True, 0x08)]


def test_transport_id_format() -> None:
    tid = iscsi_transport_id(A)
    assert tid[0] == 0x45  # FORMAT CODE 01b, PROTOCOL IDENTIFIER iSCSI
    length = struct.unpack_from(">H", tid, 2)[0]
    assert length == len(tid) - 4
    assert length % 4 == 0 and length >= 20
    assert tid[4:].rstrip(b"\x00") == b"iqn.2024-05.org.example:host-a,i,0x23d000000001"
    short = iscsi_transport_id(Nexus("a", 1, TARGET, 1))
    assert struct.unpack_from(">H", short, 2)[0] == 20  # padded up to the minimum


@given(
    name=st.from_regex(r"iqn\.[0-9]{4}-[0-9]{2}\.[a-z.]{1,20}(:[a-z0-9.-]{0,40})?", fullmatch=True),
    isid=st.integers(0, (1 << 48) - 1),
)
def test_transport_id_round_trip(name: str, isid: int) -> None:
    tid = iscsi_transport_id(Nexus(name, isid, TARGET, 1))
    assert parse_iscsi_transport_id(tid, 0) == (name, isid)


@pytest.mark.parametrize(
    "tid",
    [
        b"",
        transport_id(A.initiator_name, None, fmt=0),  # initiator device name: not a port
        transport_id(A.initiator_name, A.isid, protocol=6),  # SAS
        transport_id(A.initiator_name, A.isid)[:10],  # cut short
        bytes([0x45, 0, 0, 8]) + b"abcdefgh",  # no NUL
        transport_id(A.initiator_name + ",i,0xZZ", None, fmt=1),
        transport_id("noseparator", None, fmt=1),
        bytes([0x45, 0, 0, 4]) + b"\xff\xfe\x00\x00",
    ],
)
def test_bad_transport_ids(tid: bytes) -> None:
    with pytest.raises(CheckCondition) as exc:
        parse_iscsi_transport_id(tid, 24)
    check(exc, INVALID_FIELD_IN_PARAMETER_LIST)


def test_libiscsi_prin_serviceaction_range() -> None:
    r = Reservations()
    for action in range(4):
        r.persistent_reserve_in(A, pr_in_cdb(action))
    for action in range(4, 0x20):
        with pytest.raises(CheckCondition) as exc:
            r.persistent_reserve_in(A, pr_in_cdb(action))
        check(exc, INVALID_FIELD_IN_CDB)
        assert exc.value.field is not None and exc.value.field.byte == 1


def test_prin_short_cdb() -> None:
    with pytest.raises(CheckCondition) as exc:
        Reservations().persistent_reserve_in(A, bytes([0x5E, 0]))
    check(exc, INVALID_FIELD_IN_CDB)


# ------------------------------------------------------------------------------------------------
# REGISTER, REGISTER AND IGNORE EXISTING KEY


def test_libiscsi_prout_register_simple() -> None:
    r = Reservations()
    key = 0x5EED
    assert register(r, A, key).changed
    assert key in read_keys(r)[1]
    # re-REGISTER with RESERVATION KEY 0 from a registered nexus: conflict
    with pytest.raises(ReservationConflict):
        prout(r, A, PrOutAction.REGISTER, 0, key + 1)
    assert unregister(r, A, key).changed
    assert key not in read_keys(r)[1]


def test_register_from_unregistered_nexus() -> None:
    r = Reservations()
    with pytest.raises(ReservationConflict):
        prout(r, A, PrOutAction.REGISTER, 5, 6)  # non-zero RESERVATION KEY
    assert prout(r, A, PrOutAction.REGISTER, 0, 0) == PrOutOutcome(changed=False)
    assert r.generation == 0
    assert prout(r, A, PrOutAction.REGISTER, 0, 6).changed
    assert r.registered_key(A) == 6
    assert r.generation == 1


def test_register_changes_key_and_counts_generation() -> None:
    r = Reservations()
    register(r, A, 1)
    prout(r, A, PrOutAction.REGISTER, 1, 2)
    prout(r, A, PrOutAction.REGISTER, 2, 2)  # same key again still counts
    assert read_keys(r) == (3, [2])
    with pytest.raises(ReservationConflict):
        prout(r, A, PrOutAction.REGISTER, 1, 3)
    assert read_keys(r) == (3, [2])


def test_register_and_ignore_existing_key_ignores_reservation_key() -> None:
    r = Reservations()
    register(r, A, 1)
    prout(r, A, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, 0xDEAD, 7)
    assert r.registered_key(A) == 7
    prout(r, A, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, 0xDEAD, 0)
    assert r.registered_key(A) is None
    assert prout(r, A, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY, 0, 0) == PrOutOutcome(changed=False)
    assert r.generation == 3  # register, change, unregister; not the no-op


def test_registration_is_per_i_t_nexus() -> None:
    r = Reservations()
    register(r, A, 1)
    assert r.registered_key(A_OTHER_ISID) is None
    assert r.registered_key(A_OTHER_PORT) is None
    register(r, A_OTHER_ISID, 2)
    register(r, A_OTHER_PORT, 3)
    assert read_keys(r)[1] == [1, 2, 3]
    # iSCSI names are case-insensitive
    assert r.registered_key(Nexus(A.initiator_name.upper(), A.isid, TARGET.upper(), 1)) == 1


@pytest.mark.parametrize("action", [PrOutAction.REGISTER, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY])
def test_register_rejects_all_tg_pt_and_spec_i_pt(action: PrOutAction) -> None:
    r = Reservations()
    with pytest.raises(CheckCondition) as exc:
        prout(r, A, action, 0, 1, all_tg_pt=True)
    check(exc, INVALID_FIELD_IN_PARAMETER_LIST)
    # SPEC_I_PT=1 carries TransportIDs after the 24 bytes: refused for the bit, not the length
    cdb = pr_out_cdb(action, length=24 + 24)
    with pytest.raises(CheckCondition) as exc:
        r.persistent_reserve_out(A, cdb, basic_params(0, 1, spec_i_pt=True) + transport_id("x", 1))
    check(exc, INVALID_FIELD_IN_PARAMETER_LIST)
    assert exc.value.field is not None and (exc.value.field.byte, exc.value.field.bit) == (20, 3)
    assert r.generation == 0 and read_keys(r)[1] == []


@pytest.mark.parametrize("length", [0, 1, 23, 25, 32, 0xFFFFFFFF])
@pytest.mark.parametrize("action", [a for a in PrOutAction if a is not PrOutAction.REGISTER_AND_MOVE])
def test_parameter_list_length_must_be_24(action: PrOutAction, length: int) -> None:
    r = Reservations()
    with pytest.raises(CheckCondition) as exc:
        r.persistent_reserve_out(A, pr_out_cdb(action, length=length), basic_params(0, 1) + bytes(8))
    check(exc, PARAMETER_LIST_LENGTH_ERROR)


def test_parameter_data_shorter_than_the_cdb_says() -> None:
    with pytest.raises(CheckCondition) as exc:
        Reservations().persistent_reserve_out(A, pr_out_cdb(0), basic_params(0, 1)[:20])
    check(exc, PARAMETER_LIST_LENGTH_ERROR)


@pytest.mark.parametrize("action", [0x08, 0x09, 0x1F])
def test_unknown_prout_service_action(action: int) -> None:
    with pytest.raises(CheckCondition) as exc:
        Reservations().persistent_reserve_out(A, pr_out_cdb(action), basic_params(0, 1))
    check(exc, INVALID_FIELD_IN_CDB)


def test_prout_short_cdb() -> None:
    with pytest.raises(CheckCondition) as exc:
        Reservations().persistent_reserve_out(A, bytes([0x5F, 0, 0]), basic_params(0, 1))
    check(exc, INVALID_FIELD_IN_CDB)


def test_registration_resources_are_bounded() -> None:
    r = Reservations()
    for i in range(MAX_REGISTRATIONS):
        register(r, Nexus("iqn.x", i, TARGET, 1), 1)
    with pytest.raises(CheckCondition) as exc:
        register(r, Nexus("iqn.x", MAX_REGISTRATIONS, TARGET, 1), 1)
    check(exc, INSUFFICIENT_REGISTRATION_RESOURCES)
    register(r, Nexus("iqn.x", 0, TARGET, 1), 2)  # changing an existing key is still fine


# ------------------------------------------------------------------------------------------------
# RESERVE and RELEASE


@pytest.mark.parametrize("pr_type", ALL_TYPES)
def test_libiscsi_prout_reserve_simple(pr_type: PrType) -> None:
    r = Reservations()
    register(r, A, 42)
    generation = r.generation
    assert reserve(r, A, 42, pr_type).changed
    assert read_reservation(r) == (0 if pr_type.all_registrants else 42, pr_type)
    assert release(r, A, 42, pr_type) == PrOutOutcome(changed=True)
    assert read_reservation(r) is None
    assert r.generation == generation  # RESERVE and RELEASE never count
    unregister(r, A, 42)
    assert read_keys(r)[1] == []


def test_reserve_needs_registration_and_right_key() -> None:
    r = Reservations()
    with pytest.raises(ReservationConflict):
        reserve(r, A, 0, PrType.WRITE_EXCLUSIVE)
    register(r, A, 1)
    with pytest.raises(ReservationConflict):
        reserve(r, A, 2, PrType.WRITE_EXCLUSIVE)
    assert read_reservation(r) is None


@pytest.mark.parametrize("code", [0x0, 0x2, 0x4, 0x9, 0xF])
def test_reserve_invalid_type(code: int) -> None:
    r = Reservations()
    register(r, A, 1)
    with pytest.raises(CheckCondition) as exc:
        prout(r, A, PrOutAction.RESERVE, 1, 0, code)
    check(exc, INVALID_FIELD_IN_CDB)


def test_reserve_invalid_scope() -> None:
    r = Reservations()
    register(r, A, 1)
    with pytest.raises(CheckCondition) as exc:
        r.persistent_reserve_out(
            A, pr_out_cdb(PrOutAction.RESERVE, scope=1, pr_type=PrType.WRITE_EXCLUSIVE), basic_params(1)
        )
    check(exc, INVALID_FIELD_IN_CDB)


@pytest.mark.parametrize("pr_type", ALL_TYPES)
def test_reserve_again(pr_type: PrType) -> None:
    r = Reservations()
    register(r, A, 1)
    register(r, B, 2)
    reserve(r, A, 1, pr_type)
    assert reserve(r, A, 1, pr_type) == PrOutOutcome(changed=False)
    other_type = PrType.WRITE_EXCLUSIVE if pr_type is not PrType.WRITE_EXCLUSIVE else PrType.EXCLUSIVE_ACCESS
    with pytest.raises(ReservationConflict):
        reserve(r, A, 1, other_type)
    if pr_type.all_registrants:  # B holds it too
        assert reserve(r, B, 2, pr_type) == PrOutOutcome(changed=False)
    else:
        with pytest.raises(ReservationConflict):
            reserve(r, B, 2, pr_type)
    with pytest.raises(ReservationConflict):
        reserve(r, B, 2, other_type)
    assert r.reservation() is not None and r.reservation() == (A, pr_type)


def test_release_cases_that_do_nothing() -> None:
    r = Reservations()
    with pytest.raises(ReservationConflict):
        release(r, A, 0, PrType.WRITE_EXCLUSIVE)  # not registered
    register(r, A, 1)
    register(r, B, 2)
    assert release(r, A, 1, PrType.WRITE_EXCLUSIVE) == PrOutOutcome(changed=False)  # nothing reserved
    reserve(r, A, 1, PrType.EXCLUSIVE_ACCESS)
    assert release(r, B, 2, PrType.EXCLUSIVE_ACCESS) == PrOutOutcome(changed=False)  # not the holder
    with pytest.raises(ReservationConflict):
        release(r, A, 2, PrType.EXCLUSIVE_ACCESS)  # wrong key
    assert read_reservation(r) == (1, PrType.EXCLUSIVE_ACCESS)


def test_release_with_wrong_type_is_invalid_release() -> None:
    r = Reservations()
    register(r, A, 1)
    reserve(r, A, 1, PrType.EXCLUSIVE_ACCESS)
    with pytest.raises(CheckCondition) as exc:
        release(r, A, 1, PrType.WRITE_EXCLUSIVE)
    check(exc, INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
    with pytest.raises(CheckCondition) as exc:
        r.persistent_reserve_out(
            A, pr_out_cdb(PrOutAction.RELEASE, scope=2, pr_type=PrType.EXCLUSIVE_ACCESS), basic_params(1)
        )
    check(exc, INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
    assert read_reservation(r) == (1, PrType.EXCLUSIVE_ACCESS)


@pytest.mark.parametrize("pr_type", ALL_TYPES)
def test_release_unit_attentions(pr_type: PrType) -> None:
    """SPC-4 5.13.11.2.2: releasing a registrants-only/all-registrants reservation tells the others."""
    r = Reservations()
    register(r, A, 1)
    register(r, B, 2)
    register(r, C, 3)
    reserve(r, A, 1, pr_type)
    outcome = release(r, A, 1, pr_type)
    expected = (
        ((B, RESERVATIONS_RELEASED), (C, RESERVATIONS_RELEASED)) if pr_type.registrants_have_access else ()
    )
    assert outcome == PrOutOutcome(changed=True, unit_attentions=expected)


@pytest.mark.parametrize(
    "pr_type", [PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS]
)
def test_all_registrants_reservation_released_by_any_registrant(pr_type: PrType) -> None:
    r = Reservations()
    register(r, A, 1)
    register(r, B, 2)
    reserve(r, A, 1, pr_type)
    outcome = release(r, B, 2, pr_type)
    assert outcome.unit_attentions == ((A, RESERVATIONS_RELEASED),)
    assert r.reservation() is None


# ------------------------------------------------------------------------------------------------
# Unregistering the holder (libiscsi ProutReserve.Ownership*)


@pytest.mark.parametrize("pr_type", ALL_TYPES)
def test_libiscsi_prout_reserve_ownership(pr_type: PrType) -> None:
    r = Reservations()
    register(r, A, 11)
    register(r, B, 22)
    reserve(r, A, 11, pr_type)
    outcome = unregister(r, A, 11)
    if pr_type.all_registrants:
        assert outcome.unit_attentions == ()
        assert read_reservation(r) == (0, pr_type)
        assert r.reservation() == (B, pr_type)
        assert release(r, B, 22, pr_type).changed
    else:
        assert read_reservation(r) is None
        expected = ((B, RESERVATIONS_RELEASED),) if pr_type.registrants_only else ()
        assert outcome.unit_attentions == expected
    unregister(r, B, 22)
    assert read_keys(r)[1] == [] and read_reservation(r) is None


@pytest.mark.parametrize(
    "pr_type", [PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS]
)
def test_all_registrants_reservation_ends_with_last_registrant(pr_type: PrType) -> None:
    r = Reservations()
    register(r, A, 1)
    reserve(r, A, 1, pr_type)
    unregister(r, A, 1)
    assert r.reservation() is None
    register(r, B, 2)
    assert not r.conflicts(C, WRITE10)


def test_unregistering_a_non_holder_keeps_the_reservation() -> None:
    r = Reservations()
    register(r, A, 1)
    register(r, B, 2)
    reserve(r, A, 1, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY)
    assert unregister(r, B, 2).unit_attentions == ()
    assert r.reservation() == (A, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY)


# ------------------------------------------------------------------------------------------------
# CLEAR


def test_libiscsi_prout_clear_simple() -> None:
    r = Reservations()
    key = 0xC1EA
    register(r, A, key)
    old_gen, keys = read_keys(r)
    assert keys
    reserve(r, A, key, PrType.EXCLUSIVE_ACCESS)
    assert read_reservation(r) == (key, PrType.EXCLUSIVE_ACCESS)
    assert prout(r, A, PrOutAction.CLEAR, key).changed
    assert read_reservation(r) is None
    assert read_keys(r) == (old_gen + 1, [])


def test_clear_tells_every_other_registrant() -> None:
    r = Reservations()
    register(r, A, 1)
    register(r, B, 2)
    register(r, C, 3)
    reserve(r, B, 2, PrType.WRITE_EXCLUSIVE)
    outcome = prout(r, C, PrOutAction.CLEAR, 3)
    assert outcome.unit_attentions == ((A, RESERVATIONS_PREEMPTED), (B, RESERVATIONS_PREEMPTED))


def test_clear_needs_registration_and_key() -> None:
    r = Reservations()
    register(r, A, 1)
    with pytest.raises(ReservationConflict):
        prout(r, B, PrOutAction.CLEAR, 0)
    with pytest.raises(ReservationConflict):
        prout(r, A, PrOutAction.CLEAR, 2)
    assert read_keys(r) == (1, [1])


# ------------------------------------------------------------------------------------------------
# PREEMPT, PREEMPT AND ABORT


@pytest.mark.parametrize("action", [PrOutAction.PREEMPT, PrOutAction.PREEMPT_AND_ABORT])
def test_libiscsi_prout_preempt_remove_registration(action: PrOutAction) -> None:
    r = Reservations()
    k1, k2 = 0x1001, 0x2002
    register(r, A, k1)
    prout(r, A, PrOutAction.CLEAR, k1)
    register(r, A, k1)
    register(r, B, k2)
    old_gen, keys = read_keys(r)
    assert len(keys) == 2
    outcome = prout(r, B, action, k2, k1, PrType.EXCLUSIVE_ACCESS)
    assert outcome == PrOutOutcome(changed=True, unit_attentions=((A, REGISTRATIONS_PREEMPTED),))
    assert read_keys(r) == (old_gen + 1, [k2])
    assert r.reservation() is None  # no reservation existed, none is created
    unregister(r, B, k2)


def test_preempt_without_reservation_errors() -> None:
    r = Reservations()
    register(r, A, 1)
    register(r, B, 2)
    with pytest.raises(CheckCondition) as exc:
        prout(r, A, PrOutAction.PREEMPT, 1, 0, PrType.WRITE_EXCLUSIVE)
    check(exc, INVALID_FIELD_IN_PARAMETER_LIST)
    with pytest.raises(ReservationConflict):
        prout(r, A, PrOutAction.PREEMPT, 1, 99, PrType.WRITE_EXCLUSIVE)  # matches nobody
    with pytest.raises(ReservationConflict):
        prout(r, C, PrOutAction.PREEMPT, 0, 2, PrType.WRITE_EXCLUSIVE)  # C not registered
    with pytest.raises(ReservationConflict):
        prout(r, A, PrOutAction.PREEMPT, 7, 2, PrType.WRITE_EXCLUSIVE)  # A's key is 1
    with pytest.raises(CheckCondition) as exc:
        prout(r, A, PrOutAction.PREEMPT, 1, 2, 0x2)  # bad type
    check(exc, INVALID_FIELD_IN_CDB)
    assert read_keys(r) == (2, [1, 2])


def test_preempt_the_holder_same_type() -> None:
    r = Reservations()
    register(r, A, 1)
    register(r, B, 2)
    register(r, C, 3)
    reserve(r, A, 1, PrType.EXCLUSIVE_ACCESS)
    outcome = prout(r, B, PrOutAction.PREEMPT, 2, 1, PrType.EXCLUSIVE_ACCESS)
    assert outcome == PrOutOutcome(changed=True, unit_attentions=((A, REGISTRATIONS_PREEMPTED),))
    assert r.reservation() == (B, PrType.EXCLUSIVE_ACCESS)
    assert read_keys(r)[1] == [2, 3]
    assert r.generation == 4


def test_preempt_the_holder_new_type_releases_for_the_rest() -> None:
    r = Reservations()
    register(r, A, 1)
    register(r, B, 2)
    register(r, C, 3)
    register(r, A_OTHER_ISID, 1)  # shares A's key: also preempted
    reserve(r, A, 1, PrType.EXCLUSIVE_ACCESS)
    outcome = prout(r, B, PrOutAction.PREEMPT, 2, 1, PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)
    assert outcome.unit_attentions == (
        (A, REGISTRATIONS_PREEMPTED),
        (A_OTHER_ISID, REGISTRATIONS_PREEMPTED),
        (C, RESERVATIONS_RELEASED),
    )
    assert r.reservation() == (B, PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY)


def test_preempt_own_reservation_to_change_type() -> None:
    r = Reservations()
    register(r, A, 1)
    register(r, B, 2)
    reserve(r, A, 1, PrType.WRITE_EXCLUSIVE)
    outcome = prout(r, A, PrOutAction.PREEMPT, 1, 1, PrType.EXCLUSIVE_ACCESS)
    assert outcome.unit_attentions == ((B, RESERVATIONS_RELEASED),)
    assert r.reservation() == (A, PrType.EXCLUSIVE_ACCESS)
    assert r.registered_key(A) == 1


def test_preempt_non_holder_key_only_removes_registrations() -> None:
    r = Reservations()
    register(r, A, 1)
    register(r, B, 2)
    register(r, C, 3)
    reserve(r, A, 1, PrType.WRITE_EXCLUSIVE)
    outcome = prout(r, A, PrOutAction.PREEMPT, 1, 3, PrType.EXCLUSIVE_ACCESS)
    assert outcome.unit_attentions == ((C, REGISTRATIONS_PREEMPTED),)
    assert r.reservation() == (A, PrType.WRITE_EXCLUSIVE)  # type unchanged
    with pytest.raises(CheckCondition) as exc:
        prout(r, B, PrOutAction.PREEMPT, 2, 0, PrType.WRITE_EXCLUSIVE)
    check(exc, INVALID_FIELD_IN_PARAMETER_LIST)


@pytest.mark.parametrize(
    "pr_type", [PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS]
)
def test_preempt_all_registrants_with_zero_key(pr_type: PrType) -> None:
    r = Reservations()
    register(r, A, 1)
    register(r, B, 2)
    register(r, C, 3)
    reserve(r, A, 1, pr_type)
    outcome = prout(r, B, PrOutAction.PREEMPT, 2, 0, PrType.EXCLUSIVE_ACCESS)
    assert outcome.unit_attentions == ((A, REGISTRATIONS_PREEMPTED), (C, REGISTRATIONS_PREEMPTED))
    assert r.reservation() == (B, PrType.EXCLUSIVE_ACCESS)
    assert read_keys(r)[1] == [2]


@pytest.mark.parametrize(
    "pr_type", [PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS]
)
def test_preempt_all_registrants_with_a_key_removes_only_those(pr_type: PrType) -> None:
    r = Reservations()
    register(r, A, 1)
    register(r, B, 2)
    register(r, C, 3)
    reserve(r, A, 1, pr_type)
    outcome = prout(r, B, PrOutAction.PREEMPT, 2, 1, PrType.EXCLUSIVE_ACCESS)
    assert outcome.unit_attentions == ((A, REGISTRATIONS_PREEMPTED),)
    reservation = r.reservation()
    assert reservation is not None and reservation[1] is pr_type
    assert r.is_holder(B) and r.is_holder(C) and not r.is_holder(A)


def test_preempt_own_key_without_reservation_unregisters_self_without_attention() -> None:
    r = Reservations()
    register(r, A, 1)
    register(r, B, 1)
    outcome = prout(r, A, PrOutAction.PREEMPT, 1, 1, PrType.WRITE_EXCLUSIVE)
    assert outcome.unit_attentions == ((B, REGISTRATIONS_PREEMPTED),)
    assert read_keys(r)[1] == []


# ------------------------------------------------------------------------------------------------
# REGISTER AND MOVE


def move(
    r: Reservations,
    nexus: Nexus,
    rk: int,
    sark: int,
    dest: Nexus,
    *,
    unreg: bool = False,
    aptpl: bool = False,
) -> PrOutOutcome:
    tid = transport_id(dest.initiator_name, dest.isid)
    params = move_params(rk, sark, tid, rtpi=dest.tpgt, unreg=unreg, aptpl=aptpl)
    cdb = pr_out_cdb(PrOutAction.REGISTER_AND_MOVE, pr_type=PrType.EXCLUSIVE_ACCESS, length=len(params))
    return r.persistent_reserve_out(nexus, cdb, params)


@pytest.mark.parametrize("unreg", [False, True])
def test_register_and_move(unreg: bool) -> None:
    r = Reservations()
    register(r, A, 1)
    reserve(r, A, 1, PrType.WRITE_EXCLUSIVE)
    outcome = move(r, A, 1, 5, B, unreg=unreg, aptpl=True)
    assert outcome == PrOutOutcome(changed=True)
    assert r.reservation() == (B, PrType.WRITE_EXCLUSIVE)  # scope and type are kept
    assert r.registered_key(B) == 5
    assert r.registered_key(A) == (None if unreg else 1)
    assert r.aptpl
    assert r.generation == 2
    assert r.conflicts(A, WRITE10) and not r.conflicts(B, WRITE10)


def test_register_and_move_to_registered_nexus_keeps_its_key() -> None:
    r = Reservations()
    register(r, A, 1)
    register(r, B, 2)
    reserve(r, A, 1, PrType.EXCLUSIVE_ACCESS)
    move(r, A, 1, 5, B)
    assert r.registered_key(B) == 2
    assert read_reservation(r) == (2, PrType.EXCLUSIVE_ACCESS)


def test_register_and_move_to_another_target_port() -> None:
    r = Reservations()
    register(r, A, 1)
    reserve(r, A, 1, PrType.EXCLUSIVE_ACCESS)
    move(r, A, 1, 5, A_OTHER_PORT)
    assert r.reservation() == (A_OTHER_PORT, PrType.EXCLUSIVE_ACCESS)
    _, descriptors = read_full_status(r)
    assert [(d.rtpi, d.holder) for d in descriptors] == [(1, False), (2, True)]


def test_register_and_move_refusals() -> None:
    r = Reservations()
    register(r, A, 1)
    register(r, B, 2)
    with pytest.raises(ReservationConflict):
        move(r, A, 1, 5, C)  # nothing reserved
    reserve(r, A, 1, PrType.EXCLUSIVE_ACCESS)
    with pytest.raises(ReservationConflict):
        move(r, B, 2, 5, C)  # not the holder
    with pytest.raises(ReservationConflict):
        move(r, A, 9, 5, C)  # wrong key
    with pytest.raises(ReservationConflict):
        move(r, C, 0, 5, B)  # not registered
    with pytest.raises(CheckCondition) as exc:
        move(r, A, 1, 0, C)  # zero key
    check(exc, INVALID_FIELD_IN_PARAMETER_LIST)
    with pytest.raises(CheckCondition) as exc:
        move(r, A, 1, 5, A)  # to itself
    check(exc, INVALID_FIELD_IN_PARAMETER_LIST)
    params = move_params(1, 5, transport_id(C.initiator_name, None, fmt=0))
    with pytest.raises(CheckCondition) as exc:
        r.persistent_reserve_out(A, pr_out_cdb(PrOutAction.REGISTER_AND_MOVE, length=len(params)), params)
    check(exc, INVALID_FIELD_IN_PARAMETER_LIST)
    params = move_params(1, 5, transport_id(C.initiator_name, C.isid))
    for length in (0, 23, len(params) - 1):
        with pytest.raises(CheckCondition) as exc:
            r.persistent_reserve_out(A, pr_out_cdb(PrOutAction.REGISTER_AND_MOVE, length=length), params)
        check(exc, PARAMETER_LIST_LENGTH_ERROR)
    with pytest.raises(CheckCondition) as exc:
        r.persistent_reserve_out(
            A, pr_out_cdb(PrOutAction.REGISTER_AND_MOVE, scope=1, length=len(params)), params
        )
    check(exc, INVALID_FIELD_IN_CDB)
    assert r.reservation() == (A, PrType.EXCLUSIVE_ACCESS) and read_keys(r) == (2, [1, 2])


@pytest.mark.parametrize(
    "pr_type", [PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS]
)
def test_register_and_move_refuses_all_registrants(pr_type: PrType) -> None:
    r = Reservations()
    register(r, A, 1)
    reserve(r, A, 1, pr_type)
    with pytest.raises(ReservationConflict):
        move(r, A, 1, 5, B)


# ------------------------------------------------------------------------------------------------
# The conflict table

# libiscsi test_prout_reserve_access.c: (registered read, registered write, unregistered read,
# unregistered write) for an I_T nexus other than the one that reserved
LIBISCSI_ACCESS = {
    PrType.EXCLUSIVE_ACCESS: (False, False, False, False),
    PrType.WRITE_EXCLUSIVE: (True, False, True, False),
    PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: (True, True, False, False),
    PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY: (True, True, True, False),
    PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS: (True, True, False, False),
    PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS: (True, True, True, False),
}


@pytest.mark.parametrize("pr_type", ALL_TYPES)
def test_libiscsi_prout_reserve_access(pr_type: PrType) -> None:
    r = Reservations()
    key, key2 = 0x1234, 0x5678
    register(r, A, key)
    register(r, B, key2)
    reserve(r, A, key, pr_type)
    assert read_reservation(r) == (0 if pr_type.all_registrants else key, pr_type)
    assert not r.conflicts(A, READ10) and not r.conflicts(A, WRITE10)
    reg_read, reg_write, unreg_read, unreg_write = LIBISCSI_ACCESS[pr_type]
    assert r.conflicts(B, READ10) is not reg_read
    assert r.conflicts(B, WRITE10) is not reg_write
    assert unregister(r, B, key2).unit_attentions == ()
    assert r.conflicts(B, READ10) is not unreg_read
    assert r.conflicts(B, WRITE10) is not unreg_write
    assert release(r, A, key, pr_type).changed
    unregister(r, A, key)
    assert not r.conflicts(B, WRITE10)


ALWAYS_ALLOWED = {
    "INQUIRY": INQUIRY,
    "TEST UNIT READY": TUR,
    "REPORT LUNS": REPORT_LUNS,
    "REQUEST SENSE": REQUEST_SENSE,
    "READ CAPACITY(10)": READ_CAPACITY10,
    "READ CAPACITY(16)": bytes([0x9E, 0x10]) + bytes(14),
    "PERSISTENT RESERVE IN": pr_in_cdb(0),
    "PERSISTENT RESERVE OUT": pr_out_cdb(0),
    "REPORT TARGET PORT GROUPS": bytes([0xA3, 0x0A]) + bytes(10),
    "PREVENT ALLOW (allow)": bytes([0x1E, 0, 0, 0, 0, 0]),
    "START STOP UNIT (start)": bytes([0x1B, 0, 0, 0, 0x01, 0]),
}
READS = {
    "READ(6)": bytes([0x08]) + bytes(5),
    "READ(10)": READ10,
    "READ(12)": bytes([0xA8]) + bytes(11),
    "READ(16)": bytes([0x88]) + bytes(15),
    "VERIFY(10)": bytes([0x2F]) + bytes(9),
    "VERIFY(16)": bytes([0x8F]) + bytes(15),
    "PRE-FETCH(10)": bytes([0x34]) + bytes(9),
    "PRE-FETCH(16)": bytes([0x90]) + bytes(15),
    "GET LBA STATUS": bytes([0x9E, 0x12]) + bytes(14),
    "MODE SENSE(6)": MODE_SENSE6,
    "MODE SENSE(10)": bytes([0x5A]) + bytes(9),
    "REPORT SUPPORTED OPCODES": bytes([0xA3, 0x0C]) + bytes(10),
}
WRITES = {
    "WRITE(6)": bytes([0x0A]) + bytes(5),
    "WRITE(10)": WRITE10,
    "WRITE(12)": bytes([0xAA]) + bytes(11),
    "WRITE(16)": bytes([0x8A]) + bytes(15),
    "WRITE AND VERIFY(10)": bytes([0x2E]) + bytes(9),
    "WRITE SAME(10)": bytes([0x41]) + bytes(9),
    "WRITE SAME(16)": bytes([0x93]) + bytes(15),
    "UNMAP": bytes([0x42]) + bytes(9),
    "COMPARE AND WRITE": bytes([0x89]) + bytes(15),
    "ORWRITE": bytes([0x8B]) + bytes(15),
    "SYNCHRONIZE CACHE(10)": bytes([0x35]) + bytes(9),
    "SYNCHRONIZE CACHE(16)": bytes([0x91]) + bytes(15),
    "SANITIZE": bytes([0x48]) + bytes(9),
    "FORMAT UNIT": bytes([0x04]) + bytes(5),
    "MODE SELECT(6)": bytes([0x15]) + bytes(5),
    "MODE SELECT(10)": bytes([0x55]) + bytes(9),
    "LOG SELECT": bytes([0x4C]) + bytes(9),
    "WRITE BUFFER": bytes([0x3B]) + bytes(9),
    "EXTENDED COPY": bytes([0x83]) + bytes(15),
    "PREVENT ALLOW (prevent)": bytes([0x1E, 0, 0, 0, 1, 0]),
    "START STOP UNIT (stop)": bytes([0x1B, 0, 0, 0, 0, 0]),
    "START STOP UNIT (power condition)": bytes([0x1B, 0, 0, 0, 0x21, 0]),
    "WRITE(32)": bytes([0x7F, 0, 0, 0, 0, 0, 0, 0x18, 0x00, 0x0B]) + bytes(22),
    "unknown opcode": bytes([0xC0]) + bytes(15),
}


@pytest.mark.parametrize(
    ("name", "cdb", "access"),
    [
        *((n, c, Access.ALLOWED) for n, c in ALWAYS_ALLOWED.items()),
        *((n, c, Access.READ) for n, c in READS.items()),
        *((n, c, Access.WRITE) for n, c in WRITES.items()),
    ],
)
def test_command_access(name: str, cdb: bytes, access: Access) -> None:
    assert command_access(cdb) is access, name


@pytest.mark.parametrize(
    "cdb",
    [
        bytes([0x4D]) + bytes(9),  # LOG SENSE: ALLOWED in SPC-4 table 60
        bytes([0x3C]) + bytes(9),  # READ BUFFER: READ
        bytes([0x7F, 0, 0, 0, 0, 0, 0, 0x18, 0x00, 0x09]) + bytes(22),  # READ(32): READ
        bytes([0xA3, 0x05]) + bytes(10),  # REPORT IDENTIFYING INFORMATION: ALLOWED
    ],
)
def test_commands_the_lu_does_not_implement_count_as_writes(cdb: bytes) -> None:
    """The classes come from the command table (commands.py); a command outside it is classed WRITE,
    the conservative answer. The LU never asks: it answers INVALID COMMAND OPERATION CODE first."""
    assert command_access(cdb) is Access.WRITE


def expected_conflict(pr_type: PrType, role: str, access: Access) -> bool:
    """SPC-4 5.13.1 table 60 / SBC-3 table 13, written out per role."""
    if access is Access.ALLOWED or role == "holder":
        return False
    if role == "registered" and pr_type.registrants_have_access:
        return False
    return not (access is Access.READ and pr_type.write_exclusive)


@pytest.mark.parametrize("pr_type", ALL_TYPES)
@pytest.mark.parametrize("role", ["holder", "registered", "unregistered"])
@pytest.mark.parametrize("commands", [ALWAYS_ALLOWED, READS, WRITES], ids=["allowed", "reads", "writes"])
def test_access_matrix(pr_type: PrType, role: str, commands: dict[str, bytes]) -> None:
    r = Reservations()
    register(r, A, 1)
    register(r, B, 2)
    reserve(r, A, 1, pr_type)
    nexus = {"holder": A, "registered": B, "unregistered": C}[role]
    for name, cdb in commands.items():
        want = expected_conflict(pr_type, role, command_access(cdb))
        assert r.conflicts(nexus, cdb) is want, (name, pr_type, role)


def test_spot_checks_of_the_matrix() -> None:
    """A few cells written out literally, so the matrix above cannot agree with itself in error."""
    r = Reservations()
    register(r, A, 1)
    register(r, B, 2)
    reserve(r, A, 1, PrType.WRITE_EXCLUSIVE)
    assert not r.conflicts(C, MODE_SENSE6)
    assert r.conflicts(B, bytes([0x35]) + bytes(9))  # SYNCHRONIZE CACHE from a registrant
    assert not r.conflicts(C, TUR)
    release(r, A, 1, PrType.WRITE_EXCLUSIVE)
    reserve(r, A, 1, PrType.EXCLUSIVE_ACCESS)
    assert r.conflicts(C, MODE_SENSE6)
    assert r.conflicts(B, READ10)
    assert not r.conflicts(C, READ_CAPACITY10)
    assert not r.conflicts(C, INQUIRY)


def test_registration_alone_reserves_nothing() -> None:
    r = Reservations()
    register(r, A, 1)
    for cdb in (*READS.values(), *WRITES.values()):
        assert not r.conflicts(B, cdb)
    assert not r.conflicts(B, b"")


def test_all_registrants_holder_moves_on_when_reserver_leaves() -> None:
    r = Reservations()
    register(r, A, 1)
    register(r, B, 2)
    register(r, C, 3)
    reserve(r, A, 1, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS)
    unregister(r, A, 1)
    assert r.conflicts(A, READ10)
    assert not r.conflicts(B, WRITE10) and not r.conflicts(C, WRITE10)


# ------------------------------------------------------------------------------------------------
# RESERVE(6) / RELEASE(6)


def test_libiscsi_reserve6_simple() -> None:
    r = Reservations()
    r.reserve6(A)
    assert r.reserve6_holder() == A
    r.release6(A)
    assert r.reserve6_holder() is None


def test_libiscsi_reserve6_2initiators() -> None:
    r = Reservations()
    r.reserve6(A)
    r.reserve6(A)  # the holder may reserve again
    with pytest.raises(ReservationConflict):
        r.reserve6(B)
    assert r.conflicts(B, RESERVE6_CDB)
    assert not r.conflicts(B, RELEASE6_CDB)
    r.release6(B)  # a no-op from a non-holder
    assert r.reserve6_holder() == A
    assert not r.conflicts(A, MODE_SENSE6)
    assert r.conflicts(B, MODE_SENSE6)
    with pytest.raises(ReservationConflict):
        r.reserve6(B)
    r.release6(A)
    r.reserve6(B)
    r.release6(B)
    assert r.reserve6_holder() is None


def test_reserve6_same_initiator_other_session_conflicts() -> None:
    """libiscsi Sanitize.Reservations logs in twice with the same initiator name."""
    r = Reservations()
    r.reserve6(A_OTHER_ISID)
    assert r.conflicts(A, bytes([0x48]) + bytes(9))
    with pytest.raises(ReservationConflict):
        r.reserve6(A)


@pytest.mark.parametrize("lose", ["logout", "nexus loss", "lun reset", "target reset"])
def test_libiscsi_reserve6_dropped(lose: str) -> None:
    r = Reservations()
    register(r, C, 3)
    unregister(r, C, 3)
    r.reserve6(A)
    with pytest.raises(ReservationConflict):
        r.reserve6(B)
    if lose in ("logout", "nexus loss"):
        r.nexus_lost(B)  # someone else's nexus going away changes nothing
        assert r.reserve6_holder() == A
        r.nexus_lost(A)
    else:
        r.reset()
    r.reserve6(B)
    r.release6(B)


def test_reset_keeps_persistent_state() -> None:
    r = Reservations()
    register(r, A, 1)
    reserve(r, A, 1, PrType.EXCLUSIVE_ACCESS)
    record = r.to_record()
    r.reset()
    r.nexus_lost(A)
    assert r.to_record() == record
    assert r.conflicts(B, READ10)


def test_reserve6_lets_only_the_spc2_list_through() -> None:
    r = Reservations()
    r.reserve6(A)
    for cdb in (INQUIRY, REPORT_LUNS, REQUEST_SENSE, pr_in_cdb(0), RELEASE6_CDB, bytes([0x57]) + bytes(9)):
        assert not r.conflicts(B, cdb)
    for cdb in (TUR, READ10, WRITE10, READ_CAPACITY10, MODE_SENSE6, pr_out_cdb(0), RESERVE6_CDB):
        assert r.conflicts(B, cdb)
        assert not r.conflicts(A, cdb)


def test_reserve6_against_persistent_registrations() -> None:
    """SPC-4 5.13.3 with CRH=0: any registration makes RESERVE and RELEASE conflict."""
    r = Reservations()
    register(r, A, 1)
    for nexus in (A, B):
        assert r.conflicts(nexus, RESERVE6_CDB)
        assert r.conflicts(nexus, RELEASE6_CDB)
        with pytest.raises(ReservationConflict):
            r.reserve6(nexus)
        with pytest.raises(ReservationConflict):
            r.release6(nexus)
    unregister(r, A, 1)
    r.reserve6(A)
    assert not r.conflicts(A, RESERVE6_CDB)


def test_reserve6_holder_may_register() -> None:
    r = Reservations()
    r.reserve6(A)
    assert not r.conflicts(A, pr_out_cdb(0))
    register(r, A, 1)
    assert r.conflicts(B, pr_in_cdb(0)) is False
    assert r.conflicts(B, pr_out_cdb(0))


def test_reservation_conflict_carries_its_status() -> None:
    r = Reservations()
    r.reserve6(A)
    with pytest.raises(ReservationConflict) as exc:
        r.reserve6(B)
    assert exc.value.status is ScsiStatus.RESERVATION_CONFLICT


# ------------------------------------------------------------------------------------------------
# APTPL and the record


def build_state() -> Reservations:
    r = Reservations()
    register(r, A, 0xFFFFFFFFFFFFFFFF)
    register(r, B, 2, aptpl=True)
    register(r, A_OTHER_PORT, 3, aptpl=True)
    reserve(r, B, 2, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY)
    return r


def test_record_round_trip_with_aptpl() -> None:
    r = build_state()
    record = r.to_record()
    restored = Reservations(json.loads(json.dumps(record)))
    assert restored.to_record() == {**record, "generation": 0}  # PRgeneration restarts at power on
    assert restored.generation == 0
    assert restored.reservation() == (B, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY)
    assert read_keys(restored)[1] == [0xFFFFFFFFFFFFFFFF, 2, 3]
    assert restored.aptpl
    assert restored.conflicts(C, READ10) and not restored.conflicts(A, WRITE10)
    assert read_full_status(restored)[1] == read_full_status(r)[1]


def test_reserve6_is_never_persisted() -> None:
    r = Reservations()
    r.reserve6(C)
    record = r.to_record()
    assert record == Reservations().to_record()
    register(r, C, 1, aptpl=True)  # the RESERVE(6) holder may register
    restored = Reservations(r.to_record())
    assert restored.registered_key(C) == 1
    assert restored.reserve6_holder() is None
    assert not restored.conflicts(B, TUR)


def test_record_without_aptpl_restores_empty() -> None:
    r = build_state()
    register(r, B, 2, aptpl=False)  # the last valid APTPL bit wins
    record = r.to_record()
    assert record["aptpl"] is False
    assert record["registrations"]  # the full state is still recorded
    restored = Reservations(json.loads(json.dumps(record)))
    assert restored.to_record() == Reservations().to_record()


def test_unregister_does_not_change_aptpl() -> None:
    r = Reservations()
    register(r, A, 1, aptpl=True)
    register(r, B, 2, aptpl=True)
    prout(r, B, PrOutAction.REGISTER, 2, 0, aptpl=False)
    assert r.aptpl


def test_record_without_reservation() -> None:
    r = Reservations()
    register(r, A, 1, aptpl=True)
    restored = Reservations(r.to_record())
    assert restored.reservation() is None and restored.registered_key(A) == 1


def test_record_is_plain_data() -> None:
    def plain(value: Any) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or type(value) in (int, str, bool)

    assert plain(build_state().to_record())


def _damaged(change: str) -> dict[str, Any]:
    record = build_state().to_record()
    match change:
        case "version":
            record["version"] = 99
        case "no version":
            del record["version"]
        case "zero key":
            record["registrations"][0]["key"] = 0
        case "huge key":
            record["registrations"][0]["key"] = 1 << 64
        case "missing field":
            del record["registrations"][1]["isid"]
        case "holder index":
            record["reservation"]["holder"] = 3
        case "bad type":
            record["reservation"]["type"] = 2
        case "duplicate":
            record["registrations"].append(dict(record["registrations"][0]))
        case "not a list":
            record["registrations"] = 5
    return record


@pytest.mark.parametrize(
    "change",
    [
        "version",
        "no version",
        "zero key",
        "huge key",
        "missing field",
        "holder index",
        "bad type",
        "duplicate",
        "not a list",
    ],
)
def test_damaged_record_is_refused(change: str) -> None:
    with pytest.raises(ValueError):
        Reservations(_damaged(change))


# ------------------------------------------------------------------------------------------------
# Random PERSISTENT RESERVE OUT sequences

NEXUSES = [A, B, C, A_OTHER_ISID, A_OTHER_PORT]
KEYS = [1, 2, 3, 0xFFFFFFFFFFFFFFFF]
CURRENT = -1  # "the key this nexus is registered with"

rk_choice = st.sampled_from([CURRENT] * 6 + [0, *KEYS])  # RESERVATION KEY: mostly the right one
sark_choice = st.sampled_from([*KEYS, *KEYS, CURRENT, 0])  # SERVICE ACTION RESERVATION KEY
prout_op = st.tuples(
    st.just("prout"),
    st.integers(0, len(NEXUSES) - 1),
    st.sampled_from([*range(8), *range(8), 8, 0x1F]),  # every service action, some invalid ones
    st.sampled_from([*PrType, *PrType, 0, 9]),
    st.sampled_from([0] * 8 + [1]),  # scope
    rk_choice,
    sark_choice,
    st.sampled_from([0] * 8 + [1, 1, 2, 4, 8]),  # byte 20 (APTPL, ALL_TG_PT, SPEC_I_PT) / move flags
    st.sampled_from([None] * 12 + [0, 23, 25]),  # parameter list length override
    st.integers(0, len(NEXUSES) - 1),  # REGISTER AND MOVE destination
)
other_op = st.tuples(
    st.sampled_from(["reserve6", "release6", "reset", "nexus_lost", "restore"]),
    st.integers(0, len(NEXUSES) - 1),
)


def run_op(r: Reservations, op: tuple[Any, ...]) -> PrOutOutcome | None:
    kind = op[0]
    nexus = NEXUSES[op[1]]
    if kind == "reserve6":
        r.reserve6(nexus)
        return None
    if kind == "release6":
        r.release6(nexus)
        return None
    if kind == "nexus_lost":
        r.nexus_lost(nexus)
        return None
    if kind == "reset":
        r.reset()
        return None
    _, _, action, pr_type, scope, rk, sark, flags, length, dest = op
    current = r.registered_key(nexus) or 0
    rk = current if rk == CURRENT else rk
    sark = current if sark == CURRENT else sark
    if action == PrOutAction.REGISTER_AND_MOVE:
        target = NEXUSES[dest]
        params = move_params(
            rk,
            sark,
            transport_id(target.initiator_name, target.isid),
            rtpi=target.tpgt,
            unreg=bool(flags & 2),
            aptpl=bool(flags & 1),
        )
    else:
        params = struct.pack(">QQ4sBBH", rk, sark, b"", flags, 0, 0)
    cdb = pr_out_cdb(action, scope=scope, pr_type=pr_type, length=len(params) if length is None else length)
    return r.persistent_reserve_out(nexus, cdb, params)


def check_invariants(r: Reservations) -> None:
    reservation = r.reservation()
    if reservation is not None:
        holder, _ = reservation
        assert r.registered_key(holder) is not None  # the holder is registered
        assert r.is_holder(holder)
    _, keys = read_keys(r)
    _, descriptors = read_full_status(r)
    assert [d.key for d in descriptors] == keys
    assert all(0 < k < 1 << 64 for k in keys)
    holders = [d for d in descriptors if d.holder]
    if reservation is None:
        assert holders == []
    elif reservation[1].all_registrants:
        assert len(holders) == len(descriptors)  # every registrant holds it
    else:
        assert len(holders) == 1  # at most one reservation, one holder
    json.dumps(r.to_record())


def apply_and_check(r: Reservations, op: tuple[Any, ...]) -> None:
    """Run one operation; a refusal changes nothing, a success keeps the counting rules."""
    before = r.to_record()
    registered_before = {n for n in NEXUSES if r.registered_key(n) is not None}
    sender = NEXUSES[op[1]]
    try:
        outcome = run_op(r, op)
    except (CheckCondition, ReservationConflict):
        assert r.to_record() == before  # a refused command changes nothing
        return
    after = r.to_record()
    assert after["generation"] >= before["generation"]  # monotonic (no wrap in these runs)
    if outcome is None:
        assert after == before  # RESERVE(6) state is not in the record
        return
    if not outcome.changed:
        assert after == before
    if after["generation"] != before["generation"]:
        assert outcome.changed
        assert after["generation"] == before["generation"] + 1
    for nexus, code in outcome.unit_attentions:
        assert nexus != sender
        assert nexus in registered_before
        assert code in (REGISTRATIONS_PREEMPTED, RESERVATIONS_PREEMPTED, RESERVATIONS_RELEASED)
    assert len({n for n, _ in outcome.unit_attentions}) == len(outcome.unit_attentions)


nexus_index = st.sampled_from([0, 0, 1, 1, 2, 3, 4])


class PrMachine(RuleBasedStateMachine):
    """Random sequences of PERSISTENT RESERVE OUT (well formed and not), RESERVE(6), resets, restarts."""

    def __init__(self) -> None:
        super().__init__()
        self.r = Reservations()

    @rule(n=nexus_index, key=st.sampled_from(KEYS), aptpl=st.booleans())
    def register(self, n: int, key: int, aptpl: bool) -> None:
        apply_and_check(self.r, ("prout", n, 6, 0, 0, 0, key, int(aptpl), None, 0))

    @rule(
        n=nexus_index,
        action=st.sampled_from([0, 1, 1, 1, 2, 2, 3, 4, 4, 5, 6, 7]),
        pr_type=st.sampled_from(list(PrType)),
        sark=sark_choice,
        flags=st.sampled_from([0, 0, 1, 2, 3]),
        dest=st.integers(0, len(NEXUSES) - 1),
    )
    def well_formed(self, n: int, action: int, pr_type: PrType, sark: int, flags: int, dest: int) -> None:
        apply_and_check(self.r, ("prout", n, action, pr_type, 0, CURRENT, sark, flags, None, dest))

    @rule(op=prout_op)
    def anything(self, op: tuple[Any, ...]) -> None:
        apply_and_check(self.r, op)

    @rule(op=other_op)
    def other(self, op: tuple[Any, ...]) -> None:
        if op[0] != "restore":
            apply_and_check(self.r, op)
            return
        record = self.r.to_record()
        self.r = Reservations(json.loads(json.dumps(record)))
        if record["aptpl"]:
            assert self.r.to_record() == {**record, "generation": 0}
        else:
            assert self.r.to_record() == Reservations().to_record()

    @invariant()
    def state_is_consistent(self) -> None:
        check_invariants(self.r)
        for nexus in NEXUSES:
            assert self.r.conflicts(nexus, INQUIRY) is False
            self.r.conflicts(nexus, READ10)
            self.r.conflicts(nexus, WRITE10)


PrMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestPrMachine = PrMachine.TestCase
