"""iSCSI PDUs (RFC 7143 section 11): the dataclasses, the codec and the framer.

CONTRACT (written by the lead; the codec below is filled in by the connection engineer): the
dataclass names and fields are shared by login.py, discovery.py and connection.py. Field names
follow RFC 7143. Integers are plain ints; `data` is the data segment without padding or digest.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from frontend.constructors import positional_constructor
from frontend.iscsi import digest as _digest
from frontend.iscsi.errors import (
    BufferFull,
    DataDigestError,
    HeaderDigestError,
    InvalidPduField,
    PduError,
    SegmentTooLong,
    UnsupportedOpcode,
)


class Opcode(enum.IntEnum):
    """RFC 7143 11.2.1.2."""

    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


RESERVED_TAG = 0xFFFFFFFF


# --- initiator to target -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NopOut:
    """11.18"""

    immediate: bool
    lun: int
    itt: int
    ttt: int
    cmd_sn: int
    exp_stat_sn: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class ScsiCommand:
    """11.3. `cdb` includes any extended CDB carried in an AHS."""

    immediate: bool
    final: bool
    read: bool
    write: bool
    attr: int
    lun: int
    itt: int
    expected_length: int
    cmd_sn: int
    exp_stat_sn: int
    cdb: bytes
    data: bytes | memoryview = b""
    bidi_read_length: int | None = None     # Bidirectional Read Expected Data Transfer Length AHS


@dataclass(frozen=True, slots=True)
class TaskManagementRequest:
    """11.5"""

    immediate: bool
    function: int
    lun: int
    itt: int
    referenced_task_tag: int
    cmd_sn: int
    exp_stat_sn: int
    ref_cmd_sn: int
    exp_data_sn: int


@dataclass(frozen=True, slots=True)
class LoginRequest:
    """11.12"""

    transit: bool
    cont: bool
    csg: int
    nsg: int
    version_max: int
    version_min: int
    isid: int
    tsih: int
    itt: int
    cid: int
    cmd_sn: int
    exp_stat_sn: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class TextRequest:
    """11.10"""

    immediate: bool
    final: bool
    cont: bool
    lun: int
    itt: int
    ttt: int
    cmd_sn: int
    exp_stat_sn: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class DataOut:
    """11.7"""

    final: bool
    lun: int
    itt: int
    ttt: int
    exp_stat_sn: int
    data_sn: int
    buffer_offset: int
    data: bytes | memoryview = b""


@dataclass(frozen=True, slots=True)
class LogoutRequest:
    """11.14"""

    immediate: bool
    reason: int
    itt: int
    cid: int
    cmd_sn: int
    exp_stat_sn: int


@dataclass(frozen=True, slots=True)
class SnackRequest:
    """11.16"""

    type: int
    lun: int
    itt: int
    ttt: int
    exp_stat_sn: int
    beg_run: int
    run_length: int


# --- target to initiator -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NopIn:
    """11.19"""

    lun: int
    itt: int
    ttt: int
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class ScsiResponse:
    """11.4. `data` is the sense data WITHOUT the 2-byte SenseLength prefix (the codec adds it)."""

    response: int
    status: int
    itt: int
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int
    exp_data_sn: int = 0
    overflow: bool = False
    underflow: bool = False
    residual: int = 0
    bidi_overflow: bool = False
    bidi_underflow: bool = False
    bidi_residual: int = 0
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class TaskManagementResponse:
    """11.6"""

    response: int
    itt: int
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int


@dataclass(frozen=True, slots=True)
class LoginResponse:
    """11.13"""

    transit: bool
    cont: bool
    csg: int
    nsg: int
    version_max: int
    version_active: int
    isid: int
    tsih: int
    itt: int
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int
    status_class: int
    status_detail: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class TextResponse:
    """11.11"""

    final: bool
    cont: bool
    lun: int
    itt: int
    ttt: int
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class DataIn:
    """11.8. `stat_sn` is meaningful only when `status_present`."""

    final: bool
    lun: int
    itt: int
    ttt: int
    exp_cmd_sn: int
    max_cmd_sn: int
    data_sn: int
    buffer_offset: int
    data: bytes | memoryview
    acknowledge: bool = False
    status_present: bool = False
    status: int = 0
    stat_sn: int = 0
    overflow: bool = False
    underflow: bool = False
    residual: int = 0


@dataclass(frozen=True, slots=True)
class LogoutResponse:
    """11.15"""

    response: int
    itt: int
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int
    time2wait: int = 0
    time2retain: int = 0


@dataclass(frozen=True, slots=True)
class R2T:
    """11.8"""

    lun: int
    itt: int
    ttt: int
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int
    r2t_sn: int
    buffer_offset: int
    desired_length: int


@dataclass(frozen=True, slots=True)
class AsyncMessage:
    """11.9"""

    lun: int
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int
    event: int
    vcode: int = 0
    parameter1: int = 0
    parameter2: int = 0
    parameter3: int = 0
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Reject:
    """11.17. `header` is the complete BHS of the rejected PDU (48 bytes)."""

    reason: int
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int
    data_sn: int = 0
    header: bytes = b""


InitiatorPdu = (
    NopOut | ScsiCommand | TaskManagementRequest | LoginRequest | TextRequest | DataOut
    | LogoutRequest | SnackRequest
)
TargetPdu = (
    NopIn | ScsiResponse | TaskManagementResponse | LoginResponse | TextResponse | DataIn
    | LogoutResponse | R2T | AsyncMessage | Reject
)


# =============================================================================================
# The codec. BHS layout: RFC 7143 11.2.1. Every PDU is decoded with one precompiled struct that
# splits the 48 bytes into the fields common to all opcodes plus seven 32-bit words (bytes 20-47);
# SCSI Command has its own struct because of the CDB in bytes 32-47.
# =============================================================================================

BHS_LENGTH: Final = 48
#: The most unparsed bytes a PduReader holds. A sound stream never needs more than one PDU
#: (BHS + 1020 bytes of AHS + data segment + digests) plus one read.
MAX_BUFFERED_BYTES: Final = 32 * 1024 * 1024
#: RFC 7143 13.12: during login the default MaxRecvDataSegmentLength (8192) applies.
LOGIN_MAX_DATA_SEGMENT_LENGTH: Final = 8192
#: The DataSegmentLength field has 24 bits.
MAX_DATA_SEGMENT_FIELD: Final = 0xFFFFFF

IMMEDIATE_BIT: Final = 0x40
FINAL_BIT: Final = 0x80


class AhsType(enum.IntEnum):
    """RFC 7143 11.2.2.2."""

    EXTENDED_CDB = 1
    BIDI_READ_LENGTH = 2


# b0 b1 b2 b3 | TotalAHSLength+DataSegmentLength | LUN/ISID | ITT | seven words (bytes 20..47)
_BHS = struct.Struct(">BBBBIQI7I")
# SCSI Command: ... | ITT | EDTL | CmdSN | ExpStatSN | CDB[16]
_CMD = struct.Struct(">BBBBIQIIII16s")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_AHS_HDR = struct.Struct(">HB")
_BIDI_AHS = struct.Struct(">HBBI")
_PADS: Final = (b"", b"\0\0\0", b"\0\0", b"\0")

Data = bytes | bytearray | memoryview
P = TypeVar("P")
T = TypeVar("T")


_make_scsi_command = positional_constructor(ScsiCommand)
_make_data_out = positional_constructor(DataOut)


def _bool(flags: int, bit: int) -> bool:
    return flags & bit != 0


def padding(length: int) -> bytes:
    """The zero bytes that pad a data segment of ``length`` to a 4-byte boundary (RFC 7143 11.2)."""
    return _PADS[length & 3]


# --- decoding: initiator PDUs ------------------------------------------------------------------


def _no_data(name: str, bhs: Data, data: Data, ahs: Data) -> None:
    if len(data) or len(ahs):
        raise InvalidPduField(f"{name} carries a data segment or AHS", header=bytes(bhs))


def _parse_ahs(bhs: Data, ahs: Data) -> tuple[bytes, int | None]:
    """Extended CDB and bidirectional read length AHS (RFC 7143 11.2.2.3, 11.2.2.4)."""
    ext = b""
    bidi: int | None = None
    pos = 0
    end = len(ahs)
    while pos < end:
        if end - pos < 4:
            raise InvalidPduField("truncated AHS", header=bytes(bhs))
        length, kind = _AHS_HDR.unpack_from(ahs, pos)
        body_end = pos + 3 + length
        if length == 0 or body_end > end:
            raise InvalidPduField("AHS length out of range", header=bytes(bhs))
        if kind == AhsType.EXTENDED_CDB:
            ext = bytes(ahs[pos + 4 : body_end])
        elif kind == AhsType.BIDI_READ_LENGTH:
            if length != 5:
                raise InvalidPduField("bidirectional read length AHS must be 5 bytes", header=bytes(bhs))
            bidi = _U32.unpack_from(ahs, pos + 4)[0]
        else:
            raise InvalidPduField(f"unknown AHS type {kind}", header=bytes(bhs))
        pos = (body_end + 3) & ~3
    return ext, bidi


def _decode_scsi_command(bhs: Data, data: Data, ahs: Data) -> ScsiCommand:
    b0, b1, _b2, _b3, _al, lun, itt, edtl, cmd_sn, exp_stat_sn, cdb = _CMD.unpack_from(bhs)
    bidi: int | None = None
    if len(ahs):
        ext, bidi = _parse_ahs(bhs, ahs)
        cdb += ext
    return _make_scsi_command(
        b0 & 0x40 != 0, b1 & 0x80 != 0, b1 & 0x40 != 0, b1 & 0x20 != 0, b1 & 0x07, lun, itt, edtl, cmd_sn,
        exp_stat_sn, cdb, data if isinstance(data, (bytes, memoryview)) else bytes(data), bidi,
    )


def _decode_nop_out(bhs: Data, data: Data, ahs: Data) -> NopOut:
    b0, _b1, _b2, _b3, _al, lun, itt, ttt, cmd_sn, exp_stat_sn, *_ = _BHS.unpack_from(bhs)
    if len(ahs):
        raise InvalidPduField("NOP-Out carries an AHS", header=bytes(bhs))
    return NopOut(_bool(b0, IMMEDIATE_BIT), lun, itt, ttt, cmd_sn, exp_stat_sn, bytes(data))


def _decode_tmf(bhs: Data, data: Data, ahs: Data) -> TaskManagementRequest:
    _no_data("Task Management Request", bhs, data, ahs)
    b0, b1, _b2, _b3, _al, lun, itt, rtt, cmd_sn, exp_stat_sn, ref_cmd_sn, exp_data_sn, *_ = (
        _BHS.unpack_from(bhs)
    )
    return TaskManagementRequest(
        _bool(b0, IMMEDIATE_BIT), b1 & 0x7F, lun, itt, rtt, cmd_sn, exp_stat_sn, ref_cmd_sn, exp_data_sn
    )


def _decode_login_request(bhs: Data, data: Data, ahs: Data) -> LoginRequest:
    if len(ahs):
        raise InvalidPduField("Login Request carries an AHS", header=bytes(bhs))
    _b0, b1, vmax, vmin, _al, isid_tsih, itt, w20, cmd_sn, exp_stat_sn, *_ = _BHS.unpack_from(bhs)
    return LoginRequest(
        transit=_bool(b1, 0x80),
        cont=_bool(b1, 0x40),
        csg=(b1 >> 2) & 0x03,
        nsg=b1 & 0x03,
        version_max=vmax,
        version_min=vmin,
        isid=isid_tsih >> 16,
        tsih=isid_tsih & 0xFFFF,
        itt=itt,
        cid=w20 >> 16,
        cmd_sn=cmd_sn,
        exp_stat_sn=exp_stat_sn,
        data=bytes(data),
    )


def _decode_text_request(bhs: Data, data: Data, ahs: Data) -> TextRequest:
    if len(ahs):
        raise InvalidPduField("Text Request carries an AHS", header=bytes(bhs))
    b0, b1, _b2, _b3, _al, lun, itt, ttt, cmd_sn, exp_stat_sn, *_ = _BHS.unpack_from(bhs)
    return TextRequest(
        _bool(b0, IMMEDIATE_BIT), _bool(b1, 0x80), _bool(b1, 0x40), lun, itt, ttt, cmd_sn, exp_stat_sn,
        bytes(data),
    )


def _decode_data_out(bhs: Data, data: Data, ahs: Data) -> DataOut:
    if len(ahs):
        raise InvalidPduField("Data-Out carries an AHS", header=bytes(bhs))
    _b0, b1, _b2, _b3, _al, lun, itt, ttt, _w24, exp_stat_sn, _w32, data_sn, offset, _w44 = (
        _BHS.unpack_from(bhs)
    )
    return _make_data_out(
        b1 & 0x80 != 0, lun, itt, ttt, exp_stat_sn, data_sn, offset,
        data if isinstance(data, (bytes, memoryview)) else bytes(data),
    )


def _decode_logout_request(bhs: Data, data: Data, ahs: Data) -> LogoutRequest:
    _no_data("Logout Request", bhs, data, ahs)
    b0, b1, _b2, _b3, _al, _q, itt, w20, cmd_sn, exp_stat_sn, *_ = _BHS.unpack_from(bhs)
    return LogoutRequest(_bool(b0, IMMEDIATE_BIT), b1 & 0x7F, itt, w20 >> 16, cmd_sn, exp_stat_sn)


def _decode_snack(bhs: Data, data: Data, ahs: Data) -> SnackRequest:
    _no_data("SNACK Request", bhs, data, ahs)
    _b0, b1, _b2, _b3, _al, lun, itt, ttt, _w24, exp_stat_sn, _w32, _w36, beg_run, run_length = (
        _BHS.unpack_from(bhs)
    )
    return SnackRequest(b1 & 0x0F, lun, itt, ttt, exp_stat_sn, beg_run, run_length)


_INITIATOR_DECODERS: Final[dict[int, Callable[[Data, Data, Data], InitiatorPdu]]] = {
    Opcode.NOP_OUT: _decode_nop_out,
    Opcode.SCSI_COMMAND: _decode_scsi_command,
    Opcode.TASK_MGMT_REQUEST: _decode_tmf,
    Opcode.LOGIN_REQUEST: _decode_login_request,
    Opcode.TEXT_REQUEST: _decode_text_request,
    Opcode.DATA_OUT: _decode_data_out,
    Opcode.LOGOUT_REQUEST: _decode_logout_request,
    Opcode.SNACK_REQUEST: _decode_snack,
}


def decode(bhs: Data, data: Data = b"", ahs: Data = b"") -> InitiatorPdu:
    """Decode one initiator PDU from its BHS (48 bytes), data segment (no padding) and AHS.

    Raises ``UnsupportedOpcode`` (Reject 0x05) for an opcode an initiator may not send and
    ``InvalidPduField`` (Reject 0x09) for malformed fields.
    """
    decoder = _INITIATOR_DECODERS.get(bhs[0] & 0x3F)
    if decoder is None:
        raise UnsupportedOpcode(f"opcode 0x{bhs[0] & 0x3F:02x} not supported", header=bytes(bhs[:BHS_LENGTH]))
    return decoder(bhs, data, ahs)


# --- decoding: target PDUs (for tests and the fuzz harness's tiny initiator) -------------------


def _decode_nop_in(w: tuple[int, ...], data: Data) -> NopIn:
    return NopIn(w[5], w[6], w[7], w[8], w[9], w[10], bytes(data))


def _decode_scsi_response(w: tuple[int, ...], data: Data) -> ScsiResponse:
    b1 = w[1]
    sense = b""
    if len(data) >= 2:
        n = _U16.unpack_from(data)[0]
        sense = bytes(data[2 : 2 + n])
    return ScsiResponse(
        response=w[2], status=w[3], itt=w[6], stat_sn=w[8], exp_cmd_sn=w[9], max_cmd_sn=w[10],
        exp_data_sn=w[11], overflow=_bool(b1, 0x04), underflow=_bool(b1, 0x02), residual=w[13],
        bidi_overflow=_bool(b1, 0x10), bidi_underflow=_bool(b1, 0x08), bidi_residual=w[12], data=sense,
    )


def _decode_tmf_response(w: tuple[int, ...], data: Data) -> TaskManagementResponse:
    return TaskManagementResponse(w[2], w[6], w[8], w[9], w[10])


def _decode_login_response(w: tuple[int, ...], data: Data) -> LoginResponse:
    b1 = w[1]
    return LoginResponse(
        transit=_bool(b1, 0x80), cont=_bool(b1, 0x40), csg=(b1 >> 2) & 3, nsg=b1 & 3,
        version_max=w[2], version_active=w[3], isid=w[5] >> 16, tsih=w[5] & 0xFFFF, itt=w[6],
        stat_sn=w[8], exp_cmd_sn=w[9], max_cmd_sn=w[10], status_class=w[11] >> 24,
        status_detail=(w[11] >> 16) & 0xFF, data=bytes(data),
    )


def _decode_text_response(w: tuple[int, ...], data: Data) -> TextResponse:
    b1 = w[1]
    return TextResponse(_bool(b1, 0x80), _bool(b1, 0x40), w[5], w[6], w[7], w[8], w[9], w[10], bytes(data))


def _decode_data_in(w: tuple[int, ...], data: Data) -> DataIn:
    b1 = w[1]
    s = _bool(b1, 0x01)
    return DataIn(
        final=_bool(b1, 0x80), lun=w[5], itt=w[6], ttt=w[7], exp_cmd_sn=w[9], max_cmd_sn=w[10],
        data_sn=w[11], buffer_offset=w[12], data=bytes(data), acknowledge=_bool(b1, 0x40),
        status_present=s, status=w[3] if s else 0, stat_sn=w[8] if s else 0,
        overflow=_bool(b1, 0x04), underflow=_bool(b1, 0x02), residual=w[13],
    )


def _decode_logout_response(w: tuple[int, ...], data: Data) -> LogoutResponse:
    return LogoutResponse(w[2], w[6], w[8], w[9], w[10], w[12] >> 16, w[12] & 0xFFFF)


def _decode_r2t(w: tuple[int, ...], data: Data) -> R2T:
    return R2T(w[5], w[6], w[7], w[8], w[9], w[10], w[11], w[12], w[13])


def _decode_async(w: tuple[int, ...], data: Data) -> AsyncMessage:
    return AsyncMessage(
        lun=w[5], stat_sn=w[8], exp_cmd_sn=w[9], max_cmd_sn=w[10], event=w[11] >> 24,
        vcode=(w[11] >> 16) & 0xFF, parameter1=w[11] & 0xFFFF, parameter2=w[12] >> 16,
        parameter3=w[12] & 0xFFFF, data=bytes(data),
    )


def _decode_reject(w: tuple[int, ...], data: Data) -> Reject:
    return Reject(w[2], w[8], w[9], w[10], w[11], bytes(data))


_TARGET_DECODERS: Final[dict[int, Callable[[tuple[int, ...], Data], TargetPdu]]] = {
    Opcode.NOP_IN: _decode_nop_in,
    Opcode.SCSI_RESPONSE: _decode_scsi_response,
    Opcode.TASK_MGMT_RESPONSE: _decode_tmf_response,
    Opcode.LOGIN_RESPONSE: _decode_login_response,
    Opcode.TEXT_RESPONSE: _decode_text_response,
    Opcode.DATA_IN: _decode_data_in,
    Opcode.LOGOUT_RESPONSE: _decode_logout_response,
    Opcode.R2T: _decode_r2t,
    Opcode.ASYNC_MESSAGE: _decode_async,
    Opcode.REJECT: _decode_reject,
}


def decode_target(bhs: Data, data: Data = b"", ahs: Data = b"") -> TargetPdu:
    """Decode one target PDU (the initiator's side of the codec; used by tests and fuzzing)."""
    decoder = _TARGET_DECODERS.get(bhs[0] & 0x3F)
    if decoder is None:
        raise UnsupportedOpcode(
            f"opcode 0x{bhs[0] & 0x3F:02x} is not a target opcode", header=bytes(bhs[:BHS_LENGTH])
        )
    return decoder(_BHS.unpack_from(bhs), data)


# --- encoding ----------------------------------------------------------------------------------


def _frame(
    bhs: bytes, ahs: bytes, data: Data, header_digest: bool, data_digest: bool
) -> list[bytes | memoryview]:
    """BHS (+AHS, +header digest) as one element, then the data segment uncopied, then padding
    and data digest (RFC 7143 11.2: padding to 4 bytes; the data digest covers the padding)."""
    head = bhs + ahs if ahs else bhs
    if header_digest:
        head += _digest.pack_digest(_digest.crc32c_one(head))
    if not len(data):
        return [head]
    out: list[bytes | memoryview] = [head, data if isinstance(data, (bytes, memoryview)) else bytes(data)]
    tail = data_tail(data, data_digest)
    if tail:
        out.append(tail)
    return out


def data_tail(data: Data, data_digest: bool) -> bytes:
    """What follows a non-empty data segment on the wire: its padding to 4 bytes, then the data
    digest when negotiated, which covers the padding (RFC 7143 11.2); empty when neither."""
    pad = _PADS[len(data) & 3]
    if not data_digest:
        return pad
    value = _digest.crc32c_one(data)
    if pad:
        value = _digest.crc32c_one(pad, value)
    return pad + _digest.pack_digest(value)


def _dlen(bhs_ahs_words: int, data: Data) -> int:
    n = len(data)
    if n > MAX_DATA_SEGMENT_FIELD:
        raise ValueError(f"data segment of {n} bytes does not fit DataSegmentLength")
    return (bhs_ahs_words << 24) | n


def _enc_nop_in(p: NopIn) -> tuple[bytes, bytes, Data]:
    return _BHS.pack(0x20, 0x80, 0, 0, _dlen(0, p.data), p.lun, p.itt, p.ttt, p.stat_sn, p.exp_cmd_sn,
                     p.max_cmd_sn, 0, 0, 0), b"", p.data


def _enc_scsi_response(p: ScsiResponse) -> tuple[bytes, bytes, Data]:
    flags = 0x80
    if p.bidi_overflow:
        flags |= 0x10
    if p.bidi_underflow:
        flags |= 0x08
    if p.overflow:
        flags |= 0x04
    if p.underflow:
        flags |= 0x02
    data = _U16.pack(len(p.data)) + p.data if p.data else b""
    return _BHS.pack(0x21, flags, p.response, p.status, _dlen(0, data), 0, p.itt, 0, p.stat_sn,
                     p.exp_cmd_sn, p.max_cmd_sn, p.exp_data_sn, p.bidi_residual, p.residual), b"", data


def _enc_tmf_response(p: TaskManagementResponse) -> tuple[bytes, bytes, Data]:
    return _BHS.pack(0x22, 0x80, p.response, 0, 0, 0, p.itt, 0, p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn,
                     0, 0, 0), b"", b""


def _login_flags(transit: bool, cont: bool, csg: int, nsg: int) -> int:
    return (0x80 if transit else 0) | (0x40 if cont else 0) | ((csg & 3) << 2) | (nsg & 3)


def _enc_login_response(p: LoginResponse) -> tuple[bytes, bytes, Data]:
    return _BHS.pack(0x23, _login_flags(p.transit, p.cont, p.csg, p.nsg), p.version_max,
                     p.version_active, _dlen(0, p.data), (p.isid << 16) | p.tsih, p.itt, 0, p.stat_sn,
                     p.exp_cmd_sn, p.max_cmd_sn, (p.status_class << 24) | (p.status_detail << 16), 0,
                     0), b"", p.data


def _enc_text_response(p: TextResponse) -> tuple[bytes, bytes, Data]:
    flags = (0x80 if p.final else 0) | (0x40 if p.cont else 0)
    return _BHS.pack(0x24, flags, 0, 0, _dlen(0, p.data), p.lun, p.itt, p.ttt, p.stat_sn, p.exp_cmd_sn,
                     p.max_cmd_sn, 0, 0, 0), b"", p.data


def _enc_data_in(p: DataIn) -> tuple[bytes, bytes, Data]:
    flags = 0x80 if p.final else 0
    if p.acknowledge:
        flags |= 0x40
    if p.overflow:
        flags |= 0x04
    if p.underflow:
        flags |= 0x02
    if p.status_present:
        flags |= 0x01
    return _BHS.pack(0x25, flags, 0, p.status if p.status_present else 0, _dlen(0, p.data), p.lun,
                     p.itt, p.ttt, p.stat_sn if p.status_present else 0, p.exp_cmd_sn, p.max_cmd_sn,
                     p.data_sn, p.buffer_offset, p.residual), b"", p.data


def _enc_logout_response(p: LogoutResponse) -> tuple[bytes, bytes, Data]:
    return _BHS.pack(0x26, 0x80, p.response, 0, 0, 0, p.itt, 0, p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn, 0,
                     ((p.time2wait & 0xFFFF) << 16) | (p.time2retain & 0xFFFF), 0), b"", b""


def _enc_r2t(p: R2T) -> tuple[bytes, bytes, Data]:
    return _BHS.pack(0x31, 0x80, 0, 0, 0, p.lun, p.itt, p.ttt, p.stat_sn, p.exp_cmd_sn, p.max_cmd_sn,
                     p.r2t_sn, p.buffer_offset, p.desired_length), b"", b""


def _enc_async(p: AsyncMessage) -> tuple[bytes, bytes, Data]:
    w36 = ((p.event & 0xFF) << 24) | ((p.vcode & 0xFF) << 16) | (p.parameter1 & 0xFFFF)
    w40 = ((p.parameter2 & 0xFFFF) << 16) | (p.parameter3 & 0xFFFF)
    return _BHS.pack(0x32, 0x80, 0, 0, _dlen(0, p.data), p.lun, RESERVED_TAG, 0, p.stat_sn, p.exp_cmd_sn,
                     p.max_cmd_sn, w36, w40, 0), b"", p.data


def _enc_reject(p: Reject) -> tuple[bytes, bytes, Data]:
    return _BHS.pack(0x3F, 0x80, p.reason, 0, _dlen(0, p.header), 0, RESERVED_TAG, 0, p.stat_sn,
                     p.exp_cmd_sn, p.max_cmd_sn, p.data_sn, 0, 0), b"", p.header


def _enc_nop_out(p: NopOut) -> tuple[bytes, bytes, Data]:
    return _BHS.pack(0x00 | (IMMEDIATE_BIT if p.immediate else 0), 0x80, 0, 0, _dlen(0, p.data), p.lun,
                     p.itt, p.ttt, p.cmd_sn, p.exp_stat_sn, 0, 0, 0, 0), b"", p.data


def _enc_scsi_command(p: ScsiCommand) -> tuple[bytes, bytes, Data]:
    ahs = b""
    if len(p.cdb) > 16:
        ext = p.cdb[16:]
        ahs += _AHS_HDR.pack(len(ext) + 1, AhsType.EXTENDED_CDB) + b"\0" + ext + _PADS[(len(ext)) & 3]
    if p.bidi_read_length is not None:
        ahs += _BIDI_AHS.pack(5, AhsType.BIDI_READ_LENGTH, 0, p.bidi_read_length)
    if len(ahs) > 255 * 4:
        raise ValueError("AHS too long")
    flags = (0x80 if p.final else 0) | (0x40 if p.read else 0) | (0x20 if p.write else 0) | (p.attr & 7)
    bhs = _CMD.pack(0x01 | (IMMEDIATE_BIT if p.immediate else 0), flags, 0, 0,
                    _dlen(len(ahs) // 4, p.data), p.lun, p.itt, p.expected_length, p.cmd_sn,
                    p.exp_stat_sn, p.cdb[:16].ljust(16, b"\0"))
    return bhs, ahs, p.data


def _enc_tmf(p: TaskManagementRequest) -> tuple[bytes, bytes, Data]:
    return _BHS.pack(0x02 | (IMMEDIATE_BIT if p.immediate else 0), 0x80 | (p.function & 0x7F), 0, 0, 0,
                     p.lun, p.itt, p.referenced_task_tag, p.cmd_sn, p.exp_stat_sn, p.ref_cmd_sn,
                     p.exp_data_sn, 0, 0), b"", b""


def _enc_login_request(p: LoginRequest) -> tuple[bytes, bytes, Data]:
    return _BHS.pack(0x03 | IMMEDIATE_BIT, _login_flags(p.transit, p.cont, p.csg, p.nsg), p.version_max,
                     p.version_min, _dlen(0, p.data), (p.isid << 16) | p.tsih, p.itt, p.cid << 16,
                     p.cmd_sn, p.exp_stat_sn, 0, 0, 0, 0), b"", p.data


def _enc_text_request(p: TextRequest) -> tuple[bytes, bytes, Data]:
    flags = (0x80 if p.final else 0) | (0x40 if p.cont else 0)
    return _BHS.pack(0x04 | (IMMEDIATE_BIT if p.immediate else 0), flags, 0, 0, _dlen(0, p.data), p.lun,
                     p.itt, p.ttt, p.cmd_sn, p.exp_stat_sn, 0, 0, 0, 0), b"", p.data


def _enc_data_out(p: DataOut) -> tuple[bytes, bytes, Data]:
    return _BHS.pack(0x05, 0x80 if p.final else 0, 0, 0, _dlen(0, p.data), p.lun, p.itt, p.ttt, 0,
                     p.exp_stat_sn, 0, p.data_sn, p.buffer_offset, 0), b"", p.data


def _enc_logout_request(p: LogoutRequest) -> tuple[bytes, bytes, Data]:
    return _BHS.pack(0x06 | (IMMEDIATE_BIT if p.immediate else 0), 0x80 | (p.reason & 0x7F), 0, 0, 0, 0,
                     p.itt, p.cid << 16, p.cmd_sn, p.exp_stat_sn, 0, 0, 0, 0), b"", b""


def _enc_snack(p: SnackRequest) -> tuple[bytes, bytes, Data]:
    return _BHS.pack(0x10, 0x80 | (p.type & 0x0F), 0, 0, 0, p.lun, p.itt, p.ttt, 0, p.exp_stat_sn, 0, 0,
                     p.beg_run, p.run_length), b"", b""


_ENCODERS: Final[dict[type, Callable[[object], tuple[bytes, bytes, Data]]]] = {
    NopIn: _enc_nop_in,  # type: ignore[dict-item]
    ScsiResponse: _enc_scsi_response,  # type: ignore[dict-item]
    TaskManagementResponse: _enc_tmf_response,  # type: ignore[dict-item]
    LoginResponse: _enc_login_response,  # type: ignore[dict-item]
    TextResponse: _enc_text_response,  # type: ignore[dict-item]
    DataIn: _enc_data_in,  # type: ignore[dict-item]
    LogoutResponse: _enc_logout_response,  # type: ignore[dict-item]
    R2T: _enc_r2t,  # type: ignore[dict-item]
    AsyncMessage: _enc_async,  # type: ignore[dict-item]
    Reject: _enc_reject,  # type: ignore[dict-item]
    NopOut: _enc_nop_out,  # type: ignore[dict-item]
    ScsiCommand: _enc_scsi_command,  # type: ignore[dict-item]
    TaskManagementRequest: _enc_tmf,  # type: ignore[dict-item]
    LoginRequest: _enc_login_request,  # type: ignore[dict-item]
    TextRequest: _enc_text_request,  # type: ignore[dict-item]
    DataOut: _enc_data_out,  # type: ignore[dict-item]
    LogoutRequest: _enc_logout_request,  # type: ignore[dict-item]
    SnackRequest: _enc_snack,  # type: ignore[dict-item]
}


def encode(
    pdu: TargetPdu | InitiatorPdu, *, header_digest: bool = False, data_digest: bool = False
) -> list[bytes | memoryview]:
    """Encode a PDU for ``transport.writelines``: the BHS (with AHS and header digest) first, the data
    segment as its own element (never copied), then padding and data digest when needed.

    Target PDUs are what the connection sends; initiator PDUs are encoded for tests and fuzzing.
    """
    bhs, ahs, data = _ENCODERS[type(pdu)](pdu)
    return _frame(bhs, ahs, data, header_digest, data_digest)


def encode_data_in(
    itt: int, data: Data, final: bool, data_sn: int, offset: int, exp_cmd_sn: int, max_cmd_sn: int,
    header_digest: bool, data_digest: bool, status: int | None = None, stat_sn: int = 0, flags: int = 0,
    residual: int = 0,
) -> list[bytes | memoryview]:
    """``encode(DataIn(...))`` without building the dataclass: the read hot path (RFC 7143 11.7).
    ``status`` not None sets the S bit; ``flags`` adds the O (0x04) / U (0x02) bits."""
    if status is None:
        b1 = 0x80 if final else 0
        status = stat_sn = residual = 0
    else:
        b1 = 0x81 | flags
    bhs = _BHS.pack(0x25, b1, 0, status, len(data), 0, itt, RESERVED_TAG, stat_sn, exp_cmd_sn, max_cmd_sn,
                    data_sn, offset, residual)
    return _frame(bhs, b"", data, header_digest, data_digest)


def encode_scsi_response(
    itt: int, status: int, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int, exp_data_sn: int, flags: int,
    residual: int, sense: bytes | None, header_digest: bool, data_digest: bool,
) -> list[bytes | memoryview]:
    """``encode(ScsiResponse(...))`` without building the dataclass (RFC 7143 11.4); ``flags`` holds
    the O (0x04) / U (0x02) bits; ``sense`` gets its 2-byte SenseLength here."""
    data = _U16.pack(len(sense)) + sense if sense else b""
    bhs = _BHS.pack(0x21, 0x80 | flags, 0, status, len(data), 0, itt, 0, stat_sn, exp_cmd_sn, max_cmd_sn,
                    exp_data_sn, 0, residual)
    return _frame(bhs, b"", data, header_digest, data_digest)


def encode_bytes(
    pdu: TargetPdu | InitiatorPdu, *, header_digest: bool = False, data_digest: bool = False
) -> bytes:
    """``encode`` joined into one bytes object (tests, small PDUs)."""
    return b"".join(encode(pdu, header_digest=header_digest, data_digest=data_digest))


# --- framing -----------------------------------------------------------------------------------


class PduReader(Generic[P]):
    """Cuts a byte stream into PDUs (RFC 7143 11.2): feed bytes, then call ``next_pdu`` until None.

    ``decoder`` is ``decode`` (target side) or ``decode_target`` (a test initiator). Digests and
    the data segment limit may change between two ``next_pdu`` calls: the connection switches them
    on after the final Login Response, and the next PDU is read with the new settings.

    Errors: ``SegmentTooLong``, ``HeaderDigestError`` and ``BufferFull`` are fatal (the reader
    stops); ``DataDigestError``, ``UnsupportedOpcode`` and ``InvalidPduField`` consume the bad PDU
    and leave the reader ready for the next one. When the stream arrives in one piece per read the
    data segments handed out are memoryviews of the fed bytes (no copy).
    """

    __slots__ = ("_buf", "_dead", "_decoder", "_last", "_mv", "_pos", "data_digest", "header_digest",
                 "max_data_segment_length")

    def __init__(
        self,
        decoder: Callable[[Data, Data, Data], P],
        *,
        max_data_segment_length: int = LOGIN_MAX_DATA_SEGMENT_LENGTH,
        header_digest: bool = False,
        data_digest: bool = False,
    ) -> None:
        self._decoder = decoder
        self.max_data_segment_length = max_data_segment_length
        self.header_digest = header_digest
        self.data_digest = data_digest
        self._buf: bytes | bytearray = b""
        self._mv: memoryview | None = None
        self._pos = 0
        self._last = 0
        self._dead = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as PDUs."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._dead or not data:
            return
        buf = self._buf
        if self._pos >= len(buf):
            self._buf = data if isinstance(data, bytes) else bytes(data)
            self._mv = None
            self._pos = 0
            return
        if isinstance(buf, bytearray):
            if self._pos:
                del buf[: self._pos]
        else:
            buf = bytearray(buf[self._pos :])
            self._mv = None
        self._pos = 0
        self._last = 0
        buf += data
        self._buf = buf
        if len(buf) > MAX_BUFFERED_BYTES:
            self._dead = True
            raise BufferFull(f"{len(buf)} unparsed bytes exceed {MAX_BUFFERED_BYTES}")

    def unread(self) -> None:
        """Put back the frame ``next_frame`` returned last (no feed since): the next call returns
        it again (the connection holds a PDU behind writes still in flight)."""
        self._pos = self._last

    def last_header(self) -> bytes:
        """The BHS of the PDU ``next_pdu`` returned last (for a Reject). Valid until the next feed."""
        return bytes(self._buf[self._last : self._last + BHS_LENGTH])

    def next_pdu(self) -> P | None:
        frame = self.next_frame()
        if frame is None:
            return None
        return self._decoder(*frame)

    def decode(self, bhs: Data, data: Data, ahs: Data) -> P:
        """Decode a frame ``next_frame`` returned (raises what the decoder raises)."""
        return self._decoder(bhs, data, ahs)

    def next_frame(self) -> tuple[Data, Data, Data] | None:
        """The next PDU undecoded: (BHS, data segment, AHS), digests checked, padding removed. The
        fast path reads the BHS itself and decodes only what it does not take (``decode``)."""
        if self._dead:
            return None
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < BHS_LENGTH:
            return None
        ahs_dlen = _U32.unpack_from(buf, pos + 4)[0]
        dlen = ahs_dlen & 0xFFFFFF
        if dlen > self.max_data_segment_length:
            self._dead = True
            raise SegmentTooLong(
                f"data segment of {dlen} bytes exceeds our MaxRecvDataSegmentLength "
                f"{self.max_data_segment_length}",
                header=bytes(buf[pos : pos + BHS_LENGTH]),
            )
        hlen = BHS_LENGTH + ((ahs_dlen >> 24) << 2)
        hd = 4 if self.header_digest else 0
        padded = (dlen + 3) & ~3
        dd = 4 if dlen and self.data_digest else 0
        total = hlen + hd + padded + dd
        if avail < total:
            return None
        self._pos = pos + total
        self._last = pos
        if isinstance(buf, bytes):
            mv = self._mv
            if mv is None:
                mv = self._mv = memoryview(buf)
            head: Data = mv[pos : pos + hlen]
            segment: Data = mv[pos + hlen + hd : pos + hlen + hd + padded]
        else:
            head = bytes(buf[pos : pos + hlen])
            segment = memoryview(buf[pos + hlen + hd : pos + hlen + hd + padded])
        if hd and _digest.crc32c_one(head) != _digest.digest_value(buf, pos + hlen):
            self._dead = True
            raise HeaderDigestError("header digest mismatch", header=bytes(head[:BHS_LENGTH]))
        data = segment[:dlen] if padded != dlen else segment
        ahs = head[BHS_LENGTH:]
        if dd and _digest.crc32c_one(segment) != _digest.digest_value(buf, pos + hlen + hd + padded):
            pdu = self._decoder(head[:BHS_LENGTH], b"", ahs)
            raise DataDigestError("data digest mismatch", header=bytes(head[:BHS_LENGTH]), pdu=pdu)
        return head[:BHS_LENGTH], data, ahs


def initiator_reader(**kwargs: int | bool) -> PduReader[InitiatorPdu]:
    """A reader of initiator PDUs (what a target reads)."""
    return PduReader(decode, **kwargs)  # type: ignore[arg-type]


def target_reader(**kwargs: int | bool) -> PduReader[TargetPdu]:
    """A reader of target PDUs (what an initiator reads)."""
    return PduReader(decode_target, **kwargs)  # type: ignore[arg-type]


__all__ = [
    "BHS_LENGTH", "LOGIN_MAX_DATA_SEGMENT_LENGTH", "MAX_BUFFERED_BYTES", "R2T", "RESERVED_TAG", "AhsType",
    "AsyncMessage", "DataIn", "DataOut", "InitiatorPdu", "LoginRequest", "LoginResponse", "LogoutRequest",
    "LogoutResponse", "NopIn", "NopOut", "Opcode", "PduError", "PduReader", "Reject", "ScsiCommand",
    "ScsiResponse", "SnackRequest", "TargetPdu", "TaskManagementRequest", "TaskManagementResponse",
    "TextRequest", "TextResponse", "decode", "decode_target", "encode", "encode_bytes", "encode_data_in",
    "encode_scsi_response", "initiator_reader",
    "padding", "target_reader",
]
