"""`soma bench` end to end, tiny: real servers, a real supervised runtime measuring from the
inside, the JSON and the chart it writes; and the usage errors. The figures themselves are
not checked here (speed targets belong to the benchmark's output, not to unit tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from soma_bench import report
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
        *("--json", str(out), "--plot", str(png), "--fail-on-miss"),
        timeout=60,
    )
    document = json.loads(out.read_text())
    # Figures of four calls miss or meet the targets by chance: exit 1 exactly when one missed.
    missed = report.missed(document["targets"], document["long"])
    assert result.returncode == (1 if missed else 0), result.stderr
    assert result.stdout.rstrip().endswith(report.verdict(document["targets"], document["long"]))
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
    assert report.table(document["results"]) in result.stdout
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


def stub(name: str, baseline: str | None, p50: float, p99: float) -> dict[str, Any]:
    """A result as a run records it, with made-up figures."""
    return {
        "name": name,
        "baseline": baseline,
        "params": {"bare": baseline is None},
        "p50_us": p50,
        "p50_spread_us": [p50 * 0.9, p50 * 1.1],
        "p90_us": p99,
        "p99_us": p99,
        "max_us": p99,
        "calls_per_s": 1e6 / p50,
        "cpu_us_per_call": 10.0,
        "supervisor_cpu_us_per_call": None,
        "rss_kb": 1024,
    }


@pytest.fixture
def stubbed() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Results where the stream meets its target and supervised system.echo misses its p50
    target (1.3x against 1.15x) but meets its p99 one; the targets they give."""
    supervised_bare = "supervised: bare unary (sync)"
    results = [
        stub("bare unary (sync)", None, 100, 200),
        stub("Client stream", "bare unary (sync)", 50, 100),
        stub(supervised_bare, None, 100, 200),
        stub("supervised: Client unary, system.echo", supervised_bare, 130, 240),
    ]
    report.ratios(results)
    return results, [t.as_dict() for t in report.targets(results)]


def test_the_table_names_the_baseline_of_its_ratio_columns(
    stubbed: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    results, _ = stubbed
    lines = report.table(results).splitlines()
    assert lines[0].endswith("p50 x  p99 x  thr x  baseline of the x columns")
    rows = {line.split("  ")[0]: line for line in lines[2:6]}
    assert rows["Client stream"].endswith("  0.50   0.50   2.00  bare unary (sync)")
    assert rows["bare unary (sync)"].endswith("  -      -      -  -")
    assert lines[-1] == report.RATIO_LEGEND


def test_the_verdict_names_what_was_missed(
    stubbed: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    _, found = stubbed
    assert report.missed(found) == ["supervised system.echo p50 vs bare"]
    assert report.verdict(found) == (
        "verdict: 2 of 3 measured targets met; MISSED: supervised system.echo p50 vs bare"
        f" ({len(found) - 3} not measured in this run)"
    )
    grown = {"met": False}
    assert report.missed(found, grown)[-1] == "long run RSS growth"
    met = [t for t in found if t["met"] is not False]
    assert report.missed(met) == []
    assert report.verdict(met).startswith("verdict: 2 of 2 measured targets met (")


def test_the_chart_has_a_legend_each_case_s_ratio_and_target_and_the_verdict(
    stubbed: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    results, found = stubbed
    drawn = report.figure(results, found)
    bars, _, notes = drawn.axes
    legend = bars.get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == [
        "through Soma: p50 x its baseline; [n]: target n below",
        "bare baseline, measured in the same run",
    ]
    marked = {t.get_text() for t in bars.texts}
    assert (
        "1.30x supervised: bare unary (sync)   [1] 1.30x (target <= 1.15x) MISSED   "
        "[2] 1.20x (target <= 1.3x) met"
    ) in marked
    assert "0.50x bare unary (sync)   [3] 0.50x (target <= 0.6x) met" in marked
    lines = report.target_lines(found).splitlines()
    assert lines[1].startswith("   [1] supervised system.echo p50 vs bare ")
    assert lines[3].startswith("   [3] Client stream p50 vs bare unary (sync) ")
    assert " ".join(drawn.get_suptitle().split()).endswith(report.verdict(found))
    assert [t.get_text() for t in notes.texts] == [report.target_lines(found)]
