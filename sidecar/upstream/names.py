"""The function names of an upstream's tools, and why an approved one never moves.

A tool is the function `<upstream>.<base>`, its base being its name lower-cased, every
character outside `[a-z0-9_-]` replaced by `_`, and `t_` prefixed when that does not start
with a letter. Tools whose bases collide, or whose name is taken, get `_<6 hex of the tool
name's SHA-256>` appended (the whole digest when even that is taken). A name is taken once it
is approved: the pin store keeps each approved tool's name, so a newcomer (`Get_Ticket` beside
`get_ticket`) never renames a tool that callers and `expose` lists already use.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping

_OUTSIDE = re.compile(r"[^a-z0-9_-]")


def _base(tool: str) -> str:
    base = _OUTSIDE.sub("_", tool.lower())
    return base if base[:1].isalpha() else f"t_{base}"


def assign(upstream: str, tools: Iterable[str], kept: Mapping[str, str]) -> dict[str, str]:
    """`{tool: function name}` for `tools`, none of them a name of `kept` (`{tool: function
    name}` of the tools whose names are fixed); a tool left without a name is left out."""
    taken = set(kept.values())
    groups: dict[str, list[str]] = {}
    for tool in sorted(set(tools) - set(kept)):
        groups.setdefault(_base(tool), []).append(tool)
    names: dict[str, str] = {}
    # Plain names first, so that no tool's suffixed name takes another tool's plain one.
    for base, owners in groups.items():
        plain = f"{upstream}.{base}"
        if len(owners) == 1 and plain not in taken:
            names[owners[0]] = plain
            taken.add(plain)
    for base, owners in groups.items():
        for tool in owners:
            if tool in names:
                continue
            digest = hashlib.sha256(tool.encode()).hexdigest()
            for suffix in (digest[:6], digest):
                name = f"{upstream}.{base}_{suffix}"
                if name not in taken:
                    names[tool] = name
                    taken.add(name)
                    break
    return names
