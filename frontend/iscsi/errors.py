"""Errors of the iSCSI layer, each carrying the code it puts on the wire.

``PduError`` and its subclasses are raised by the codec (``frontend.iscsi.pdu``) and by the
connection core; each carries the Reject reason (RFC 7143 11.17.1) and, where known, the BHS of the
offending PDU (a Reject echoes it). ``fatal`` says whether the connection must be closed: at
ErrorRecoveryLevel 0 a framing error cannot be recovered (RFC 7143 7.8, 7.12).

The login engineer may add a ``LoginError`` (status class/detail) below; keep additions self-contained.
"""

from __future__ import annotations

import enum


class RejectReason(enum.IntEnum):
    """Reject PDU reason codes, RFC 7143 11.17.1."""

    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OPERATION_REJECT = 0x0A
    WAITING_FOR_LOGOUT = 0x0C


class IscsiError(Exception):
    """Base of every error raised by frontend.iscsi."""


class PduError(IscsiError):
    """A PDU the target cannot accept. ``reason`` goes into the Reject PDU."""

    reason: RejectReason = RejectReason.PROTOCOL_ERROR
    fatal: bool = False

    def __init__(
        self,
        message: str,
        *,
        header: bytes = b"",
        reason: RejectReason | None = None,
        fatal: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.header = header
        if reason is not None:
            self.reason = reason
        if fatal is not None:
            self.fatal = fatal


class InvalidPduField(PduError):
    """A field holds a value RFC 7143 does not allow (Reject 0x09)."""

    reason = RejectReason.INVALID_PDU_FIELD


class UnsupportedOpcode(PduError):
    """An opcode the target does not implement (Reject 0x05, RFC 7143 11.17.1)."""

    reason = RejectReason.COMMAND_NOT_SUPPORTED


class HeaderDigestError(PduError):
    """The header CRC32C did not match. Framing can no longer be trusted: RFC 7143 7.8 lets the
    receiver discard up to a later PDU only with a sync layer, which we lack, so the connection closes."""

    fatal = True


class DataDigestError(PduError):
    """The data segment CRC32C did not match (Reject 0x02, RFC 7143 7.8).

    The header was sound, so ``pdu`` holds the decoded PDU (its data must not be used); the
    connection needs its fields to account for a discarded Data-Out.
    """

    reason = RejectReason.DATA_DIGEST_ERROR

    def __init__(self, message: str, *, header: bytes, pdu: object) -> None:
        super().__init__(message, header=header)
        self.pdu = pdu


class SegmentTooLong(PduError):
    """A data segment longer than the MaxRecvDataSegmentLength we declared (RFC 7143 13.12):
    a protocol error; the stream cannot be trusted afterwards."""

    fatal = True


class BufferFull(PduError):
    """More unparsed bytes than ``pdu.MAX_BUFFERED_BYTES``: the peer is not speaking iSCSI."""

    fatal = True


class IllegalTransition(IscsiError):
    """A state machine was asked for a move its transition table does not contain (a bug)."""


# --- login and text negotiation (owned by the login engineer: login.py, keys.py, chap.py,
# discovery.py) ------------------------------------------------------------------------------------


class LoginStatus:
    """Login Response Status-Class and Status-Detail pairs, RFC 7143 11.13.5.

    Unpack them into LoginError: ``raise LoginError(*LoginStatus.TARGET_NOT_FOUND, "no such target")``.
    """

    SUCCESS = (0x00, 0x00)
    TARGET_MOVED_TEMPORARILY = (0x01, 0x01)
    TARGET_MOVED_PERMANENTLY = (0x01, 0x02)
    INITIATOR_ERROR = (0x02, 0x00)
    AUTHENTICATION_FAILURE = (0x02, 0x01)
    AUTHORIZATION_FAILURE = (0x02, 0x02)
    TARGET_NOT_FOUND = (0x02, 0x03)
    TARGET_REMOVED = (0x02, 0x04)
    UNSUPPORTED_VERSION = (0x02, 0x05)
    TOO_MANY_CONNECTIONS = (0x02, 0x06)
    MISSING_PARAMETER = (0x02, 0x07)
    CANT_INCLUDE_IN_SESSION = (0x02, 0x08)
    SESSION_TYPE_NOT_SUPPORTED = (0x02, 0x09)
    SESSION_DOES_NOT_EXIST = (0x02, 0x0A)
    INVALID_DURING_LOGIN = (0x02, 0x0B)
    TARGET_ERROR = (0x03, 0x00)
    SERVICE_UNAVAILABLE = (0x03, 0x01)
    OUT_OF_RESOURCES = (0x03, 0x02)


class LoginError(IscsiError):
    """A login that fails with this Status-Class / Status-Detail (RFC 7143 11.13.5).

    ``reason`` is a short human-readable cause, for the log and the ``login_failed`` metric.
    ``LoginMachine.receive`` turns it into a Login Response and a ``LoginFailed`` outcome.
    """

    def __init__(self, status_class: int, status_detail: int, reason: str) -> None:
        super().__init__(f"login failed {status_class:#04x}/{status_detail:#04x}: {reason}")
        self.status_class = status_class
        self.status_detail = status_detail
        self.reason = reason


class TextFormatError(IscsiError, ValueError):
    """A data segment that is not a well-formed key=value text (RFC 7143 6.1).

    Raised by ``frontend.iscsi.keys.parse_text``; login turns it into an initiator error
    (0x02/0x00), full-feature text negotiation into ``TextRequestRejected``.
    """


class TextRequestRejected(IscsiError):
    """A full-feature Text Request that breaks the text protocol (RFC 7143 11.10, 11.11).

    Raised by ``frontend.iscsi.discovery.TextNegotiation``; answer with a Reject PDU carrying
    ``reject_reason`` (RFC 7143 11.17.1: PROTOCOL_ERROR or INVALID_PDU_FIELD) and the request's BHS.
    """

    def __init__(self, reject_reason: RejectReason, reason: str) -> None:
        super().__init__(f"text request rejected ({int(reject_reason):#04x}): {reason}")
        self.reject_reason = reject_reason
        self.reason = reason
