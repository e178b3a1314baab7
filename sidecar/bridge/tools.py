"""MCP tools derived from the cards at request time, never declared a second time.

Everything a tool says comes from its function's card: the description with its examples,
the schemas, the annotations (from `idempotent` and the `side_effects` vocabulary, see
`soma_runtime.side_effects`), and the SLO and tags under our `_meta` prefix.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import mcp.types as types

from sidecar.access import AllowList
from sidecar.bridge.names import ToolNames, function_name, tool_name
from soma_runtime.bridge_config import BridgeSection
from soma_runtime.cards import FunctionCard
from soma_runtime.search import has_tag
from soma_runtime.side_effects import Effects, classify

# Our reverse-DNS `_meta` prefix (the project's GitHub organisation, soma-runtime.github.io).
META = "io.github.soma-runtime/"
IDEMPOTENCY_KEY = META + "idempotency-key"


class Exposure:
    """Which functions one bridge instance exposes, and under which tool names."""

    def __init__(self, section: BridgeSection) -> None:
        self._globs = AllowList(section.expose)
        self._tags = tuple(section.expose_tags)
        self.form: ToolNames = section.tool_names

    def exposes(self, card: FunctionCard) -> bool:
        return self._globs.allows(card.name) or any(has_tag(card, t) for t in self._tags)

    def tools(self, functions: Iterable[FunctionCard]) -> list[tuple[str, FunctionCard]]:
        """`(tool name, card)` of each exposed function that has a tool name, by name."""
        named = ((tool_name(card.name, self.form), card) for card in functions)
        return sorted(
            ((name, card) for name, card in named if name is not None and self.exposes(card)),
            key=lambda pair: pair[0],
        )

    def resolve(self, tool: str, functions: Iterable[FunctionCard]) -> FunctionCard | None:
        """The exposed function `tool` names in this instance's form, else None."""
        function = function_name(tool, self.form)
        if function is None:
            return None
        card = next((c for c in functions if c.name == function), None)
        return card if card is not None and self.exposes(card) else None


def effects(card: FunctionCard) -> Effects:
    return classify(card.side_effects)


def listed_output_schema(card: FunctionCard) -> dict[str, Any] | None:
    """The `outputSchema` a tool lists, which its structured results must then match.

    MCP requires an object at the root of outputSchema; other outputs go out as text only.
    An upstream tool that declared no output schema is listed without one too: its card
    declares no object (sidecar.upstream.cards.UNDECLARED_OUTPUT)."""
    return card.output_schema if card.output_schema.get("type") == "object" else None


def to_tool(name: str, card: FunctionCard) -> types.Tool:
    found = effects(card)
    description = card.description
    if card.examples:
        description += "\n\nExamples:\n" + "\n".join(f"- {e}" for e in card.examples)
    output_schema = listed_output_schema(card)
    meta: dict[str, object] = {
        META + "function": card.name,
        META + "slo": card.slo.model_dump(exclude_none=True),
        META + "tags": list(card.tags),
        META + "side_effects": list(card.side_effects),
    }
    if not card.idempotent:
        meta[META + "accepts"] = [IDEMPOTENCY_KEY]
    return types.Tool(
        name=name,
        # The real function name, whatever form the tool's name takes.
        title=card.name,
        description=description,
        input_schema=card.input_schema,
        output_schema=output_schema,
        annotations=types.ToolAnnotations(
            title=card.name,
            read_only_hint=found.read_only,
            # destructive/idempotent mean something only for tools that are not read-only.
            destructive_hint=found.destructive and not found.read_only,
            idempotent_hint=card.idempotent,
            open_world_hint=found.open_world,
        ),
        _meta=meta,
    )
