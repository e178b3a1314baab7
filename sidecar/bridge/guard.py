"""The HTTP front of a bridge instance, before the MCP SDK sees a request: protected-resource
metadata (RFC 9728), authentication (API keys, OAuth bearer JWTs), scopes, rate limits, the
request body limit, and cancellation (a client that goes away, or a 2025-era client's posted
`notifications/cancelled`, which only the guard can match to its caller).

Written by hand because the SDK's auth middleware reads only `Authorization: Bearer`, has no
API keys, no rate limits, serves metadata at the path-suffixed URI only and sends challenges
without `scope=` (which the 2025-11-25 authorization spec says it SHOULD carry).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import structlog
from mcp.shared.dispatcher import as_request_id
from mcp.types import RequestId
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sidecar.bridge.calls import Principal
from sidecar.bridge.keys import OAUTH, UNKNOWN_KEY, KeyCache
from sidecar.bridge.oauth import InvalidToken, TokenVerifier
from sidecar.mcp_methods import CANCELLED
from soma_runtime import strict_json
from soma_runtime.bridge_config import BridgeSection
from soma_runtime.cards import FunctionCard
from soma_runtime.throttle import RepeatedWarnings, TokenBuckets

log = structlog.get_logger(component="bridge")

PRINCIPAL = "soma.principal"  # where the guard leaves the caller in the ASGI scope's state
WELL_KNOWN = "/.well-known/oauth-protected-resource"
_API_KEY_PREFIX = "soma_"
# Failed authentications per client address: a burst, then answers slow down (bounded), so
# guessing keys costs time; success is never slowed.
FAILURE_BURST = 10
FAILURE_RATE = 2.0
MAX_BACKOFF_S = 2.0
# Levels of JSON-RPC around a tool's arguments: a batch, the message, its params.
ENVELOPE_DEPTH = 3
PARSE_ERROR = -32700  # JSON-RPC


class _Refusal(Exception):
    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        self.status, self.body, self.headers = status, body, headers


class Guard:
    """ASGI middleware in front of one instance's MCP app."""

    def __init__(
        self,
        app: ASGIApp,
        bridge: BridgeSection,
        resource_url: str,
        *,
        keys: KeyCache | None,
        verifier: TokenVerifier | None,
        writes: Callable[[str, dict[str, Any]], FunctionCard | None],
        max_input_depth: int,
        cancel: Callable[[str, RequestId], None],
    ) -> None:
        """`writes(tool, arguments)` is the card of the exposed function a call reaches when
        it is not read-only, else None; `cancel(principal id, request id)` cancels that
        caller's call in flight under that id, if there is one. Request bodies nest at most
        `max_input_depth` levels beyond the JSON-RPC envelope, as inputs do on a runtime's
        channel."""
        self._app = app
        self._max_depth = max_input_depth + ENVELOPE_DEPTH
        self._bridge = bridge
        self._resource = resource_url
        parts = urlsplit(resource_url)
        self._path = parts.path or "/"
        self._metadata_url = f"{parts.scheme}://{parts.netloc}{WELL_KNOWN}{parts.path}"
        self._keys = keys
        self._verifier = verifier
        self._writes = writes
        self._cancel = cancel
        oauth = bridge.auth.oauth
        self._scopes = frozenset(oauth.scopes) if oauth else frozenset()
        self._write_scopes = frozenset(oauth.write_scopes) if oauth else frozenset()
        rate = bridge.auth.rate
        self._rate = TokenBuckets(rate.burst, rate.per_key) if rate else None
        self._warnings = RepeatedWarnings(log)
        self._failures = TokenBuckets(FAILURE_BURST, FAILURE_RATE)
        self._how = _how_to_authenticate(keys is not None, oauth is not None)
        # Without OAuth, a client that starts a sign-in after a 401 (mcp-remote, the
        # Inspector) asks for metadata and client registration here and shows the answer.
        self._not_found: dict[str, Any] = {"error": "not_found"}
        if oauth is None:
            self._not_found["error_description"] = (
                f"the MCP endpoint is {self._path}, and this server does no OAuth: {self._how}"
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        path = scope["path"]
        principal: Principal | None = None
        try:
            if path in (WELL_KNOWN, WELL_KNOWN + self._path) and self._verifier is not None:
                await _json(send, 200, self._metadata(), {"cache-control": "max-age=300"})
                return
            if path != self._path:
                raise _Refusal(404, self._not_found, {})
            headers = _headers(scope)
            principal = await self._authenticate(headers)
            self._check_scopes(principal, self._scopes)
            self._check_rate(principal)
            body = await _read_body(
                receive, self._bridge.max_request_bytes, self._bridge.request_timeout
            )
            message = self._parse(body)
            self._check_write_scopes(principal, message)
        except _Refusal as refusal:
            if self._keys is not None and path == self._path:
                self._keys.counts.rejection(self._bridge.name, _key_label(principal))
            if refusal.status == 401:
                client = scope.get("client")
                wait = self._failures.take(client[0] if client else None)
                if wait > 0.0:
                    await asyncio.sleep(min(wait, MAX_BACKOFF_S))
            await _json(send, refusal.status, refusal.body, refusal.headers)
            return
        if self._keys is not None:
            self._keys.counts.call(self._bridge.name, _key_label(principal))
        scope.setdefault("state", {})[PRINCIPAL] = principal
        self._cancels(principal, message)
        await _forward(self._app, scope, body, receive, send)

    def _metadata(self) -> dict[str, Any]:
        """RFC 9728 protected-resource metadata, served at both well-known URIs."""
        oauth = self._bridge.auth.oauth
        assert oauth is not None
        return {
            "resource": self._resource,
            "authorization_servers": [oauth.issuer],
            "scopes_supported": sorted(self._scopes | self._write_scopes),
            "bearer_methods_supported": ["header"],
            "resource_name": f"Soma bridge {self._bridge.name}",
        }

    def _challenge(self, error: str | None, description: str, scopes: frozenset[str]) -> str:
        parts = ['Bearer realm="soma"']
        if error is not None:
            parts.append(f'error="{error}", error_description="{description}"')
        if self._verifier is not None:
            parts.append(f'resource_metadata="{self._metadata_url}"')
            if scopes:
                parts.append(f'scope="{" ".join(sorted(scopes))}"')
        return ", ".join(parts)

    def _unauthorized(self, reason: str, presented: bool) -> _Refusal:
        """A 401 that says what was wrong and what to send instead. The challenge carries
        the error only when a credential was presented (RFC 6750 §3.1); the body always
        does: it is what clients without an OAuth flow show (the TypeScript SDK, the
        Inspector with `--stored-auth-only`)."""
        self._warnings.warning(
            "bridge_unauthorized", reason, bridge=self._bridge.name, reason=reason
        )
        description = f"{reason}: {self._how}"
        header = self._challenge("invalid_token" if presented else None, description, self._scopes)
        return _Refusal(
            401,
            {"error": "invalid_token", "error_description": description},
            {"www-authenticate": header},
        )

    async def _authenticate(self, headers: dict[str, str]) -> Principal:
        """The caller, from `x-api-key` or `Authorization: Bearer` (never from the URL)."""
        api_key = headers.get("x-api-key")
        authorization = headers.get("authorization")
        if authorization is not None:
            scheme, _, credential = authorization.partition(" ")
            if scheme.lower() != "bearer" or not credential.strip():
                raise self._unauthorized("the Authorization header must be Bearer", True)
            credential = credential.strip()
            if api_key is None and credential.startswith(_API_KEY_PREFIX) and self._keys:
                api_key = credential
            elif api_key is None:
                return await self._token(credential)
        if api_key is None:
            raise self._unauthorized("no credentials", False)
        found = self._keys.lookup(api_key) if self._keys is not None else None
        if found is None or found[1] != self._bridge.name:
            raise self._unauthorized("unknown, expired or revoked API key", True)
        return Principal(f"key:{found[0]}")

    async def _token(self, token: str) -> Principal:
        if self._verifier is None:
            raise self._unauthorized("unknown, expired or revoked API key", True)
        try:
            subject, scopes = await self._verifier.verify(token)
        except InvalidToken as exc:
            raise self._unauthorized(str(exc), True) from None
        return Principal(f"sub:{subject}", scopes)

    def _check_scopes(self, principal: Principal, needed: frozenset[str]) -> None:
        if principal.scopes is None or needed <= principal.scopes:
            return
        # Every scope needed in one challenge, so a client steps up once.
        header = self._challenge(
            "insufficient_scope", "more scopes are needed", needed | self._scopes
        )
        raise _Refusal(
            403,
            {"error": "insufficient_scope", "scope": " ".join(sorted(needed | self._scopes))},
            {"www-authenticate": header},
        )

    def _check_rate(self, principal: Principal) -> None:
        if self._rate is None:
            return
        wait = self._rate.take(principal.id)
        if wait > 0.0:
            raise _Refusal(
                429,
                {"error": "rate_limited", "retry_after_s": math.ceil(wait)},
                {"retry-after": str(math.ceil(wait))},
            )

    def _parse(self, body: bytes) -> Any:
        """The request's JSON, read once by the strict reader with its depth bound: a body
        nested thousands deep is a parse error here, never a RecursionError further on."""
        if not body:
            return None  # a GET or DELETE: the SDK answers it
        try:
            return strict_json.loads(body, self._max_depth)
        except strict_json.JsonError as exc:
            raise _Refusal(
                400,
                {
                    "jsonrpc": "2.0",
                    "id": None,
                    "error": {"code": PARSE_ERROR, "message": f"Parse error: the body {exc}"},
                },
                {},
            ) from None

    def _check_write_scopes(self, principal: Principal, message: Any) -> None:
        """A `tools/call` of a tool that is not read-only needs `write_scopes` too."""
        if not self._write_scopes or principal.scopes is None:
            return
        for item in _messages(message):
            if item.get("method") != "tools/call":
                continue
            params = item.get("params")
            if not isinstance(params, dict):
                continue
            name, arguments = params.get("name"), params.get("arguments") or {}
            if (
                isinstance(name, str)
                and isinstance(arguments, dict)
                and self._writes(name, arguments)
            ):
                self._check_scopes(principal, self._write_scopes)

    def _cancels(self, principal: Principal, message: Any) -> None:
        """A `notifications/cancelled` cancels the caller's own call in flight (see
        `sidecar.bridge.cancels`); the SDK then acknowledges it as usual."""
        for item in _messages(message):
            params = item.get("params")
            if item.get("method") == CANCELLED and "id" not in item and isinstance(params, dict):
                request_id = as_request_id(params.get("requestId"))
                if request_id is not None:
                    self._cancel(principal.id, request_id)


def _messages(message: Any) -> list[dict[str, Any]]:
    """The JSON-RPC messages of a parsed request body (one, or a batch)."""
    items = message if isinstance(message, list) else [message]
    return [item for item in items if isinstance(item, dict)]


def _how_to_authenticate(api_keys: bool, oauth: bool) -> str:
    """What a client must send, in words a person can act on (no quote or backslash: it goes
    into a challenge's quoted string)."""
    key = "an API key of this bridge as Authorization: Bearer <key> or x-api-key: <key>"
    jwt = "an access token of its authorization server as Authorization: Bearer <token>"
    if api_keys and oauth:
        return f"send {key}, or {jwt}"
    return f"send {key if api_keys else jwt}"


def _key_label(principal: Principal | None) -> str:
    """The key id a request is counted under: never the key, never an unchecked value."""
    if principal is None:
        return UNKNOWN_KEY
    kind, _, name = principal.id.partition(":")
    return name if kind == "key" else OAUTH


def _headers(scope: Scope) -> dict[str, str]:
    """Request headers by lower-case name; a repeated header keeps its first value."""
    out: dict[str, str] = {}
    for name, value in scope["headers"]:
        out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return out


async def _read_body(receive: Receive, limit: int, timeout: float) -> bytes:
    """The whole body, within `limit` bytes and `timeout` seconds (a body sent a byte at a
    time would hold its connection as long as the client liked)."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _Refusal(400, {"error": "disconnected"}, {})
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise _Refusal(413, {"error": "request_too_large", "limit_bytes": limit}, {})
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise _Refusal(408, {"error": "request_timeout", "timeout_s": timeout}, {}) from None


async def _forward(app: ASGIApp, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
    """Run the app on the body already read. When the client disconnects first, the app is
    cancelled, and the organ call with it: closing the stream is how a 2026-07-28 client
    cancels."""
    disconnected = asyncio.Event()
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def watch() -> None:  # the only reader of the real `receive` from now on
        while (await receive())["type"] != "http.disconnect":
            pass
        disconnected.set()

    call = asyncio.ensure_future(app(scope, replayed, send))
    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({call, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        call.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if call.done():
        call.result()  # the app's own exception, if any
        return
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await call


async def _json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})
