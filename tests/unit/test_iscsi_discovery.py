"""SendTargets answers and full-feature Text Request negotiation (RFC 7143 11.10, 11.11, 12.3)."""

from __future__ import annotations

from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frontend.iscsi.discovery import TextNegotiation, TextStep, send_targets
from frontend.iscsi.errors import RejectReason, TextRequestRejected
from frontend.iscsi.keys import KeyValue, encode_text, parse_text
from frontend.iscsi.params import SessionParams, SessionType
from frontend.iscsi.pdu import RESERVED_TAG, TextRequest
from frontend.target import Portal, RemoteTarget, Target, TargetRegistry, TargetSettings

A = "iqn.2026-11.io.sparrow:alpha"
B = "iqn.2026-11.io.sparrow:beta"
SETTINGS = TargetSettings(portals=(Portal("192.0.2.1", 3260, 1), Portal("2001:db8::1", 3260, 1)))


def registry(*names: str) -> TargetRegistry:
    reg = TargetRegistry()
    for name in names:
        reg.add(Target(name, name.rsplit(":", 1)[1], cast(Any, object())))
    return reg


def pairs(data: bytes) -> list[tuple[str, str]]:
    return [(p.key, p.value) for p in parse_text(data)]


def record(name: str) -> list[tuple[str, str]]:
    addresses = ["192.0.2.1:3260,1", "[2001:db8::1]:3260,1"]
    return [("TargetName", name)] + [("TargetAddress", a) for a in addresses]


# --- send_targets ----------------------------------------------------------------------------


def test_discovery_all_lists_every_target_with_its_portals() -> None:
    data = send_targets("All", registry(B, A), SETTINGS, None)
    assert data.endswith(b"\0")
    assert pairs(data) == record(A) + record(B)


def test_normal_session_only_learns_its_own_target() -> None:
    reg = registry(A, B)
    assert pairs(send_targets("All", reg, SETTINGS, B)) == record(B)
    assert pairs(send_targets("", reg, SETTINGS, B)) == record(B)


def test_named_target() -> None:
    reg = registry(A, B)
    assert pairs(send_targets(B, reg, SETTINGS, None)) == record(B)
    assert pairs(send_targets(B.upper().replace("IQN", "iqn"), reg, SETTINGS, None)) == record(B)
    assert send_targets("iqn.2026-11.io.sparrow:gone", reg, SETTINGS, None) == b""


def test_empty_value_on_discovery_session_names_nothing() -> None:
    assert send_targets("", registry(A), SETTINGS, None) == b""


@pytest.mark.parametrize("value", ["Alle", "A", "all", "ALL", "nonsense"])
def test_bad_values_are_rejected(value: str) -> None:
    assert send_targets(value, registry(A), SETTINGS, None) == b"SendTargets=Reject\0"


def test_no_portals_means_no_addresses() -> None:
    assert pairs(send_targets("All", registry(A), TargetSettings(), None)) == [("TargetName", A)]


# --- targets served by another node (cluster primary elsewhere) ------------------------------

C = "iqn.2026-11.io.sparrow:gamma"
PRIMARY = Portal("198.51.100.7", 3261, 3)
MOVED_B = [("TargetName", B), ("TargetAddress", "198.51.100.7:3261,3")]   # B's record, served by PRIMARY


def test_remote_target_lists_only_its_primarys_portal() -> None:
    reg = registry(A, C)
    reg.add_remote(RemoteTarget(B, "beta", PRIMARY))
    assert pairs(send_targets("All", reg, SETTINGS, None)) == [*record(A), *MOVED_B, *record(C)]
    assert pairs(send_targets(B, reg, SETTINGS, None)) == MOVED_B


def test_redirected_local_target_lists_the_new_primary_and_back() -> None:
    reg = registry(A, B)
    reg.redirect(B, PRIMARY)
    assert pairs(send_targets("All", reg, SETTINGS, None)) == [*record(A), *MOVED_B]
    # a normal session opened before the move learns where its target went
    assert pairs(send_targets("", reg, SETTINGS, B)) == MOVED_B
    assert pairs(send_targets("All", reg, SETTINGS, B)) == MOVED_B
    reg.redirect(B, None)
    assert pairs(send_targets("All", reg, SETTINGS, None)) == record(A) + record(B)


def test_remote_target_has_its_address_even_without_local_portals() -> None:
    reg = registry(A)
    reg.add_remote(RemoteTarget(B, "beta", Portal("2001:db8::7", 3260, 1)))
    assert pairs(send_targets("All", reg, TargetSettings(), None)) == [
        ("TargetName", A), ("TargetName", B), ("TargetAddress", "[2001:db8::7]:3260,1"),
    ]


