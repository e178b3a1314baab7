"""`python -m sidecar`: the commands that need the sidecar's code.

`soma sidecar` and `soma cards export|check` hand over to these (by exec, so the shared core
never imports the sidecar), and they can be run directly the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvloop

from sidecar.app import serve
from sidecar.loading import resolve_organ_class
from sidecar.organs import BUILTIN_ORGANS
from sidecar.secrets_cli import add_commands as add_secret_commands
from sidecar.secrets_cli import run as run_secrets
from sidecar.vault.kek import KekError
from soma_runtime import OrganCard
from soma_runtime.card_files import check_cards, export_cards
from soma_runtime.config import ConfigError, load_config
from soma_runtime.logs import configure_logging
from soma_runtime.unix import UnsafePath


def _serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"soma sidecar: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.logging.level, config.logging.format)
    try:
        uvloop.run(serve(config, supervised=args.supervised))
    except (ConfigError, UnsafePath, KekError) as exc:
        print(f"soma sidecar: {exc}", file=sys.stderr)
        return 2
    return 0


def _cards(specs: list[str]) -> list[OrganCard]:
    return [resolve_organ_class(spec)().describe() for spec in [*BUILTIN_ORGANS, *specs]]


def _cards_export(args: argparse.Namespace) -> int:
    for path in export_cards(_cards(args.organ), args.dir):
        print(path)
    return 0


def _cards_check(args: argparse.Namespace) -> int:
    drift = check_cards(_cards(args.organ), args.dir)
    for item in drift:
        print(f"{args.dir / item.file}: {item.problem}", file=sys.stderr)
    if drift:
        print("cards drifted from the code; run `soma cards export`", file=sys.stderr)
        return 1
    print(f"cards in {args.dir} match the code")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sidecar")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser("serve", help="run the sidecar on [sidecar].socket")
    serve_cmd.add_argument(
        "--config",
        type=Path,
        default=None,
        help="configuration file (default $SOMA_CONFIG, then ./soma.toml)",
    )
    serve_cmd.add_argument(
        "--supervised",
        action="store_true",
        help="serve the admin socket for `soma supervise` instead of [sidecar].socket",
    )
    serve_cmd.set_defaults(handler=_serve)

    secrets = commands.add_parser("secrets", help="manage the vault's secrets")
    add_secret_commands(secrets)
    secrets.set_defaults(handler=run_secrets)

    cards = commands.add_parser("cards", help="export or check the built-in organs' cards")
    card_commands = cards.add_subparsers(dest="cards_command", required=True)
    for name, handler, text in (
        ("export", _cards_export, "write cards/<organ>.toml and .json for every built-in organ"),
        ("check", _cards_check, "exit 1 when the exported cards differ from the code"),
    ):
        sub = card_commands.add_parser(name, help=text)
        sub.add_argument("--dir", type=Path, default=Path("cards"), help="cards directory")
        sub.add_argument(
            "--organ",
            action="append",
            default=[],
            metavar="MODULE:CLASS",
            help="also include this organ (repeatable)",
        )
        sub.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.handler(args)
    except ValueError as exc:
        print(f"soma: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)
