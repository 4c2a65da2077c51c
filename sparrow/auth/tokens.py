"""API tokens: who may do what through the master's HTTP API (sans-IO; no sockets, no files).

A token is ``spw_<id>_<secret>``: ``id`` is 16 hex digits (public: it names the token in ``sparrow
token list`` and ``revoke``), ``secret`` is :data:`SECRET_BYTES` random bytes from :mod:`secrets`,
URL-safe base64. The plaintext is shown once, when the token is made; the authority keeps only
``sha256(secret)`` (a 256-bit random secret needs no slow hash), compared with
:func:`hmac.compare_digest`.

Roles (:class:`Role`), each allowed what the one below it is, plus more:

- ``reader``: list and inspect volumes, list nodes, read the master's ``/metrics``;
- ``operator``: create, resize and delete volumes, fail them over and rebuild their copies, drain
  and undrain nodes;
- ``admin``: everything, tokens, a volume's ``backing`` and the nodes' scrape token too.

A token may be scoped to a *tenant*, a volume-name prefix: it lists, sees and changes only volumes
whose name starts with it, and creating one outside it is refused. A tenant token can never manage
tokens, nor see or forget nodes (nodes are shared by every tenant), whatever its role.

The rules are one table, :data:`RULES`: each :class:`Action` names the least role it needs and
whether a tenant token may do it. :func:`authorize` applies it; :func:`can_see` is the tenant rule.
Failures carry their HTTP status (:class:`Unauthorized` 401, :class:`Forbidden` 403).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field

#: Random bytes in a token's secret (256 bits).
SECRET_BYTES = 32
#: Hex digits in a token id.
ID_HEX = 16
TOKEN_PREFIX = "spw_"
TOKEN_PATTERN = re.compile(r"spw_(?P<id>[0-9a-f]{16})_(?P<secret>[A-Za-z0-9_-]{43})")
TOKEN_ID_PATTERN = re.compile(r"[0-9a-f]{16}")
#: A tenant is a volume-name prefix (volume names: sparrow.cluster.messages.VOLUME_NAME_PATTERN).
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
NAME_MAX = 128


class Role(enum.StrEnum):
    READER = "reader"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANKS = {Role.READER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


class Action(enum.StrEnum):
    VOLUME_READ = "volume.read"
    VOLUME_WRITE = "volume.write"
    VOLUME_BACKING = "volume.backing"
    NODE_READ = "node.read"
    NODE_WRITE = "node.write"
    #: Drain or undrain a node (sparrow.cluster.moves).
    NODE_DRAIN = "node.drain"
    TOKEN_MANAGE = "token.manage"
    #: Read the master's /metrics (sparrow.metricsauth): they name every tenant's volumes.
    METRICS_READ = "metrics.read"
    #: A route the table of sparrow.master.auth does not name: admin only.
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Rule:
    role: Role
    #: May a token scoped to a tenant do it at all (on its own volumes)?
    tenant: bool


#: The one table of who may do what (see the module docstring).
RULES: dict[Action, Rule] = {
    Action.VOLUME_READ: Rule(Role.READER, tenant=True),
    Action.VOLUME_WRITE: Rule(Role.OPERATOR, tenant=True),
    Action.VOLUME_BACKING: Rule(Role.ADMIN, tenant=True),
    Action.NODE_READ: Rule(Role.READER, tenant=False),
    Action.NODE_WRITE: Rule(Role.ADMIN, tenant=False),
    Action.NODE_DRAIN: Rule(Role.OPERATOR, tenant=False),
    Action.TOKEN_MANAGE: Rule(Role.ADMIN, tenant=False),
    Action.METRICS_READ: Rule(Role.READER, tenant=False),
    Action.ADMIN: Rule(Role.ADMIN, tenant=False),
}


class AuthError(Exception):
    """A request refused for who sent it; ``status`` is its HTTP status."""

    status = 403


class Unauthorized(AuthError):
    """No token, a malformed, unknown or revoked one (401)."""

    status = 401


class Forbidden(AuthError):
    """A valid token whose role or tenant does not allow the request (403)."""

    status = 403


class InvalidToken(ValueError):
    """A token field that may not be stored (role, tenant, name)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request comes from: the token that authenticated it."""

    token_id: str
    role: Role
    #: The volume-name prefix the token is scoped to (None: every volume).
    tenant: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A token as the authority stores it: never its secret, only the secret's sha256 (hex)."""

    token_id: str
    role: Role
    tenant: str | None
    name: str | None
    secret_sha256: str
    created_at: float
    revoked_at: float | None = None

    @property
    def principal(self) -> Principal:
        return Principal(self.token_id, self.role, self.tenant, self.name)


