"""An upstream's MCP tool list turned into function cards.

Each tool is the function its pinned name says (see `names`); the organ keeps the map back to
the tool's real name. Annotations are mapped back to `idempotent` and `side_effects` in the
vocabulary of `soma_runtime.side_effects` (with MCP's defaults for missing hints: not
read-only, destructive, open world); they come from the upstream, whose definitions the
operator pins (see `pins`).
"""

from __future__ import annotations

from typing import Any

from mcp.types import Tool
from pydantic import ValidationError

from soma_runtime.cards import FunctionCard, ResidencyPolicy, SloConfig

QUEUE_CAP = 16
# The output of a tool that declared no output schema (see `answers`): its MCP content
# blocks, and the structured content it may send all the same. Deliberately without
# `"type": "object"` at the root: a card's output schema is listed to MCP clients only when it
# declares an object (sidecar.bridge.tools), and a bridge lists what the upstream declared.
UNDECLARED_OUTPUT: dict[str, Any] = {
    "description": "What the upstream MCP server answered; it declared no output schema.",
    "properties": {
        "content": {"type": "array", "items": {"type": "object"}},
        "structuredContent": {"type": "object"},
    },
    "required": ["content"],
}


def declares_output(tool: Tool) -> bool:
    """Whether a call's output is the tool's structured content (else `UNDECLARED_OUTPUT`)."""
    return bool(tool.output_schema)


def definition(tool: Tool) -> dict[str, Any]:
    """What is pinned of a tool: everything that tells a model or a policy what it does."""
    annotations = tool.annotations.model_dump(exclude_none=True) if tool.annotations else {}
    return {
        "name": tool.name,
        "title": tool.title,
        "description": tool.description,
        "input_schema": tool.input_schema,
        "output_schema": tool.output_schema,
        "annotations": annotations,
    }


def side_effects(upstream: str, tool: Tool) -> tuple[bool, list[str]]:
    """`(idempotent, side_effects)` from the tool's annotations."""
    hints = tool.annotations
    where = f"through upstream MCP server {upstream!r}"
    if hints is not None and hints.read_only_hint:
        return True, [f"reads {where}"]
    destructive = hints is None or hints.destructive_hint is not False
    effects = [f"{'overwrites' if destructive else 'writes'} {where}"]
    if hints is None or hints.open_world_hint is not False:
        effects.append(f"network reached {where}")
    return bool(hints is not None and hints.idempotent_hint), effects


def function_card(
    name: str, upstream: str, tool: Tool, credential: str | None, timeout: float, *, local: bool
) -> FunctionCard | None:
    """The card of one tool; None (the tool is left out) when its schemas are not valid JSON
    Schema or hold what a card cannot (null)."""
    idempotent, effects = side_effects(upstream, tool)
    try:
        return FunctionCard(
            name=name,
            description=tool.description or tool.title or f"{tool.name} of {upstream}",
            tags=["upstream", upstream],
            examples=[],
            input_schema=tool.input_schema,
            output_schema=tool.output_schema or UNDECLARED_OUTPUT,  # as declares_output says
            slo=SloConfig(
                p95_latency_ms=int(timeout * 1000), max_error_rate=0.05, queue_cap=QUEUE_CAP
            ),
            # A stdio upstream runs on this machine; an HTTP one may be anywhere.
            residency=ResidencyPolicy.LOCAL if local else ResidencyPolicy.GLOBAL,
            idempotent=idempotent,
            side_effects=effects,
            credentials=[credential] if credential else [],
        )
    except ValidationError:
        return None