# --- TextNegotiation -------------------------------------------------------------------------


def params(session_type: SessionType = SessionType.DISCOVERY, target: str | None = None,
           max_send: int = 8192) -> SessionParams:
    return SessionParams(session_type=session_type, initiator_name="iqn.2024-01.com.example:host", isid=1,
                         tsih=1, target_name=target, max_send_data_segment_length=max_send)


def text_request(data: bytes | list[tuple[str, str]] = b"", *, final: bool = True, cont: bool = False,
                 itt: int = 5, ttt: int = RESERVED_TAG) -> TextRequest:
    if isinstance(data, list):
        data = encode_text([KeyValue(k, v) for k, v in data])
    return TextRequest(immediate=True, final=final, cont=cont, lun=0, itt=itt, ttt=ttt, cmd_sn=10,
                       exp_stat_sn=3, data=data)


def send(n: TextNegotiation, req: TextRequest, stat_sn: int = 3) -> TextStep:
    return n.receive(req, stat_sn=stat_sn, exp_cmd_sn=10, max_cmd_sn=137)


def test_libiscsi_send_targets() -> None:
    n = TextNegotiation(params(), registry(A, B), SETTINGS)
    step = send(n, text_request([("SendTargets", "All")]))
    r = step.response
    assert (r.final, r.cont, r.ttt, r.itt, r.lun) == (True, False, RESERVED_TAG, 5, 0)
    assert (r.stat_sn, r.exp_cmd_sn, r.max_cmd_sn) == (3, 10, 137)
    assert pairs(r.data) == record(A) + record(B)
    assert step.max_send_data_segment_length is None
    assert not n.in_progress


def test_send_targets_on_a_normal_session() -> None:
    n = TextNegotiation(params(SessionType.NORMAL, B), registry(A, B), SETTINGS)
    assert pairs(send(n, text_request([("SendTargets", "All")])).response.data) == record(B)


@pytest.mark.parametrize(
    ("key", "value", "answer"),
    [
        ("SendTargetsPlease", "All", "NotUnderstood"),   # libiscsi's invalid-key case
        ("sENDtARGETS", "aLL", "NotUnderstood"),          # keys are case-sensitive
        ("X-com.example.thing", "1", "NotUnderstood"),
        ("MaxBurstLength", "65536", "Reject"),            # login-only keys
        ("HeaderDigest", "CRC32C", "Reject"),
        ("InitiatorName", "iqn.2024-01.com.example:x", "Reject"),
        ("MaxRecvDataSegmentLength", "12", "Reject"),     # out of range
    ],
)
def test_other_keys(key: str, value: str, answer: str) -> None:
    n = TextNegotiation(params(), registry(A), SETTINGS)
    assert pairs(send(n, text_request([(key, value)])).response.data) == [(key, answer)]


@pytest.mark.parametrize("value", ["Alle", "A"])
def test_send_targets_bad_value(value: str) -> None:
    n = TextNegotiation(params(), registry(A), SETTINGS)
    assert pairs(send(n, text_request([("SendTargets", value)])).response.data) == [("SendTargets", "Reject")]


def test_max_recv_data_segment_length_declaration_resizes_answers() -> None:
    names = [f"iqn.2026-11.io.sparrow:v{i}" for i in range(10)]
    n = TextNegotiation(params(max_send=262144), registry(*names), SETTINGS)
    whole = send(n, text_request([("SendTargets", "All")], itt=5)).response.data
    assert len(whole) > 1024
    step = send(n, text_request([("MaxRecvDataSegmentLength", "512")], itt=6))
    assert step.max_send_data_segment_length == 512
    assert step.response.data == b""
    step = send(n, text_request([("SendTargets", "All")], itt=7))
    assert step.response.data == whole[:512] and step.response.cont


def test_long_answer_is_split_with_c_bit_and_ttt() -> None:
    names = [f"iqn.2026-11.io.sparrow:volume-{i:03d}" for i in range(40)]
    n = TextNegotiation(params(max_send=600), registry(*names), SETTINGS)
    step = send(n, text_request([("SendTargets", "All")], itt=9))
    received = b""
    tags = set()
    while True:
        r = step.response
        assert len(r.data) <= 600 and r.itt == 9
        received += r.data
        if r.final:
            assert (r.cont, r.ttt) == (False, RESERVED_TAG)
            break
        assert r.cont and r.ttt != RESERVED_TAG
        tags.add(r.ttt)
        assert n.in_progress
        step = send(n, text_request(itt=9, ttt=r.ttt))
    assert len(tags) > 3
    assert [v for k, v in pairs(received) if k == "TargetName"] == names
    assert not n.in_progress


