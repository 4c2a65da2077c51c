"""sparrow.auth.tokens: minting, parsing, verifying and the role/tenant table (no I/O)."""

from __future__ import annotations

import pytest

from sparrow.auth import tokens
from sparrow.auth.tokens import RULES, Action, Forbidden, Principal, Role, Unauthorized


def test_a_token_is_an_id_and_a_256_bit_secret_and_only_its_hash_is_kept() -> None:
    new = tokens.mint("operator", tenant="team-a", name="ci", created_at=5.0)
    token_id, secret = tokens.parse(new.plaintext)
    assert token_id == new.record.token_id and len(token_id) == 16
    assert len(secret) == 43  # base64url of 32 bytes
    assert new.record.secret_sha256 == tokens.hash_secret(secret)
    assert secret not in repr(new) and new.plaintext not in repr(new.record)
    assert (new.record.role, new.record.tenant, new.record.name) == (Role.OPERATOR, "team-a", "ci")
    assert tokens.verify(new.record, secret) == Principal(token_id, Role.OPERATOR, "team-a", "ci")
    assert tokens.mint("reader", created_at=0).plaintext != tokens.mint("reader", created_at=0).plaintext


@pytest.mark.parametrize(
    "header",
    [None, "", "Basic abc", "Bearer", "Bearer   ", "Bearer spw_zz", "Bearer spw_0123456789abcdef_short"],
)
def test_a_missing_or_malformed_token_is_unauthorized(header: str | None) -> None:
    with pytest.raises(Unauthorized) as info:
        tokens.parse(tokens.bearer_token(header))
    assert info.value.status == 401


def test_a_wrong_unknown_or_revoked_token_is_unauthorized() -> None:
    new = tokens.mint("admin", created_at=1.0)
    _, secret = tokens.parse(new.plaintext)
    other = tokens.parse(tokens.mint("admin", created_at=1.0).plaintext)[1]
    with pytest.raises(Unauthorized):
        tokens.verify(new.record, other)
    with pytest.raises(Unauthorized):
        tokens.verify(None, secret)
    revoked = tokens.TokenRecord(**{**_fields(new.record), "revoked_at": 2.0})
    with pytest.raises(Unauthorized):
        tokens.verify(revoked, secret)


def _fields(record: tokens.TokenRecord) -> dict[str, object]:
    return {f: getattr(record, f) for f in record.__dataclass_fields__}


def test_bad_role_tenant_or_name_are_refused() -> None:
    for kwargs in ({"role": "root"}, {"role": "admin", "tenant": "a/b"}, {"role": "admin", "name": ""}):
        with pytest.raises(tokens.InvalidToken):
            tokens.mint(kwargs.pop("role"), created_at=0, **kwargs)


#: Who may do what: (role, tenant?) -> the actions allowed. The table in the module must agree.
EXPECTED = {
    (Role.READER, False): {Action.VOLUME_READ, Action.NODE_READ, Action.METRICS_READ},
    (Role.OPERATOR, False): {
        Action.VOLUME_READ,
        Action.VOLUME_WRITE,
        Action.NODE_READ,
        Action.NODE_DRAIN,
        Action.METRICS_READ,
    },
    (Role.ADMIN, False): set(Action),
    (Role.READER, True): {Action.VOLUME_READ},
    (Role.OPERATOR, True): {Action.VOLUME_READ, Action.VOLUME_WRITE},
    (Role.ADMIN, True): {Action.VOLUME_READ, Action.VOLUME_WRITE, Action.VOLUME_BACKING},
}


@pytest.mark.parametrize(("role", "tenant"), list(EXPECTED))
def test_the_role_and_tenant_table(role: Role, tenant: bool) -> None:
    who = Principal("0" * 16, role, "team-a" if tenant else None)
    allowed = set()
    for action in Action:
        try:
            tokens.authorize(who, action, "team-a-db" if tenant else None)
            allowed.add(action)
        except Forbidden as e:
            assert e.status == 403
    assert allowed == EXPECTED[(role, tenant)]
    assert set(RULES) == set(Action)


def test_a_tenant_token_sees_and_changes_only_its_prefix() -> None:
    who = Principal("0" * 16, Role.OPERATOR, "team-a")
    assert tokens.can_see(who, "team-a-db") and not tokens.can_see(who, "team-b-db")
    tokens.authorize(who, Action.VOLUME_WRITE, "team-a-db")
    with pytest.raises(Forbidden, match="outside it"):
        tokens.authorize(who, Action.VOLUME_WRITE, "team-b-db")
    assert tokens.can_see(Principal("1" * 16, Role.READER), "anything")
