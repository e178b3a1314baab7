"""`soma status` and `soma systemd-unit`: light commands, no grpc and no sidecar code."""

from __future__ import annotations

import argparse
import json

from soma_cli.errors import RUNTIME_FAILURE, CommandError, load


def status(args: argparse.Namespace) -> int:
    from soma_runtime.layout import RuntimeLayout
    from soma_runtime.supervisor.control import fetch_status, format_status

    config = load(args.config)
    path = RuntimeLayout(config.runtime_dir).supervisor_socket
    try:
        answer = fetch_status(path)
    except OSError as exc:
        message = f"no supervisor answers on {path} ({exc})"
        if not args.json:
            raise CommandError(message, RUNTIME_FAILURE) from None
        # Scripts reading --json get JSON either way.
        print(json.dumps({"ok": False, "error": "unreachable", "message": message}, indent=2))
        return RUNTIME_FAILURE
    print(json.dumps(answer, indent=2) if args.json else format_status(answer))
    return 0


def systemd_unit(args: argparse.Namespace) -> int:
    from soma_runtime.systemd_unit import unit_file

    # Built in full before anything is printed: an error leaves no half (or empty) unit.
    text = unit_file(load(args.config), user=args.user)
    print(text, end="")
    return 0
