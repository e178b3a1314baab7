"""`soma bench`: the groups of cases, the servers they need, and the run from start to report.

Groups (`--cases`; all by default):
  echo        100 B echo, one call at a time: the raw Unix-socket floor, bare grpc.aio unary
              (sync and asyncio clients) and bidi stream, `sdk.Client` / `sdk.AsyncClient` over
              unary and the stream, against a standalone `soma sidecar`
  inflight    1/8/32/128 calls in flight (asyncio clients): bare unary and stream, the SDK
  payload     100 B / 10 KB / 1 MB through `sdk.Client` against bare unary
  supervised  from inside a runtime of `soma supervise` (session, allow-list, validation,
              credential injection, JSON logs, metrics when built in): `bench.echo` against
              bare unary measured by the same worker
  gateway     a POST through the outbound gateway against the same POST sent directly
  runtimes    the supervised case with 1/16/64 runtimes connected
  bridge      `tools/call` through an MCP bridge instance against a bare `mcp` SDK server
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from contextlib import AsyncExitStack, ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvloop

from soma_bench import GROUPS, report
from soma_bench.bridge import Servers
from soma_bench.clients import Endpoints, Spec, build
from soma_bench.deploy import BenchError, Deployment, start_bare, start_sidecar
from soma_bench.measure import Result, Settings, progress, run_group
from soma_bench.soak import long_run


@dataclass(frozen=True)
class Plan:
    """How much a run measures: the batches, and the points of each sweep."""

    settings: Settings
    inflight: tuple[int, ...]
    payloads: tuple[int, ...]
    runtimes: tuple[int, ...]


# `--quick` (`make bench`): about 1-1.5 minutes on a 2-core machine; the full run, which
# the README's table comes from, sweeps further and takes several minutes.
QUICK = Plan(
    Settings(warmup=200, batches=6, per_batch=300), (1, 32), (100, 10_000, 1_000_000), (1, 16)
)
FULL = Plan(
    Settings(warmup=500, batches=10, per_batch=500),
    (1, 8, 32, 128),
    (100, 10_000, 1_000_000),
    (1, 16, 64),
)


def sdk_specs(prefix: str, kind: str, baseline: str, suffix: str = "", **extra: Any) -> list[Spec]:
    """The SDK's cases, over unary and over the stream; `extra`: more `Spec` keys."""
    specs = []
    for transport in ("unary", "stream"):
        spec = Spec(name=f"{prefix} {transport}{suffix}", kind=kind, baseline=baseline)
        spec["transport"] = transport
        spec.update(extra)  # type: ignore[typeddict-item]
        specs.append(spec)
    return specs


def echo_specs() -> list[Spec]:
    specs = [
        Spec(name="raw uds echo (floor)", kind="raw", baseline=None),
        Spec(name="bare unary (sync)", kind="bare_unary_sync", baseline=None),
        Spec(name="bare unary (aio)", kind="bare_unary_aio", baseline=None),
        Spec(name="bare stream (aio)", kind="bare_stream_aio", baseline="bare unary (aio)"),
    ]
    specs += sdk_specs("Client", "client", "bare unary (sync)")
    specs += sdk_specs("AsyncClient", "async_client", "bare unary (aio)")
    for spec in specs:  # the stream's own baseline is the bare stream
        if spec["name"] == "AsyncClient stream":
            spec["baseline"] = "bare stream (aio)"
    return specs


def inflight_specs(k: int) -> list[Spec]:
    unary = f"bare unary (aio) @{k}"
    specs = [
        Spec(name=unary, kind="bare_unary_aio", baseline=None, inflight=k),
        Spec(name=f"bare stream (aio) @{k}", kind="bare_stream_aio", baseline=unary, inflight=k),
    ]
    return specs + sdk_specs("AsyncClient", "async_client", unary, f" @{k}", inflight=k)


def size_name(size: int) -> str:
    return (
        f"{size // 1_000_000} MB"
        if size >= 1_000_000
        else f"{size // 1000} KB"
        if size >= 1000
        else f"{size} B"
    )


def payload_specs(size: int) -> list[Spec]:
    bare = f"bare unary (sync) {size_name(size)}"
    return [
        Spec(name=bare, kind="bare_unary_sync", baseline=None, payload=size),
        Spec(name=f"Client {size_name(size)}", kind="client", baseline=bare, payload=size),
    ]


def supervised_specs() -> list[Spec]:
    """`bench.echo` (validation and a credential) over both transports, and `system.echo`
    (neither) over unary: the difference is what those two cost per call."""
    bare = "supervised: bare unary (sync)"
    specs = [Spec(name=bare, kind="bare_unary_sync", baseline=None)]
    specs += sdk_specs("supervised: Client", "client", bare, op="bench.echo")
    plain = Spec(name="supervised: Client unary, system.echo", kind="client", baseline=bare)
    plain["transport"] = "unary"
    return [*specs, plain]


def runtimes_specs(n: int) -> list[Spec]:
    bare = f"runtimes {n}: bare unary (sync)"
    params = {"runtimes": n}
    return [
        Spec(name=bare, kind="bare_unary_sync", baseline=None, params=params),
        Spec(
            name=f"runtimes {n}: Client",
            kind="client",
            baseline=bare,
            op="bench.echo",
            params=params,
        ),
    ]


GATEWAY_SPECS = [
    Spec(name="gateway: direct", kind="http_direct", baseline=None),
    Spec(name=report.GATEWAY, kind="http_gateway", baseline="gateway: direct"),
]


async def measure_local(
    title: str, specs: list[Spec], endpoints: Endpoints, settings: Settings
) -> list[Result]:
    async with AsyncExitStack() as stack:
        cases = [await build(spec, endpoints, stack) for spec in specs]
        return await run_group(title, cases, settings)


