"""Which HTTP server and client make the fastest streaming proxy on this machine: the
measurement behind the gateway's choice (see sidecar/gateway.py).

    .venv/bin/python -m benchmarks.gateway_http

Each variant is a minimal streaming proxy (request body and answer relayed chunk by chunk,
nothing buffered whole) in its own process on uvloop, as the sidecar runs. The same request
goes to the same local upstream directly and through each variant, in interleaved batches, so
that a noisy moment on a shared machine hits every variant alike; figures are medians of
per-batch medians, and the ratio to the direct call is what to compare.

The aiohttp variants need aiohttp, which the project does not install (see its entry in
pyproject.toml for why the gateway does not use it); without it they are skipped.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpcore2
import httpx2
import uvloop
from starlette.types import Receive, Scope, Send

from benchmarks.vault_and_gateway import cpu_seconds
from sidecar.gateway_transport import AsyncioBackend
from tests.fake_upstream import FakeUpstream

# Sends one request upstream: yields (status, raw headers), then the body's chunks.
Forward = Callable[..., AsyncIterator[Any]]

VARIANTS = (
    "uvicorn-h11+starlette+httpx2",  # the gateway before (round 3)
    "uvicorn-h11+httpx2",
    "uvicorn-httptools+httpx2",
    "uvicorn-httptools+httpcore2",
    "uvicorn-httptools+httpcore2-asyncio",  # the gateway now
    "aiohttp+httpcore2-asyncio",
    "uvicorn-httptools+aiohttp",
    "aiohttp+aiohttp",
)
ROUNDS, PER_BATCH, WARMUP = 12, 100, 100
PAYLOAD = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


# -- the proxies ------------------------------------------------------------------------------


def _httpx2_client() -> Forward:
    client = httpx2.AsyncClient(trust_env=False)

    async def forward(
        method: str, url: str, headers: list[tuple[bytes, bytes]], body: AsyncIterator[bytes]
    ) -> AsyncIterator[Any]:
        request = client.build_request(method, url, headers=headers, content=body)
        response = await client.send(request, stream=True)
        try:
            yield response.status_code, list(response.headers.raw)
            async for chunk in response.aiter_bytes():
                yield chunk
        finally:
            await response.aclose()

    return forward


def _httpcore2_client(backend: httpcore2.AsyncNetworkBackend | None = None) -> Forward:
    pool = httpcore2.AsyncConnectionPool(
        max_connections=100, max_keepalive_connections=20, network_backend=backend
    )

    async def forward(
        method: str, url: str, headers: list[tuple[bytes, bytes]], body: AsyncIterator[bytes]
    ) -> AsyncIterator[Any]:
        netloc = url.split("/")[2].encode()
        headers = [(b"host", netloc), *headers]
        async with pool.stream(method, url, headers=headers, content=body) as response:
            yield response.status, response.headers
            async for chunk in response.aiter_stream():
                yield chunk

    return forward


def _aiohttp_client() -> Forward:
    import aiohttp

    session = aiohttp.ClientSession(auto_decompress=False, trust_env=False)

    async def forward(
        method: str, url: str, headers: list[tuple[bytes, bytes]], body: AsyncIterator[bytes]
    ) -> AsyncIterator[Any]:
        pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
        async with session.request(
            method, url, headers=pairs, data=body, skip_auto_headers=("User-Agent",)
        ) as response:
            yield response.status, [(k, v) for k, v in response.raw_headers]
            async for chunk in response.content.iter_any():
                yield chunk

    return forward


HOP = {b"host", b"connection", b"transfer-encoding", b"keep-alive"}


def _serve_uvicorn(http: str, client: Forward, sock: socket.socket, upstream: str) -> None:
    import uvicorn

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return

        async def body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if chunk := message.get("body", b""):
                    yield chunk
                if not message.get("more_body"):
                    return

        headers = [(k, v) for k, v in scope["headers"] if k not in HOP]
        answer = client(scope["method"], upstream + scope["path"], headers, body())
        status, raw = await anext(answer)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k, v) for k, v in raw if k.lower() not in HOP],
            }
        )
        async for chunk in answer:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    config = uvicorn.Config(app, http=http, lifespan="off", access_log=False, log_config=None)
    asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))


def _serve_starlette(client: Forward, sock: socket.socket, upstream: str) -> None:
    import uvicorn
    from starlette.requests import Request
    from starlette.responses import StreamingResponse

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        headers = [(k, v) for k, v in request.headers.raw if k not in HOP]
        answer = client(request.method, upstream + scope["path"], headers, request.stream())
        status, raw = await anext(answer)

        async def body() -> AsyncIterator[bytes]:
            async for chunk in answer:
                yield chunk

        response = StreamingResponse(body(), status_code=status)
        response.raw_headers = [(k, v) for k, v in raw if k.lower() not in HOP]
        await response(scope, receive, send)

    config = uvicorn.Config(app, http="h11", lifespan="off", access_log=False, log_config=None)
    asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))


def _serve_aiohttp(client: Forward, sock: socket.socket, upstream: str) -> None:
    from aiohttp import web

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        headers = [(k, v) for k, v in request.raw_headers if k.lower() not in HOP]
        answer = client(
            request.method, upstream + request.raw_path, headers, request.content.iter_any()
        )
        status, raw = await anext(answer)
        response = web.StreamResponse(status=status)
        for k, v in raw:
            if k.lower() not in HOP:
                response.headers.add(k.decode("latin-1"), v.decode("latin-1"))
        await response.prepare(request)
        async for chunk in answer:
            await response.write(chunk)
        await response.write_eof()
        return response

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(web.Server(handler), sock=sock)
        await server.serve_forever()

    asyncio.run(main())


CLIENTS: dict[str, Callable[[], Forward]] = {
    "httpx2": _httpx2_client,
    "httpcore2": _httpcore2_client,
    "httpcore2-asyncio": lambda: _httpcore2_client(AsyncioBackend()),
    "aiohttp": _aiohttp_client,
}


def serve(variant: str, fd: int, upstream: str) -> None:
    """Serve one variant's proxy on the listening socket `fd` until terminated."""
    uvloop.install()
    sock = socket.socket(fileno=fd)
    server, _, client_name = variant.partition("+")
    starlette = client_name.startswith("starlette+")
    client_name = client_name.removeprefix("starlette+")
    made: list[Forward] = []

    def client(*args: Any) -> AsyncIterator[Any]:
        if not made:  # made inside the serving loop, on first use
            made.append(CLIENTS[client_name]())
        return made[0](*args)

    if starlette:
        _serve_starlette(client, sock, upstream)
    elif server == "aiohttp":
        _serve_aiohttp(client, sock, upstream)
    else:
        _serve_uvicorn(server.removeprefix("uvicorn-"), client, sock, upstream)


