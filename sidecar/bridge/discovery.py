"""Progressive discovery (`discovery = "search"`): an instance lists two tools instead of
hundreds. `search_tools` searches the exposed functions with the executive's search (names,
descriptions, tags, examples) and returns the matching tools as `tools/list` would describe
them; `call_tool` calls one of them by that name, through the same path as a listed tool
(validation, write scopes, idempotency keys, audit)."""

from __future__ import annotations

from typing import Any

import mcp.types as types

SEARCH_TOOLS = "search_tools"
CALL_TOOL = "call_tool"
MAX_RESULTS = 50

SEARCH_TOOL = types.Tool(
    name=SEARCH_TOOLS,
    title="Search the tools of this server",
    description=(
        "Find tools by what they do: every word of `query` must match a tool's name, "
        "description, tags or examples. Returns the best matches with their input schemas; "
        f"call one with {CALL_TOOL}."
    ),
    input_schema={
        "type": "object",
        "properties": {
            "query": {"type": "string", "maxLength": 1000},
            "tag": {"type": "string", "maxLength": 100},
            "limit": {"type": "integer", "minimum": 1, "maximum": MAX_RESULTS},
        },
        "required": ["query"],
        "additionalProperties": False,
    },
    annotations=types.ToolAnnotations(
        read_only_hint=True, idempotent_hint=True, open_world_hint=False
    ),
)

CALL_TOOL_TOOL = types.Tool(
    name=CALL_TOOL,
    title="Call a tool found with search_tools",
    description=(
        f"Call a tool returned by {SEARCH_TOOLS} with arguments matching its input schema. "
        "Its annotations (read-only, destructive, idempotent) are in the search result."
    ),
    input_schema={
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 256},
            "arguments": {"type": "object"},
        },
        "required": ["name"],
        "additionalProperties": False,
    },
    # The union of what the tools behind it may do.
    annotations=types.ToolAnnotations(
        read_only_hint=False, destructive_hint=True, idempotent_hint=False, open_world_hint=True
    ),
)


def call_target(arguments: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """`(tool name, its arguments)` of `call_tool` arguments already validated against its
    input schema."""
    return arguments["name"], arguments.get("arguments", {})
