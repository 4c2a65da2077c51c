"""Text key=value parsing, encoding and the negotiation rules of RFC 7143 sections 6 and 13.

A text (the data segment of Login and Text PDUs, RFC 7143 6.1) is a sequence of ``key=value``
pairs, each terminated by a NUL byte. Keys are at most 63 bytes; values at most 255 bytes unless
the key says otherwise (CHAP challenges and responses may be longer). This module knows

- the syntax: :func:`parse_text`, :func:`encode_text` and the value decoders
  (:func:`parse_number`, :func:`parse_bool`, :func:`parse_list`, :func:`parse_binary`);
- every key the target understands, with its class and negotiation rule: :data:`KEYS`;
- the operational negotiation of one login: :class:`OperationalNegotiator`, which answers the
  initiator's offers and produces the agreed values.

Identity keys (InitiatorName, TargetName, ...) and security keys (AuthMethod, CHAP_*) are listed
here but answered by ``login.py`` and ``chap.py``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from frontend.iscsi.errors import LoginError, LoginStatus, TextFormatError
from frontend.iscsi.params import SessionType
from frontend.target import TargetSettings

MAX_KEY_BYTES = 63
"""RFC 7143 6.1: a key name is at most 63 bytes."""

MAX_VALUE_BYTES = 255
"""RFC 7143 6.1: a text value is at most 255 bytes unless the key says otherwise."""

MAX_LARGE_VALUE_BYTES = 8192
"""The longest encoded value of a large-binary key (CHAP_C, CHAP_R) or of a key we do not know."""

MAX_TEXT_BYTES = 65536
"""The most text one login or text exchange may accumulate over C-bit PDUs before we give up."""

# Reserved answers, RFC 7143 6.2.
NOT_UNDERSTOOD = "NotUnderstood"
REJECT = "Reject"
IRRELEVANT = "Irrelevant"
NONE = "None"
YES = "Yes"
NO = "No"

_KEY_RE = re.compile(r"[A-Za-z0-9.\-+@_#]+\Z")
_LABEL_RE = re.compile(r"[A-Za-z][A-Za-z0-9.\-+@_]*\Z")
_DECIMAL_RE = re.compile(r"(0|[1-9][0-9]*)\Z")
_HEX_RE = re.compile(r"0[xX][0-9A-Fa-f]+\Z")
_BASE64_RE = re.compile(r"0[bB][A-Za-z0-9+/]+={0,2}\Z")


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One ``key=value`` pair of a text."""

    key: str
    value: str


class ValueSyntaxError(ValueError):
    """A value that does not follow its key's syntax or range: the answer is ``key=Reject``."""


# --- syntax (RFC 7143 6.1) -------------------------------------------------------------------


def parse_text(data: bytes) -> tuple[KeyValue, ...]:
    """Split a text into its pairs, in order.

    Empty strings between NULs (and a missing final NUL) are tolerated; anything else that is not
    ``key=value`` raises :class:`TextFormatError`: no ``=``, an empty or over-long key, a key with
    characters outside RFC 7143 6.1's key-name set, non-UTF-8 bytes, an over-long value.
    """
    if len(data) > MAX_TEXT_BYTES:
        raise TextFormatError(f"text of {len(data)} bytes exceeds {MAX_TEXT_BYTES}")
    pairs: list[KeyValue] = []
    for raw in data.split(b"\0"):
        if not raw:
            continue
        key_bytes, eq, value_bytes = raw.partition(b"=")
        if not eq:
            raise TextFormatError(f"no '=' in {raw[:64]!r}")
        if not key_bytes:
            raise TextFormatError("empty key")
        if len(key_bytes) > MAX_KEY_BYTES:
            raise TextFormatError(f"key of {len(key_bytes)} bytes exceeds {MAX_KEY_BYTES}")
        if len(value_bytes) > MAX_LARGE_VALUE_BYTES:
            raise TextFormatError(f"value of {len(value_bytes)} bytes exceeds {MAX_LARGE_VALUE_BYTES}")
        try:
            key = key_bytes.decode("ascii")
            value = value_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TextFormatError(f"undecodable text: {e.reason}") from None
        if not _KEY_RE.match(key):
            raise TextFormatError(f"bad key name {key!r}")
        spec = KEYS.get(key)
        limit = spec.max_value_bytes if spec is not None else MAX_LARGE_VALUE_BYTES
        if len(value_bytes) > limit:
            raise TextFormatError(f"{key} value of {len(value_bytes)} bytes exceeds {limit}")
        pairs.append(KeyValue(key, value))
    return tuple(pairs)


