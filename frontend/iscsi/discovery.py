"""SendTargets answers and full-feature Text Request negotiation (RFC 7143 11.10, 11.11, 12.3, 13.3).

:func:`send_targets` builds the answer to one ``SendTargets=<value>`` key.

:class:`TextNegotiation` answers every Text Request of one connection in full-feature phase.
The connection layer calls::

    step = negotiation.receive(request, stat_sn=..., exp_cmd_sn=..., max_cmd_sn=...)
    send(step.response)
    if step.max_send_data_segment_length is not None:
        ...  # the initiator declared a new MaxRecvDataSegmentLength: cap Data-In/Text PDUs to it

``TextRequestRejected`` (from ``errors.py``) means the request breaks the text protocol: answer it
with a Reject PDU carrying ``e.reject_reason`` and the request's header. Behaviour:

- A request with C=1 is acknowledged with an empty response (F=0, a new Target Transfer Tag); the
  initiator continues with that TTT until a request with C=0 completes the text.
- An answer longer than the initiator's MaxRecvDataSegmentLength is sent in pieces: C=1, F=0 and a
  TTT on each but the last; the initiator fetches the next piece with an empty request carrying
  that TTT (RFC 7143 11.11.2, 11.11.4).
- A request with TTT 0xffffffff starts a new exchange and drops any unfinished one (11.10.4).
- Keys: ``SendTargets`` is answered; ``MaxRecvDataSegmentLength`` is recorded (declarative, no
  answer); keys that may not be used in full-feature phase get ``key=Reject``; keys we do not know
  (including vendor X-/X# keys) get ``key=NotUnderstood``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from frontend.iscsi.errors import RejectReason, TextFormatError, TextRequestRejected
from frontend.iscsi.keys import (
    KEYS,
    MAX_TEXT_BYTES,
    NOT_UNDERSTOOD,
    REJECT,
    KeyValue,
    ValueSyntaxError,
    encode_text,
    find_duplicate,
    is_iscsi_name,
    parse_number,
    parse_text,
)
from frontend.iscsi.params import SessionParams, SessionType
from frontend.iscsi.pdu import RESERVED_TAG, TextRequest, TextResponse
from frontend.target import RemoteTarget, Target, TargetRegistry, TargetSettings


def _record(target: Target | RemoteTarget, settings: TargetSettings) -> list[KeyValue]:
    """One target's record: its name, then one TargetAddress per portal (RFC 7143 13.8, 13.3).

    A target served here lists this node's portals; one served elsewhere lists only the portal that
    serves it (its primary), so discovery at any node of a cluster leads to the primary.
    """
    portals = (target.portal,) if isinstance(target, RemoteTarget) else settings.portals
    return [KeyValue("TargetName", target.iqn)] + [
        KeyValue("TargetAddress", portal.address()) for portal in portals
    ]


def send_targets(
    value: str, targets: TargetRegistry, settings: TargetSettings, session_target: str | None
) -> bytes:
    """The text answering ``SendTargets=<value>`` (RFC 7143 12.3, 13.3, appendix C).

    ``value`` is ``All``, an iSCSI target name, or empty (the session's own target).
    ``session_target`` is the IQN of a normal session's target, None on a discovery session.
    A normal session only ever learns about its own target, even with ``All``. A name we do not
    serve gives an empty answer; a value that is none of the three gives ``SendTargets=Reject``.
    With no portals in ``settings``, records of targets served here carry no TargetAddress (the
    initiator then uses the address it is connected to); a target served elsewhere
    (:class:`~frontend.target.RemoteTarget`, or redirected) always carries its primary's portal.
    """
    return encode_text(send_targets_pairs(value, targets, settings, session_target))


def send_targets_pairs(
    value: str, targets: TargetRegistry, settings: TargetSettings, session_target: str | None
) -> list[KeyValue]:
    """:func:`send_targets` as pairs."""
    if value == "All":
        chosen = list(targets) if session_target is None else [t for t in targets if t.iqn == session_target]
    elif value == "":
        own = targets.resolve(session_target) if session_target is not None else None
        chosen = [own] if own is not None else []
    elif is_iscsi_name(value):
        named = targets.resolve(value) or targets.resolve(value.lower())
        chosen = [named] if named is not None else []
    else:
        return [KeyValue("SendTargets", REJECT)]
    return [kv for target in chosen for kv in _record(target, settings)]


@dataclass(frozen=True, slots=True)
class TextStep:
    """What to send for one Text Request, and what it changed."""

    response: TextResponse
    max_send_data_segment_length: int | None = None  # the initiator's new declaration, if any


class TextNegotiation:
    """Answers the Text Requests of one full-feature connection (see the module docstring)."""

    def __init__(self, params: SessionParams, targets: TargetRegistry, settings: TargetSettings) -> None:
        self._params = params
        self._targets = targets
        self._settings = settings
        self._max_send = params.max_send_data_segment_length
        self._next_ttt = 1
        # The exchange in progress: its ITT and TTT, text still to receive or still to send.
        self._itt: int | None = None
        self._ttt: int | None = None
        self._incoming = bytearray()
        self._outgoing = b""

    @property
    def in_progress(self) -> bool:
        """Whether an exchange waits for the initiator's next Text Request."""
        return self._ttt is not None

    def receive(self, request: TextRequest, *, stat_sn: int, exp_cmd_sn: int, max_cmd_sn: int) -> TextStep:
        step = self._receive(request)
        return replace(
            step,
            response=replace(step.response, stat_sn=stat_sn, exp_cmd_sn=exp_cmd_sn, max_cmd_sn=max_cmd_sn),
        )

    def _receive(self, request: TextRequest) -> TextStep:
        if request.cont and request.final:
            raise TextRequestRejected(RejectReason.PROTOCOL_ERROR, "Text Request with both C and F bits")
        if request.ttt == RESERVED_TAG:
            self._reset()
        elif request.ttt != self._ttt or request.itt != self._itt:
            raise TextRequestRejected(
                RejectReason.INVALID_PDU_FIELD, f"unknown Target Transfer Tag {request.ttt:#x}"
            )
        self._itt = request.itt
        if self._outgoing:
            # The initiator fetches the next piece of our answer (RFC 7143 11.11.2).
            if request.data:
                raise TextRequestRejected(RejectReason.PROTOCOL_ERROR, "text while our answer is pending")
            return self._send_piece(request)
        self._incoming += request.data
        if len(self._incoming) > MAX_TEXT_BYTES:
            self._reset()
            raise TextRequestRejected(RejectReason.PROTOCOL_ERROR, f"text exceeds {MAX_TEXT_BYTES} bytes")
        if request.cont:
            return TextStep(self._response(request, final=False, cont=False, ttt=self._new_ttt()))
        text, self._incoming = bytes(self._incoming), bytearray()
        answers, max_send = self._answer(text)
        if max_send is not None:
            self._max_send = max_send
        self._outgoing = encode_text(answers)
        step = self._send_piece(request)
        return replace(step, max_send_data_segment_length=max_send)

    def _answer(self, text: bytes) -> tuple[list[KeyValue], int | None]:
        try:
            pairs = parse_text(text)
        except TextFormatError as e:
            self._reset()
            raise TextRequestRejected(RejectReason.PROTOCOL_ERROR, f"malformed text: {e}") from None
        duplicate = find_duplicate(pairs)
        if duplicate is not None:
            self._reset()
            raise TextRequestRejected(RejectReason.PROTOCOL_ERROR, f"{duplicate} sent twice")
        answers: list[KeyValue] = []
        max_send: int | None = None
        for p in pairs:
            spec = KEYS.get(p.key)
            if spec is None:
                answers.append(KeyValue(p.key, NOT_UNDERSTOOD))
            elif p.key == "SendTargets":
                session_target = (
                    self._params.target_name if self._params.session_type is SessionType.NORMAL else None
                )
                answers.extend(send_targets_pairs(p.value, self._targets, self._settings, session_target))
            elif p.key == "MaxRecvDataSegmentLength":
                try:
                    max_send = parse_number(p.value, spec.lo, spec.hi)
                except ValueSyntaxError:
                    answers.append(KeyValue(p.key, REJECT))
            else:
                # Login-only keys may not be renegotiated in full-feature phase (RFC 7143 13).
                answers.append(KeyValue(p.key, REJECT))
        return answers, max_send

    def _send_piece(self, request: TextRequest) -> TextStep:
        piece, self._outgoing = self._outgoing[: self._max_send], self._outgoing[self._max_send :]
        if self._outgoing:
            return TextStep(self._response(request, final=False, cont=True, ttt=self._new_ttt(), data=piece))
        if not request.final:
            # The initiator has more to say: keep the exchange open (RFC 7143 11.11.1).
            return TextStep(self._response(request, final=False, cont=False, ttt=self._new_ttt(), data=piece))
        self._reset()
        return TextStep(self._response(request, final=True, cont=False, ttt=RESERVED_TAG, data=piece))

    def _new_ttt(self) -> int:
        ttt = self._next_ttt
        self._next_ttt = self._next_ttt % 0xFFFFFFFE + 1   # 1..0xfffffffe, never the reserved tag
        self._ttt = ttt
        return ttt

    def _reset(self) -> None:
        self._itt = None
        self._ttt = None
        self._incoming = bytearray()
        self._outgoing = b""

    def _response(
        self, request: TextRequest, *, final: bool, cont: bool, ttt: int, data: bytes = b""
    ) -> TextResponse:
        return TextResponse(
            final=final, cont=cont, lun=request.lun, itt=request.itt, ttt=ttt,
            stat_sn=0, exp_cmd_sn=0, max_cmd_sn=0, data=data,
        )
