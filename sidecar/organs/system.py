"""The `system` organ: liveness and round-trip checks, for health probes, tests and benchmarks."""

from __future__ import annotations

import os
import time
from typing import Any

from soma_runtime import FunctionCard, OrganCard, ResidencyPolicy, RoutedOrgan, SloConfig, Stimulus
from soma_runtime import function as organ_function

VERSION = "0.1.0"

_ECHO = FunctionCard(
    name="system.echo",
    description=(
        "Return the input object unchanged. Measures the round trip through the sidecar "
        "without doing any work."
    ),
    tags=["diagnostics", "echo", "read", "benchmark"],
    examples=[
        "Check that a payload survives the round trip to the sidecar",
        "Measure the sidecar's per-call latency with a 100-byte payload",
        "Echo a nested object back to verify JSON encoding",
    ],
    input_schema={
        "type": "object",
        "description": "Any JSON object; it is returned as is.",
    },
    output_schema={"type": "object", "description": "The input object."},
    slo=SloConfig(p95_latency_ms=5, max_error_rate=0.0001, queue_cap=10000),
    residency=ResidencyPolicy.LOCAL,
    idempotent=True,
    side_effects=[],
)

_PING = FunctionCard(
    name="system.ping",
    description=(
        "Answer that the sidecar is alive. Returns the sidecar's process id, its uptime in "
        "seconds and the current time."
    ),
    tags=["diagnostics", "health", "read"],
    examples=[
        "Check that the sidecar is up before sending work",
        "Read how long the sidecar has been running",
    ],
    input_schema={"type": "object", "properties": {}, "additionalProperties": False},
    output_schema={
        "type": "object",
        "properties": {
            "pong": {"const": True},
            "pid": {"type": "integer"},
            "uptime_s": {"type": "number", "minimum": 0},
            "time": {"type": "number", "description": "Seconds since the Unix epoch."},
        },
        "required": ["pong", "pid", "uptime_s", "time"],
    },
    slo=SloConfig(p95_latency_ms=5, max_error_rate=0.0001, queue_cap=10000),
    residency=ResidencyPolicy.LOCAL,
    idempotent=True,
    side_effects=[],
)


class SystemOrgan(RoutedOrgan):
    """Built in, always safe to load: it reads nothing and changes nothing."""

    card = OrganCard(
        name="system",
        version=VERSION,
        description="Diagnostics organ of the sidecar: echo and liveness checks.",
        division="runtime",
        subsystem="system",
        tags=["diagnostics", "health", "runtime", "benchmark"],
        execution_modes=["sidecar"],
        functions=[],
        author="Soma Runtime",
        repository="https://github.com/soma-runtime/soma-runtime",
    )

    def __init__(self) -> None:
        self._started = time.monotonic()

    @organ_function(_ECHO)
    async def echo(self, input: dict[str, Any], stimulus: Stimulus) -> dict[str, Any]:
        return input

    @organ_function(_PING)
    async def ping(self, input: dict[str, Any], stimulus: Stimulus) -> dict[str, Any]:
        return {
            "pong": True,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self._started, 3),
            "time": time.time(),
        }
