"""The PDU codec and framer: round trips, digests, framing edge cases (RFC 7143 11, 13.1)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from frontend.iscsi import digest
from frontend.iscsi.errors import (
    DataDigestError,
    HeaderDigestError,
    InvalidPduField,
    RejectReason,
    SegmentTooLong,
    UnsupportedOpcode,
)
from frontend.iscsi.pdu import (
    R2T,
    AsyncMessage,
    DataIn,
    DataOut,
    LoginRequest,
    LoginResponse,
    LogoutRequest,
    LogoutResponse,
    NopIn,
    NopOut,
    PduReader,
    Reject,
    ScsiCommand,
    ScsiResponse,
    SnackRequest,
    TaskManagementRequest,
    TaskManagementResponse,
    TextRequest,
    TextResponse,
    decode,
    decode_target,
    encode,
    encode_bytes,
    initiator_reader,
    target_reader,
)

CDB10 = bytes([0x28, 0, 0, 0, 0, 0x10, 0, 0, 1, 0])

INITIATOR_PDUS = [
    NopOut(True, 0, 0x11, 0xFFFFFFFF, 7, 3, b"ping data"),
    NopOut(False, 1 << 48, 0xFFFFFFFF, 0x1234, 7, 3),
    ScsiCommand(False, True, True, False, 1, 0, 0x22, 4096, 100, 9, CDB10),
    ScsiCommand(True, False, False, True, 2, 0, 0x23, 8192, 101, 9, CDB10, b"x" * 513),
    ScsiCommand(False, True, False, False, 1, 0, 0x24, 0, 102, 9, bytes(range(32))),          # extended CDB
    ScsiCommand(False, True, True, True, 1, 0, 0x25, 512, 103, 9, bytes(range(17)), b"", 1024),  # + bidi AHS
    TaskManagementRequest(True, 1, 0, 0x30, 0x22, 104, 10, 100, 0),
    LoginRequest(True, False, 1, 3, 0, 0, 0x23D000000001, 0, 1, 1, 10, 5, b"InitiatorName=iqn.x\0"),
    TextRequest(False, True, False, 0, 0x40, 0xFFFFFFFF, 105, 11, b"SendTargets=All\0"),
    DataOut(True, 0, 0x23, 0x99, 12, 3, 8192, b"d" * 1000),
    LogoutRequest(True, 0, 0x50, 1, 106, 13),
    SnackRequest(1, 0, 0x23, 0x99, 14, 2, 3),
]

TARGET_PDUS = [
    NopIn(0, 0xFFFFFFFF, 0x77, 5, 6, 7),
    NopIn(0, 0x11, 0xFFFFFFFF, 5, 6, 7, b"echo"),
    ScsiResponse(0, 2, 0x22, 8, 9, 10, 1, overflow=True, residual=512, data=b"\x70" + bytes(17)),
    ScsiResponse(0, 0, 0x22, 8, 9, 10, 0, underflow=True, residual=3, bidi_overflow=True, bidi_residual=9),
    TaskManagementResponse(1, 0x30, 11, 12, 13),
    LoginResponse(True, False, 1, 3, 0, 0, 0x23D000000001, 5, 1, 5, 10, 137, 0, 0, b"HeaderDigest=None\0"),
    LoginResponse(False, False, 0, 0, 0, 0, 1, 0, 1, 5, 10, 137, 2, 3),
    TextResponse(True, False, 0, 0x40, 0xFFFFFFFF, 14, 15, 16, b"TargetName=iqn.t\0"),
    DataIn(True, 0, 0x22, 0xFFFFFFFF, 1, 2, 0, 0, b"r" * 4096, status_present=True, status=0, stat_sn=17,
           underflow=True, residual=100),
    DataIn(False, 0, 0x22, 0xFFFFFFFF, 1, 2, 3, 8192, b"r" * 7),
    LogoutResponse(0, 0x50, 18, 19, 20, 2, 20),
    R2T(0, 0x23, 0x99, 21, 22, 23, 1, 65536, 262144),
    AsyncMessage(0, 24, 25, 26, 1, 0, 0, 2, 3, b"\0\x02abc"),
    Reject(9, 27, 28, 29, 0, bytes(range(48))),
]


def _whole(pdu: object, **kw: bool) -> bytes:
    return encode_bytes(pdu, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("pdu", INITIATOR_PDUS, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("digests", [False, True])
def test_initiator_pdus_round_trip(pdu: object, digests: bool) -> None:
    reader = initiator_reader(max_data_segment_length=65536, header_digest=digests, data_digest=digests)
    reader.feed(_whole(pdu, header_digest=digests, data_digest=digests))
    got = reader.next_pdu()
    assert _normalise(got) == _normalise(pdu)
    assert reader.next_pdu() is None
    assert reader.buffered == 0


@pytest.mark.parametrize("pdu", TARGET_PDUS, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("digests", [False, True])
def test_target_pdus_round_trip(pdu: object, digests: bool) -> None:
    reader = target_reader(max_data_segment_length=65536, header_digest=digests, data_digest=digests)
    reader.feed(_whole(pdu, header_digest=digests, data_digest=digests))
    assert _normalise(reader.next_pdu()) == _normalise(pdu)


def _normalise(pdu: object) -> object:
    """memoryview data compares by content: turn it into bytes for equality."""
    from dataclasses import fields, replace

    changes = {f.name: bytes(getattr(pdu, f.name)) for f in fields(pdu)  # type: ignore[arg-type]
               if isinstance(getattr(pdu, f.name), memoryview)}
    if isinstance(pdu, ScsiCommand):
        changes["cdb"] = pdu.cdb.ljust(16, b"\0")  # the BHS CDB field is 16 bytes on the wire
    return replace(pdu, **changes) if changes else pdu  # type: ignore[type-var]


def test_bhs_layout_of_a_scsi_command_matches_rfc_7143_11_3() -> None:
    wire = _whole(ScsiCommand(True, True, True, False, 1, 5 << 48, 0xA1B2C3D4, 4096, 0x01020304, 0x0A0B0C0D,
                              CDB10))
    assert len(wire) == 48
    assert wire[0] == 0x41                      # I bit + opcode 0x01
    assert wire[1] == 0x80 | 0x40 | 1           # F, R, ATTR=SIMPLE
    assert wire[4:8] == b"\0\0\0\0"             # no AHS, no data
    assert wire[8:16] == (5 << 48).to_bytes(8, "big")
    assert wire[16:20] == bytes.fromhex("a1b2c3d4")
    assert struct.unpack(">III", wire[20:32]) == (4096, 0x01020304, 0x0A0B0C0D)
    assert wire[32:48] == CDB10 + bytes(6)


def test_extended_cdb_uses_ahs_type_1() -> None:
    cdb = bytes(range(32))
    wire = _whole(ScsiCommand(False, True, False, False, 1, 0, 1, 0, 1, 1, cdb))
    assert wire[4] == 5                         # TotalAHSLength: 20 bytes = 5 words
    assert wire[48:52] == bytes([0, 17, 1, 0])  # AHSLength = CDB length - 15, type 1, reserved
    assert wire[52:68] == cdb[16:]
    assert decode(wire[:48], b"", wire[48:68]).cdb == cdb  # type: ignore[union-attr]


def test_scsi_response_carries_sense_length() -> None:
    sense = bytes([0x70, 0, 5]) + bytes(15)
    parts = encode(ScsiResponse(0, 2, 1, 1, 1, 1, data=sense))
    data = b"".join(parts)[48:]
    assert data[:2] == b"\x00\x12" and data[2:20] == sense and len(data) == 20  # padded to 4


def test_rfc3720_crc32c_vector_and_little_endian_digest() -> None:
    assert digest.crc32c([bytes(32)]) == 0x8A9136AA
    assert digest.digest([bytes(32)]) == bytes.fromhex("aa36918a")
    assert digest.crc32c([bytes(range(32))]) == 0x46DD794E


def test_padding_and_data_digest_cover_the_pad() -> None:
    parts = encode(NopIn(0, 1, 0xFFFFFFFF, 1, 1, 1, b"abcde"), header_digest=True, data_digest=True)
    head, data, tail = parts
    assert len(head) == 52 and data == b"abcde"
    assert tail[:3] == b"\0\0\0"
    assert tail[3:] == digest.digest([b"abcde\0\0\0"])
    assert head[48:] == digest.digest([head[:48]])


def test_encode_does_not_copy_data() -> None:
    payload = memoryview(bytearray(b"z" * 8192))
    parts = encode(DataIn(True, 0, 1, 0xFFFFFFFF, 1, 1, 0, 0, payload))
    assert parts[1] is payload


def test_reader_hands_out_views_of_fed_bytes() -> None:
    wire = _whole(DataOut(True, 0, 1, 2, 0, 0, 0, b"q" * 4096))
    reader = initiator_reader(max_data_segment_length=8192)
    reader.feed(wire)
    pdu = reader.next_pdu()
    assert isinstance(pdu, DataOut)
    assert isinstance(pdu.data, memoryview) and pdu.data.obj is wire


def test_byte_by_byte_and_trailing_data() -> None:
    pdus = INITIATOR_PDUS
    stream = b"".join(_whole(p, header_digest=True, data_digest=True) for p in pdus)
    reader = initiator_reader(max_data_segment_length=65536, header_digest=True, data_digest=True)
    got = []
    for i in range(len(stream)):
        reader.feed(stream[i : i + 1])
        while (p := reader.next_pdu()) is not None:
            got.append(p)
    assert [_normalise(p) for p in got] == [_normalise(p) for p in pdus]
    # a complete PDU followed by part of the next: the part waits
    reader = initiator_reader(max_data_segment_length=65536)
    first, second = _whole(pdus[0]), _whole(pdus[1])
    reader.feed(first + second[:30])
    assert reader.next_pdu() is not None
    assert reader.next_pdu() is None and reader.buffered == 30
    reader.feed(second[30:])
    assert _normalise(reader.next_pdu()) == _normalise(pdus[1])


@given(st.lists(st.sampled_from(INITIATOR_PDUS), min_size=1, max_size=6), st.data())
def test_any_split_of_a_stream_gives_the_same_pdus(pdus: list[object], data: st.DataObject) -> None:
    stream = b"".join(_whole(p) for p in pdus)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    reader = initiator_reader(max_data_segment_length=65536)
    got = []
    last = 0
    for cut in [*cuts, len(stream)]:
        reader.feed(stream[last:cut])
        last = cut
        while (p := reader.next_pdu()) is not None:
            got.append(_normalise(p))
    assert got == [_normalise(p) for p in pdus]


def test_header_digest_error_is_fatal() -> None:
    wire = bytearray(_whole(INITIATOR_PDUS[0], header_digest=True))
    wire[20] ^= 1
    reader = initiator_reader(header_digest=True)
    reader.feed(bytes(wire))
    with pytest.raises(HeaderDigestError) as e:
        reader.next_pdu()
    assert e.value.fatal
    reader.feed(_whole(INITIATOR_PDUS[0], header_digest=True))
    assert reader.next_pdu() is None  # the reader has stopped


def test_data_digest_error_consumes_the_pdu_and_goes_on() -> None:
    bad = bytearray(_whole(DataOut(False, 0, 7, 9, 0, 0, 0, b"abcd" * 10), data_digest=True))
    bad[60] ^= 0xFF
    good = _whole(INITIATOR_PDUS[0], data_digest=True)
    reader = initiator_reader(data_digest=True)
    reader.feed(bytes(bad) + good)
    with pytest.raises(DataDigestError) as e:
        reader.next_pdu()
    assert e.value.reason is RejectReason.DATA_DIGEST_ERROR and not e.value.fatal
    assert isinstance(e.value.pdu, DataOut) and e.value.pdu.itt == 7
    assert len(e.value.header) == 48
    assert _normalise(reader.next_pdu()) == _normalise(INITIATOR_PDUS[0])


def test_digests_switch_between_pdus() -> None:
    login = _whole(INITIATOR_PDUS[7])
    nop = _whole(INITIATOR_PDUS[0], header_digest=True, data_digest=True)
    reader = initiator_reader()
    reader.feed(login + nop)
    assert isinstance(reader.next_pdu(), LoginRequest)
    reader.header_digest = reader.data_digest = True
    assert isinstance(reader.next_pdu(), NopOut)


def test_segment_longer_than_declared_is_fatal() -> None:
    reader = initiator_reader(max_data_segment_length=1024)
    reader.feed(_whole(DataOut(False, 0, 1, 2, 0, 0, 0, b"x" * 1025))[:48])  # the header is enough
    with pytest.raises(SegmentTooLong) as e:
        reader.next_pdu()
    assert e.value.fatal and e.value.reason is RejectReason.PROTOCOL_ERROR


def test_unknown_opcode_is_command_not_supported_and_skipped() -> None:
    bogus = bytearray(_whole(NopOut(True, 0, 1, 0xFFFFFFFF, 1, 1, b"abc")))
    bogus[0] = 0x1C
    reader = initiator_reader()
    reader.feed(bytes(bogus) + _whole(INITIATOR_PDUS[0]))
    with pytest.raises(UnsupportedOpcode) as e:
        reader.next_pdu()
    assert e.value.reason == 0x05 and e.value.header[0] == 0x1C
    assert isinstance(reader.next_pdu(), NopOut)


def test_target_opcode_from_initiator_is_not_supported() -> None:
    with pytest.raises(UnsupportedOpcode):
        decode(_whole(TARGET_PDUS[0]))


def test_malformed_ahs_is_invalid_pdu_field() -> None:
    wire = bytearray(_whole(INITIATOR_PDUS[4]))
    wire[50] = 7                                # unknown AHS type
    with pytest.raises(InvalidPduField) as e:
        decode(wire[:48], b"", wire[48:68])
    assert e.value.reason == 0x09


def test_tmf_with_data_is_invalid() -> None:
    wire = _whole(INITIATOR_PDUS[6])
    with pytest.raises(InvalidPduField):
        decode(wire, b"abcd")


def test_decode_target_rejects_initiator_opcodes() -> None:
    with pytest.raises(UnsupportedOpcode):
        decode_target(_whole(INITIATOR_PDUS[0])[:48])


def test_reader_is_generic_over_decoders() -> None:
    reader: PduReader[object] = PduReader(decode_target)
    reader.feed(_whole(TARGET_PDUS[0]))
    assert isinstance(reader.next_pdu(), NopIn)
