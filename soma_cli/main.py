"""The argparse tree. Handlers are named as `module:function` and imported only when run."""

from __future__ import annotations

import argparse
import importlib
import os
import select
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

Handler = Callable[[argparse.Namespace], int]
CARDS_DIR = Path("cards")


def _version() -> str:
    try:
        return version("soma-runtime")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _command(
    group: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    text: str,
    handler: str,
    *,
    config: bool = True,
) -> argparse.ArgumentParser:
    sub = group.add_parser(name, help=text, description=text)
    if config:
        sub.add_argument(
            "--config",
            type=Path,
            default=None,
            help="configuration file (default $SOMA_CONFIG, then ./soma.toml)",
        )
    sub.set_defaults(handler=handler)
    return sub


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {value}")
    return value


def _positive(text: str) -> int:
    value = _count(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _bench_groups(text: str) -> list[str]:
    from soma_bench import GROUPS  # a constant; the benchmark itself loads when it runs

    groups = [g.strip() for g in text.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise argparse.ArgumentTypeError(
            f"unknown group(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(GROUPS)}"
        )
    return groups


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soma", description="Soma Runtime")
    parser.add_argument("--version", action="version", version=f"soma {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _command(commands, "supervise", "run the sidecar and the runtimes", "soma_cli.run:supervise")
    sidecar = _command(
        commands, "sidecar", "run the sidecar on [sidecar].socket", "soma_cli.run:sidecar"
    )
    sidecar.add_argument(
        "--supervised",
        action="store_true",
        help="serve the admin socket for `soma supervise` instead of [sidecar].socket",
    )
    status = _command(commands, "status", "show the supervised processes", "soma_cli.status:status")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    unit = _command(
        commands,
        "systemd-unit",
        "print a systemd unit for `soma supervise`",
        "soma_cli.status:systemd_unit",
    )
    unit.add_argument(
        "--user", action="store_true", help="a unit for your own user manager (systemctl --user)"
    )
    unit.add_argument(
        "--service-user",
        metavar="NAME",
        help="the user a system unit runs the supervisor and agents as "
        "(default: the owner of the configuration file; never root unless named)",
    )
    unit.add_argument(
        "--service-group", metavar="NAME", help="its group (default: the user's own group)"
    )

    secrets = commands.add_parser(
        "secrets", help="the vault's secrets: set, list, delete, rotate-kek, audit"
    )
    actions = secrets.add_subparsers(dest="action", required=True, metavar="ACTION")
    set_cmd = _command(
        actions,
        "set",
        "store a new version (typed without echo on a terminal; else stdin or --file)",
        "soma_cli.secrets:set_secret",
    )
    set_cmd.add_argument("name")
    set_cmd.add_argument("--file", type=Path, help="read the value from this file")
    listing = _command(
        actions, "list", "names, versions, dates and users; no values", "soma_cli.secrets:list_"
    )
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    _command(
        actions, "delete", "delete every version of a secret", "soma_cli.secrets:delete"
    ).add_argument("name")
    _command(
        actions, "rotate-kek", "re-wrap every data key under a new KEK", "soma_cli.secrets:rotate"
    )
    audit = _command(
        actions,
        "audit",
        "print the audit log (JSON lines), oldest first",
        "soma_cli.secrets:audit",
    )
    audit.add_argument("name", nargs="?", default=None, help="only this secret's entries")
    audit.add_argument("--limit", type=int, default=1000, help="at most this many entries")

    cards = commands.add_parser("cards", help="capability cards: export, check, search")
    actions = cards.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, handler, text in (
        ("export", "soma_cli.cards:export", "write cards/<organ>.toml and .json"),
        ("check", "soma_cli.cards:check", "exit 1 when the exported cards drift from the code"),
    ):
        sub = _command(actions, name, text, handler, config=False)
        sub.add_argument("--dir", type=Path, default=CARDS_DIR, help="cards directory")
        sub.add_argument(
            "--organ",
            action="append",
            default=[],
            metavar="MODULE:CLASS",
            help="also include this organ (repeatable)",
        )
    search = _command(
        actions,
        "search",
        "search the exported cards (imports no organ)",
        "soma_cli.cards:search",
        config=False,
    )
    search.add_argument("query", nargs="?", default="", help="words that must all match")
    search.add_argument("--tag", default=None, help="only functions with this tag")
    search.add_argument("--dir", type=Path, default=CARDS_DIR, help="cards directory")
    search.add_argument("--json", action="store_true", help="print the matching cards as JSON")

    # MCP bridge instances (soma_cli.bridge): API keys, and the stdio front MCP clients launch.
    bridge = commands.add_parser("bridge", help="MCP bridge instances: API keys")
    actions = bridge.add_subparsers(dest="action", required=True, metavar="ACTION")
    keys = actions.add_parser("keys", help="API keys of bridge instances: create, list, revoke")
    actions = keys.add_subparsers(dest="key_action", required=True, metavar="ACTION")
    create = _command(
        actions, "create", "create a key and print it (once)", "soma_cli.bridge:create_key"
    )
    create.add_argument("--bridge", required=True, metavar="NAME", help="the [[bridge]] name")
    create.add_argument("--label", default="", help="a note shown by `list`")
    create.add_argument("--expires", type=float, metavar="DAYS", help="expire after DAYS")
    keys_list = _command(actions, "list", "keys, without secrets", "soma_cli.bridge:list_keys")
    keys_list.add_argument("--bridge", metavar="NAME", help="only this bridge's keys")
    keys_list.add_argument("--json", action="store_true", help="print the list as JSON")
    _command(actions, "revoke", "revoke a key by id", "soma_cli.bridge:revoke_key").add_argument(
        "key_id", metavar="KEY_ID"
    )
    mcp = commands.add_parser("mcp", help="serve a bridge instance to an MCP client")
    actions = mcp.add_subparsers(dest="action", required=True, metavar="ACTION")
    _command(
        actions,
        "stdio",
        "MCP over stdin/stdout, relayed to the running bridge instance with $SOMA_BRIDGE_KEY",
        "soma_cli.bridge:mcp_stdio",
    ).add_argument("--bridge", required=True, metavar="NAME", help="the [[bridge]] name")

    # -- soma upstream: pinned tool definitions of upstream MCP servers ----------------------
    upstream = commands.add_parser(
        "upstream", help="upstream MCP servers: review and approve changed tool definitions"
    )
    actions = upstream.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, handler, text in (
        ("diff", "soma_cli.upstream:diff", "show how quarantined tools changed (exit 1 if any)"),
        ("approve", "soma_cli.upstream:approve", "approve the tools' current definitions"),
    ):
        sub = _command(actions, name, text, handler)
        sub.add_argument("name", help="the [[upstream]] name")
        sub.add_argument("--tool", default=None, help="only this tool (its upstream name)")
    # -- end soma upstream -------------------------------------------------------------------

    # -- soma bench: what a call costs, beside bare baselines (soma_bench) -------------------
    bench = _command(
        commands,
        "bench",
        "measure the call paths against bare baselines; a table on stdout, progress on stderr",
        "soma_bench.cli:bench",
        config=False,
    )
    bench.add_argument("--quick", action="store_true", help="the short run `make bench` makes")
    bench.add_argument("--json", type=Path, metavar="PATH", help="write every figure as JSON")
    bench.add_argument("--plot", type=Path, metavar="PATH", help="draw a chart (PNG, matplotlib)")
    bench.add_argument(
        "--cases",
        type=_bench_groups,
        metavar="GROUP,...",
        help="only these groups: echo, inflight, payload, supervised, gateway, runtimes, bridge",
    )
    bench.add_argument("--batches", type=_positive, metavar="N", help="interleaved batches")
    bench.add_argument("--calls", type=_positive, metavar="N", help="calls per batch")
    bench.add_argument("--warmup", type=_count, metavar="N", help="warm-up calls per case")
    bench.add_argument(
        "--long",
        type=_positive,
        nargs="?",
        const=1_000_000,
        metavar="CALLS",
        help="also check the sidecar's RSS stays flat over CALLS calls (default a million)",
    )
    bench.add_argument(
        "--fail-on-miss",
        action="store_true",
        help="exit 1 when a target this run measured is missed (after printing and writing)",
    )
    # -- end soma bench ----------------------------------------------------------------------
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # After parsing: --help and --version stay light.
    from soma_cli.errors import RUNTIME_FAILURE, CommandError

    module, _, name = args.handler.partition(":")
    handler: Handler = getattr(importlib.import_module(module), name)
    try:
        code = handler(args)
        sys.stdout.flush()  # here, not at exit: a reader that left is handled below
    except CommandError as exc:
        print(f"soma {args.command}: {exc}", file=sys.stderr)
        code = exc.code
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe or socket: a real failure, with its traceback
        # `soma status | head -1`: the reader took what it wanted. Stop without a traceback
        # (the recipe of the `signal` module's docs): stdout now goes to /dev/null, so the
        # interpreter's last flush of what is still buffered cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = RUNTIME_FAILURE
    sys.exit(code)


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe nobody reads any more (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):  # no usable stdout at all
        return False