def encode_text(pairs: Iterable[KeyValue]) -> bytes:
    """``key=value\\0`` for each pair, in order (RFC 7143 6.1)."""
    return b"".join(f"{p.key}={p.value}".encode() + b"\0" for p in pairs)


def find_duplicate(pairs: Iterable[KeyValue]) -> str | None:
    """The first key that appears twice, or None (RFC 7143 6.2: a key is offered once)."""
    seen: set[str] = set()
    for p in pairs:
        if p.key in seen:
            return p.key
        seen.add(p.key)
    return None


def parse_number(value: str, lo: int, hi: int) -> int:
    """A numerical value (RFC 7143 6.1: decimal-constant or hex-constant) within ``lo..hi``."""
    if _DECIMAL_RE.match(value) and len(value) <= 20:  # 2**64 has 20 digits
        n = int(value)
    elif _HEX_RE.match(value) and len(value) <= 18:
        n = int(value[2:], 16)
    else:
        raise ValueSyntaxError(f"not a number: {value[:32]!r}")
    if not lo <= n <= hi:
        raise ValueSyntaxError(f"{n} is outside {lo}..{hi}")
    return n


def parse_bool(value: str) -> bool:
    """A boolean value: exactly ``Yes`` or ``No`` (RFC 7143 6.1)."""
    if value == YES:
        return True
    if value == NO:
        return False
    raise ValueSyntaxError(f"not Yes/No: {value[:32]!r}")


def parse_list(value: str) -> tuple[str, ...]:
    """A list of standard labels separated by commas (RFC 7143 6.1, 6.2.1)."""
    items = tuple(value.split(","))
    for item in items:
        if not _LABEL_RE.match(item):
            raise ValueSyntaxError(f"bad list item {item[:32]!r}")
    return items


def parse_binary(value: str) -> bytes:
    """A binary value: ``0x`` hex (an odd digit count implies a leading zero) or ``0b`` base64
    (RFC 7143 6.1)."""
    if _HEX_RE.match(value):
        digits = value[2:]
        if len(digits) % 2:
            digits = "0" + digits
        return bytes.fromhex(digits)
    if _BASE64_RE.match(value):
        try:
            return base64.b64decode(value[2:], validate=True)
        except (binascii.Error, ValueError):
            raise ValueSyntaxError("bad base64 value") from None
    raise ValueSyntaxError(f"not a binary value: {value[:32]!r}")


def encode_binary(data: bytes) -> str:
    """``0x`` followed by two hex digits per byte: the encoding every initiator reads."""
    return "0x" + data.hex()


def is_iscsi_name(value: str) -> bool:
    """Whether ``value`` looks like an iSCSI name (RFC 7143 4.2.7: iqn., eui. or naa. format)."""
    return len(value.encode()) <= 223 and value[:4].lower() in ("iqn.", "eui.", "naa.") and len(value) > 4


# --- the key table (RFC 7143 section 13) -----------------------------------------------------


class KeyClass(enum.Enum):
    """Who handles a key."""

    IDENTITY = "identity"          # declared by the initiator at login start; login.py
    SECURITY = "security"          # security stage only; login.py / chap.py
    OPERATIONAL = "operational"    # OperationalNegotiator
    TARGET_ONLY = "target-only"    # only a target may send it; an initiator's copy is rejected
    FULL_FEATURE = "full-feature"  # only in full-feature phase (SendTargets)


class Rule(enum.Enum):
    """How an operational key's result is computed from offer and answer (RFC 7143 6.2.2)."""

    OR = "or"
    AND = "and"
    MIN = "min"
    MAX = "max"
    DECLARATIVE = "declarative"
    DIGEST = "digest"              # list: the first offered value we support
    FIXED = "fixed"                # a list or boolean whose only acceptable answer is ours
    REJECTED = "rejected"          # always answered Reject (obsolete keys, RFC 7143 13.25)


@dataclass(frozen=True, slots=True)
class KeySpec:
    """What RFC 7143 section 13 says about one key."""

    name: str
    key_class: KeyClass
    rule: Rule | None = None
    lo: int = 0
    hi: int = 0
    default: int | bool | str | None = None
    irrelevant_for_discovery: bool = False
    ffp_allowed: bool = False      # may appear in a Text Request in full-feature phase
    max_value_bytes: int = MAX_VALUE_BYTES


