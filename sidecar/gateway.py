"""The outbound gateway: model SDKs call the sidecar with a placeholder key; the sidecar
forwards to the real upstream with the real credential, streaming both ways unchanged.

Each runtime that uses gateways has its own loopback port (the supervisor opens the listening
sockets, so the port survives sidecar restarts) and its own placeholder. A request is
forwarded only when it arrives on that runtime's port, from a process of the sidecar's user
(read from the kernel's TCP table), with the runtime's current placeholder where the SDK puts
its key, for a gateway the runtime may use. The placeholder is then replaced by the
credential, which is attached only for the gateway's upstream origin. Answers stream back as
they come (server-sent events included), with the credential scrubbed out of their headers and
bodies in every form an echoing upstream may return it in (see sidecar.scrub).

HTTP is uvicorn's httptools protocol serving this module's own ASGI application, and
httpcore2's connection pool on plain asyncio connections sending upstream: the fastest
well-kept pair measured that relays header bytes exactly as sent (see
`benchmarks/gateway_http.py` and the pins in pyproject.toml).
Each port has its own uvicorn server, bounded in connections and request heads, so that one
runtime cannot take the sidecar's descriptors or its event loop through its port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import time
import zlib
from collections.abc import AsyncIterator, Callable
from urllib.parse import parse_qsl, urlencode

import httpcore2
import httpx2
import structlog
import uvicorn
from starlette.types import Receive, Scope, Send

from sidecar.access import Channel
from sidecar.credentials import CredentialBroker, CredentialDenied
from sidecar.gateway_transport import AsyncioBackend
from sidecar.http_server import EmbeddedServer, HttpLimits, bounded_http
from sidecar.scrub import Scrubber, content_codings, scrubbable
from sidecar.vault.store import VaultError
from soma_runtime.config import GatewaySection
from soma_runtime.listeners import (
    HTTP_MAX_CONNECTIONS,
    HTTP_MAX_HEADER_BYTES,
    HTTP_REQUEST_TIMEOUT_S,
)
from soma_runtime.unix import loopback_peer_uid

log = structlog.get_logger(component="gateway")

# What one runtime's port holds (see sidecar.http_server).
LIMITS = HttpLimits("gateway", HTTP_MAX_CONNECTIONS, HTTP_MAX_HEADER_BYTES, HTTP_REQUEST_TIMEOUT_S)

# Answers of known length up to this size are relayed without watching for the client's
# disconnect (a task per request): they arrive promptly once their headers have.
PROMPT_BODY_BYTES = 64 * 1024

# Headers that describe one hop, not the message: never forwarded either way.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)


class GatewayRefusal(Exception):
    """The request is answered by the gateway itself, with this status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# What the upstream client raises when an exchange fails; timeouts are told apart (504).
UPSTREAM_ERRORS = (
    httpcore2.TimeoutException,
    httpcore2.NetworkError,
    httpcore2.ProtocolError,
    httpcore2.UnsupportedProtocol,
    OSError,
)


