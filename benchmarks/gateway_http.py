"""Which HTTP server and client make the fastest streaming proxy on this machine: the
measurement behind the gateway's choice (see sidecar/gateway.py).

    .venv/bin/python -m benchmarks.gateway_http

Each variant is a minimal streaming proxy (request body and answer relayed chunk by chunk,
nothing buffered whole) in its own process on uvloop, as the sidecar runs. The same request
goes to the same local upstream directly and through each variant, in interleaved batches, so
that a noisy moment on a shared machine hits every variant alike; figures are medians of
per-batch medians, and the ratio to the direct call is what to compare.

Needs aiohttp and httptools (the gateway's own dependencies) besides uvicorn and httpx2.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable

import httpx2

from tests.fake_upstream import FakeUpstream

VARIANTS = (
    "uvicorn-h11+httpx2",
    "uvicorn-httptools+httpx2",
    "uvicorn-h11+aiohttp",
    "uvicorn-httptools+aiohttp",
    "aiohttp+aiohttp",
    "aiohttp+httpx2",
)
ROUNDS, PER_BATCH, WARMUP = 12, 100, 100
PAYLOAD = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


# -- the proxies ------------------------------------------------------------------------------


def _httpx2_client() -> Callable[..., AsyncIterator[object]]:
    client = httpx2.AsyncClient(trust_env=False)

    async def forward(
        method: str, url: str, headers: list[tuple[bytes, bytes]], body: AsyncIterator[bytes]
    ) -> AsyncIterator[object]:
        request = client.build_request(method, url, headers=headers, content=body)
        response = await client.send(request, stream=True)
        try:
            yield response.status_code, list(response.headers.raw)
            async for chunk in response.aiter_bytes():
                yield chunk
        finally:
            await response.aclose()

    return forward


def _aiohttp_client() -> Callable[..., AsyncIterator[object]]:
    import aiohttp

    session = aiohttp.ClientSession(auto_decompress=False, trust_env=False)

    async def forward(
        method: str, url: str, headers: list[tuple[bytes, bytes]], body: AsyncIterator[bytes]
    ) -> AsyncIterator[object]:
        pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
        async with session.request(
            method, url, headers=pairs, data=body, skip_auto_headers=("User-Agent",)
        ) as response:
            yield response.status, [(k, v) for k, v in response.raw_headers]
            async for chunk in response.content.iter_any():
                yield chunk

    return forward


HOP = {b"host", b"connection", b"transfer-encoding", b"keep-alive"}


def _serve_uvicorn(http: str, client: Callable[..., AsyncIterator[object]], sock: socket.socket,
                   upstream: str) -> None:
    import uvicorn

    async def app(scope: dict, receive: Callable, send: Callable) -> None:  # type: ignore[type-arg]
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
        status, raw = await anext(answer)  # type: ignore[misc]
        await send(
            {"type": "http.response.start", "status": status,
             "headers": [(k, v) for k, v in raw if k.lower() not in HOP]}
        )
        async for chunk in answer:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    config = uvicorn.Config(app, http=http, lifespan="off", access_log=False, log_config=None)
    asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))


def _serve_aiohttp(client: Callable[..., AsyncIterator[object]], sock: socket.socket,
                   upstream: str) -> None:
    from aiohttp import web

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        headers = [(k, v) for k, v in request.raw_headers if k.lower() not in HOP]
        answer = client(request.method, upstream + request.raw_path, headers,
                        request.content.iter_any())
        status, raw = await anext(answer)  # type: ignore[misc]
        response = web.StreamResponse(status=status)
        for k, v in raw:
            if k.lower() not in HOP:
                response.headers.add(k.decode("latin-1"), v.decode("latin-1"))
        await response.prepare(request)
        async for chunk in answer:
            await response.write(chunk)  # type: ignore[arg-type]
        await response.write_eof()
        return response

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(
            web.Server(handler), sock=sock
        )
        await server.serve_forever()

    asyncio.run(main())


def serve(variant: str, fd: int, upstream: str) -> None:
    import uvloop

    uvloop.install()
    sock = socket.socket(fileno=fd)
    server, _, client_name = variant.partition("+")
    async def make() -> Callable[..., AsyncIterator[object]]:
        return _aiohttp_client() if client_name == "aiohttp" else _httpx2_client()
    # The client must be made inside the serving loop: build it lazily on first use.
    holder: list[Callable[..., AsyncIterator[object]]] = []

    def client(*args: object) -> AsyncIterator[object]:
        if not holder:
            holder.append(_aiohttp_client() if client_name == "aiohttp" else _httpx2_client())
        return holder[0](*args)

    del make
    if server == "aiohttp":
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


def main() -> None:
    upstream = FakeUpstream()
    procs, urls = [], {"direct": f"{upstream.url}/v1/chat/completions"}
    try:
        for variant in VARIANTS:
            sock = socket.create_server(("127.0.0.1", 0))
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.gateway_http", "serve", variant,
                     str(sock.fileno()), upstream.url],
                    pass_fds=[sock.fileno()],
                )
            )
            urls[variant] = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions"
            sock.close()
        p50s: dict[str, list[float]] = {name: [] for name in urls}
        with httpx2.Client(trust_env=False, timeout=30) as http:
            for url in urls.values():
                _batch(http, url, WARMUP)
            for round_ in range(ROUNDS):
                names = list(urls) if round_ % 2 == 0 else list(reversed(urls))
                for name in names:
                    p50s[name].append(_batch(http, urls[name], PER_BATCH))
                print(f"round {round_ + 1}/{ROUNDS}", file=sys.stderr)
        direct = statistics.median(p50s["direct"])
        print(f"{'streaming proxy (server+client)':<30} p50 ms  spread   x direct  added x direct")
        for name, values in p50s.items():
            p50 = statistics.median(values)
            spread = max(values) - min(values)
            print(f"  {name:<28} {p50:6.3f}  {spread:6.3f}   {p50 / direct:6.2f}x "
                  f"  {(p50 - direct) / direct:6.2f}x")
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