_MAX_DSL = 2**24 - 1
_OP = KeyClass.OPERATIONAL

KEYS: Mapping[str, KeySpec] = {
    s.name: s
    for s in (
        # 13.4 - 13.8, 13.21: identity (declarative by the initiator)
        KeySpec("InitiatorName", KeyClass.IDENTITY),
        KeySpec("InitiatorAlias", KeyClass.IDENTITY),
        KeySpec("TargetName", KeyClass.IDENTITY),
        KeySpec("SessionType", KeyClass.IDENTITY),
        # 12.1: security
        KeySpec("AuthMethod", KeyClass.SECURITY),
        KeySpec("CHAP_A", KeyClass.SECURITY),
        KeySpec("CHAP_I", KeyClass.SECURITY),
        KeySpec("CHAP_C", KeyClass.SECURITY, max_value_bytes=MAX_LARGE_VALUE_BYTES),
        KeySpec("CHAP_N", KeyClass.SECURITY),
        KeySpec("CHAP_R", KeyClass.SECURITY, max_value_bytes=MAX_LARGE_VALUE_BYTES),
        # sent by the target only
        KeySpec("TargetAlias", KeyClass.TARGET_ONLY),
        KeySpec("TargetAddress", KeyClass.TARGET_ONLY),
        KeySpec("TargetPortalGroupTag", KeyClass.TARGET_ONLY),
        # 13.3
        KeySpec("SendTargets", KeyClass.FULL_FEATURE, ffp_allowed=True),
        # 13.1: digests
        KeySpec("HeaderDigest", KeyClass.OPERATIONAL, Rule.DIGEST, default=NONE),
        KeySpec("DataDigest", KeyClass.OPERATIONAL, Rule.DIGEST, default=NONE),
        # 13.2 - 13.20
        KeySpec("MaxConnections", KeyClass.OPERATIONAL, Rule.MIN, 1, 65535, 1, irrelevant_for_discovery=True),
        KeySpec("InitialR2T", KeyClass.OPERATIONAL, Rule.OR, default=True, irrelevant_for_discovery=True),
        KeySpec("ImmediateData", KeyClass.OPERATIONAL, Rule.AND, default=True, irrelevant_for_discovery=True),
        KeySpec(
            "MaxRecvDataSegmentLength", KeyClass.OPERATIONAL, Rule.DECLARATIVE, 512, _MAX_DSL, 8192,
            ffp_allowed=True,
        ),
        KeySpec("MaxBurstLength", _OP, Rule.MIN, 512, _MAX_DSL, 262144, irrelevant_for_discovery=True),
        KeySpec("FirstBurstLength", _OP, Rule.MIN, 512, _MAX_DSL, 65536, irrelevant_for_discovery=True),
        KeySpec("DefaultTime2Wait", _OP, Rule.MAX, 0, 3600, 2),
        KeySpec("DefaultTime2Retain", _OP, Rule.MIN, 0, 3600, 20),
        KeySpec("MaxOutstandingR2T", _OP, Rule.MIN, 1, 65535, 1, irrelevant_for_discovery=True),
        KeySpec("DataPDUInOrder", _OP, Rule.OR, default=True, irrelevant_for_discovery=True),
        KeySpec("DataSequenceInOrder", _OP, Rule.OR, default=True, irrelevant_for_discovery=True),
        KeySpec("ErrorRecoveryLevel", _OP, Rule.MIN, 0, 2, 0),
        # 13.23 (RFC 7143), 2.1 (RFC 7144)
        KeySpec("TaskReporting", _OP, Rule.FIXED, default="RFC3720"),
        KeySpec("iSCSIProtocolLevel", _OP, Rule.MIN, 0, 31, 1, irrelevant_for_discovery=True),
        # 13.25: obsolete markers. IFMarker/OFMarker: we answer No (allowed); the intervals: Reject.
        KeySpec("IFMarker", KeyClass.OPERATIONAL, Rule.FIXED, default=False),
        KeySpec("OFMarker", KeyClass.OPERATIONAL, Rule.FIXED, default=False),
        KeySpec("IFMarkInt", KeyClass.OPERATIONAL, Rule.REJECTED),
        KeySpec("OFMarkInt", KeyClass.OPERATIONAL, Rule.REJECTED),
        # RFC 7145 (iSER) 6.3: we are iSCSI over TCP
        KeySpec("RDMAExtensions", KeyClass.OPERATIONAL, Rule.FIXED, default=False),
    )
}