def test_unknown_ttt_is_rejected() -> None:
    n = TextNegotiation(params(max_send=512), registry(*[f"iqn.2026-11.io.sparrow:v{i}" for i in range(30)]),
                        SETTINGS)
    r = send(n, text_request([("SendTargets", "All")])).response
    with pytest.raises(TextRequestRejected) as e:
        send(n, text_request(ttt=r.ttt + 1))
    assert e.value.reject_reason is RejectReason.INVALID_PDU_FIELD
    with pytest.raises(TextRequestRejected):
        send(n, text_request(itt=99, ttt=r.ttt))  # right TTT, wrong ITT
    with pytest.raises(TextRequestRejected):
        send(n, text_request(ttt=0x1234))


def test_new_request_abandons_an_unfinished_answer() -> None:
    n = TextNegotiation(params(max_send=512), registry(*[f"iqn.2026-11.io.sparrow:v{i}" for i in range(30)]),
                        SETTINGS)
    first = send(n, text_request([("SendTargets", "All")])).response
    assert first.cont
    step = send(n, text_request([("X-foo", "1")], itt=7))
    assert pairs(step.response.data) == [("X-foo", "NotUnderstood")]
    assert step.response.final and not n.in_progress
    with pytest.raises(TextRequestRejected):
        send(n, text_request(ttt=first.ttt))


def test_request_text_split_with_c_bit() -> None:
    n = TextNegotiation(params(), registry(A), SETTINGS)
    whole = b"SendTargets=All\0"
    step = send(n, text_request(whole[:7], final=False, cont=True))
    r = step.response
    assert (r.final, r.cont, r.data) == (False, False, b"")
    assert r.ttt != RESERVED_TAG
    step = send(n, text_request(whole[7:], ttt=r.ttt))
    assert step.response.final
    assert pairs(step.response.data) == record(A)


def test_request_without_final_keeps_the_exchange_open() -> None:
    n = TextNegotiation(params(), registry(A), SETTINGS)
    r = send(n, text_request([("X-a", "1")], final=False)).response
    assert (r.final, r.cont) == (False, False) and r.ttt != RESERVED_TAG
    assert pairs(r.data) == [("X-a", "NotUnderstood")]
    r = send(n, text_request(ttt=r.ttt)).response
    assert (r.final, r.ttt, r.data) == (True, RESERVED_TAG, b"")


@pytest.mark.parametrize(
    "req",
    [
        text_request(b"garbage-without-equals\0"),
        text_request(b"SendTargets=All\0SendTargets=All\0"),
        text_request(b"SendTargets=All\0", final=True, cont=True),
    ],
)
def test_protocol_errors_are_rejected(req: TextRequest) -> None:
    n = TextNegotiation(params(), registry(A), SETTINGS)
    with pytest.raises(TextRequestRejected) as e:
        send(n, req)
    assert e.value.reject_reason is RejectReason.PROTOCOL_ERROR
    assert not n.in_progress


def test_request_text_is_capped() -> None:
    n = TextNegotiation(params(), registry(A), SETTINGS)
    ttt = RESERVED_TAG
    with pytest.raises(TextRequestRejected):
        for _ in range(100):
            ttt = send(n, text_request(b"X-a=" + b"b" * 4000, final=False, cont=True, ttt=ttt)).response.ttt


TEXT_REQUESTS = st.builds(
    text_request,
    data=st.one_of(st.binary(max_size=60), st.sampled_from([b"SendTargets=All\0", b"SendTargets=\0", b""])),
    final=st.booleans(),
    cont=st.booleans(),
    itt=st.sampled_from([1, 2]),
    ttt=st.sampled_from([RESERVED_TAG, RESERVED_TAG, 1, 2, 3]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(TEXT_REQUESTS, max_size=10), st.integers(512, 2048))
def test_only_text_request_rejected_escapes(requests: list[TextRequest], max_send: int) -> None:
    names = [f"iqn.2026-11.io.sparrow:v{i}" for i in range(30)]
    n = TextNegotiation(params(max_send=max_send), registry(*names), SETTINGS)
    for req in requests:
        try:
            step = send(n, req)
        except TextRequestRejected:
            continue
        assert len(step.response.data) <= max_send
        assert step.response.final == (step.response.ttt == RESERVED_TAG)


def test_text_negotiation_lists_remote_targets() -> None:
    reg = registry(A)
    reg.add_remote(RemoteTarget(B, "beta", PRIMARY))
    n = TextNegotiation(params(), reg, SETTINGS)
    data = send(n, text_request([("SendTargets", "All")])).response.data
    assert pairs(data) == [*record(A), *MOVED_B]
