"""What a run prints and writes: the table, the issue's targets checked, JSON and a chart."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLOT_EXTRA = "pip install 'soma-runtime[bench]' (matplotlib)"


def ratios(results: list[dict[str, Any]]) -> None:
    """Add each result's ratios to its baseline (measured in the same group): p50, p99 and
    throughput; None without a baseline."""
    by_name = {r["name"]: r for r in results}
    for r in results:
        base = by_name.get(r["baseline"] or "")
        r["ratio"] = (
            {
                "p50": r["p50_us"] / base["p50_us"],
                "p99": r["p99_us"] / base["p99_us"],
                "throughput": r["calls_per_s"] / base["calls_per_s"],
            }
            if base
            else None
        )


@dataclass
class Target:
    """One target of the issue: `value` against `limit` (`at_most` or at least)."""

    name: str
    value: float | None
    limit: float
    at_most: bool = True
    unit: str = "x"

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "limit": self.limit,
            "at_most": self.at_most,
            "unit": self.unit,
            "met": self.met,
        }


def _against(
    by: dict[str, dict[str, Any]], name: str, other: str, key: str = "p50_us"
) -> float | None:
    """`name`'s figure over `other`'s (both measured in the same group), None unless both
    were measured."""
    if name not in by or other not in by:
        return None
    return float(by[name][key] / by[other][key])


# The target is `system.echo` from a supervised runtime; `bench.echo` (a credential
# resolved per call as well) is in the table beside it.
SUPERVISED = ("supervised: Client unary, system.echo", "supervised: bare unary (sync)")
GATEWAY = "gateway: via the gateway"


def targets(results: list[dict[str, Any]]) -> list[Target]:
    """The issue's targets, from the cases this run measured (None: not measured)."""
    by = {r["name"]: r for r in results}
    return [
        Target("supervised system.echo p50 vs bare", _against(by, *SUPERVISED), 1.15),
        Target("supervised system.echo p99 vs bare", _against(by, *SUPERVISED, "p99_us"), 1.3),
        Target(
            "Client stream p50 vs bare unary (sync)",
            _against(by, "Client stream", "bare unary (sync)"),
            0.6,
        ),
        Target(
            "AsyncClient stream p50 vs bare unary (aio)",
            _against(by, "AsyncClient stream", "bare unary (aio)"),
            0.6,
        ),
        Target(
            "AsyncClient stream p50 vs bare stream",
            _against(by, "AsyncClient stream", "bare stream (aio)"),
            1.15,
        ),
        Target(
            "stream throughput @32 vs bare unary",
            _against(by, "AsyncClient stream @32", "bare unary (aio) @32", "calls_per_s"),
            1.5,
            at_most=False,
        ),
        *runtime_targets(by),
        Target(
            "bridge tools/call p50 vs bare mcp",
            _against(by, "mcp: tools/call via bridge", "mcp: bare SDK server"),
            1.3,
        ),
        Target("gateway p50 vs direct (total)", _against(by, GATEWAY, "gateway: direct"), 2.0),
    ]


