"""What a run prints and writes: the table, the issue's targets checked, JSON and a chart."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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
    """One target of the issue: `value` against `limit` (`at_most` or at least); `case` is
    the measured case it is about, when it is one case's ratio (the chart marks it there)."""

    name: str
    value: float | None
    limit: float
    at_most: bool = True
    unit: str = "x"
    case: str | None = None

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
            "case": self.case,
            "met": self.met,
        }


def _ratio(
    by: dict[str, dict[str, Any]],
    title: str,
    limit: float,
    name: str,
    other: str,
    key: str = "p50_us",
    at_most: bool = True,
) -> Target:
    """The target that `name`'s figure over `other`'s (both measured in the same group) is
    within `limit`; not measured unless both were."""
    value = float(by[name][key] / by[other][key]) if name in by and other in by else None
    return Target(title, value, limit, at_most, case=name)


# The target is `system.echo` from a supervised runtime; `bench.echo` (a credential
# resolved per call as well) is in the table beside it.
SUPERVISED = ("supervised: Client unary, system.echo", "supervised: bare unary (sync)")
GATEWAY = "gateway: via the gateway"


def targets(results: list[dict[str, Any]]) -> list[Target]:
    """The issue's targets, from the cases this run measured (None: not measured)."""
    by = {r["name"]: r for r in results}
    return [
        _ratio(by, "supervised system.echo p50 vs bare", 1.15, *SUPERVISED),
        _ratio(by, "supervised system.echo p99 vs bare", 1.3, *SUPERVISED, "p99_us"),
        _ratio(
            by, "Client stream p50 vs bare unary (sync)", 0.6, "Client stream", "bare unary (sync)"
        ),
        _ratio(
            by,
            "AsyncClient stream p50 vs bare unary (aio)",
            0.6,
            "AsyncClient stream",
            "bare unary (aio)",
        ),
        _ratio(
            by,
            "AsyncClient stream p50 vs bare stream",
            1.15,
            "AsyncClient stream",
            "bare stream (aio)",
        ),
        _ratio(
            by,
            "stream throughput @32 vs bare unary",
            1.5,
            "AsyncClient stream @32",
            "bare unary (aio) @32",
            "calls_per_s",
            at_most=False,
        ),
        *runtime_targets(by),
        _ratio(
            by,
            "bridge tools/call p50 vs bare mcp",
            1.3,
            "mcp: tools/call via bridge",
            "mcp: bare SDK server",
        ),
        _ratio(by, "gateway p50 vs direct (total)", 2.0, GATEWAY, "gateway: direct"),
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
        Target(
            f"p50 flat from {counts[0]} to {counts[-1]} runtimes", flat, 1.10, case=high["name"]
        ),
        Target("sidecar RSS per added runtime", per_runtime, 1024, unit="KiB", case=high["name"]),
    ]


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


# What the ratio columns are: printed under the table and drawn on the chart.
RATIO_LEGEND = (
    "p50 x, p99 x: the case's latency over its baseline's (lower is better); thr x: its calls/s "
    "over the baseline's (higher is better). Each row's baseline is named in its last column and "
    "was measured in the same run, batch by batch with the case; '-': the row is a baseline."
)


def table(results: list[dict[str, Any]]) -> str:
    """The results as a fixed-width table: latencies in µs, the p50 with its batch spread;
    CPU per call of the server (sidecar or bare) and of the supervisor; the server's RSS; the
    ratios to the baseline the last column names; the legend of the ratios under it."""
    header = (
        f"{'case':<34} {'p50 µs (spread)':>22} {'p90':>7} {'p99':>7} {'max':>8} "
        f"{'calls/s':>8} {'cpu µs':>7} {'sup µs':>7} {'RSS MB':>7} "
        f"{'p50 x':>6} {'p99 x':>6} {'thr x':>6}  baseline of the x columns"
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
            f"{_num(ratio.get('throughput'), 2):>6}  {r['baseline'] if ratio else '-'}"
        )
    return "\n".join([*lines, "", RATIO_LEGEND])


def _target_text(t: dict[str, Any]) -> tuple[str, str, str]:
    """A target's value, its limit and its verdict, as printed."""
    verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
    sign = "<=" if t["at_most"] else ">="
    value = "-" if t["value"] is None else f"{t['value']:.2f}{t['unit']}"
    return value, f"target {sign} {t['limit']:g}{t['unit']}", verdict


def target_lines(found: list[dict[str, Any]]) -> str:
    """The targets (as `Target.as_dict` gives them), met or missed, with the ratio."""
    lines = ["targets (ratios measured in this run):"]
    for number, t in enumerate(found, 1):
        value, target, verdict = _target_text(t)
        lines.append(
            f"  {f'[{number}]':>4} {t['name']:<42} {value:>12}  {'(' + target + ')':<22} {verdict}"
        )
    return "\n".join(lines)