class Gateway:
    """The ASGI application behind every runtime's gateway port."""

    def __init__(
        self,
        gateways: list[GatewaySection],
        broker: CredentialBroker,
        channel_of: Callable[[str], Channel | None],
        ports: dict[int, str],
        request_level: int | None,
    ) -> None:
        self._gateways = {g.name: g for g in gateways}
        # The level of the one `gateway` event per request (the `[logging] calls` level: the
        # vault's audit rows already record every credential use); None drops it.
        self._request_level = request_level
        self._broker = broker
        self._channel_of = channel_of
        self._ports = ports
        # httpx2's defaults (limits, certificate checks) without its per-request layers, on
        # plain asyncio connections.
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=httpx2.create_ssl_context(trust_env=False),
            network_backend=AsyncioBackend(),
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        runtime = self._ports.get(scope["server"][1], "?")
        # The raw path: still percent-encoded, so %2F or %3F in an upstream path stay as sent.
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        gateway_name, _, rest = raw_path.lstrip("/").partition("/")
        relay: _Relay | None = None
        status = 0
        try:
            relay = await self._forward(scope, receive, runtime, gateway_name, rest)
        except GatewayRefusal as refusal:
            level = log.warning if refusal.status in (401, 403) else log.error
            level(
                "gateway_refused",
                runtime=runtime,
                gateway=gateway_name,
                status=refusal.status,
                reason=refusal.message,
            )
            await _refuse(send, refusal)
            status = refusal.status
        except _ClientGone:  # before its request's body had arrived: nobody to answer
            log.info("client_gone", runtime=runtime, gateway=gateway_name, status=0, bytes=0)
            return
        if relay is not None:
            status = relay.status
            try:
                await relay.send_to(send, receive)
            except UPSTREAM_ERRORS as error:
                # The answer had started: all that is left is to say why it stopped.
                log.warning("relay_failed", status=status, error=type(error).__name__)
            finally:
                await relay.aclose(runtime)
        if self._request_level is None:
            return
        log.log(
            self._request_level,
            "gateway",
            runtime=runtime,
            gateway=gateway_name,
            method=scope["method"],
            path="/" + rest,
            status=status,
            bytes=0 if relay is None else relay.sent,
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
        )

    def _admit(
        self, scope: Scope, runtime: str, gateway_name: str
    ) -> tuple[GatewaySection, Channel]:
        gateway = self._gateways.get(gateway_name)
        if gateway is None:
            raise GatewayRefusal(404, f"no gateway named {gateway_name!r}")
        channel = self._channel_of(runtime)
        if channel is None or channel.placeholder is None:
            raise GatewayRefusal(401, "the runtime of this port is not running")
        if gateway_name not in channel.gateways:
            raise GatewayRefusal(403, f"runtime {runtime!r} may not use gateway {gateway_name!r}")
        # The TCP peer itself: uvicorn's proxy headers are off, no header can stand in for it.
        client_port, server_port = scope["client"][1], scope["server"][1]
        if loopback_peer_uid(client_port, server_port) != os.geteuid():
            raise GatewayRefusal(403, "the connection does not come from the sidecar's user")
        return gateway, channel

    async def _forward(
        self, scope: Scope, receive: Receive, runtime: str, gateway_name: str, rest: str
    ) -> _Relay:
        gateway, channel = self._admit(scope, runtime, gateway_name)
        settings = self._broker.settings(gateway.credential)
        assert settings is not None  # the config guarantees it
        # Pairs, not a dict: a header may repeat (two anthropic-beta values, say).
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        chunked = any(k == "transfer-encoding" for k, _ in headers)
        headers = [(k, v) for k, v in headers if k not in HOP_BY_HOP]
        query = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        presented = _take_placeholder(settings.inject.kind, settings.inject.name, headers, query)
        if presented is None or not channel.placeholder_matches(presented):
            raise GatewayRefusal(401, "missing or wrong placeholder key for this runtime")
        declared = next((v for k, v in headers if k == "content-length"), None)
        if (
            declared is not None
            and declared.isdigit()
            and int(declared) > gateway.max_request_bytes
        ):
            raise GatewayRefusal(
                413, f"request bodies are limited to {gateway.max_request_bytes} bytes"
            )
        try:
            credentials = await self._broker.resolve(
                [gateway.credential],
                runtime=runtime,
                allowed=frozenset({gateway.credential}),
                organ="gateway",
                op=gateway.name,
            )
        except (VaultError, CredentialDenied) as exc:
            raise GatewayRefusal(503, f"credential unavailable: {exc}") from None
        credential = credentials[gateway.credential]
        url = gateway.upstream.rstrip("/") + ("/" + rest if rest else "")
        if query:
            url += "?" + urlencode(query)
        url, extra = credential.attach(url)  # checks the origin as httpx2 parses the URL ...
        target = httpx2.URL(url)  # ... and sends it just as httpx2 would
        # Identity: a compressed answer could not be scrubbed of an echoed credential.
        extra["accept-encoding"] = "identity"
        replaced = {name.lower() for name in extra}
        try:
            added = [(k.encode("ascii"), v.encode("ascii")) for k, v in extra.items()]
        except UnicodeEncodeError:
            raise GatewayRefusal(
                500, f"{gateway.name}: the credential is not ASCII and cannot be sent in a header"
            ) from None
        # As bytes: header values beyond ASCII go on exactly as the client sent them.
        kept = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers if k not in replaced]
        framing = [(b"transfer-encoding", b"chunked")] if chunked and declared is None else []
        body = _Body(receive, gateway.max_request_bytes) if chunked or declared else None
        upstream_request = httpcore2.Request(
            scope["method"],
            httpcore2.URL(
                scheme=target.raw_scheme,
                host=target.raw_host,
                port=target.port,
                target=target.raw_path,
            ),
            headers=[(b"host", target.netloc), *kept, *framing, *added],
            content=body,
            extensions={
                "timeout": {
                    "connect": 10.0,
                    "read": gateway.timeout,
                    "write": gateway.timeout,
                    "pool": gateway.timeout,
                }
            },
        )
        try:
            response = await self._pool.handle_async_request(upstream_request)
        except Exception as exc:
            # What stopped the request's body, if something did, whatever the client made of it.
            if body is not None and body.failure is not None:
                raise body.failure from None
            if isinstance(exc, httpcore2.TimeoutException):
                raise GatewayRefusal(
                    504, f"{gateway.name}: the upstream did not answer in time"
                ) from None
            if isinstance(exc, UPSTREAM_ERRORS):
                raise GatewayRefusal(
                    502, f"{gateway.name}: upstream unreachable ({type(exc).__name__})"
                ) from None
            raise
        if body is not None and body.failure is not None:  # the upstream answered early
            await response.aclose()
            raise body.failure
        names = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
        if not scrubbable(names):
            await response.aclose()
            raise GatewayRefusal(
                502,
                f"{gateway.name}: the upstream answered in a content-encoding the gateway cannot "
                "scrub (it asked for identity)",
            )
        return _Relay(response, content_codings(names), credential.scrubber)