def runtime_targets(by: dict[str, dict[str, Any]]) -> list[Target]:
    """p50 flat from 1 to the most runtimes measured (each p50 as a ratio to the bare unary of
    its own run, so that the runs' different moments cancel out), and RSS per added runtime."""
    counts = sorted(
        int(r["params"]["runtimes"])
        for r in by.values()
        if r["name"].startswith("runtimes ") and r["ratio"]
    )
    if len(counts) < 2:
        return [
            Target("p50 flat from 1 to N runtimes", None, 1.10),
            Target("sidecar RSS per added runtime", None, 1024, unit="KiB"),
        ]
    low, high = by[f"runtimes {counts[0]}: Client"], by[f"runtimes {counts[-1]}: Client"]
    flat = high["ratio"]["p50"] / low["ratio"]["p50"]
    per_runtime = (high["rss_kb"] - low["rss_kb"]) / (counts[-1] - counts[0])
    return [
        Target(f"p50 flat from {counts[0]} to {counts[-1]} runtimes", flat, 1.10),
        Target("sidecar RSS per added runtime", per_runtime, 1024, unit="KiB"),
    ]


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(results: list[dict[str, Any]]) -> str:
    """The results as a fixed-width table: latencies in µs, the p50 with its batch spread;
    CPU per call of the server (sidecar or bare) and of the supervisor; the server's RSS."""
    header = (
        f"{'case':<34} {'p50 µs (spread)':>22} {'p90':>7} {'p99':>7} {'max':>8} "
        f"{'calls/s':>8} {'cpu µs':>7} {'sup µs':>7} {'RSS MB':>7} "
        f"{'p50 x':>6} {'p99 x':>6} {'thr x':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        low, high = r["p50_spread_us"]
        p50 = f"{r['p50_us']:,.0f} ({low:,.0f}-{high:,.0f})"
        ratio = r["ratio"] or {}
        rss = None if r["rss_kb"] is None else r["rss_kb"] / 1024
        lines.append(
            f"{r['name']:<34} {p50:>22} "
            f"{r['p90_us']:>7,.0f} {r['p99_us']:>7,.0f} {r['max_us']:>8,.0f} "
            f"{r['calls_per_s']:>8,.0f} {_num(r['cpu_us_per_call']):>7} "
            f"{_num(r['supervisor_cpu_us_per_call']):>7} {_num(rss, 1):>7} "
            f"{_num(ratio.get('p50'), 2):>6} {_num(ratio.get('p99'), 2):>6} "
            f"{_num(ratio.get('throughput'), 2):>6}"
        )
    return "\n".join(lines)


def target_lines(found: list[dict[str, Any]]) -> str:
    """The targets (as `Target.as_dict` gives them), met or missed, with the ratio."""
    lines = ["targets (ratios measured in this run):"]
    for t in found:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        sign = "<=" if t["at_most"] else ">="
        value = "-" if t["value"] is None else f"{t['value']:.2f}{t['unit']}"
        target = f"(target {sign} {t['limit']:g}{t['unit']})"
        lines.append(f"  {t['name']:<42} {value:>12}  {target:<22} {verdict}")
    return "\n".join(lines)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n")


def check_plotting() -> None:
    """Raise ImportError naming the extra when matplotlib is missing (before measuring)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(f"--plot needs matplotlib: {PLOT_EXTRA}") from None


def plot(path: Path, results: list[dict[str, Any]]) -> None:
    """A PNG: p50 of every in-flight-1 case with its batch spread, and throughput against
    calls in flight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single = [r for r in results if r["params"].get("inflight", 1) == 1]
    swept = [r for r in results if "@" in r["name"]]
    figure, (left, right) = plt.subplots(
        1, 2, figsize=(15, max(4.0, 0.32 * len(single) + 1.5)), width_ratios=(3, 2)
    )
    names = [r["name"] for r in single][::-1]
    p50 = [r["p50_us"] for r in single][::-1]
    spread = [
        [r["p50_us"] - r["p50_spread_us"][0] for r in single][::-1],
        [r["p50_spread_us"][1] - r["p50_us"] for r in single][::-1],
    ]
    colours = ["tab:gray" if r["params"]["bare"] else "tab:blue" for r in single][::-1]
    left.barh(names, p50, xerr=spread, color=colours, capsize=2)
    left.set_xscale("log")
    left.set_xlabel("p50 latency, µs (log; bars: min-max of batch medians; grey: baselines)")
    left.tick_params(axis="y", labelsize=8)
    series: dict[str, list[tuple[int, float]]] = {}
    for r in swept:
        series.setdefault(r["name"].split(" @")[0], []).append(
            (int(r["params"]["inflight"]), r["calls_per_s"])
        )
    for label, points in series.items():
        points.sort()
        right.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    right.set_xscale("log", base=2)
    right.set_xlabel("calls in flight")
    right.set_ylabel("calls/s")
    if series:
        right.legend(fontsize=8)
    right.grid(alpha=0.3)
    figure.suptitle("soma bench: 100-byte echo unless named; medians of interleaved batches")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def long_lines(long: dict[str, Any]) -> str:
    verdict = "met" if long["met"] else "MISSED"
    return (
        f"long run: {long['calls']:,} calls ({long['inflight']} in flight) in {long['seconds']}s; "
        f"sidecar RSS after warm-up grew {long['rss_growth_kb']:,} KiB "
        f"(target <= {long['growth_limit_kb']:,} KiB)  {verdict}"
    )
