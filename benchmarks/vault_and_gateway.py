"""Vault organ latency through the SDK, and the gateway's added latency over a direct call.

    .venv/bin/python -m benchmarks.vault_and_gateway

Baselines measured in the same run: `system.echo` through the same sidecar (the cost of the
sidecar round trip itself), and the same HTTP request sent straight to the local upstream,
in batches interleaved with the gateway's. Figures are medians of per-batch quantiles, so a
noisy moment on a shared machine moves them little; compare the ratios rather than the
absolute times.

`measure_gateway(tmp)` is the gateway case on its own, for other benchmark drivers: it needs
an empty private directory and the `soma` command of this checkout's virtualenv (it runs a
supervisor with one runtime and a local upstream), takes about ten seconds, and returns
`GatewayFigures`.
"""

from __future__ import annotations

import base64
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx2

import sdk
from tests.fake_upstream import FakeUpstream
from tests.helpers import SupervisorRun, process_environ, set_secret, start_sidecar, wait_until

BATCHES, PER_BATCH = 10, 100


def one_batch(fn: Callable[[int], object], first: int, size: int) -> tuple[float, float]:
    """(p50, p99) in milliseconds of `size` calls of `fn`."""
    times = []
    for i in range(first, first + size):
        started = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.99)]


def measure(fn: Callable[[int], object]) -> tuple[float, float]:
    """(p50, p99) in milliseconds: medians over batches of each batch's quantiles."""
    for i in range(50):
        fn(i)
    batches = [one_batch(fn, batch * PER_BATCH, PER_BATCH) for batch in range(BATCHES)]
    return statistics.median(b[0] for b in batches), statistics.median(b[1] for b in batches)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used: unlike latency, load on a shared
    machine hardly moves it."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vault_figures(tmp: Path) -> None:
    proc, target = start_sidecar(tmp, ["system", "vault"])
    try:
        with sdk.Client(target) as client:
            blob = base64.b64encode(b"x" * 100).decode()
            echo = measure(lambda i: client.call("system.echo", {"data": blob}))
            store = measure(
                lambda i: client.call("vault.store", {"key": f"k{i % 500}", "data": blob})
            )
            retrieve = measure(lambda i: client.call("vault.retrieve", {"key": f"k{i % 500}"}))
    finally:
        proc.stop()
    print("through sdk.Client, 100-byte payload      p50 ms   p99 ms   p50 / echo")
    for name, (p50, p99) in [
        ("system.echo (baseline)", echo),
        ("vault.store", store),
        ("vault.retrieve", retrieve),
    ]:
        print(f"  {name:<38} {p50:7.3f}  {p99:7.3f}   {p50 / echo[0]:6.2f}x")


GATEWAY = """
[[credential]]
name = "model"
hosts = ["{upstream}"]

[[gateway]]
name = "model"
upstream = "{upstream}/v1"
credential = "model"
base_url_env = "OPENAI_BASE_URL"
api_key_env = "OPENAI_API_KEY"

[[runtime]]
name = "bench"
command = ["python", "-c", "import signal; signal.pause()"]
gateways = ["model"]
"""


@dataclass(frozen=True, slots=True)
class GatewayFigures:
    """Milliseconds; the sidecar's CPU time per request through the gateway."""

    direct_p50: float
    direct_p99: float
    gateway_p50: float
    gateway_p99: float
    sidecar_cpu_per_request: float

    @property
    def added_ratio(self) -> float:
        """What the gateway adds at p50, as a multiple of the direct call (target: <= 1)."""
        return (self.gateway_p50 - self.direct_p50) / self.direct_p50


def measure_gateway(
    tmp: Path, batches: int = BATCHES, per_batch: int = PER_BATCH
) -> GatewayFigures:
    """The same POST sent straight to a local upstream and through a supervised runtime's
    gateway, in alternating batches (each round in the other order)."""
    upstream = FakeUpstream()
    body = GATEWAY.format(upstream=upstream.url)
    config = SupervisorRun.write(tmp, body)
    set_secret(config, "model", "sk-bench-0123456789")
    run = SupervisorRun(tmp, body)
    try:
        run.wait_ready()
        wait_until(lambda: run.child("bench")["state"] == "running")
        environ = process_environ(run.child("bench")["pid"])
        sidecar = run.child("sidecar")["pid"]
        base, key = environ["OPENAI_BASE_URL"], environ["OPENAI_API_KEY"]
        payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        with httpx2.Client(trust_env=False, timeout=30) as http:

            def direct(i: int) -> None:
                http.post(
                    f"{upstream.url}/v1/chat/completions",
                    headers={"Authorization": "Bearer sk-bench"},
                    json=payload,
                ).raise_for_status()

            def via(i: int) -> None:
                http.post(
                    f"{base}/chat/completions",
                    headers={"Authorization": f"Bearer {key}"},
                    json=payload,
                ).raise_for_status()

            one_batch(direct, 0, 50)
            one_batch(via, 0, 50)
            figures: dict[str, list[tuple[float, float]]] = {"direct": [], "via": []}
            cpu = 0.0
            for batch in range(batches):
                for name in ("direct", "via") if batch % 2 == 0 else ("via", "direct"):
                    before = cpu_seconds(sidecar)
                    fn = direct if name == "direct" else via
                    figures[name].append(one_batch(fn, batch * per_batch, per_batch))
                    if name == "via":
                        cpu += cpu_seconds(sidecar) - before
    finally:
        run.stop()
        upstream.close()

    def median(name: str, index: int) -> float:
        return statistics.median(b[index] for b in figures[name])

    return GatewayFigures(
        median("direct", 0),
        median("direct", 1),
        median("via", 0),
        median("via", 1),
        cpu / (batches * per_batch) * 1000,
    )


def gateway_figures(tmp: Path) -> None:
    figures = measure_gateway(tmp)
    print("POST /v1/chat/completions to a local upstream   p50 ms   p99 ms")
    print(
        f"  direct (baseline)                              {figures.direct_p50:7.3f}  "
        f"{figures.direct_p99:7.3f}"
    )
    print(
        f"  through the gateway                            {figures.gateway_p50:7.3f}  "
        f"{figures.gateway_p99:7.3f}"
    )
    print(
        f"  added by the gateway: {figures.gateway_p50 - figures.direct_p50:.3f} ms at p50 "
        f"({figures.added_ratio:.2f}x the direct call; "
        f"{figures.gateway_p50 / figures.direct_p50:.2f}x in total)"
    )
    print(
        f"  sidecar CPU per request through the gateway: {figures.sidecar_cpu_per_request:.3f} ms"
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as raw:
        tmp = Path(raw)
        (tmp / "vault").mkdir(mode=0o700)
        vault_figures(tmp / "vault")
        (tmp / "gateway").mkdir(mode=0o700)
        gateway_figures(tmp / "gateway")


if __name__ == "__main__":
    main()
