"""`soma status` and `soma systemd-unit`: light commands, no grpc and no sidecar code."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from soma_cli.errors import RUNTIME_FAILURE, SETUP_ERROR, CommandError, load


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
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    print(format_status(answer))
    sidecar = answer.get("sidecar")
    if sidecar is not None:
        print()
        print(format_sidecar(sidecar))
    return 0


def format_sidecar(sidecar: dict[str, Any]) -> str:
    """Each function's calls, error rate and p95 against its SLO; each runtime's calls."""
    from soma_runtime.supervisor.control import format_table

    rows: list[tuple[str, ...]] = [("FUNCTION", "CALLS", "ERRORS (MAX)", "P95 (SLO)", "SLO")]
    for f in sidecar["functions"]:
        rows.append(
            (
                f["name"],
                str(f["count"]),
                f"{_percent(f['error_rate'])} ({_percent(f['slo_max_error_rate'])})",
                f"{_ms(f['p95_ms'])} ({_ms(f['slo_p95_ms'])})",
                _verdict(f),
            )
        )
    runtimes: list[tuple[str, ...]] = [("RUNTIME", "CALLS", "DENIALS")]
    runtimes += [(c["runtime"], str(c["calls"]), str(c["denials"])) for c in sidecar["channels"]]
    return format_table(rows) + "\n\n" + format_table(runtimes)


def _verdict(function: dict[str, Any]) -> str:
    """`meets`, or `MISSES` and what: a mark to see at a glance (`-` before any call)."""
    if function["count"] == 0:
        return "-"
    missed = []
    if function["p95_ms"] > function["slo_p95_ms"]:
        missed.append("p95")
    if function["error_rate"] > function["slo_max_error_rate"]:
        missed.append("errors")
    return f"MISSES {', '.join(missed)}" if missed else "meets"


def _percent(rate: float) -> str:
    return f"{rate * 100:.2g}%" if rate < 0.1 else f"{rate * 100:.0f}%"


def _ms(value: float | None) -> str:
    """Milliseconds, two significant digits (the histogram is exact to 10%)."""
    if value is None:
        return "-"
    if value >= 10:
        return f"{value:.0f} ms"
    return f"{value:.2g} ms"


def systemd_unit(args: argparse.Namespace) -> int:
    from soma_runtime.systemd_unit import UnitError, access_warnings, service_account, unit_file

    config = load(args.config)
    if args.user and (args.service_user or args.service_group):
        raise CommandError(
            "--service-user and --service-group are for a system unit: a user's manager runs "
            "its units as that user",
            SETUP_ERROR,
        )
    # Built in full before anything is printed: an error leaves no half (or empty) unit.
    try:
        account = (
            None if args.user else service_account(config, args.service_user, args.service_group)
        )
        text = unit_file(config, account=account)
    except UnitError as exc:
        raise CommandError(str(exc), SETUP_ERROR) from None
    for warning in [] if account is None else access_warnings(config, account):
        print(f"soma systemd-unit: warning: {warning}", file=sys.stderr)
    print(text, end="")
    return 0
