"""The metrics endpoint of a real sidecar, scraped over real sockets after real calls, and
`soma status` with each function against its SLO."""

from __future__ import annotations

import itertools
import json
import secrets
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

import sdk
from sidecar.bridge.published import url_file
from soma_cli.status import format_sidecar
from soma_runtime.config import ConfigError, parse_config
from soma_runtime.slo import BUCKET_BOUNDS_MS, MAX_ERROR_KINDS, ROUND_BOUNDS_MS, FunctionStats
from tests.fixtures.organs import SLO
from tests.helpers import (
    Process,
    SupervisorRun,
    read_report,
    run_soma,
    start_sidecar,
    wait_until,
)
from tests.test_bridge_clients import create_key

GET = b"GET /metrics HTTP/1.1\r\nHost: metrics\r\n\r\n"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_address(proc: Process) -> str:
    """Where the sidecar serves its metrics, from its `metrics_serving` log event."""

    def logged() -> str | None:
        for line in proc.output().splitlines():
            if '"metrics_serving"' in line:
                return str(json.loads(line)["address"])
        return None

    return wait_until(logged, what="the metrics endpoint")


def connect(address: str) -> socket.socket:
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(address.removeprefix("unix:"))
        return sock
    host, port = address.removeprefix("http://").split("/")[0].rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def closed(sock: socket.socket) -> bool:
    """Whether the server closes the connection without answering (waits at most 10 s)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def exchange(address: str, request: bytes = GET) -> tuple[int, bytes, bytes]:
    """One request; the status, the head and the body (the server closes after answering)."""
    with connect(address) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), head, body


def scrape(address: str) -> Samples:
    status, head, body = exchange(address)
    assert status == 200, body
    assert b"content-type: text/plain; version=" in head.lower()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def buckets(samples: Samples, function: str) -> dict[str, float]:
    name = "soma_function_latency_seconds_bucket"
    return {
        dict(labels)["le"]: v
        for (n, labels), v in samples.items()
        if n == name and dict(labels)["function"] == function
    }


METRICS_TCP = """
[metrics]
listen = "127.0.0.1:0"