@dataclass(frozen=True, slots=True)
class NewToken:
    """A freshly minted token: ``plaintext`` is shown once and never stored."""

    record: TokenRecord
    plaintext: str = field(repr=False)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_fields(role: object, tenant: object, name: object) -> tuple[Role, str | None, str | None]:
    """The role, tenant and name of a new token, checked. Raises InvalidToken."""
    try:
        checked_role = Role(role) if isinstance(role, str) else None
    except ValueError:
        checked_role = None
    if checked_role is None:
        raise InvalidToken(f"role must be one of {', '.join(r.value for r in Role)}, not {role!r}")
    if tenant is not None and (not isinstance(tenant, str) or not TENANT_PATTERN.fullmatch(tenant)):
        raise InvalidToken(f"tenant must be a volume-name prefix ({TENANT_PATTERN.pattern}), not {tenant!r}")
    if name is not None and (
        not isinstance(name, str) or not name or len(name) > NAME_MAX or not name.isprintable()
    ):
        raise InvalidToken(f"name must be 1..{NAME_MAX} printable characters")
    return checked_role, tenant, name


def mint(role: object, *, tenant: object = None, name: object = None, created_at: float) -> NewToken:
    """A new random token. Raises InvalidToken for a bad role, tenant or name."""
    checked_role, checked_tenant, checked_name = check_fields(role, tenant, name)
    token_id = secrets.token_hex(ID_HEX // 2)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    record = TokenRecord(
        token_id, checked_role, checked_tenant, checked_name, hash_secret(secret), float(created_at)
    )
    return NewToken(record, f"{TOKEN_PREFIX}{token_id}_{secret}")


def parse(token: str) -> tuple[str, str]:
    """``(id, secret)`` of a token's text. Raises Unauthorized for anything else."""
    match = TOKEN_PATTERN.fullmatch(token)
    if match is None:
        raise Unauthorized("malformed token")
    return match["id"], match["secret"]


def bearer_token(header: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header. Raises Unauthorized."""
    if header is None:
        raise Unauthorized("missing token (send Authorization: Bearer <token>)")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    return token.strip()


def verify(record: TokenRecord | None, secret: str) -> Principal:
    """The principal of a token whose stored record is ``record`` (None: no such id), if
    ``secret`` matches (constant time) and the token is not revoked. Raises Unauthorized."""
    expected = record.secret_sha256 if record is not None else "0" * 64
    matches = hmac.compare_digest(expected, hash_secret(secret))  # compared even for an unknown id
    if record is None or not matches or record.revoked_at is not None:
        raise Unauthorized("invalid or revoked token")
    return record.principal


def can_see(principal: Principal, volume_name: str) -> bool:
    """The tenant rule: a tenant token sees only volumes whose name starts with its prefix."""
    return principal.tenant is None or volume_name.startswith(principal.tenant)


def authorize(principal: Principal, action: Action, volume_name: str | None = None) -> None:
    """Raise Forbidden unless ``principal`` may do ``action`` (on volume ``volume_name``)."""
    rule = RULES[action]
    if not principal.role.allows(rule.role):
        raise Forbidden(f"token {principal.token_id} ({principal.role}) may not {action}: needs {rule.role}")
    if principal.tenant is not None:
        if not rule.tenant:
            raise Forbidden(
                f"token {principal.token_id} is scoped to tenant {principal.tenant!r}: may not {action}"
            )
        if volume_name is not None and not can_see(principal, volume_name):
            raise Forbidden(
                f"token {principal.token_id} is scoped to tenant {principal.tenant!r}: "
                f"volume {volume_name!r} is outside it"
            )