def missed(found: list[dict[str, Any]], long: dict[str, Any] | None = None) -> list[str]:
    """The names of the targets this run measured and missed (the long run's RSS included)."""
    names = [t["name"] for t in found if t["met"] is False]
    if long is not None and not long["met"]:
        names.append("long run RSS growth")
    return names


def verdict(found: list[dict[str, Any]], long: dict[str, Any] | None = None) -> str:
    """One line: how many targets were met, and which were missed."""
    measured = [t for t in found if t["met"] is not None] + ([long] if long is not None else [])
    failed = missed(found, long)
    unmeasured = len(found) - len([t for t in found if t["met"] is not None])
    line = f"verdict: {len(measured) - len(failed)} of {len(measured)} measured targets met"
    if failed:
        line += f"; MISSED: {', '.join(failed)}"
    if unmeasured:
        line += f" ({unmeasured} not measured in this run)"
    return line


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n")


def check_plotting() -> None:
    """Raise ImportError naming the extra when matplotlib is missing (before measuring)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(f"--plot needs matplotlib: {PLOT_EXTRA}") from None


def plot(
    path: Path,
    results: list[dict[str, Any]],
    found: list[dict[str, Any]],
    long: dict[str, Any] | None = None,
) -> None:
    """Draw `figure` into a PNG."""
    import matplotlib.pyplot as plt

    drawn = figure(results, found, long)
    drawn.savefig(path, dpi=110)
    plt.close(drawn)


def figure(
    results: list[dict[str, Any]],
    found: list[dict[str, Any]],
    long: dict[str, Any] | None = None,
) -> Figure:
    """The chart: p50 of every in-flight-1 case with its batch spread, each Soma case marked
    with its ratio to its baseline and the targets about it; throughput against calls in
    flight; under them every target with its verdict, and the run's verdict on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    single = [r for r in results if r["params"].get("inflight", 1) == 1][::-1]
    swept = [r for r in results if "@" in r["name"]]
    bars_high = max(4.0, 0.32 * len(single))
    notes_high = 0.16 * len(found) + 1.2
    drawn = plt.figure(figsize=(18, bars_high + notes_high + 1.5))
    grid = drawn.add_gridspec(2, 2, width_ratios=(5, 2), height_ratios=(bars_high, notes_high))
    left, right = drawn.add_subplot(grid[0, 0]), drawn.add_subplot(grid[0, 1])
    notes = drawn.add_subplot(grid[1, :])
    names = [r["name"] for r in single]
    spread = [
        [r["p50_us"] - r["p50_spread_us"][0] for r in single],
        [r["p50_spread_us"][1] - r["p50_us"] for r in single],
    ]
    colours = ["tab:gray" if r["params"]["bare"] else "tab:blue" for r in single]
    left.barh(names, [r["p50_us"] for r in single], xerr=spread, color=colours, capsize=2)
    left.set_xscale("log")
    # Room on the right of the longest bar for its marks.
    low = min(r["p50_spread_us"][0] for r in single)
    left.set_xlim(low / 2, max(r["p50_spread_us"][1] for r in single) * 3000)
    left.set_xlabel("p50 latency, µs (log); whiskers: min-max of the batch medians")
    left.tick_params(axis="y", labelsize=8)
    # Each target is marked on the case it is about, numbered as in the list under the chart.
    about: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for number, t in enumerate(found, 1):
        if t["case"] is not None:
            about.setdefault(t["case"], []).append((number, t))
    for row, r in enumerate(single):
        marks = [f"{r['ratio']['p50']:.2f}x {r['baseline']}"] if r["ratio"] else []
        for number, t in about.get(r["name"], []):
            value, target, verdict_ = _target_text(t)
            marks.append(f"[{number}] {value} ({target}) {verdict_}")
        if marks:
            left.annotate(
                "   ".join(marks),
                (r["p50_spread_us"][1], row),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
                color="tab:red"
                if any(t["met"] is False for _, t in about.get(r["name"], []))
                else "black",
            )
    left.legend(
        handles=[
            Patch(color="tab:blue", label="through Soma: p50 x its baseline; [n]: target n below"),
            Patch(color="tab:gray", label="bare baseline, measured in the same run"),
        ],
        loc="lower right",
        fontsize=8,
    )
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
    notes.axis("off")
    notes.text(0, 1, target_lines(found), family="monospace", fontsize=8, va="top")
    drawn.suptitle(
        "soma bench: 100-byte echo unless named; medians of interleaved batches\n"
        + textwrap.fill(verdict(found, long), 180),
        color="tab:red" if missed(found, long) else "black",
    )
    drawn.tight_layout()
    return drawn


def long_lines(long: dict[str, Any]) -> str:
    verdict = "met" if long["met"] else "MISSED"
    return (
        f"long run: {long['calls']:,} calls ({long['inflight']} in flight) in {long['seconds']}s; "
        f"sidecar RSS after warm-up grew {long['rss_growth_kb']:,} KiB "
        f"(target <= {long['growth_limit_kb']:,} KiB)  {verdict}"
    )
