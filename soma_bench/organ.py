"""The organ the supervised case calls: `system.echo` with everything a real function has
switched on, so the production path is measured whole: a schema to validate against and a
credential the sidecar must resolve, check against the runtime's grant and hand over."""

from __future__ import annotations

from typing import Any

from soma_runtime import (
    FunctionCard,
    OrganCard,
    OrganFailure,
    ResidencyPolicy,
    RoutedOrgan,
    SloConfig,
    Stimulus,
)
from soma_runtime import function as organ_function

CREDENTIAL = "bench"

_ECHO = FunctionCard(
    name="bench.echo",
    description=(
        "Return the input unchanged after the sidecar has validated it and resolved the "
        "`bench` credential: the whole call path of a real function, doing no work."
    ),
    tags=["benchmark", "echo"],
    examples=["Measure the full call path with a credential", "Echo a 100-byte payload"],
    input_schema={
        "type": "object",
        "properties": {"data": {"type": "string", "maxLength": 4_000_000}},
        "required": ["data"],
        "additionalProperties": False,
    },
    output_schema={"type": "object"},
    slo=SloConfig(p95_latency_ms=5, max_error_rate=0.0001, queue_cap=10000),
    residency=ResidencyPolicy.LOCAL,
    idempotent=True,
    side_effects=[],
    credentials=[CREDENTIAL],
)


class BenchOrgan(RoutedOrgan):
    """Loaded by `soma bench`'s supervised configuration as `soma_bench.organ:BenchOrgan`."""

    card = OrganCard(
        name="bench",
        version="0.1.0",
        description="Benchmark organ: an echo with validation and an injected credential.",
        division="runtime",
        subsystem="bench",
        tags=["benchmark"],
        execution_modes=["sidecar"],
        functions=[],
    )

    @organ_function(_ECHO)
    async def echo(self, input: dict[str, Any], stimulus: Stimulus) -> dict[str, Any]:
        if CREDENTIAL not in stimulus.credentials:  # the path under test must have run
            raise OrganFailure("CredentialUnavailable", "the bench credential was not handed over")
        return input
