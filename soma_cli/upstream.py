"""`soma upstream diff|approve NAME`: review and approve the tool definitions of an upstream
MCP server whose changed (or new) tools the sidecar holds in quarantine (sidecar.upstream.pins).

Both work on the state directory's pin database, so they need no running sidecar; the running
sidecar lifts the quarantine at its next refresh of the upstream's tool list.
"""

from __future__ import annotations

import argparse
import difflib
import json
from typing import TYPE_CHECKING

from soma_cli.errors import RUNTIME_FAILURE, SETUP_ERROR, CommandError, load

if TYPE_CHECKING:
    from sidecar.upstream.pins import PinStore, ToolState


def _store(args: argparse.Namespace) -> PinStore:
    from sidecar.upstream.pins import PinStore

    config = load(args.config)
    if args.name not in {u.name for u in config.upstream}:
        raise CommandError(f"no [[upstream]] named {args.name!r}", SETUP_ERROR)
    return PinStore(config.state_dir)


def _lines(text: str | None) -> list[str]:
    if text is None:
        return []
    return json.dumps(json.loads(text), indent=2, sort_keys=True).splitlines(keepends=True)


def _diff(state: ToolState) -> str:
    return "".join(
        difflib.unified_diff(
            _lines(state.pinned),
            _lines(state.seen),
            fromfile=f"{state.tool} (approved)" if state.pinned else "/dev/null",
            tofile=f"{state.tool} (upstream now)",
        )
    )


def diff(args: argparse.Namespace) -> int:
    """Print what changed in each quarantined tool; exit 1 when some tool is quarantined."""
    quarantined = [s for s in _store(args).states(args.name) if s.quarantined]
    if args.tool is not None:
        quarantined = [s for s in quarantined if s.tool == args.tool]
    for state in quarantined:
        print(_diff(state), end="")
    if not quarantined:
        print(f"upstream {args.name}: no tool awaits approval")
        return 0
    return RUNTIME_FAILURE


def approve(args: argparse.Namespace) -> int:
    approved = _store(args).approve(args.name, args.tool)
    if not approved:
        what = f"tool {args.tool!r}" if args.tool else "no tool"
        raise CommandError(f"upstream {args.name}: {what} awaits approval", RUNTIME_FAILURE)
    print(f"upstream {args.name}: approved {', '.join(approved)}")
    return 0
