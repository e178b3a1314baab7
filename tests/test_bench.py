"""`soma bench` end to end, tiny: real servers, a real supervised runtime measuring from the
inside, the JSON and the chart it writes; and the usage errors. The figures themselves are
not checked here (speed targets belong to the benchmark's output, not to unit tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, child_env, run_soma

RESULT_FIELDS = {
    "name",
    "baseline",
    "params",
    "calls",
    "p50_us",
    "p50_spread_us",
    "p90_us",
    "p99_us",
    "max_us",
    "calls_per_s",
    "cpu_us_per_call",
    "supervisor_cpu_us_per_call",
    "rss_kb",
    "ratio",
}


def test_a_tiny_run_writes_every_field_as_json_and_a_png(tmp_path: Path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = run_soma(
        "bench",
        *("--cases", "echo,gateway,bridge", "--batches", "1", "--calls", "4", "--warmup", "2"),
        *("--long", "400"),
        *("--json", str(out), "--plot", str(png)),
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    results = {r["name"]: r for r in document["results"]}
    # The floor, both bare unary clients, the bare stream, the SDK's clients, the gateway
    # pair measured inside a supervised runtime, and the MCP pair.
    assert {"raw uds echo (floor)", "bare unary (sync)", "bare stream (aio)"} <= set(results)
    assert {"gateway: direct", "gateway: via the gateway", "mcp: tools/call via bridge"} <= set(
        results
    )
    for client in ("Client", "AsyncClient"):
        assert {f"{client} unary", f"{client} stream"} <= set(results)
    assert results["AsyncClient stream"]["baseline"] == "bare stream (aio)"
    for r in document["results"]:
        assert set(r) == RESULT_FIELDS, r["name"]
        assert r["calls"] == 4
        assert 0 < r["p50_us"] <= r["p90_us"] <= r["p99_us"] <= r["max_us"]
        low, high = r["p50_spread_us"]
        assert low <= r["p50_us"] <= high
        assert r["calls_per_s"] > 0
        assert r["cpu_us_per_call"] is not None and r["cpu_us_per_call"] >= 0
        assert r["rss_kb"] > 0
        if r["baseline"] is None:
            assert r["ratio"] is None
        else:
            base = results[r["baseline"]]
            assert r["ratio"]["p50"] == pytest.approx(r["p50_us"] / base["p50_us"])
            assert set(r["ratio"]) == {"p50", "p99", "throughput"}
    # Server CPU is charged to the right process: the sidecar serves the SDK's calls, and
    # the gateway's RSS is the supervised sidecar's, not the bare server's.
    assert results["gateway: via the gateway"]["rss_kb"] != results["gateway: direct"]["rss_kb"]
    # ...and the supervisor's CPU only to calls through a supervised sidecar.
    assert results["gateway: via the gateway"]["supervisor_cpu_us_per_call"] is not None
    assert results["gateway: direct"]["supervisor_cpu_us_per_call"] is None
    assert results["bare unary (sync)"]["supervisor_cpu_us_per_call"] is None
    targets = {t["name"]: t for t in document["targets"]}
    gateway = targets["gateway p50 vs direct (total)"]
    assert gateway["value"] == pytest.approx(results["gateway: via the gateway"]["ratio"]["p50"])
    assert gateway["met"] == (gateway["value"] <= 2.0)
    stream = targets["AsyncClient stream p50 vs bare stream"]
    assert stream["value"] == pytest.approx(results["AsyncClient stream"]["ratio"]["p50"])
    assert targets["p50 flat from 1 to N runtimes"]["met"] is None  # not measured
    # stdout: the table and the verdicts; stderr: progress.
    assert "gateway: via the gateway" in result.stdout
    assert "gateway p50 vs direct (total)" in result.stdout
    assert "batch 1/1" in result.stderr
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    long = document["long"]
    assert long["calls"] == 400
    assert [calls for calls, _ in long["rss_kb_samples"]] == list(range(40, 401, 40))
    assert long["met"] == (long["rss_growth_kb"] <= long["growth_limit_kb"])
    assert "long run: 400 calls" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cases", "echo,nope"], "unknown group(s) nope"),
        (["--cases", ","], "unknown group(s) (none)"),
        (["--calls", "0"], "must be at least 1"),
        (["--batches", "many"], "not a whole number"),
        (["--warmup", "-1"], "must be 0 or more"),
        (["--long", "0"], "must be at least 1"),
        (["--frobnicate"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_are_a_usage_error(args: list[str], message: str) -> None:
    result = run_soma("bench", *args, timeout=30)
    assert result.returncode == 2
    assert "usage: soma" in result.stderr
    assert message in result.stderr


def test_an_output_path_in_no_directory_is_refused_before_measuring(tmp_path: Path) -> None:
    result = run_soma("bench", "--json", str(tmp_path / "missing" / "b.json"), timeout=30)
    assert result.returncode == 2
    assert f"no directory {tmp_path / 'missing'}" in result.stderr
    assert "batch" not in result.stderr


def test_plot_without_matplotlib_names_the_extra_before_measuring(tmp_path: Path) -> None:
    hide = (
        "import sys; sys.modules['matplotlib'] = None; from soma_cli.main import main; "
        f"main(['bench', '--cases', 'echo', '--plot', {str(tmp_path / 'x.png')!r}])"
    )
    result = subprocess.run(
        [sys.executable, "-c", hide],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "soma-runtime[bench]" in result.stderr
    assert "batch" not in result.stderr  # nothing was measured
    assert not (tmp_path / "x.png").exists()