SUPPORTED_DIGESTS = ("CRC32C", NONE)


# --- operational negotiation (RFC 7143 6.2, section 13) --------------------------------------


class OperationalNegotiator:
    """Answers the initiator's operational keys during one login and remembers the results.

    ``answer(key, value)`` returns the value to send back, or None for a declaration that needs no
    answer. A key offered a second time in the same login is a renegotiation, which RFC 7143 6.2
    makes an initiator error (LoginError 0x02/0x00).
    """

    def __init__(self, settings: TargetSettings, session_type: SessionType) -> None:
        self._settings = settings
        self._session_type = session_type
        self._offered: set[str] = set()
        self._values: dict[str, int | bool | str] = {}
        self._ours: dict[str, int | bool] = {
            "MaxConnections": 1,
            "InitialR2T": False,          # OR: we accept either; the initiator's choice wins
            "ImmediateData": True,        # AND: we accept either; the initiator's choice wins
            "MaxBurstLength": settings.max_burst_length,
            "FirstBurstLength": settings.first_burst_length,
            "DefaultTime2Wait": 0,        # MAX: the initiator's choice wins
            "DefaultTime2Retain": 0,      # MIN: we keep no state for connection recovery
            "MaxOutstandingR2T": settings.max_outstanding_r2t,
            "DataPDUInOrder": True,       # OR: we require in-order data
            "DataSequenceInOrder": True,
            "ErrorRecoveryLevel": 0,
            "iSCSIProtocolLevel": 1,
        }
        self._declared = False

    def answer(self, key: str, value: str) -> str | None:
        spec = KEYS[key]
        if spec.key_class is not KeyClass.OPERATIONAL or spec.rule is None:
            raise ValueError(f"{key} is not an operational key")
        if key in self._offered:
            raise LoginError(*LoginStatus.INITIATOR_ERROR, f"{key} negotiated twice")
        self._offered.add(key)
        if spec.irrelevant_for_discovery and self._session_type is SessionType.DISCOVERY:
            return IRRELEVANT
        if spec.rule is Rule.REJECTED:
            return REJECT
        try:
            return self._negotiate(spec, value)
        except ValueSyntaxError:
            return REJECT

    def _negotiate(self, spec: KeySpec, value: str) -> str | None:
        key, rule = spec.name, spec.rule
        if rule is Rule.DIGEST:
            for item in parse_list(value):
                if item in SUPPORTED_DIGESTS:
                    self._values[key] = item
                    return item
            return REJECT
        if rule is Rule.FIXED:
            if isinstance(spec.default, bool):
                parse_bool(value)
                return YES if spec.default else NO
            if str(spec.default) in parse_list(value):
                return str(spec.default)
            return REJECT
        if rule is Rule.DECLARATIVE:
            self._values[key] = parse_number(value, spec.lo, spec.hi)
            return None
        if rule in (Rule.OR, Rule.AND):
            offered = parse_bool(value)
            ours = bool(self._ours[key])
            result = (offered or ours) if rule is Rule.OR else (offered and ours)
            self._values[key] = result
            return YES if result else NO
        offered_n = parse_number(value, spec.lo, spec.hi)
        ours_n = int(self._ours[key])
        result_n = min(offered_n, ours_n) if rule is Rule.MIN else max(offered_n, ours_n)
        if key == "FirstBurstLength":
            # RFC 7143 13.14: FirstBurstLength MUST NOT exceed MaxBurstLength.
            result_n = min(result_n, self.value_int("MaxBurstLength"))
        self._values[key] = result_n
        return str(result_n)

    def declarations(self) -> tuple[KeyValue, ...]:
        """Our own declarations, once per login: MaxRecvDataSegmentLength (RFC 7143 13.12)."""
        if self._declared:
            return ()
        self._declared = True
        return (KeyValue("MaxRecvDataSegmentLength", str(self._settings.max_recv_data_segment_length)),)

    def value(self, key: str) -> int | bool | str:
        """The agreed value of ``key``, or its RFC 7143 default when it was not negotiated."""
        if key in self._values:
            return self._values[key]
        default = KEYS[key].default
        assert default is not None, key
        return default

    def value_int(self, key: str) -> int:
        v = self.value(key)
        assert isinstance(v, int) and not isinstance(v, bool), key
        return v

    def value_bool(self, key: str) -> bool:
        v = self.value(key)
        assert isinstance(v, bool), key
        return v
