"""The bridge as an OAuth 2.1 resource server: bearer JWTs checked with PyJWT.

Signature with a key of the issuer's JWKS (a file, or an https URL; cached, and fetched again
for an unknown `kid` at most once per `jwks_refresh_interval`), an algorithm from the
allow-list that fits the key's type (the allow-list cannot hold `none` or HMAC: see
`soma_runtime.bridge_config.JwtAlgorithm`), the issuer, the audience equal to the instance's
resource URL (RFC 8707; one trailing slash tolerated), `exp`/`nbf` within the leeway.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx2
import jwt
import structlog

from soma_runtime.bridge_config import OAuthSection

log = structlog.get_logger(component="bridge")

MAX_JWKS_BYTES = 1024 * 1024
# Which key type each algorithm family needs (a token cannot pick a key of another type).
_KEY_TYPE = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


class InvalidToken(Exception):
    """The token is refused; the message is safe to show the client (it holds no token)."""


class Jwks:
    """The issuer's signing keys by `kid`."""

    def __init__(self, source: str, refresh_interval: float, clock: Any = time.monotonic) -> None:
        self._source = source
        self._interval = refresh_interval
        self._clock = clock
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._loaded_at: float | None = None
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        found = self._find(kid)
        if found is not None:
            return found
        async with self._lock:
            found = self._find(kid)  # another request may have refreshed meanwhile
            due = self._loaded_at is None or self._clock() - self._loaded_at >= self._interval
            if found is None and due:
                self._loaded_at = self._clock()
                await self._load()
                found = self._find(kid)
        return found

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None and len(self._keys) == 1:  # a lone key may be used without a kid
            return next(iter(self._keys.values()))
        return self._keys.get(kid) if kid is not None else None

    async def _load(self) -> None:
        """Fetch the key set; on a failure the keys known so far stay in use."""
        try:
            if self._source.startswith("https://"):
                async with httpx2.AsyncClient(timeout=5.0, follow_redirects=False) as client:
                    reply = await client.get(self._source)
                    reply.raise_for_status()
                    raw = reply.content
            else:
                raw = Path(self._source).read_bytes()
            if len(raw) > MAX_JWKS_BYTES:
                raise ValueError(f"more than {MAX_JWKS_BYTES} bytes")
            keys = jwt.PyJWKSet.from_dict(json.loads(raw)).keys
        except (OSError, ValueError, httpx2.HTTPError, jwt.PyJWTError) as exc:
            log.warning("jwks_unavailable", source=self._source, error=str(exc))
            return
        self._keys = {key.key_id: key for key in keys}
        log.info("jwks_loaded", source=self._source, keys=len(self._keys))


class TokenVerifier:
    def __init__(self, settings: OAuthSection, resource_url: str, jwks: Jwks) -> None:
        self._settings = settings
        base = resource_url.removesuffix("/")
        self._audiences = [base, base + "/"]
        self._jwks = jwks

    async def verify(self, token: str) -> tuple[str, frozenset[str]]:
        """`(subject, scopes)` of a valid token; `InvalidToken` otherwise."""
        settings = self._settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in settings.algorithms:
            raise InvalidToken("signing algorithm not allowed")
        kid = header.get("kid")
        key = await self._jwks.key(kid if isinstance(kid, str) else None)
        if key is None:
            raise InvalidToken("unknown signing key")
        if _KEY_TYPE.get(alg[:2]) != key.key_type:
            raise InvalidToken("signing algorithm does not fit the key")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self._audiences,
                issuer=settings.issuer,
                leeway=settings.leeway,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("token not meant for this resource") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("token from another issuer") from None
        except jwt.PyJWTError:
            raise InvalidToken("invalid token") from None
        return str(claims["sub"]), _scopes(claims)


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    """RFC 9068 `scope` (space-separated), or the `scp` list some issuers send."""
    scope = claims.get("scope")
    if isinstance(scope, str):
        return frozenset(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, list):
        return frozenset(s for s in scp if isinstance(s, str))
    return frozenset()
