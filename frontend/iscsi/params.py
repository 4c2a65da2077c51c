"""The operational parameters a login negotiated (RFC 7143 section 13)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class SessionType(enum.Enum):
    NORMAL = "Normal"
    DISCOVERY = "Discovery"


@dataclass(frozen=True, slots=True)
class SessionParams:
    """What a successful login agreed on. Written by login.py, read by connection.py."""

    session_type: SessionType
    initiator_name: str
    isid: int
    tsih: int
    target_name: str | None = None          # None for discovery sessions
    initiator_alias: str | None = None
    header_digest: bool = False             # CRC32C on headers
    data_digest: bool = False               # CRC32C on data segments
    max_recv_data_segment_length: int = 8192  # the most WE accept per PDU (our declaration)
    max_send_data_segment_length: int = 8192  # the most the INITIATOR accepts (its declaration)
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    initial_r2t: bool = True
    immediate_data: bool = True
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    default_time2wait: int = 2
    default_time2retain: int = 0
    error_recovery_level: int = 0
    max_connections: int = 1
