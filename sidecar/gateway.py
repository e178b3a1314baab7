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

HTTP is starlette's: `Request.stream()` reads the body, `StreamingResponse` relays the answer
and stops it (closing the upstream request) the moment the client disconnects, and refusals
are `JSONResponse`s. Each port has its own uvicorn server, capped in connections, so that one
runtime cannot take the sidecar's descriptors through its port.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from urllib.parse import parse_qsl, urlencode

import httpx2
import structlog
import uvicorn
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from sidecar.access import Channel
from sidecar.credentials import CredentialBroker, CredentialDenied
from sidecar.scrub import Scrubber, content_codings, scrubbable
from sidecar.vault.store import VaultError
from soma_runtime.config import GatewaySection
from soma_runtime.gateway_sockets import SOCKETS_ENV
from soma_runtime.throttle import RepeatedWarnings
from soma_runtime.unix import loopback_peer_uid

log = structlog.get_logger(component="gateway")

# Connections one runtime's port holds open at once; more are closed as they are accepted.
MAX_CONNECTIONS_PER_PORT = 64

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


def sockets_from_env(environ: MutableMapping[str, str] | None = None) -> dict[str, socket.socket]:
    """The listening sockets the supervisor passed, by runtime (`claims=7,triage=8`)."""
    raw = (os.environ if environ is None else environ).get(SOCKETS_ENV, "")
    sockets = {}
    for item in filter(None, raw.split(",")):
        runtime, _, fd = item.partition("=")
        sockets[runtime] = socket.socket(fileno=int(fd))
    return sockets


