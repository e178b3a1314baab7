"""Checking `[[runtime]].allow` globs against the functions the sidecar has loaded.

A glob whose organ part (before the first `.`) names no loaded organ can never match: a typo
(`sytem.*`) that would silently deny everything, so it is refused. A glob that names a loaded
organ but matches none of its functions today is only warned about.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from soma_runtime.config import ConfigError, RuntimeSection


@dataclass(frozen=True, slots=True)
class Unmatched:
    """A glob that matches no loaded function: where it is, and what was perhaps meant."""

    key: str  # `runtime[i].allow[j]`
    pattern: str
    suggestion: str | None


def check_allow_lists(
    runtimes: Sequence[RuntimeSection], functions: Collection[str]
) -> list[Unmatched]:
    """The globs that match no function today; `ConfigError` naming every glob that never
    can (all of them at once: an operator fixes the file in one go, not one start per typo)."""
    organs = sorted({name.split(".", 1)[0] for name in functions})
    unmatched = []
    refused = []
    for i, runtime in enumerate(runtimes):
        for j, pattern in enumerate(runtime.allow):
            if any(fnmatch.fnmatchcase(name, pattern) for name in functions):
                continue
            key = f"runtime[{i}].allow[{j}]"
            organ, dot, rest = pattern.partition(".")
            if not any(fnmatch.fnmatchcase(name, organ) for name in organs):
                close = difflib.get_close_matches(organ, organs, n=1)
                hint = f"; did you mean {close[0] + dot + rest!r}?" if close else ""
                known = ", ".join(organs) or "none"
                refused.append(
                    f"{key}: {pattern!r} can match no function: no loaded organ is named "
                    f"{organ!r} (loaded: {known}){hint}"
                )
                continue
            close = difflib.get_close_matches(pattern, functions, n=1)
            unmatched.append(Unmatched(key, pattern, close[0] if close else None))
    if refused:
        raise ConfigError("; ".join(refused))  # the separator of every config error's problems
    return unmatched