[[bridge]]
name = "desk"
expose = ["system.*"]
"""


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[tuple[Process, str]]:
    proc, target = start_sidecar(tmp_path, ["system", "tests.fixtures.organs:Acme"], METRICS_TCP)
    yield proc, target
    assert proc.stop() == 0, proc.output()


def test_scrape_counts_calls_errors_latency_and_runtimes(sidecar: tuple[Process, str]) -> None:
    proc, target = sidecar
    with sdk.Client(target) as client:
        for i in range(5):
            client.call("system.echo", {"i": i})
        for _ in range(2):
            assert client.stimulate("acme.refuse", {}).error == "NotFound"
        assert client.stimulate("acme.greet", {}).error == "InvalidInput"
        client.call("acme.slow", {"ms": 60})
    samples = scrape(metrics_address(proc))

    assert value(samples, "soma_function_calls_total", function="system.echo") == 5
    assert value(samples, "soma_function_errors_total", function="acme.refuse", kind="NotFound")
    assert (
        value(samples, "soma_function_errors_total", function="acme.refuse", kind="NotFound") == 2
    )
    assert (
        value(samples, "soma_function_errors_total", function="acme.greet", kind="InvalidInput")
        == 1
    )
    assert (
        value(samples, "soma_function_errors_total", function="system.echo", kind="Internal")
        is None
    )
    assert value(samples, "soma_function_in_flight", function="acme.slow") == 0
    assert value(samples, "soma_function_slo_p95_seconds", function="acme.slow") == 1.0
    assert value(samples, "soma_function_slo_max_error_rate", function="acme.greet") == 0.01

    echo = buckets(samples, "system.echo")
    assert list(echo) == [repr(b / 1000) for b in ROUND_BOUNDS_MS] + ["+Inf"]
    counts = list(echo.values())
    assert counts == sorted(counts) and counts[-1] == 5  # cumulative, adding up to the calls
    assert value(samples, "soma_function_latency_seconds_count", function="system.echo") == 5
    slow = buckets(samples, "acme.slow")
    # About 60 ms: above every bound up to 50 ms, counted from 100 ms on if it was quick.
    assert slow["0.05"] == 0 and slow["+Inf"] == 1
    # uvloop's timers count from the loop's cached clock in whole milliseconds, so a 60 ms
    # sleep can measure 59.x ms from the executive's own clock (seen: 59.4).
    assert value(samples, "soma_function_latency_seconds_sum", function="acme.slow") >= 0.055

    assert value(samples, "soma_runtime_calls_total", runtime="local") == 9
    assert value(samples, "soma_runtime_denials_total", runtime="local") == 0
    assert value(samples, "process_resident_memory_bytes")


def test_bridge_keys_are_counted_by_id_and_random_keys_make_no_series(
    sidecar: tuple[Process, str], tmp_path: Path
) -> None:
    proc, _ = sidecar
    published = url_file(tmp_path / "run", "desk")
    wait_until(published.exists, what="the bridge URL file")
    url = published.read_text().strip()
    key = create_key(tmp_path / "soma.toml")
    key_id = key.split("_")[1]
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    accept = {"accept": "application/json, text/event-stream"}
    random_ids = [secrets.token_hex(8) for _ in range(3)]
    with httpx2.Client(timeout=10.0) as http:
        for _ in range(2):
            reply = http.post(url, headers={**accept, "x-api-key": key}, json=ping)
            assert reply.status_code == 200
        for random_id in random_ids:  # well-formed, unknown keys of a hostile client
            guessed = f"soma_{random_id}_{secrets.token_hex(32)}"
            reply = http.post(url, headers={**accept, "authorization": f"Bearer {guessed}"})
            assert reply.status_code == 401
    address = metrics_address(proc)
    samples = scrape(address)
    assert value(samples, "soma_bridge_key_calls_total", bridge="desk", key=key_id) == 2
    assert value(samples, "soma_bridge_key_rejections_total", bridge="desk", key="unknown") == 3
    body = exchange(address)[2].decode()
    assert key.split("_")[2] not in body
    assert not any(random_id in body for random_id in random_ids)


def test_the_endpoint_answers_only_scrapes(sidecar: tuple[Process, str]) -> None:
    address = metrics_address(sidecar[0])
    assert exchange(address, b"GET / HTTP/1.1\r\nHost: m\r\n\r\n")[0] == 404
    status, head, _ = exchange(address, b"POST /metrics HTTP/1.1\r\nHost: m\r\n\r\n")
    assert status == 405 and b"allow: get, head" in head.lower()
    assert exchange(address, b"NONSENSE\r\n\r\n")[0] == 400
    status, head, body = exchange(address, b"HEAD /metrics HTTP/1.1\r\nHost: m\r\n\r\n")
    assert status == 200 and body == b"" and b"content-length: " in head.lower()
    openmetrics = (
        b"GET /metrics HTTP/1.1\r\nHost: m\r\nAccept: application/openmetrics-text\r\n\r\n"
    )
    status, head, body = exchange(address, openmetrics)
    assert b"application/openmetrics-text" in head and body.endswith(b"# EOF\n")


def test_idle_connections_cannot_keep_a_scrape_out(tmp_path: Path) -> None:
    """A local user fills the endpoint's connections and keeps opening more, sending nothing
    (or half a request): each real scrape is still answered at once, well within the
    per-scrape timeout, because a newcomer closes the oldest connection with no request."""
    timeout = 5.0
    extra = f'\n[metrics]\nlisten = "127.0.0.1:0"\nmax_connections = 2\ntimeout = {timeout}\n'
    proc, target = start_sidecar(tmp_path, ["system"], extra)
    try:
        address = metrics_address(proc)
        stuck = [connect(address) for _ in range(2)]
        stuck[0].sendall(b"GET /metr")  # half a request, never finished
        for _ in range(3):
            started = time.monotonic()
            assert exchange(address)[0] == 200
            assert time.monotonic() - started < timeout  # not a slot freed by the timeout
            stuck += [connect(address) for _ in range(2)]  # the attacker opens more
        with sdk.Client(target) as client:  # the sidecar serves on meanwhile
            assert client.call("system.echo", {"x": 1}) == {"x": 1}
        for sock in stuck:
            with sock:
                assert closed(sock)  # pushed out by a newcomer, or after `timeout`
        assert value(scrape(address), "soma_runtime_calls_total", runtime="local") == 1
    finally:
        assert proc.stop() == 0, proc.output()


def test_held_back_warnings_are_reported_once_a_flood_stops(tmp_path: Path) -> None:
    """Warnings past their burst are counted, not logged; when the flood stops, a line says
    how many there were, an interval later, with no further event to carry it."""
    extra = '\n[metrics]\nlisten = "127.0.0.1:0"\nmax_connections = 2\n'
    proc, _ = start_sidecar(tmp_path, ["system"], extra)
    flood = 12  # each connection beyond the cap of 2 is one warning: 5 logged, 5 held back

    def capped() -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in proc.output().splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("event") == "metrics_connections_capped"]

    try:
        address = metrics_address(proc)
        opened = [connect(address) for _ in range(flood)]
        for sock in opened[:-2]:
            assert closed(sock)  # pushed out by a newcomer: that newcomer made a warning
        for sock in opened:
            sock.close()
        wait_until(
            lambda: sum(1 + line.get("repeated", 0) for line in capped()) == flood - 2,
            timeout=30,
            what="the held-back warnings to be reported",
        )
    finally:
        assert proc.stop() == 0, proc.output()


# alpha calls echo and greet, and is denied acme.fail; beta may call acme.fail, which always
# fails, so the function misses its error budget.
PROBES = """
[metrics]
listen = "unix:run/metrics/metrics.sock"

