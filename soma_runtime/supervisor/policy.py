"""Restart decisions: whether to restart, and how long to wait first."""

from __future__ import annotations

import random

from soma_runtime.config import RestartPolicy


def wants_restart(policy: RestartPolicy, returncode: int) -> bool:
    """`always` restarts any exit, `on-failure` a non-zero exit or a signal, `never` nothing."""
    if policy.restart == "always":
        return True
    if policy.restart == "on-failure":
        return returncode != 0
    return False


def backoff_delay(policy: RestartPolicy, attempt: int, rng: random.Random) -> float:
    """Seconds before consecutive restart number `attempt` (1, 2, ...): exponential, capped,
    with "equal jitter" (between half and all of the step) so restarts of many processes do
    not fall in step, while each delay is still at least as long as the previous one's floor.
    """
    step = min(policy.backoff_max, policy.backoff_initial * 2.0 ** (attempt - 1))
    return step / 2 + rng.uniform(0.0, step / 2)
