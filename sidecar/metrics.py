"""Prometheus metrics of the sidecar, and the endpoint that serves them (`[metrics] listen`).

The call path only increments integers it keeps anyway (the executive's per-function SLO
stats, the channels' call and denial counts, the bridge keys' request counts);
`SomaCollector` copies them at scrape time, in the event loop (a few µs a function), and the
metric families and their text are built in a thread, so calls go on during a scrape.

The endpoint is a small HTTP/1.1 server (h11 parses, one request per connection): at most
`max_connections` connections at once, each with `timeout` seconds from connection to last
byte, so a slow or hostile scraper never stalls the event loop. A connection beyond the cap
closes the oldest one that has not sent its request yet (a scraper sends it at once), so
idle connections, however many a local user opens, cannot keep a real scrape out; only when
every connection is being answered is the newcomer closed (the policy of every HTTP port,
`sidecar.http_server.to_close`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import h11
import structlog
from prometheus_client import ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from sidecar.bridge.keys import KeyCounts
from sidecar.channels import ChannelRegistry
from sidecar.http_server import to_close
from soma_runtime import Executive
from soma_runtime.config import ConfigError, MetricsSection, SomaConfig
from soma_runtime.listeners import tcp_listener
from soma_runtime.slo import ROUND_BOUNDS_MS, FunctionStatsSnapshot
from soma_runtime.throttle import RepeatedWarnings
from soma_runtime.unix import prepare_socket_path, private_umask, remove_socket

log = structlog.get_logger(component="sidecar")

PATH = "/metrics"
_MAX_HEAD = 8192  # bytes of request line and headers; a scrape sends a few hundred
# The histogram's `le` bounds in seconds, written from the same decimals as the millisecond
# bounds they count at (2.5 ms is "0.0025", not 2.5 / 1000).
_LE = tuple(repr(float(f"{bound!r}e-3")) for bound in ROUND_BOUNDS_MS)


class SomaCollector:
    """The sidecar's own counters. `read()` copies them; it runs in the event loop's thread
    (they are the loop's, and a histogram read between two steps of a call adds up)."""

    def __init__(self, executive: Executive, channels: ChannelRegistry, keys: KeyCounts) -> None:
        self._executive = executive
        self._channels = channels
        self._keys = keys

    def read(self) -> Reading:
        return Reading(
            self._executive.function_stats(),
            [(c.name, c.calls, c.denials) for c in self._channels.channels()],
            list(self._keys.calls.items()),
            list(self._keys.rejections.items()),
        )


@dataclass(frozen=True, slots=True)
class Reading(Collector):
    """The counters as read at one moment, made into metric families by `collect()` (in
    any thread: most of a scrape's cost is there and in the formatting after it)."""

    functions: list[FunctionStatsSnapshot]
    runtimes: list[tuple[str, int, int]]
    key_calls: list[tuple[tuple[str, str], int]]
    key_rejections: list[tuple[tuple[str, str], int]]

    def collect(self) -> Iterable[Metric]:
        yield from self._functions()
        calls = CounterMetricFamily(
            "soma_runtime_calls", "Calls a runtime made on its channel.", labels=["runtime"]
        )
        denials = CounterMetricFamily(
            "soma_runtime_denials",
            "Calls refused PERMISSION_DENIED (allow-list or credential).",
            labels=["runtime"],
        )
        for runtime, n_calls, n_denials in self.runtimes:
            calls.add_metric([runtime], n_calls)
            denials.add_metric([runtime], n_denials)
        key_calls = CounterMetricFamily(
            "soma_bridge_key_calls",
            "Requests a bridge let through, by API key id ('oauth': bearer tokens).",
            labels=["bridge", "key"],
        )
        key_rejections = CounterMetricFamily(
            "soma_bridge_key_rejections",
            "Requests a bridge refused, by API key id ('unknown': no key was recognised).",
            labels=["bridge", "key"],
        )
        for family, counts in ((key_calls, self.key_calls), (key_rejections, self.key_rejections)):
            for (bridge, key), n in counts:
                family.add_metric([bridge, key], n)
        yield from (calls, denials, key_calls, key_rejections)

    def _functions(self) -> Iterable[Metric]:
        labels = ["function"]
        calls = CounterMetricFamily("soma_function_calls", "Calls of a function.", labels=labels)
        errors = CounterMetricFamily(
            "soma_function_errors",
            "Failed calls of a function, by error kind.",
            labels=["function", "kind"],
        )
        in_flight = GaugeMetricFamily(
            "soma_function_in_flight", "Calls running now.", labels=labels
        )
        latency = HistogramMetricFamily(
            "soma_function_latency_seconds", "Latency of a function's calls.", labels=labels
        )
        slo_p95 = GaugeMetricFamily(
            "soma_function_slo_p95_seconds", "The function's p95 latency objective.", labels=labels
        )
        slo_errors = GaugeMetricFamily(
            "soma_function_slo_max_error_rate",
            "The function's error budget (caller errors do not count against it).",
            labels=labels,
        )
        for stats in self.functions:
            name = [stats.name]
            calls.add_metric(name, stats.count)
            for kind, n in stats.errors_by_kind.items():
                errors.add_metric([stats.name, kind], n)
            in_flight.add_metric(name, stats.in_flight)
            buckets = [*zip(_LE, stats.cumulative, strict=True), ("+Inf", stats.count)]
            latency.add_metric(name, buckets, stats.sum_ms / 1000.0)
            slo_p95.add_metric(name, stats.slo_p95_ms / 1000.0)
            slo_errors.add_metric(name, stats.slo_max_error_rate)
        yield from (calls, errors, in_flight, latency, slo_p95, slo_errors)


@contextlib.asynccontextmanager
async def serve_metrics(config: SomaConfig, collector: SomaCollector) -> AsyncIterator[str]:
    """Serve the sidecar's counters and the process's own (CPU, memory, descriptors) on
    `[metrics].listen` while the block runs; yields the address."""
    settings = config.metrics
    assert settings.listen is not None
    handler = _Endpoint(collector, settings)
    try:
        server, address = await _listen(config, settings.listen, handler)
    except OSError as exc:
        raise ConfigError(
            f"metrics.listen: cannot serve on {settings.listen}: {exc.strerror or exc}"
        ) from None
    log.info("metrics_serving", address=address)
    try:
        yield address
    finally:
        server.close()
        handler.abort_all()
        await server.wait_closed()
        if address.startswith("unix:"):
            remove_socket(Path(address.removeprefix("unix:")))


async def _listen(
    config: SomaConfig, listen: str, handler: _Endpoint
) -> tuple[asyncio.Server, str]:
    if listen.startswith("unix:"):
        path = config.resolve(Path(listen.removeprefix("unix:")))
        prepare_socket_path(path)  # private directory, nothing live or foreign in the way
        with private_umask():
            server = await asyncio.start_unix_server(handler.connection, os.fspath(path))
        path.chmod(0o600)
        return server, f"unix:{path}"
    host, _, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    sock = tcp_listener(host, int(port))
    sock.setblocking(False)
    server = await asyncio.start_server(handler.connection, sock=sock)
    shown = f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    return server, f"http://{shown}:{sock.getsockname()[1]}{PATH}"


class _Endpoint:
    def __init__(self, collector: SomaCollector, settings: MetricsSection) -> None:
        self._collector = collector
        self._process = ProcessCollector(registry=None)
        self._settings = settings
        self._open: dict[asyncio.StreamWriter, float] = {}  # when each arrived
        self._answering: set[asyncio.StreamWriter] = set()  # their request has arrived
        self._refusals = RepeatedWarnings(log)

    def abort_all(self) -> None:
        for writer in self._open:
            writer.transport.abort()

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open[writer] = asyncio.get_running_loop().time()
        done = False
        try:
            closing = to_close(
                self._open, self._settings.max_connections, self._idle, self._open.__getitem__
            )
            if closing is not None:
                self._refusals.warning("metrics_connections_capped", None)
                closing.transport.abort()
                if closing is writer:
                    return  # every other connection is being answered
            async with asyncio.timeout(self._settings.timeout):
                await self._exchange(reader, writer)
            done = True
        except (ConnectionError, TimeoutError):
            pass  # the scraper went away or took too long: its slot is freed either way
        finally:
            del self._open[writer]
            self._answering.discard(writer)
            if done:
                writer.close()
            else:
                writer.transport.abort()  # never wait on a peer that does not read
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _idle(self, writer: asyncio.StreamWriter) -> bool:
        return writer not in self._answering and not writer.transport.is_closing()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        try:
            event = conn.next_event()
            while event is h11.NEED_DATA:
                conn.receive_data(await reader.read(4096))
                event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            writer.write(_answer(conn, status, b"bad request\n", "text/plain", head_only=False))
            await writer.drain()
            return
        if not isinstance(event, h11.Request):
            return  # closed before a request
        self._answering.add(writer)  # no newcomer closes it now
        status, body, content_type, extra = await self._respond(event)
        head_only = event.method == b"HEAD"
        writer.write(_answer(conn, status, body, content_type, head_only, extra))
        await writer.drain()

    async def _respond(self, request: h11.Request) -> tuple[int, bytes, str, list[tuple[str, str]]]:
        if request.target.split(b"?", 1)[0] != PATH.encode():
            return 404, b"not found: the metrics are at /metrics\n", "text/plain", []
        if request.method not in (b"GET", b"HEAD"):
            return 405, b"method not allowed\n", "text/plain", [("allow", "GET, HEAD")]
        accept = ",".join(v.decode("latin-1") for k, v in request.headers if k == b"accept")
        encoder, content_type = choose_encoder(accept)
        # Read in the loop, made into text in a thread: calls go on meanwhile.
        scrape = _Collectors(self._collector.read(), self._process)
        return 200, await asyncio.to_thread(encoder, scrape), content_type, []


class _Collectors(Collector):
    def __init__(self, *collectors: Collector) -> None:
        self._collectors = collectors

    def collect(self) -> Iterable[Metric]:
        for collector in self._collectors:
            yield from collector.collect()


def _answer(
    conn: h11.Connection,
    status: int,
    body: bytes,
    content_type: str,
    head_only: bool,
    extra: list[tuple[str, str]] | None = None,
) -> bytes:
    headers = [
        ("content-type", content_type),
        ("content-length", str(len(body))),
        ("connection", "close"),
        *(extra or []),
    ]
    out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    if not head_only:
        out += conn.send(h11.Data(data=body)) or b""
    return out + (conn.send(h11.EndOfMessage()) or b"")