async def measure_bridge(tmp: Path, settings: Settings) -> list[Result]:
    servers = Servers(tmp / "bridge")
    try:
        async with AsyncExitStack() as stack:
            return await run_group("bridge", await servers.cases(stack, 100), settings)
    finally:
        servers.stop()


def settings_of(args: argparse.Namespace, plan: Plan) -> Settings:
    return Settings(
        warmup=plan.settings.warmup if args.warmup is None else args.warmup,
        batches=args.batches or plan.settings.batches,
        per_batch=args.calls or plan.settings.per_batch,
    )


def measure_supervised(
    tmp: Path, groups: list[str], plan: Plan, settings: Settings, bare: Endpoints
) -> list[dict[str, Any]]:
    """The groups measured inside a supervised runtime: one deployment per runtime count
    (the supervised and gateway groups with one runtime)."""
    results: list[dict[str, Any]] = []
    for n in plan.runtimes if "runtimes" in groups else (1,):
        todo: list[tuple[str, list[Spec]]] = []
        if n == 1 and "supervised" in groups:
            todo.append(("supervised", supervised_specs()))
        if n == 1 and "gateway" in groups:
            todo.append(("gateway", GATEWAY_SPECS))
        if "runtimes" in groups:
            todo.append((f"runtimes {n}", runtimes_specs(n)))
        progress(f"starting soma supervise with {n} runtime(s)")
        deployment = Deployment(tmp / f"supervised-{n}", n, f"http://127.0.0.1:{bare.http_port}")
        try:
            where = {
                "bare_dir": str(bare.bare_dir),
                "bare_pid": bare.bare_pid,
                "http_port": bare.http_port,
                "sidecar_pid": deployment.sidecar_pid,
                "supervisor_pid": deployment.supervisor.pid,
            }
            for title, specs in todo:
                progress(f"{title}: {len(specs)} cases, measured inside runtime bench0")
                plan_ = {"title": title, "specs": specs, "settings": asdict(settings)}
                results += deployment.measure({**plan_, "endpoints": where})
        finally:
            deployment.stop()
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every selected group, in one run; the JSON document."""
    plan = QUICK if args.quick else FULL
    settings = settings_of(args, plan)
    groups: list[str] = args.cases or list(GROUPS)
    began = time.monotonic()
    results: list[dict[str, Any]] = []
    soak = None
    loop = uvloop.new_event_loop()

    def local(title: str, specs: list[Spec], endpoints: Endpoints) -> None:
        progress(f"{title}: {len(specs)} cases")
        found = loop.run_until_complete(measure_local(title, specs, endpoints, settings))
        results.extend(r.as_dict() for r in found)

    try:
        with tempfile.TemporaryDirectory(prefix="soma-bench-") as raw, ExitStack() as stack:
            tmp = Path(raw)
            bare, ready = start_bare(tmp / "bare")
            stack.callback(bare.stop)
            endpoints = Endpoints(tmp / "bare", bare.pid, ready["http_port"])
            if {"echo", "inflight", "payload"} & set(groups) or args.long:
                sidecar, endpoints.target = start_sidecar(tmp / "sidecar")
                stack.callback(sidecar.stop)
                endpoints.sidecar_pid = sidecar.pid
            if "echo" in groups:
                local("echo", echo_specs(), endpoints)
            for k in plan.inflight if "inflight" in groups else ():
                local(f"inflight {k}", inflight_specs(k), endpoints)
            for size in plan.payloads if "payload" in groups else ():
                local(f"payload {size_name(size)}", payload_specs(size), endpoints)
            if {"supervised", "gateway", "runtimes"} & set(groups):
                results += measure_supervised(tmp, groups, plan, settings, endpoints)
            if "bridge" in groups:
                progress("bridge: 2 cases")
                found = loop.run_until_complete(measure_bridge(tmp, settings))
                results.extend(r.as_dict() for r in found)
            if args.long:
                soak = loop.run_until_complete(long_run(endpoints, args.long))
    finally:
        loop.close()
    report.ratios(results)
    return {
        "command": " ".join(["soma", *sys.argv[1:]]),
        "mode": "quick" if args.quick else "full",
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": len(os.sched_getaffinity(0)),
        },
        "settings": asdict(settings),
        "seconds": round(time.monotonic() - began, 1),
        "results": results,
        "targets": [t.as_dict() for t in report.targets(results)],
        "long": soak,
    }


def bench(args: argparse.Namespace) -> int:
    """The `soma bench` handler: measure, print the table, the targets and the verdict, write
    what was asked; with `--fail-on-miss`, exit 1 when a measured target was missed."""
    for path in (args.json, args.plot):  # found out now, not after minutes of measuring
        if path is not None and not path.parent.is_dir():
            print(f"soma bench: no directory {path.parent} for {path}", file=sys.stderr)
            return 2
    if args.plot is not None:
        try:
            report.check_plotting()
        except ImportError as exc:
            print(f"soma bench: {exc}", file=sys.stderr)
            return 2
    try:
        document = run(args)
    except BenchError as exc:
        print(f"soma bench: {exc}", file=sys.stderr)
        return 1
    found, long = document["targets"], document["long"]
    print(report.table(document["results"]))
    print()
    print(report.target_lines(found))
    if long:
        print()
        print(report.long_lines(long))
    print()
    print(report.verdict(found, long))
    if args.json is not None:
        report.write_json(args.json, document)
    if args.plot is not None:
        report.plot(args.plot, document["results"], found, long)
    return 1 if args.fail_on_miss and report.missed(found, long) else 0
