"""Vault organ latency through the SDK, and the gateway's added latency over a direct call.

    .venv/bin/python -m benchmarks.vault_and_gateway

Baselines measured in the same run: `system.echo` through the same sidecar (the cost of the
sidecar round trip itself), and the same HTTP request sent straight to the local upstream.
Figures are medians of per-batch medians, so a noisy moment on a shared machine moves them
little; compare the ratios rather than the absolute times.
"""

from __future__ import annotations

import base64
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx2

import sdk
from tests.fake_upstream import FakeUpstream
from tests.helpers import SupervisorRun, process_environ, set_secret, start_sidecar, wait_until

BATCHES, PER_BATCH = 10, 100


def measure(fn: Callable[[int], object]) -> tuple[float, float]:
    """(p50, p99) in milliseconds: medians over batches of each batch's quantiles."""
    for i in range(50):
        fn(i)
    p50s, p99s = [], []
    for batch in range(BATCHES):
        times = []
        for i in range(PER_BATCH):
            started = time.perf_counter()
            fn(batch * PER_BATCH + i)
            times.append((time.perf_counter() - started) * 1000)
        times.sort()
        p50s.append(times[len(times) // 2])
        p99s.append(times[int(len(times) * 0.99)])
    return statistics.median(p50s), statistics.median(p99s)


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


def gateway_figures(tmp: Path) -> None:
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
            direct = measure(
                lambda i: http.post(
                    f"{upstream.url}/v1/chat/completions",
                    headers={"Authorization": "Bearer sk-bench"},
                    json=payload,
                ).raise_for_status()
            )
            cpu_before = cpu_seconds(sidecar)
            via = measure(
                lambda i: http.post(
                    f"{base}/chat/completions",
                    headers={"Authorization": f"Bearer {key}"},
                    json=payload,
                ).raise_for_status()
            )
            calls = 50 + BATCHES * PER_BATCH  # measure() warms up with 50
            cpu_per_call = (cpu_seconds(sidecar) - cpu_before) / calls * 1000
    finally:
        run.stop()
        upstream.close()
    print("POST /v1/chat/completions to a local upstream   p50 ms   p99 ms")
    print(f"  direct (baseline)                              {direct[0]:7.3f}  {direct[1]:7.3f}")
    print(f"  through the gateway                            {via[0]:7.3f}  {via[1]:7.3f}")
    print(
        f"  added by the gateway: {via[0] - direct[0]:.3f} ms at p50 "
        f"({via[0] / direct[0]:.2f}x the direct call)"
    )
    print(f"  sidecar CPU per call through the gateway: {cpu_per_call:.3f} ms")


def main() -> None:
    with tempfile.TemporaryDirectory() as raw:
        tmp = Path(raw)
        (tmp / "vault").mkdir(mode=0o700)
        vault_figures(tmp / "vault")
        (tmp / "gateway").mkdir(mode=0o700)
        gateway_figures(tmp / "gateway")


if __name__ == "__main__":
    main()
