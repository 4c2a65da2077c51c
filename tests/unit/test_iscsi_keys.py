"""Text key=value syntax and the operational negotiation rules (RFC 7143 6.1, 6.2, 13)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from frontend.iscsi.errors import LoginError, TextFormatError
from frontend.iscsi.keys import (
    KEYS,
    MAX_TEXT_BYTES,
    KeyClass,
    KeyValue,
    OperationalNegotiator,
    ValueSyntaxError,
    encode_binary,
    encode_text,
    find_duplicate,
    is_iscsi_name,
    parse_binary,
    parse_bool,
    parse_list,
    parse_number,
    parse_text,
)
from frontend.iscsi.params import SessionType
from frontend.target import TargetSettings

# --- syntax ----------------------------------------------------------------------------------


def test_parse_text_keeps_order_and_values() -> None:
    data = b"InitiatorName=iqn.2024-01.com.example:a\0HeaderDigest=None,CRC32C\0X-vendor.k=a=b\0"
    assert parse_text(data) == (
        KeyValue("InitiatorName", "iqn.2024-01.com.example:a"),
        KeyValue("HeaderDigest", "None,CRC32C"),
        KeyValue("X-vendor.k", "a=b"),  # only the first '=' separates key from value
    )


def test_parse_text_tolerates_empty_strings_and_missing_final_nul() -> None:
    assert parse_text(b"\0A=1\0\0B=\0C=3") == (KeyValue("A", "1"), KeyValue("B", ""), KeyValue("C", "3"))
    assert parse_text(b"") == ()


@pytest.mark.parametrize(
    "data",
    [
        b"NoEquals\0",
        b"=value\0",
        b"K" * 64 + b"=1\0",
        b"InitiatorAlias=" + b"a" * 256 + b"\0",
        b"X-unknown=" + b"a" * 8193 + b"\0",
        b"InitiatorAlias=\xff\xfe\0",
        b"Ke\xffy=1\0",
        b"Bad Key=1\0",
        b"A" * (MAX_TEXT_BYTES + 1),
    ],
)
def test_parse_text_rejects_garbage(data: bytes) -> None:
    with pytest.raises(TextFormatError):
        parse_text(data)


def test_value_limits_depend_on_the_key() -> None:
    assert parse_text(b"K" * 63 + b"=1\0")[0].key == "K" * 63
    assert len(parse_text(b"InitiatorAlias=" + b"a" * 255 + b"\0")[0].value) == 255
    long_challenge = "0x" + "ab" * 1024
    assert parse_text(f"CHAP_C={long_challenge}\0".encode())[0].value == long_challenge


def test_utf8_values_are_decoded() -> None:
    assert parse_text("InitiatorAlias=hôte\0".encode()) == (KeyValue("InitiatorAlias", "hôte"),)


def test_encode_text() -> None:
    assert encode_text([KeyValue("A", "1"), KeyValue("B", "x,y")]) == b"A=1\0B=x,y\0"
    assert encode_text([]) == b""


KEY_NAMES = st.from_regex(r"[A-Z][A-Za-z0-9._-]{0,20}", fullmatch=True)
VALUES = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"), max_size=40)


@given(st.lists(st.tuples(KEY_NAMES, VALUES)))
def test_encode_parse_roundtrip(items: list[tuple[str, str]]) -> None:
    pairs = [KeyValue(k, v) for k, v in items if len(v.encode()) <= 255]
    assert parse_text(encode_text(pairs)) == tuple(pairs)


@given(st.binary(max_size=600))
def test_parse_text_only_raises_text_format_error(data: bytes) -> None:
    with contextlib.suppress(TextFormatError):
        parse_text(data)


def test_find_duplicate() -> None:
    assert find_duplicate([KeyValue("A", "1"), KeyValue("B", "1")]) is None
    assert find_duplicate([KeyValue("A", "1"), KeyValue("B", "1"), KeyValue("A", "2")]) == "A"


@pytest.mark.parametrize(("text", "expected"), [("0", 0), ("8192", 8192), ("0x2000", 8192), ("0X1f", 31)])
def test_parse_number(text: str, expected: int) -> None:
    assert parse_number(text, 0, 2**24) == expected


@pytest.mark.parametrize(
    "text", ["", "012", "-1", "1.5", "abc", "0x", "0b", "1e3", " 1", "9" * 30, "9" * 5000]
)
def test_parse_number_rejects_bad_syntax(text: str) -> None:
    with pytest.raises(ValueSyntaxError):
        parse_number(text, 0, 2**64)


def test_parse_number_checks_the_range() -> None:
    assert parse_number("512", 512, 1024) == 512
    with pytest.raises(ValueSyntaxError):
        parse_number("511", 512, 1024)
    with pytest.raises(ValueSyntaxError):
        parse_number("1025", 512, 1024)


def test_parse_bool() -> None:
    assert parse_bool("Yes") is True
    assert parse_bool("No") is False
    for bad in ("yes", "NO", "1", "", "True"):
        with pytest.raises(ValueSyntaxError):
            parse_bool(bad)


def test_parse_list() -> None:
    assert parse_list("CRC32C,None") == ("CRC32C", "None")
    for bad in ("", "CRC32C,", ",None", "a b", "1abc"):
        with pytest.raises(ValueSyntaxError):
            parse_list(bad)


def test_binary_values() -> None:
    assert parse_binary("0x0102ff") == b"\x01\x02\xff"
    assert parse_binary("0XABC") == b"\x0a\xbc"  # an odd digit count implies a leading zero
    assert parse_binary("0bAQL/") == b"\x01\x02\xff"
    assert parse_binary("0BAQI=") == b"\x01\x02"
    assert encode_binary(b"\x00\xab") == "0x00ab"
    for bad in ("", "0102", "0x", "0xZZ", "0b", "0b!!!!", "0bAQI"):
        with pytest.raises(ValueSyntaxError):
            parse_binary(bad)


def test_is_iscsi_name() -> None:
    assert is_iscsi_name("iqn.2024-01.com.example:x")
    assert is_iscsi_name("eui.02004567A425678D")
    assert is_iscsi_name("naa.52004567BA64678D")
    assert not is_iscsi_name("All")
    assert not is_iscsi_name("iqn.")
    assert not is_iscsi_name("iqn." + "a" * 220)


def test_key_table_is_consistent() -> None:
    for name, spec in KEYS.items():
        assert name == spec.name
        assert (spec.rule is not None) == (spec.key_class is KeyClass.OPERATIONAL), name


# --- operational negotiation -----------------------------------------------------------------

SETTINGS = TargetSettings(max_burst_length=1048576, first_burst_length=65536, max_outstanding_r2t=4,
                          max_recv_data_segment_length=262144)


def negotiator(session_type: SessionType = SessionType.NORMAL) -> OperationalNegotiator:
    return OperationalNegotiator(SETTINGS, session_type)


@pytest.mark.parametrize(
    ("key", "offer", "answer"),
    [
        ("MaxBurstLength", "262144", "262144"),         # min: theirs is smaller
        ("MaxBurstLength", "16777215", "1048576"),      # min: ours is smaller
        ("FirstBurstLength", "262144", "65536"),
        ("MaxOutstandingR2T", "16", "4"),
        ("MaxOutstandingR2T", "1", "1"),
        ("MaxConnections", "8", "1"),
        ("ErrorRecoveryLevel", "2", "0"),
        ("DefaultTime2Wait", "2", "2"),                 # max with our 0
        ("DefaultTime2Retain", "20", "0"),              # min with our 0
        ("InitialR2T", "No", "No"),                     # OR with our No
        ("InitialR2T", "Yes", "Yes"),
        ("ImmediateData", "Yes", "Yes"),                # AND with our Yes
        ("ImmediateData", "No", "No"),
        ("DataPDUInOrder", "No", "Yes"),                # OR with our Yes
        ("DataSequenceInOrder", "Yes", "Yes"),
        ("HeaderDigest", "None,CRC32C", "None"),
        ("HeaderDigest", "CRC32C,None", "CRC32C"),
        ("DataDigest", "MD5,CRC32C", "CRC32C"),
        ("DataDigest", "MD5", "Reject"),
        ("IFMarker", "Yes", "No"),
        ("OFMarker", "No", "No"),
        ("OFMarkInt", "2048~8192", "Reject"),
        ("TaskReporting", "ResponseFence,RFC3720", "RFC3720"),
        ("TaskReporting", "FastAbort", "Reject"),
        ("RDMAExtensions", "Yes", "No"),
        ("iSCSIProtocolLevel", "2", "1"),
        ("MaxBurstLength", "511", "Reject"),             # out of range
        ("MaxBurstLength", "lots", "Reject"),            # bad syntax
        ("ErrorRecoveryLevel", "3", "Reject"),
        ("InitialR2T", "maybe", "Reject"),
        ("HeaderDigest", "", "Reject"),
        ("IFMarker", "Perhaps", "Reject"),
    ],
)
def test_answers(key: str, offer: str, answer: str) -> None:
    assert negotiator().answer(key, offer) == answer


def test_results_follow_answers_and_defaults_stay_otherwise() -> None:
    n = negotiator()
    n.answer("MaxBurstLength", "131072")
    n.answer("ImmediateData", "No")
    n.answer("HeaderDigest", "CRC32C")
    n.answer("MaxOutstandingR2T", "0")  # out of range: Reject keeps the default
    assert n.value("MaxBurstLength") == 131072
    assert n.value("ImmediateData") is False
    assert n.value("HeaderDigest") == "CRC32C"
    assert n.value("MaxOutstandingR2T") == 1
    # RFC 7143 defaults for what was never offered
    assert n.value("FirstBurstLength") == 65536
    assert n.value("InitialR2T") is True
    assert n.value("DataDigest") == "None"
    assert n.value("MaxRecvDataSegmentLength") == 8192
    assert n.value("DefaultTime2Retain") == 20
    assert n.value("DefaultTime2Wait") == 2


def test_first_burst_is_bounded_by_max_burst() -> None:
    n = negotiator()
    assert n.answer("MaxBurstLength", "16384") == "16384"
    assert n.answer("FirstBurstLength", "65536") == "16384"
    assert n.value("FirstBurstLength") == 16384


def test_max_recv_data_segment_length_is_a_declaration() -> None:
    n = negotiator()
    assert n.answer("MaxRecvDataSegmentLength", "65536") is None
    assert n.value("MaxRecvDataSegmentLength") == 65536
    assert n.declarations() == (KeyValue("MaxRecvDataSegmentLength", "262144"),)
    assert n.declarations() == ()  # once per login
    assert negotiator().answer("MaxRecvDataSegmentLength", "100") == "Reject"


def test_session_keys_are_irrelevant_for_discovery() -> None:
    n = negotiator(SessionType.DISCOVERY)
    for key in ("MaxBurstLength", "FirstBurstLength", "InitialR2T", "ImmediateData", "MaxConnections",
                "MaxOutstandingR2T", "DataPDUInOrder", "DataSequenceInOrder"):
        assert n.answer(key, "1") == "Irrelevant", key
    assert n.value("MaxBurstLength") == 262144
    assert n.answer("HeaderDigest", "CRC32C") == "CRC32C"
    assert n.answer("MaxRecvDataSegmentLength", "4096") is None
    assert n.answer("ErrorRecoveryLevel", "0") == "0"


def test_renegotiation_is_an_initiator_error() -> None:
    n = negotiator()
    n.answer("MaxBurstLength", "65536")
    with pytest.raises(LoginError) as e:
        n.answer("MaxBurstLength", "65536")
    assert (e.value.status_class, e.value.status_detail) == (2, 0)


def test_only_operational_keys_are_negotiated_here() -> None:
    with pytest.raises(ValueError):
        negotiator().answer("InitiatorName", "iqn.2024-01.x:y")
