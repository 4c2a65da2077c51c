"""iSCSI PDUs (RFC 7143 section 11): the dataclasses, the codec and the framer.

CONTRACT (written by the lead; the codec below is filled in by the connection engineer): the
dataclass names and fields are shared by login.py, discovery.py and connection.py. Field names
follow RFC 7143. Integers are plain ints; `data` is the data segment without padding or digest.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


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