# -- the measurement --------------------------------------------------------------------------


def _batch(http: httpx2.Client, url: str, n: int) -> float:
    """The median latency of `n` requests, in ms."""
    times = []
    for _ in range(n):
        started = time.perf_counter()
        http.post(url, json=PAYLOAD).raise_for_status()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def _has_aiohttp() -> bool:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    upstream = FakeUpstream()
    procs, urls = [], {"direct": f"{upstream.url}/v1/chat/completions"}
    try:
        for variant in VARIANTS:
            if "aiohttp" in variant and not _has_aiohttp():
                print(f"{variant}: skipped (pip install aiohttp to measure it)", file=sys.stderr)
                continue
            sock = socket.create_server(("127.0.0.1", 0))
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.gateway_http",
                        "serve",
                        variant,
                        str(sock.fileno()),
                        upstream.url,
                    ],
                    pass_fds=[sock.fileno()],
                )
            )
            urls[variant] = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions"
            sock.close()
        pids = {name: proc.pid for name, proc in zip(list(urls)[1:], procs, strict=True)}
        p50s: dict[str, list[float]] = {name: [] for name in urls}
        cpu: dict[str, float] = dict.fromkeys(urls, 0.0)
        with httpx2.Client(trust_env=False, timeout=30) as http:
            for url in urls.values():
                _batch(http, url, WARMUP)
            for round_ in range(ROUNDS):
                names = list(urls) if round_ % 2 == 0 else list(reversed(urls))
                for name in names:
                    before = cpu_seconds(pids[name]) if name in pids else 0.0
                    p50s[name].append(_batch(http, urls[name], PER_BATCH))
                    if name in pids:
                        cpu[name] += cpu_seconds(pids[name]) - before
                print(f"round {round_ + 1}/{ROUNDS}", file=sys.stderr)
        direct = statistics.median(p50s["direct"])
        print(
            f"{'streaming proxy (server+client)':<38} p50 ms  spread  x direct added/direct  CPU us"
        )
        for name, values in p50s.items():
            p50 = statistics.median(values)
            cpu_us = cpu[name] / (ROUNDS * PER_BATCH) * 1e6
            print(
                f"  {name:<36} {p50:6.3f}  {max(values) - min(values):6.3f}  {p50 / direct:6.2f}x"
                f"  {(p50 - direct) / direct:9.2f}x  {cpu_us:6.0f}"
            )
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
        upstream.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
