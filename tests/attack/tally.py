"""What the attack suites did, counted: the figures the README's security table quotes.

Sections: `fuzz` (cases run per target), `faults` (faults injected, per kind), `attacks`
(attacks tried, per kind), `calls` (calls made, and calls lost) and `writes` (acknowledged
writes, and acknowledged writes lost). Tests count as they go; at the end of the session the
totals are printed and written to `.soma/attack-report.json` (see `conftest.py`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

SECTIONS = ("fuzz", "faults", "attacks", "calls", "writes")
# Sections whose names are kinds of one thing, so a total means something.
_SUMMED = ("fuzz", "faults", "attacks")
_counts: Counter[tuple[str, str]] = Counter()


def count(section: str, name: str, n: int = 1) -> None:
    if section not in SECTIONS:
        raise ValueError(f"unknown tally section {section!r}")
    _counts[(section, name)] += n


def totals() -> dict[str, dict[str, int]]:
    """{section: {name: n}} for every section, empty sections included."""
    out: dict[str, dict[str, int]] = {section: {} for section in SECTIONS}
    for (section, name), n in sorted(_counts.items()):
        out[section][name] = n
    return out


def render(report: dict[str, dict[str, int]]) -> list[str]:
    """One line per section: the count of each name (and the total, where it adds up)."""
    lines = []
    for section in SECTIONS:
        entries = report.get(section, {})
        detail = ", ".join(f"{name} {n}" for name, n in entries.items()) or "-"
        total = f"{sum(entries.values())} in all: " if section in _SUMMED else ""
        lines.append(f"{section:<8} {total}{detail}")
    return lines


def write(path: Path, report: dict[str, dict[str, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
