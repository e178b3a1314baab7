"""Nothing an MCP client sends may slow a runtime's channel: a real `soma sidecar` serving a
bridge, a runtime's SDK client calling `system.ping` before and during a flood of the
bridge's port from another process (endless headers, slowloris heads, slow bodies, hundreds
of idle connections). The flood is bounded (the sidecar's descriptors and memory), the
runtime's p50 stays within a few times its idle p50 (the ratio is printed), and the sidecar
keeps serving, bridge included."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx2

import sdk
from sidecar.bridge.published import url_file
from tests.attack import tally
from tests.attack.scale import pick
from tests.helpers import REPO, child_env, health_status, start_sidecar, wait_until
from tests.test_bridge_clients import create_key

REQUEST_TIMEOUT = 2.0
BRIDGE = f"""
[[bridge]]
name = "desk"
expose = ["system.*"]
request_timeout = {REQUEST_TIMEOUT}
"""
MAX_CONNECTIONS = 64  # the bridge's default cap
FLOOD_S = pick(6.0, 30.0)
PING = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
ACCEPT = "application/json, text/event-stream"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def ping_ms(client: sdk.Client) -> float:
    started = time.perf_counter()
    client.call("system.ping", {})
    return (time.perf_counter() - started) * 1000.0


def bridge_answers(url: str, key: str) -> bool:
    try:
        reply = httpx2.post(
            url, headers={"x-api-key": key, "accept": ACCEPT}, json=PING, timeout=5.0
        )
    except httpx2.HTTPError:
        return False
    return reply.status_code == 200


def test_a_bridge_flood_does_not_slow_the_runtimes(tmp_path: Path) -> None:
    proc, target = start_sidecar(tmp_path, ["system"], extra=BRIDGE)
    try:
        published = url_file(tmp_path / "run", "desk")
        wait_until(published.exists, what="the bridge URL file")
        url = published.read_text().strip()
        port = int(url.split(":")[2].split("/")[0])
        key = create_key(tmp_path / "soma.toml")
        pid = proc.pid
        assert bridge_answers(url, key)  # opens the key store: descriptors counted from here
        with sdk.Client(target) as client:
            for _ in range(50):  # warm: the channel, the session, the loop's caches
                ping_ms(client)
            idle = statistics.median(ping_ms(client) for _ in range(300))
            rss_before, fds_before = rss_bytes(pid), fds(pid)

            argv = ["-m", "tests.attack.flood", "127.0.0.1", str(port), str(FLOOD_S), key]
            attacker = subprocess.Popen(
                [sys.executable, *argv],
                cwd=REPO,
                env=child_env(),
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert attacker.stdout is not None
                assert attacker.stdout.readline() == "flooding\n"
                during: list[float] = []
                rss_max, fds_max, bridge_ok, bridge_tries = rss_before, fds_before, 0, 0
                next_bridge_call = time.monotonic() + 1.0
                while attacker.poll() is None:
                    during.append(ping_ms(client))
                    rss_max, fds_max = max(rss_max, rss_bytes(pid)), max(fds_max, fds(pid))
                    if time.monotonic() > next_bridge_call:  # a legitimate MCP client, too
                        bridge_tries += 1
                        bridge_ok += bridge_answers(url, key)
                        next_bridge_call = time.monotonic() + 1.0
                out, _ = attacker.communicate(timeout=30)
            finally:
                if attacker.poll() is None:
                    attacker.kill()
                    attacker.wait()
            report = json.loads(out)
            flood = statistics.median(during)
            print(
                f"\nruntime system.ping p50: idle {idle:.3f} ms, during the bridge flood "
                f"{flood:.3f} ms ({flood / idle:.1f}x idle, {len(during)} calls); sidecar RSS "
                f"+{(rss_max - rss_before) / 2**20:.1f} MiB, descriptors +{fds_max - fds_before}; "
                f"the bridge answered {bridge_ok} of {bridge_tries} calls during the flood; "
                f"attacker: {json.dumps(report)}"
            )
            # After the flood: every connection gone, the sidecar (the same process) serving.
            wait_until(lambda: fds(pid) <= fds_before + 2, 30.0, "the flood's connections closed")
        assert proc.proc.poll() is None, proc.output()
        assert health_status(target) == "SERVING"
        assert bridge_answers(url, key)
    finally:
        proc.stop()
    for kind, counts in report.items():
        tally.count("attacks", f"bridge flood: {kind} connections", counts["opened"])
    # Bounded: each connection beyond the port's cap is closed, every slow one is closed
    # after the request timeout (a head within it, then a body within it), memory stays put.
    assert fds_max - fds_before <= MAX_CONNECTIONS + 8
    assert rss_max - rss_before < 64 * 2**20
    assert report["endless_headers"]["closed"] > 0
    assert report["slowloris"]["closed"] > 0
    assert report["slowloris"]["held_s"] < REQUEST_TIMEOUT + 3.0
    assert report["slow_body"]["held_s"] < 2 * REQUEST_TIMEOUT + 3.0
    # Generous, for a loaded two-core machine on which the attacker takes a core: a few times
    # idle at most, never the hundreds of milliseconds an unbounded header cost.
    assert flood < max(5.0 * idle, 5.0), (idle, flood)
