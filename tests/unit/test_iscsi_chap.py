"""CHAP (RFC 1994) as iSCSI uses it (RFC 7143 12.1.3), target side."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable

import pytest

from frontend.iscsi.chap import CHALLENGE_BYTES, ChapAuthenticator, ChapState, chap_response
from frontend.iscsi.errors import LoginError
from frontend.iscsi.keys import KeyValue
from frontend.target import ChapConfig, ChapSecret

ONE_WAY = ChapConfig(initiator=ChapSecret("alice", "initiator-secret"))
MUTUAL = ChapConfig(
    initiator=ChapSecret("alice", "initiator-secret"), target=ChapSecret("tgt", "target-secret")
)
CHALLENGE = bytes(range(0x10, 0x10 + CHALLENGE_BYTES))


def fixed_random(identifier: int = 0x2A, challenge: bytes = CHALLENGE) -> Callable[[int], bytes]:
    def random_bytes(n: int) -> bytes:
        return bytes([identifier]) if n == 1 else challenge[:n]

    return random_bytes


def md5(*parts: bytes) -> bytes:
    return hashlib.md5(b"".join(parts)).digest()


def started(config: ChapConfig = ONE_WAY) -> ChapAuthenticator:
    chap = ChapAuthenticator(config, fixed_random())
    answer = chap.receive({"CHAP_A": "5"})
    assert answer == (
        KeyValue("CHAP_A", "5"),
        KeyValue("CHAP_I", "42"),
        KeyValue("CHAP_C", "0x" + CHALLENGE.hex()),
    )
    return chap


def assert_auth_failure(e: pytest.ExceptionInfo[LoginError]) -> None:
    assert (e.value.status_class, e.value.status_detail) == (0x02, 0x01)


def test_chap_response_is_md5_of_identifier_secret_challenge() -> None:
    # RFC 1994 4.1: Response = MD5(Identifier || secret || Challenge)
    assert chap_response(0x2A, b"secret", CHALLENGE) == md5(b"\x2a", b"secret", CHALLENGE)
    assert chap_response(0, b"", b"") == bytes.fromhex("93b885adfe0da089cdf634904fd59f71")  # MD5(b"\0")


def test_one_way_success() -> None:
    chap = started()
    response = md5(b"\x2a", b"initiator-secret", CHALLENGE)
    answer = chap.receive({"CHAP_N": "alice", "CHAP_R": "0x" + response.hex().upper()})
    assert answer == ()
    assert chap.done


def test_response_may_be_base64() -> None:
    chap = started()
    response = md5(b"\x2a", b"initiator-secret", CHALLENGE)
    chap.receive({"CHAP_N": "alice", "CHAP_R": "0b" + base64.b64encode(response).decode()})
    assert chap.done


def test_algorithm_is_chosen_from_the_list() -> None:
    chap = ChapAuthenticator(ONE_WAY, fixed_random())
    assert chap.receive({"CHAP_A": "7,SHA3,5"})[0] == KeyValue("CHAP_A", "5")
    assert chap.state is ChapState.WAIT_RESPONSE


@pytest.mark.parametrize("offer", ["7", "6,7", "", "5,", "MD5"])
def test_no_md5_fails(offer: str) -> None:
    with pytest.raises(LoginError) as e:
        ChapAuthenticator(ONE_WAY, fixed_random()).receive({"CHAP_A": offer})
    assert_auth_failure(e)


@pytest.mark.parametrize(
    "keys",
    [
        # wrong name, wrong secret, wrong identifier
        {"CHAP_N": "bob", "CHAP_R": "0x" + md5(b"\x2a", b"initiator-secret", CHALLENGE).hex()},
        {"CHAP_N": "alice", "CHAP_R": "0x" + md5(b"\x2a", b"wrong-secret", CHALLENGE).hex()},
        {"CHAP_N": "alice", "CHAP_R": "0x" + md5(b"\x2b", b"initiator-secret", CHALLENGE).hex()},
        {"CHAP_N": "alice", "CHAP_R": "not-binary"},
        {"CHAP_N": "alice"},
        {"CHAP_R": "0x00"},
        {"CHAP_A": "5", "CHAP_N": "alice", "CHAP_R": "0x00"},
    ],
)
def test_bad_responses_fail(keys: dict[str, str]) -> None:
    chap = started()
    with pytest.raises(LoginError) as e:
        chap.receive(keys)
    assert_auth_failure(e)
    assert not chap.done


def test_response_before_challenge_fails() -> None:
    chap = ChapAuthenticator(ONE_WAY, fixed_random())
    with pytest.raises(LoginError) as e:
        chap.receive({"CHAP_N": "alice", "CHAP_R": "0x00"})
    assert_auth_failure(e)


def good_response() -> dict[str, str]:
    return {"CHAP_N": "alice", "CHAP_R": "0x" + md5(b"\x2a", b"initiator-secret", CHALLENGE).hex()}


def test_mutual_success() -> None:
    chap = started(MUTUAL)
    their_challenge = bytes(range(32))
    answer = chap.receive(good_response() | {"CHAP_I": "1", "CHAP_C": "0x" + their_challenge.hex().upper()})
    assert answer == (
        KeyValue("CHAP_N", "tgt"),
        KeyValue("CHAP_R", "0x" + md5(b"\x01", b"target-secret", their_challenge).hex()),
    )
    assert chap.done


def test_mutual_requested_but_not_configured_fails() -> None:
    chap = started(ONE_WAY)
    with pytest.raises(LoginError) as e:
        chap.receive(good_response() | {"CHAP_I": "1", "CHAP_C": "0x0102"})
    assert_auth_failure(e)


def test_reflected_challenge_fails() -> None:
    chap = started(MUTUAL)
    with pytest.raises(LoginError) as e:
        chap.receive(good_response() | {"CHAP_I": "1", "CHAP_C": "0x" + CHALLENGE.hex()})
    assert_auth_failure(e)
    assert "reflect" in e.value.reason


@pytest.mark.parametrize(
    "extra",
    [
        {"CHAP_I": "1"},                                  # CHAP_C missing
        {"CHAP_C": "0x0102"},                             # CHAP_I missing
        {"CHAP_I": "256", "CHAP_C": "0x0102"},            # identifier is one byte
        {"CHAP_I": "1", "CHAP_C": "0x" + "00" * 1025},    # RFC 7143 12.1.3: at most 1024 bytes
        {"CHAP_I": "1", "CHAP_C": "junk"},
    ],
)
def test_bad_mutual_keys_fail(extra: dict[str, str]) -> None:
    chap = started(MUTUAL)
    with pytest.raises(LoginError) as e:
        chap.receive(good_response() | extra)
    assert_auth_failure(e)


def test_mutual_with_identical_secrets_is_refused() -> None:
    same = ChapConfig(initiator=ChapSecret("alice", "s3cret"), target=ChapSecret("tgt", "s3cret"))
    chap = ChapAuthenticator(same, fixed_random())
    chap.receive({"CHAP_A": "5"})
    with pytest.raises(LoginError) as e:
        chap.receive({"CHAP_N": "alice", "CHAP_R": "0x" + md5(b"\x2a", b"s3cret", CHALLENGE).hex(),
                      "CHAP_I": "1", "CHAP_C": "0x0102"})
    assert_auth_failure(e)


def test_chap_after_completion_fails() -> None:
    chap = started()
    chap.receive(good_response())
    with pytest.raises(LoginError) as e:
        chap.receive({"CHAP_A": "5"})
    assert_auth_failure(e)


def test_no_keys_is_no_progress() -> None:
    chap = started()
    assert chap.receive({}) == ()
    assert chap.state is ChapState.WAIT_RESPONSE
