"""An upstream's MCP tool list turned into function cards.

Tool names become function names `<upstream>.<name>`: lower-cased, every character outside
`[a-z0-9_-]` replaced by `_`, `t_` prefixed when the name does not start with a letter, and
`_<6 hex of its SHA-256>` appended when that makes two tools collide. The organ keeps the map
back to the tool's real name. Annotations are mapped back to `idempotent` and `side_effects`
in the vocabulary of `soma_runtime.side_effects` (with MCP's defaults for missing hints: not
read-only, destructive, open world); they come from the upstream, whose definitions the
operator pins (see `pins`).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from mcp.types import Tool
from pydantic import ValidationError

from soma_runtime.cards import FunctionCard, ResidencyPolicy, SloConfig

QUEUE_CAP = 16
_OUTSIDE = re.compile(r"[^a-z0-9_-]")
# Without an output schema a result is its MCP content blocks.
CONTENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"content": {"type": "array", "items": {"type": "object"}}},
    "required": ["content"],
}


def function_names(upstream: str, tools: list[str]) -> dict[str, str]:
    """`{function name: tool name}` for the tools of one upstream."""
    mapped: dict[str, list[str]] = {}
    for tool in tools:
        base = _OUTSIDE.sub("_", tool.lower())
        if not base[:1].isalpha():
            base = f"t_{base}"
        mapped.setdefault(base, []).append(tool)
    names: dict[str, str] = {}
    for base, owners in mapped.items():
        for tool in owners:
            suffix = "" if len(owners) == 1 else "_" + hashlib.sha256(tool.encode()).hexdigest()[:6]
            names[f"{upstream}.{base}{suffix}"] = tool
    return names


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
            output_schema=tool.output_schema or CONTENT_SCHEMA,
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
