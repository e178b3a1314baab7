"""Tool names: a function's dotted name, or a form model APIs accept.

Many hosts pass tool names straight to model APIs that allow only `^[a-zA-Z0-9_-]{1,64}$`,
so the default ("safe") form rewrites the dots of `organ.function` names, reversibly:

    "_" -> "__"      "." -> "_"        ("vault.retrieve" -> "vault_retrieve",
                                         "my_organ.do_it" -> "my__organ_do__it")

A function name's segments start with a letter, so "." is never followed by "_" and a run of
n underscores decodes as n // 2 underscores followed by a dot when n is odd: the mapping is a
bijection. A name is accepted only in its instance's form and only when it is canonical
(re-encoding its decoding gives it back), so no second spelling reaches a function.
"""

from __future__ import annotations

import re
from typing import Literal

from soma_runtime.cards import FUNCTION_NAME

ToolNames = Literal["safe", "dotted"]
SAFE_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_FUNCTION = re.compile(FUNCTION_NAME)
_RUN = re.compile(r"_+")


def tool_name(function: str, form: ToolNames) -> str | None:
    """The tool name of `function`; None when its safe form would exceed 64 characters."""
    if form == "dotted":
        return function
    name = function.replace("_", "__").replace(".", "_")
    return name if SAFE_TOOL_NAME.fullmatch(name) else None


def function_name(tool: str, form: ToolNames) -> str | None:
    """The function a tool name stands for; None when it is not a canonical name in `form`."""
    if form == "dotted":
        function = tool
    else:
        if not SAFE_TOOL_NAME.fullmatch(tool):
            return None
        function = _RUN.sub(lambda m: "_" * (len(m[0]) // 2) + "." * (len(m[0]) % 2), tool)
    if not _FUNCTION.fullmatch(function) or tool_name(function, form) != tool:
        return None
    return function
