"""CHAP for iSCSI login: CHAP_A=5 (MD5), one-way and mutual (RFC 1994, RFC 7143 12.1.3).

The exchange, target side, once ``AuthMethod=CHAP`` is agreed::

    I -> T  CHAP_A=<A1,A2,...>
    T -> I  CHAP_A=5 CHAP_I=<id> CHAP_C=<challenge>
    I -> T  CHAP_N=<name> CHAP_R=<MD5(id + secret + challenge)> [CHAP_I=<id'> CHAP_C=<challenge'>]
    T -> I  [CHAP_N=<target name> CHAP_R=<MD5(id' + target secret + challenge')>]

:class:`ChapAuthenticator` is the sans-IO target side of that exchange for one login. Every
failure raises ``LoginError`` 0x02/0x01 (authentication failure).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable, Mapping

from frontend.iscsi.errors import LoginError, LoginStatus
from frontend.iscsi.keys import (
    KeyValue,
    ValueSyntaxError,
    encode_binary,
    parse_binary,
    parse_number,
)
from frontend.target import ChapConfig

CHAP_MD5 = 5
"""CHAP_A value for MD5 (RFC 1994, IANA PPP authentication algorithms)."""

CHALLENGE_BYTES = 16
"""Length of the challenge we send; RFC 7143 12.1.3 recommends at least 16 bytes for MD5."""

MAX_CHALLENGE_BYTES = 1024
"""RFC 7143 12.1.3: a CHAP challenge MUST NOT exceed 1024 bytes."""

CHAP_KEYS = frozenset({"CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R"})


def chap_response(identifier: int, secret: bytes, challenge: bytes) -> bytes:
    """RFC 1994 4.1: MD5 over the identifier octet, the secret, then the challenge."""
    return hashlib.md5(bytes([identifier]) + secret + challenge, usedforsecurity=False).digest()


def _fail(reason: str) -> LoginError:
    return LoginError(*LoginStatus.AUTHENTICATION_FAILURE, reason)


class ChapState(enum.Enum):
    WAIT_ALGORITHM = "wait-algorithm"   # AuthMethod=CHAP agreed; CHAP_A expected
    WAIT_RESPONSE = "wait-response"     # challenge sent; CHAP_N and CHAP_R expected
    DONE = "done"                       # the initiator proved its secret (and we ours, if asked)


class ChapAuthenticator:
    """The target side of one CHAP exchange.

    ``receive(keys)`` takes the CHAP_* keys of one complete login text and returns the CHAP_* keys
    to answer with; ``done`` tells when the initiator is authenticated.
    """

    def __init__(self, config: ChapConfig, random_bytes: Callable[[int], bytes]) -> None:
        self._config = config
        self._random_bytes = random_bytes
        self._state = ChapState.WAIT_ALGORITHM
        self._identifier = 0
        self._challenge = b""

    @property
    def state(self) -> ChapState:
        return self._state

    @property
    def done(self) -> bool:
        return self._state is ChapState.DONE

    def receive(self, keys: Mapping[str, str]) -> tuple[KeyValue, ...]:
        unexpected = set(keys) - CHAP_KEYS
        if unexpected:
            raise ValueError(f"not CHAP keys: {sorted(unexpected)}")
        if not keys:
            return ()
        if self._state is ChapState.WAIT_ALGORITHM:
            return self._select_algorithm(keys)
        if self._state is ChapState.WAIT_RESPONSE:
            return self._verify(keys)
        raise _fail("CHAP keys after CHAP completed")

    def _select_algorithm(self, keys: Mapping[str, str]) -> tuple[KeyValue, ...]:
        if set(keys) != {"CHAP_A"}:
            raise _fail(f"expected CHAP_A, got {sorted(keys)}")
        try:
            algorithms = [_parse_algorithm(a) for a in parse_list_loose(keys["CHAP_A"])]
        except ValueSyntaxError as e:
            raise _fail(f"bad CHAP_A: {e}") from None
        if CHAP_MD5 not in algorithms:
            raise _fail(f"no supported CHAP_A in {keys['CHAP_A'][:64]!r}")
        identifier = self._random_bytes(1)
        challenge = self._random_bytes(CHALLENGE_BYTES)
        if len(identifier) != 1 or len(challenge) != CHALLENGE_BYTES:
            raise LoginError(*LoginStatus.TARGET_ERROR, "random source returned too few bytes")
        self._identifier = identifier[0]
        self._challenge = challenge
        self._state = ChapState.WAIT_RESPONSE
        return (
            KeyValue("CHAP_A", str(CHAP_MD5)),
            KeyValue("CHAP_I", str(self._identifier)),
            KeyValue("CHAP_C", encode_binary(self._challenge)),
        )

    def _verify(self, keys: Mapping[str, str]) -> tuple[KeyValue, ...]:
        if "CHAP_A" in keys:
            raise _fail("CHAP_A sent twice")
        if "CHAP_N" not in keys or "CHAP_R" not in keys:
            raise _fail("CHAP_N and CHAP_R are required")
        expected_user = self._config.initiator.user.encode()
        if not hmac.compare_digest(keys["CHAP_N"].encode(), expected_user):
            raise _fail("wrong CHAP_N")
        try:
            response = parse_binary(keys["CHAP_R"])
        except ValueSyntaxError as e:
            raise _fail(f"bad CHAP_R: {e}") from None
        expected = chap_response(self._identifier, self._config.initiator.secret.encode(), self._challenge)
        if not hmac.compare_digest(response, expected):
            raise _fail("wrong CHAP_R")
        answer: tuple[KeyValue, ...] = ()
        if "CHAP_I" in keys or "CHAP_C" in keys:
            answer = self._prove_ourselves(keys)
        self._state = ChapState.DONE
        return answer

    def _prove_ourselves(self, keys: Mapping[str, str]) -> tuple[KeyValue, ...]:
        """Mutual CHAP: the initiator challenges the target (RFC 7143 12.1.3)."""
        if "CHAP_I" not in keys or "CHAP_C" not in keys:
            raise _fail("mutual CHAP needs both CHAP_I and CHAP_C")
        target = self._config.target
        if target is None:
            raise _fail("mutual CHAP requested but no target secret is configured")
        if target.secret == self._config.initiator.secret:
            # RFC 7143 12.1.3: a secret used to authenticate initiators MUST NOT authenticate targets.
            raise _fail("mutual CHAP refused: target and initiator secrets are identical")
        try:
            identifier = parse_number(keys["CHAP_I"], 0, 255)
            challenge = parse_binary(keys["CHAP_C"])
        except ValueSyntaxError as e:
            raise _fail(f"bad mutual CHAP key: {e}") from None
        if not 0 < len(challenge) <= MAX_CHALLENGE_BYTES:
            raise _fail(f"CHAP_C of {len(challenge)} bytes")
        if challenge == self._challenge:
            # RFC 7143 12.1.3: a reflected challenge MUST be refused.
            raise _fail("initiator reflected our CHAP challenge")
        return (
            KeyValue("CHAP_N", target.user),
            KeyValue("CHAP_R", encode_binary(chap_response(identifier, target.secret.encode(), challenge))),
        )


def parse_list_loose(value: str) -> tuple[str, ...]:
    """CHAP_A is a list of numbers, which are not standard labels: split on commas only."""
    items = tuple(value.split(","))
    if any(not item for item in items):
        raise ValueSyntaxError("empty CHAP_A item")
    return items


def _parse_algorithm(item: str) -> int:
    """One CHAP_A item; anything that is not a number 0..255 is an algorithm we do not know (-1)."""
    try:
        return parse_number(item, 0, 255)
    except ValueSyntaxError:
        return -1
