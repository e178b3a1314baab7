"""The attack suites' session report: what they counted (see `tally`), printed at the end of
the run and written to `.soma/attack-report.json` for `make chaos` and the README's table."""

from __future__ import annotations

import pytest

from tests.attack import tally
from tests.attack.scale import SCALE
from tests.helpers import REPO

REPORT = REPO / ".soma" / "attack-report.json"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    report = tally.totals()
    if not any(report.values()):
        return  # no attack suite ran in this session
    tally.write(REPORT, report)
    terminalreporter.section(f"attack suites ({SCALE})")
    for line in tally.render(report):
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"(written to {REPORT.relative_to(REPO)})")
