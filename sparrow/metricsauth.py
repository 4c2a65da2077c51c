"""Who may read ``GET /metrics`` on the master, a node and ``sparrow serve`` (docs/operations.md,
"Prometheus").

The metrics name volumes (labels), so ``/metrics`` is a locked door like every other. It opens to
``Authorization: Bearer <scrape token>``, where the *scrape token* is derived one way from the
cluster secret's key ``K`` (sparrow.cluster.channel)::

    scrape token = "sps_" | hex(HKDF-SHA256(K, info=b"sparrow metrics scrape v1"))

so the master and every node know it without a new file to hand out, ``sparrow metrics token``
prints it for Prometheus (``authorization: credentials_file:``), and a leaked scrape token gives
no key of the cluster channel (nor the secret). It changes only with the cluster secret. The
master (and serve) also take an API token with no tenant (sparrow.master.auth: a tenant token
would read other tenants' volume names, 403), and hand the scrape token to an admin token only
(``GET /v1/metrics/scrape-token``: ``sparrow top`` reads each node's ``/metrics`` with it; admin
because a scrape token outlives the revoked API token that asked for it).

:class:`MetricsDoor` holds the token (compared in constant time) and counts what it refused
(``sparrow_metrics_scrapes_refused_total{reason}``). ``--public-metrics`` (``[http]
public_metrics = true`` for serve) opens the door to anyone: for labs only.
"""

from __future__ import annotations

import enum
import hmac

from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from prometheus_client import CollectorRegistry, Counter

from sparrow.cluster.channel import ClusterSecret
from sparrow.httpjson import error_response

#: What the scrape token is derived under from the cluster secret's key.
SCRAPE_INFO = b"sparrow metrics scrape v1"
#: A scrape token's prefix: tells it apart from an API token (``spw_``) in a config or a log.
SCRAPE_PREFIX = "sps_"
#: The route that hands the scrape token to a token holder (sparrow.master.auth, ``sparrow top``).
SCRAPE_TOKEN_ROUTE = "/v1/metrics/scrape-token"


def scrape_token(secret: ClusterSecret) -> str:
    """The scrape token of the cluster whose secret is ``secret`` (see the module docstring)."""
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=SCRAPE_INFO).derive(secret.key)
    return SCRAPE_PREFIX + derived.hex()


class Refusal(enum.StrEnum):
    """Why a scrape was refused; the ``reason`` label of the counter."""

    #: No ``Authorization`` header, or not ``Bearer``.
    MISSING = "missing"
    #: A bearer credential that is neither the scrape token nor (master) a valid API token.
    WRONG = "wrong"


def bearer(authorization: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer X`` header (None: no such header)."""
    if authorization is None:
        return None
    scheme, _, credential = authorization.strip().partition(" ")
    credential = credential.strip()
    return credential if scheme.lower() == "bearer" and credential else None


class MetricsDoor:
    """The ``/metrics`` door of one daemon: the scrape token it opens to (None: none; an API token
    still opens the master's), or open to anyone (``public``); refusals counted on ``registry``."""

    def __init__(
        self, token: str | None, *, public: bool = False, registry: CollectorRegistry | None = None
    ) -> None:
        self._token = token.encode() if token is not None else None
        self.public = public
        self.refused = Counter(
            "sparrow_metrics_scrapes_refused",
            "GET /metrics refused for want of a credential (sparrow.metricsauth), by reason",
            ["reason"],
            registry=registry if registry is not None else CollectorRegistry(),
        )
        for reason in Refusal:
            self.refused.labels(reason=reason.value)

    @classmethod
    def of(cls, secret: ClusterSecret, *, public: bool, registry: CollectorRegistry | None) -> MetricsDoor:
        return cls(scrape_token(secret), public=public, registry=registry)

    @property
    def token(self) -> str | None:
        return None if self._token is None else self._token.decode()

    def admits(self, authorization: str | None) -> bool:
        """Is the request open (public) or does its header carry the scrape token? Constant time
        in the credential's content."""
        if self.public:
            return True
        credential = bearer(authorization)
        if credential is None or self._token is None:
            return False
        return hmac.compare_digest(credential.encode(), self._token)

    def refuse(self, authorization: str | None) -> web.Response:
        """401 with one line and nothing else said; counted."""
        reason = Refusal.MISSING if bearer(authorization) is None else Refusal.WRONG
        self.refused.labels(reason=reason.value).inc()
        message = (
            "GET /metrics needs Authorization: Bearer <scrape token> (`sparrow metrics token`)"
            if reason is Refusal.MISSING
            else "the credential does not open /metrics"
        )
        response = error_response(401, message)
        response.headers["WWW-Authenticate"] = 'Bearer realm="sparrow"'
        return response


__all__ = [
    "SCRAPE_INFO",
    "SCRAPE_PREFIX",
    "SCRAPE_TOKEN_ROUTE",
    "MetricsDoor",
    "Refusal",
    "bearer",
    "scrape_token",
]