class Gateway:
    """The ASGI application behind every runtime's gateway port."""

    def __init__(
        self,
        gateways: list[GatewaySection],
        broker: CredentialBroker,
        channel_of: Callable[[str], Channel | None],
        ports: dict[int, str],
    ) -> None:
        self._gateways = {g.name: g for g in gateways}
        self._broker = broker
        self._channel_of = channel_of
        self._ports = ports
        self._client = httpx2.AsyncClient(follow_redirects=False, trust_env=False)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        request = Request(scope, receive)
        runtime = self._ports.get(scope["server"][1], "?")
        # The raw path: still percent-encoded, so %2F or %3F in an upstream path stay as sent.
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        gateway_name, _, rest = raw_path.lstrip("/").partition("/")
        relay: _Relay | None = None
        response: Response
        try:
            relay = await self._forward(request, runtime, gateway_name, rest)
            response = relay.response()
        except GatewayRefusal as refusal:
            level = log.warning if refusal.status in (401, 403) else log.error
            level(
                "gateway_refused",
                runtime=runtime,
                gateway=gateway_name,
                status=refusal.status,
                reason=refusal.message,
            )
            response = JSONResponse(
                {"error": {"type": "soma_gateway", "message": refusal.message}},
                status_code=refusal.status,
            )
        except ClientDisconnect:  # before its request's body had arrived: nobody to answer
            log.info("client_gone", runtime=runtime, gateway=gateway_name, status=0, bytes=0)
            return
        try:
            await response(scope, receive, send)
        except httpx2.HTTPError as error:
            # The answer had started: all that is left is to say why it stopped.
            log.warning("relay_failed", status=response.status_code, error=type(error).__name__)
        finally:
            if relay is not None:
                await relay.aclose(runtime)
        log.info(
            "gateway",
            runtime=runtime,
            gateway=gateway_name,
            method=request.method,
            path="/" + rest,
            status=response.status_code,
            bytes=0 if relay is None else relay.sent,
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
        )

    def _admit(
        self, request: Request, runtime: str, gateway_name: str
    ) -> tuple[GatewaySection, Channel]:
        gateway = self._gateways.get(gateway_name)
        if gateway is None:
            raise GatewayRefusal(404, f"no gateway named {gateway_name!r}")
        channel = self._channel_of(runtime)
        if channel is None or channel.placeholder is None:
            raise GatewayRefusal(401, "the runtime of this port is not running")
        if gateway_name not in channel.gateways:
            raise GatewayRefusal(403, f"runtime {runtime!r} may not use gateway {gateway_name!r}")
        client_port, server_port = request.scope["client"][1], request.scope["server"][1]
        if loopback_peer_uid(client_port, server_port) != os.geteuid():
            raise GatewayRefusal(403, "the connection does not come from the sidecar's user")
        return gateway, channel

    async def _forward(
        self, request: Request, runtime: str, gateway_name: str, rest: str
    ) -> _Relay:
        gateway, channel = self._admit(request, runtime, gateway_name)
        settings = self._broker.settings(gateway.credential)
        assert settings is not None  # the config guarantees it
        # Pairs, not a dict: a header may repeat (two anthropic-beta values, say).
        headers = [
            (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in request.headers.raw
        ]
        headers = [(k, v) for k, v in headers if k not in HOP_BY_HOP]
        query = parse_qsl(request.scope["query_string"].decode("latin-1"), keep_blank_values=True)
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
        url, extra = credential.attach(url)
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
        upstream_request = self._client.build_request(
            request.method,
            url,
            headers=kept + added,
            content=_limited(request.stream(), gateway.max_request_bytes),
            timeout=httpx2.Timeout(gateway.timeout, connect=10.0),
        )
        try:
            response = await self._client.send(upstream_request, stream=True)
        except _TooLarge as exc:
            raise GatewayRefusal(413, str(exc)) from None
        except httpx2.TimeoutException:
            raise GatewayRefusal(
                504, f"{gateway.name}: the upstream did not answer in time"
            ) from None
        except httpx2.HTTPError as exc:
            raise GatewayRefusal(
                502, f"{gateway.name}: upstream unreachable ({type(exc).__name__})"
            ) from None
        if not scrubbable(response.headers):
            await response.aclose()
            raise GatewayRefusal(
                502,
                f"{gateway.name}: the upstream answered in a content-encoding the gateway cannot "
                "scrub (it asked for identity)",
            )
        return _Relay(response, credential.scrubber)


class _TooLarge(Exception):
    pass


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


async def _limited(body: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """The request's body as it arrives, refused once it grows beyond `limit` bytes (a body
    sent without a Content-Length, or with a false one)."""
    received = 0
    async for chunk in body:
        received += len(chunk)
        if received > limit:
            raise _TooLarge(f"request bodies are limited to {limit} bytes")
        if chunk:
            yield chunk


class _Relay:
    """The upstream's answer on its way back: as it comes (SSE intact), without the
    credential in any form, counted, and closed however it ends.

    The scrubbing mask is as long as what it hides, so a Content-Length stays true and the
    body keeps the upstream's framing. A body the upstream compressed although the gateway
    asked for identity is relayed decoded, without its Content-Encoding and Content-Length.
    """

    def __init__(self, upstream: httpx2.Response, scrubber: Scrubber) -> None:
        self._upstream = upstream
        self._scrubber = scrubber
        self.sent = 0
        self._finished = False
        self._failed = False

    def response(self) -> StreamingResponse:
        upstream, scrub = self._upstream, self._scrubber.scrub
        decoded = bool(content_codings(upstream.headers))
        dropped = HOP_BY_HOP | {"content-encoding", "content-length"} if decoded else HOP_BY_HOP
        response = StreamingResponse(self._body(), status_code=upstream.status_code)
        # Raw pairs, not a mapping: a header may repeat, and stays as the upstream sent it.
        response.raw_headers = [
            (scrub(k), scrub(v))
            for k, v in upstream.headers.raw
            if k.decode("latin-1").lower() not in dropped
        ]
        return response

    async def _body(self) -> AsyncIterator[bytes]:
        body = self._scrubber.stream()
        try:
            async for chunk in self._upstream.aiter_bytes():
                if out := body.feed(chunk):
                    self.sent += len(out)
                    yield out
        except httpx2.HTTPError:
            self._failed = True  # logged by the gateway as `relay_failed`
            raise
        if rest := body.flush():
            self.sent += len(rest)
            yield rest
        self._finished = True

    async def aclose(self, runtime: str) -> None:
        """Close the upstream request; if the answer was not all relayed, the client went
        away: StreamingResponse stops relaying at its disconnect."""
        if not (self._finished or self._failed):
            log.info(
                "client_gone", runtime=runtime, status=self._upstream.status_code, bytes=self.sent
            )
        await self._upstream.aclose()


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the sidecar's loop: the sidecar, not uvicorn, owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _CappedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection as soon as it is accepted when its
    port already holds `MAX_CONNECTIONS_PER_PORT`. uvicorn's own `limit_concurrency` is not
    enough: it answers requests with 503, while a connection that sends none holds a
    descriptor of the sidecar for as long as the runtime keeps it open."""

    refusals = RepeatedWarnings(log)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > MAX_CONNECTIONS_PER_PORT:
            port = self.server[1] if self.server else None
            self.refusals.warning("gateway_connections_capped", port, port=port)
            transport.close()


class GatewayServer:
    """Serves `Gateway` on the inherited listening sockets: one uvicorn server per runtime's
    port, so that the cap on connections is each runtime's own."""

    def __init__(self, app: Gateway, sockets: list[socket.socket], grace: float) -> None:
        config = uvicorn.Config(
            app,
            http=_CappedH11,
            lifespan="off",
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=math.ceil(grace),
        )
        self._servers = [(_EmbeddedServer(config), sock) for sock in sockets]
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