class _TooLarge(GatewayRefusal):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request bodies are limited to {limit} bytes")


class _ClientGone(Exception):
    """The client disconnected before its request's body had all arrived."""


class _Body:
    """The request's body as it arrives, refused once it grows beyond `limit` bytes (a body
    sent without a Content-Length, or with a false one). What stopped it is kept, since the
    upstream client may report the stop as its own error."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self.failure: _TooLarge | _ClientGone | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        received = 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.failure = _ClientGone()
                raise self.failure
            chunk: bytes = message.get("body", b"")
            received += len(chunk)
            if received > self._limit:
                self.failure = _TooLarge(self._limit)
                raise self.failure
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


async def _refuse(send: Send, refusal: GatewayRefusal) -> None:
    body = json.dumps({"error": {"type": "soma_gateway", "message": refusal.message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": refusal.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _take_placeholder(
    kind: str, name: str | None, headers: list[tuple[str, str]], query: list[tuple[str, str]]
) -> str | None:
    """Remove the placeholder from where the SDK put its key, and return it."""
    if kind == "query":
        pairs, key = query, name
    else:
        pairs, key = headers, "authorization" if kind == "bearer" else (name or "").lower()
    found = [v for k, v in pairs if k == key]
    pairs[:] = [(k, v) for k, v in pairs if k != key]
    if not found:
        return None
    if kind != "bearer":
        return found[0]
    scheme, _, token = found[0].partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


class _Decoder:
    """Undoes the gzip or deflate coding of a body the upstream compressed although the
    gateway asked for identity (as httpx2 would), so that it can be scrubbed."""

    def __init__(self, codings: list[str]) -> None:
        # gzip: its header; deflate: zlib-wrapped as the RFC says, raw if a server sends it so.
        self._objects = [
            zlib.decompressobj(zlib.MAX_WBITS | 16 if c == "gzip" else zlib.MAX_WBITS)
            for c in reversed(codings)
        ]
        self._raw = [c == "deflate" for c in reversed(codings)]

    def feed(self, data: bytes) -> bytes:
        for index, decoder in enumerate(self._objects):
            try:
                data = decoder.decompress(data)
            except zlib.error:
                if not self._raw[index]:
                    raise
                self._raw[index] = False
                self._objects[index] = decoder = zlib.decompressobj(-zlib.MAX_WBITS)
                data = decoder.decompress(data)
        return data

    def flush(self) -> bytes:
        data = b""
        for decoder in self._objects:
            data = decoder.decompress(data) + decoder.flush()
        return data


class _Relay:
    """The upstream's answer on its way back: as it comes (SSE intact), without the
    credential in any form, counted, and closed however it ends.

    The scrubbing mask is as long as what it hides, so a Content-Length stays true and the
    body keeps the upstream's framing. A body the upstream compressed although the gateway
    asked for identity is relayed decoded, without its Content-Encoding and Content-Length.
    """

    def __init__(
        self, upstream: httpcore2.Response, codings: list[str], scrubber: Scrubber
    ) -> None:
        self._upstream = upstream
        self._decoder = _Decoder(codings) if codings else None
        self._scrubber = scrubber
        self.status = upstream.status
        self.sent = 0
        self._finished = False
        self._failed = False

    async def send_to(self, send: Send, receive: Receive) -> None:
        """Relay the answer. A short one of known length is relayed at once; anything else
        beside a watch on the client, so that a stream it leaves stops at once (closing the
        upstream request) rather than at the next chunk."""
        scrub = self._scrubber.scrub
        dropped = (
            HOP_BY_HOP | {"content-encoding", "content-length"} if self._decoder else HOP_BY_HOP
        )
        headers = [
            (scrub(k), scrub(v))
            for k, v in self._upstream.headers
            if k.decode("latin-1").lower() not in dropped
        ]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        length = next((v for k, v in headers if k.lower() == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) <= PROMPT_BODY_BYTES:
            await self._pump(send)
            return
        pump = asyncio.create_task(self._pump(send))
        gone = asyncio.create_task(_disconnected(receive))
        try:
            await asyncio.wait((pump, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, gone):
                task.cancel()  # the one still running: a stream the client left, or its watch
        with contextlib.suppress(asyncio.CancelledError):
            await gone
        try:
            await pump
        except asyncio.CancelledError:
            if not gone.done() or gone.cancelled():
                raise  # not the client's leaving: the gateway itself is being stopped

    async def _pump(self, send: Send) -> None:
        body = self._scrubber.stream()
        async for chunk in self._chunks():
            if out := body.feed(chunk):
                self.sent += len(out)
                await send({"type": "http.response.body", "body": out, "more_body": True})
        rest = body.flush()
        self.sent += len(rest)
        await send({"type": "http.response.body", "body": rest})
        self._finished = True

    async def _chunks(self) -> AsyncIterator[bytes]:
        stream = self._upstream.aiter_stream()
        try:
            async for chunk in stream:
                yield self._decoder.feed(chunk) if self._decoder else chunk
        except UPSTREAM_ERRORS:
            self._failed = True  # logged by the gateway as `relay_failed`
            raise
        if self._decoder:
            yield self._decoder.flush()

    async def aclose(self, runtime: str) -> None:
        """Close the upstream request; if the answer was not all relayed, the client went
        away (the relay stops at its disconnect)."""
        if not (self._finished or self._failed):
            log.info("client_gone", runtime=runtime, status=self.status, bytes=self.sent)
        await self._upstream.aclose()


async def _disconnected(receive: Receive) -> None:
    """Returns when the client disconnects (its request's body was all read before)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class GatewayServer:
    """Serves `Gateway` on the inherited listening sockets: one uvicorn server per runtime's
    port, so that the cap on connections is each runtime's own."""

    def __init__(self, app: Gateway, sockets: list[socket.socket], grace: float) -> None:
        config = uvicorn.Config(
            app,
            http=bounded_http(LIMITS),
            ws="none",
            # The TCP peer is the client: no header may stand in for it (see `_admit`).
            proxy_headers=False,
            lifespan="off",
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=math.ceil(grace),
        )
        self._servers = [(EmbeddedServer(config), sock) for sock in sockets]
        self._app = app
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        # The sockets already listen, so connections queue until uvicorn accepts them.
        self._tasks = [
            asyncio.create_task(server.serve(sockets=[sock])) for server, sock in self._servers
        ]

    async def stop(self) -> None:
        for server, _ in self._servers:
            server.should_exit = True
        await asyncio.gather(*self._tasks)
        await self._app.aclose()
