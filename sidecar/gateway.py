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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx2
import structlog
import uvicorn

from sidecar.access import Channel
from sidecar.credentials import Credential, CredentialBroker, CredentialDenied
from sidecar.scrub import content_codings, scrubbable
from sidecar.vault.store import VaultError
from soma_runtime.config import GatewaySection
from soma_runtime.gateway_sockets import SOCKETS_ENV
from soma_runtime.unix import loopback_peer_uid

log = structlog.get_logger(component="gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

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
        runtime = self._ports.get(scope["server"][1], "?")
        # The raw path: still percent-encoded, so %2F or %3F in an upstream path stay as sent.
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        gateway_name, _, rest = raw_path.lstrip("/").partition("/")
        status, sent = 0, 0
        try:
            status, sent = await self._forward(scope, receive, send, runtime, gateway_name, rest)
        except GatewayRefusal as refusal:
            status = refusal.status
            level = log.warning if status in (401, 403) else log.error
            level(
                "gateway_refused",
                runtime=runtime,
                gateway=gateway_name,
                status=status,
                reason=refusal.message,
            )
            await _error(send, status, refusal.message)
        log.info(
            "gateway",
            runtime=runtime,
            gateway=gateway_name,
            method=scope["method"],
            path="/" + rest,
            status=status,
            bytes=sent,
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
        client_port, server_port = scope["client"][1], scope["server"][1]
        if loopback_peer_uid(client_port, server_port) != os.geteuid():
            raise GatewayRefusal(403, "the connection does not come from the sidecar's user")
        return gateway, channel

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, runtime: str, gateway_name: str, rest: str
    ) -> tuple[int, int]:
        gateway, channel = self._admit(scope, runtime, gateway_name)
        settings = self._broker.settings(gateway.credential)
        assert settings is not None  # the config guarantees it
        # Pairs, not a dict: a header may repeat (two anthropic-beta values, say).
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        headers = [(k, v) for k, v in headers if k not in HOP_BY_HOP]
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
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
        body_done = asyncio.Event()
        request = self._client.build_request(
            scope["method"],
            url,
            headers=kept + added,
            content=_body(receive, gateway.max_request_bytes, body_done),
            timeout=httpx2.Timeout(gateway.timeout, connect=10.0),
        )
        try:
            response = await self._client.send(request, stream=True)
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
        return await _relay(response, send, _disconnected(receive, body_done), credential)


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


async def _body(receive: Receive, limit: int, done: asyncio.Event) -> AsyncIterator[bytes]:
    received = 0
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                raise _TooLarge(f"request bodies are limited to {limit} bytes")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return
    finally:
        done.set()


async def _disconnected(receive: Receive, body_done: asyncio.Event) -> None:
    """Returns when the client goes away (listening only once its body has been read)."""
    await body_done.wait()
    while (await receive())["type"] != "http.disconnect":
        pass


async def _relay(
    response: httpx2.Response, send: Send, disconnected: Awaitable[None], credential: Credential
) -> tuple[int, int]:
    """Stream the upstream's answer back as it comes (SSE intact) without the credential in
    any form, and stop reading it as soon as the client disconnects.

    The scrubbing mask is as long as what it hides, so a Content-Length stays true and the
    body keeps the upstream's framing. A body the upstream compressed although the gateway
    asked for identity is relayed decoded, without its Content-Encoding and Content-Length.
    """
    sent = 0
    scrubber = credential.scrubber
    decoded = bool(content_codings(response.headers))
    dropped = HOP_BY_HOP | {"content-encoding", "content-length"} if decoded else HOP_BY_HOP

    async def pump() -> None:
        nonlocal sent
        headers = [
            (scrubber.scrub(k), scrubber.scrub(v))
            for k, v in response.headers.raw
            if k.decode("latin-1").lower() not in dropped
        ]
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        body = scrubber.stream()
        async for chunk in response.aiter_bytes():
            if out := body.feed(chunk):
                sent += len(out)
                await send({"type": "http.response.body", "body": out, "more_body": True})
        rest = body.flush()
        sent += len(rest)
        await send({"type": "http.response.body", "body": rest, "more_body": False})

    relay, gone = asyncio.ensure_future(pump()), asyncio.ensure_future(disconnected)
    try:
        await asyncio.wait({relay, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not relay.done():
            log.info("client_gone", status=response.status_code, bytes=sent)
        relay.cancel()
        gone.cancel()
        await asyncio.gather(relay, gone, return_exceptions=True)
        if relay.done() and not relay.cancelled() and (error := relay.exception()) is not None:
            # The answer had started: all that is left is to say why it stopped.
            log.warning("relay_failed", status=response.status_code, error=type(error).__name__)
    finally:
        await response.aclose()
    return response.status_code, sent


async def _error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": {"type": "soma_gateway", "message": message}}).encode()
    with contextlib.suppress(Exception):  # the response may already have started
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the sidecar's loop: the sidecar, not uvicorn, owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class GatewayServer:
    """Serves `Gateway` on the inherited listening sockets."""

    def __init__(self, app: Gateway, sockets: list[socket.socket], grace: float) -> None:
        config = uvicorn.Config(
            app,
            lifespan="off",
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=math.ceil(grace),
        )
        self._server = _EmbeddedServer(config)
        self._sockets = sockets
        self._app = app
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # The sockets already listen, so connections queue until uvicorn accepts them.
        self._task = asyncio.create_task(self._server.serve(sockets=self._sockets))

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        await self._app.aclose()