[[runtime]]
name = "alpha"
command = ["python", "-m", "tests.fixtures.agents", "probe", "alpha.jsonl"]
allow = ["system.*", "acme.greet"]

[[runtime]]
name = "beta"
allow = ["system.echo", "acme.fail"]
command = ["python", "-c", '''
import pathlib, signal, sdk
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
with sdk.Client.from_env() as client:
    client.call("system.echo", {})
    assert client.stimulate("acme.fail", {}).error == "Internal"
    pathlib.Path("beta.jsonl").write_text("{}")
    signal.sigwait({signal.SIGTERM})
''']
"""


def test_supervised_unix_endpoint_denials_and_status(tmp_path: Path) -> None:
    run = SupervisorRun(tmp_path, PROBES)
    try:
        run.wait_ready()
        wait_until(
            lambda: all(read_report(tmp_path / f"{n}.jsonl") for n in ("alpha", "beta")),
            what="both probes to report",
        )
        sock = tmp_path / "run" / "metrics" / "metrics.sock"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        samples = scrape(f"unix:{sock}")
        assert value(samples, "soma_runtime_calls_total", runtime="alpha") == 3
        assert value(samples, "soma_runtime_denials_total", runtime="alpha") == 1
        assert value(samples, "soma_runtime_calls_total", runtime="beta") == 2
        assert value(samples, "soma_runtime_denials_total", runtime="beta") == 0
        assert value(samples, "soma_function_errors_total", function="acme.fail", kind="Internal")
        assert value(samples, "soma_function_calls_total", function="acme.fail") == 1

        result = run_soma("status", "--config", str(run.config))
        assert result.returncode == 0, result.stderr
        rows = {line.split()[0]: line for line in result.stdout.splitlines() if line}
        assert rows["system.echo"].split()[1] == "2" and rows["system.echo"].endswith("meets")
        assert rows["acme.fail"].endswith("MISSES errors")
        assert "100% (1%)" in rows["acme.fail"]
        assert rows["system.ping"].endswith("-")  # no calls yet: no verdict
        assert rows["alpha"].split()[1:] == ["3", "1"]
        assert rows["beta"].split()[1:] == ["2", "0"]

        functions = {f["name"]: f for f in run.status()["sidecar"]["functions"]}
        assert functions["acme.fail"]["meets_slo"] is False
        assert functions["system.echo"]["meets_slo"] is True
        assert "cumulative" not in functions["system.echo"]
    finally:
        assert run.stop() == 0, run.proc.output()
    assert not sock.exists()


def _function(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "acme.slow",
        "count": 10,
        "error_rate": 0.0,
        "slo_max_error_rate": 0.01,
        "p95_ms": 1.2,
        "slo_p95_ms": 1000,
        **overrides,
    }


def test_status_marks_each_objective_missed() -> None:
    sidecar = {
        "functions": [
            _function(),
            _function(name="a.p95", p95_ms=1210.0),
            _function(name="a.both", p95_ms=1210.0, error_rate=0.5),
        ],
        "channels": [{"runtime": "alpha", "calls": 12, "denials": 1}],
    }
    lines = format_sidecar(sidecar).splitlines()
    assert lines[0].split() == ["FUNCTION", "CALLS", "ERRORS", "(MAX)", "P95", "(SLO)", "SLO"]
    assert lines[1].split() == [
        "acme.slow",
        "10",
        "0%",
        "(1%)",
        "1.2",
        "ms",
        "(1000",
        "ms)",
        "meets",
    ]
    assert lines[2].endswith("1210 ms (1000 ms)  MISSES p95")
    assert lines[3].endswith("MISSES p95, errors")
    assert lines[5:] == ["RUNTIME  CALLS  DENIALS", "alpha    12     1"]


@pytest.mark.parametrize(
    "listen",
    ["0.0.0.0:9464", "192.168.1.10:9464", "[::]:9464", "localhost:9464", "unix:", "9464"],
)
def test_metrics_listen_is_loopback_or_a_unix_socket(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"^metrics\.listen: "):
        parse_config({"metrics": {"listen": listen}})


def test_round_bounds_are_exact_bucket_bounds() -> None:
    assert set(ROUND_BOUNDS_MS) <= set(BUCKET_BOUNDS_MS)
    steps = [b / a for a, b in itertools.pairwise(BUCKET_BOUNDS_MS)]
    assert max(steps) < 1.1
    stats = FunctionStats("f", SLO)
    for latency in (0.01, 0.0100001, 2.5, 2.6, 1e9):  # on a bound, just above it, overflow
        stats.record(latency, None)
    cumulative = dict(zip(ROUND_BOUNDS_MS, stats.snapshot().cumulative, strict=True))
    assert (cumulative[0.01], cumulative[0.025], cumulative[2.5], cumulative[5.0]) == (1, 2, 3, 4)
    assert cumulative[100_000] == 4 and stats.count == 5


def test_error_kinds_are_bounded() -> None:
    stats = FunctionStats("f", SLO)
    for i in range(MAX_ERROR_KINDS + 10):
        stats.record(1.0, f"Kind{i}")
    by_kind = stats.snapshot().errors_by_kind
    assert len(by_kind) == MAX_ERROR_KINDS + 1 and by_kind["Other"] == 10


def test_a_taken_port_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "soma.toml"
        config.write_text(
            f'[soma]\nruntime_dir = "run"\nstate_dir = "state"\n[sidecar]\nsocket = "run/s.sock"\n'
            f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
        )
        result = run_soma("sidecar", "--config", str(config))
    assert result.returncode != 0
    assert f"metrics.listen: cannot serve on 127.0.0.1:{port}: Address already in use" in (
        result.stderr
    )
