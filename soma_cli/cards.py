"""`soma cards export|check|search`: the capability cards in `cards/`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from soma_cli.errors import RUNTIME_FAILURE, SETUP_ERROR, CommandError

if TYPE_CHECKING:
    from soma_runtime import OrganCard


def _cards(specs: list[str]) -> list[OrganCard]:
    """The built-in organs' cards and those of `--organ MODULE:CLASS` (imported from here)."""
    from sidecar.loading import resolve_organ_class
    from sidecar.organs import BUILTIN_ORGANS

    sys.path.insert(0, "")  # `--organ` paths are relative to where `soma` is run
    try:
        return [resolve_organ_class(spec)().describe() for spec in [*BUILTIN_ORGANS, *specs]]
    except ValueError as exc:
        raise CommandError(str(exc), SETUP_ERROR) from None


def export(args: argparse.Namespace) -> int:
    from soma_runtime.card_files import export_cards

    for path in export_cards(_cards(args.organ), args.dir):
        print(path)
    return 0


def check(args: argparse.Namespace) -> int:
    from soma_runtime.card_files import check_cards

    drift = check_cards(_cards(args.organ), args.dir)
    for item in drift:
        print(f"{args.dir / item.file}: {item.problem}", file=sys.stderr)
    if drift:
        raise CommandError("cards drifted from the code; run `soma cards export`", RUNTIME_FAILURE)
    print(f"cards in {args.dir} match the code")
    return 0


def search(args: argparse.Namespace) -> int:
    from soma_runtime.card_files import CardFileError, functions_of, load_cards
    from soma_runtime.search import search_functions

    try:
        cards = load_cards(args.dir)
    except CardFileError as exc:
        raise CommandError(str(exc), SETUP_ERROR) from None
    matches = search_functions(functions_of(cards), args.query, args.tag)
    if args.json:
        found = [
            {"organ": o, "function": c.model_dump(mode="json", exclude_none=True)}
            for o, c in matches
        ]
        print(json.dumps(found, indent=2))
        return 0
    if not matches:
        print("no matching functions", file=sys.stderr)
        return RUNTIME_FAILURE
    width = max(len(card.name) for _, card in matches)
    for organ, card in matches:
        print(f"{card.name:<{width}}  [{organ}] {card.description}")
    return 0
