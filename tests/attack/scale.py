"""How hard the attack suites push: `SOMA_ATTACK_SCALE=short` (the default, run by `make test`)
or `long` (run by `make chaos`). Every suite takes its counts from `pick`, so one knob moves
them all and the short runs stay within the test suite's time budget."""

from __future__ import annotations

import os
from typing import TypeVar

from hypothesis import HealthCheck, Phase, settings

SCALE = os.environ.get("SOMA_ATTACK_SCALE", "short")
if SCALE not in ("short", "long"):
    raise RuntimeError(f"SOMA_ATTACK_SCALE must be 'short' or 'long', not {SCALE!r}")
LONG = SCALE == "long"

T = TypeVar("T")


def pick(short: T, long: T) -> T:
    """The value for the current scale."""
    return long if LONG else short


def fuzz_settings(short: int, long: int, *, shrink: bool = True) -> settings:
    """Hypothesis settings for a target that runs `short` or `long` examples.

    Short runs are derandomized, so `make test` tries the same cases every time and cannot
    flake; long runs draw new cases each time. No example database: nothing is written to the
    working tree, and a failure prints the input that reproduces it. `shrink=False` for targets
    whose failure leaves the server broken: every later case would fail too, so shrinking
    would only blame the wrong input (and wait out a timeout per attempt).
    """
    phases = tuple(Phase) if shrink else (Phase.explicit, Phase.reuse, Phase.generate)
    return settings(
        max_examples=pick(short, long),
        phases=phases,
        deadline=None,
        derandomize=not LONG,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
