"""The `soma` command.

Commands that run sidecar code are handed to `python -m sidecar` by exec (see `DELEGATED`):
the shared core never imports the sidecar, the sidecar's own parser owns their options and
help, and `soma sidecar` keeps its pid, so signals reach the server directly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from soma_runtime.card_files import CardFileError, functions_of, load_cards
from soma_runtime.config import ConfigError, SomaConfig, load_config
from soma_runtime.layout import RuntimeLayout
from soma_runtime.logs import configure_logging
from soma_runtime.search import search_functions
from soma_runtime.supervisor.arbiter import Supervisor
from soma_runtime.supervisor.control import fetch_status, format_status
from soma_runtime.systemd_unit import unit_file
from soma_runtime.unix import UnsafePath

Handler = Callable[[argparse.Namespace], int]

# `soma <prefix> ARGS` runs `python -m sidecar <target> ARGS`; the text is the help line.
DELEGATED: dict[tuple[str, ...], tuple[tuple[str, ...], str]] = {
    ("sidecar",): (("serve",), "run the sidecar on [sidecar].socket"),
    ("cards", "export"): (("cards", "export"), "write cards/<organ>.toml and .json"),
    ("cards", "check"): (("cards", "check"), "exit 1 when the exported cards drift from the code"),
    ("secrets",): (("secrets",), "the vault's secrets: set, list, delete, rotate-kek, audit"),
}


def _cards_search(args: argparse.Namespace) -> int:
    try:
        cards = load_cards(args.dir)
    except CardFileError as exc:
        print(f"soma cards search: {exc}", file=sys.stderr)
        return 2
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
        return 1
    width = max(len(card.name) for _, card in matches)
    for organ, card in matches:
        print(f"{card.name:<{width}}  [{organ}] {card.description}")
    return 0


def _load(args: argparse.Namespace) -> SomaConfig:
    try:
        return load_config(args.config)
    except ConfigError as exc:
        raise SystemExit(f"soma {args.command}: {exc}") from None


def _supervise(args: argparse.Namespace) -> int:
    config = _load(args)
    configure_logging(config.logging.level, config.logging.format)
    try:
        return asyncio.run(Supervisor(config).run())
    except UnsafePath as exc:  # a runtime or state directory others could redirect
        print(f"soma supervise: {exc}", file=sys.stderr)
        return 2


def _status(args: argparse.Namespace) -> int:
    config = _load(args)
    path = RuntimeLayout(config.runtime_dir).supervisor_socket
    try:
        status = fetch_status(path)
    except OSError as exc:
        print(f"soma status: no supervisor answers on {path} ({exc})", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _systemd_unit(args: argparse.Namespace) -> int:
    print(unit_file(_load(args), user=args.user), end="")
    return 0


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="configuration file (default $SOMA_CONFIG, then ./soma.toml)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soma", description="Soma Runtime")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}

    cards = commands.add_parser("cards", help="capability cards: export, check, search")
    groups["cards"] = cards.add_subparsers(dest="action", required=True, metavar="ACTION")
    for prefix, (_, text) in DELEGATED.items():
        parent = groups[prefix[0]] if len(prefix) > 1 else commands
        parent.add_parser(prefix[-1], help=text, add_help=False)

    supervise = commands.add_parser("supervise", help="run the sidecar and the runtimes")
    _add_config(supervise)
    supervise.set_defaults(handler=_supervise)

    status = commands.add_parser("status", help="show the supervised processes")
    _add_config(status)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(handler=_status)

    unit = commands.add_parser("systemd-unit", help="print a systemd unit for `soma supervise`")
    _add_config(unit)
    unit.add_argument("--user", action="store_true", help="a unit for the user's manager")
    unit.set_defaults(handler=_systemd_unit)

    search = groups["cards"].add_parser(
        "search", help="search the exported cards (imports no organ)"
    )
    search.add_argument("query", nargs="?", default="", help="words that must all match")
    search.add_argument("--tag", default=None, help="only functions with this tag")
    search.add_argument("--dir", type=Path, default=Path("cards"), help="cards directory")
    search.add_argument("--json", action="store_true", help="print the matching cards as JSON")
    search.set_defaults(handler=_cards_search)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    for prefix, (target, _) in DELEGATED.items():
        if tuple(args[: len(prefix)]) == prefix:
            argv_ = [sys.executable, "-m", "sidecar", *target, *args[len(prefix) :]]
            os.execv(sys.executable, argv_)  # noqa: S606 - argv, no shell: this is the point
    parsed = build_parser().parse_args(args)
    handler: Handler = parsed.handler
    sys.exit(handler(parsed))
