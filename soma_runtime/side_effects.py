"""The vocabulary of a card's `side_effects`: what each entry's first word says it does.

Each entry is a short phrase whose first word is its kind, so a card stays readable and a
machine can still tell a read from a delete (the MCP bridge derives its tool annotations
from it):

- `reads ...`                                 reads local state only
- `writes ...`, `updates ...`, `creates ...`, `appends ...`    adds or changes, never destroys
- `overwrites ...`, `replaces ...`, `deletes ...`, `removes ...`  may destroy what was there
- `network ...`                               reaches hosts outside the machine (any effect there)

An entry of any other kind is taken at its worst: it may destroy, and it may reach the network.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

_READ = frozenset({"reads"})
_WRITE = frozenset({"writes", "updates", "creates", "appends"})
_DESTROY = frozenset({"overwrites", "replaces", "deletes", "removes"})
_NETWORK = frozenset({"network"})


@dataclass(frozen=True, slots=True)
class Effects:
    """What a function's side effects amount to."""

    read_only: bool
    destructive: bool
    open_world: bool


def classify(side_effects: Iterable[str]) -> Effects:
    kinds = {entry.split(maxsplit=1)[0].lower() if entry.strip() else "" for entry in side_effects}
    unknown = kinds - _READ - _WRITE - _DESTROY - _NETWORK
    return Effects(
        read_only=kinds <= _READ,
        destructive=bool(kinds & (_DESTROY | _NETWORK) or unknown),
        open_world=bool(kinds & _NETWORK or unknown),
    )
