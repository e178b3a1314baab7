"""`soma secrets`: set, list, delete and rotate the vault's secrets, and read the audit log.

Values come from standard input or a file, never from the command line: argv is visible to
every user through `ps` and /proc.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sidecar.vault.kek import KekError
from sidecar.vault.open import VaultSetupError, open_vault
from sidecar.vault.store import MAX_SECRET_BYTES, VaultError
from soma_runtime.config import ConfigError, SomaConfig, load_config
from soma_runtime.unix import UnsafePath


def users_of(config: SomaConfig, secret: str) -> list[str]:
    """Who may have `secret` used on their behalf: runtimes, directly or through a gateway."""
    credentials = {c.name for c in config.credential if c.secret_name == secret}
    gateways = {g.name for g in config.gateway if g.credential in credentials}
    users = []
    for runtime in config.runtime:
        via = sorted(credentials & set(runtime.credentials)) + [
            f"gateway {g}" for g in sorted(gateways & set(runtime.gateways))
        ]
        if via:
            users.append(f"{runtime.name} ({', '.join(via)})")
    return users


def _read_value(args: argparse.Namespace) -> bytes:
    if args.file is not None:
        raw = Path(args.file).read_bytes()
    else:
        if sys.stdin.isatty():
            print(f"Value for {args.name} (end with Ctrl-D):", file=sys.stderr)
        raw = sys.stdin.buffer.read(MAX_SECRET_BYTES + 2)
    # One trailing newline is what `echo` and editors add, not part of the secret.
    return raw.removesuffix(b"\n").removesuffix(b"\r")


def _set(args: argparse.Namespace, config: SomaConfig) -> int:
    value = _read_value(args)
    vault = open_vault(config)
    version = vault.set_secret(args.name, value)
    print(f"secret {args.name}: version {version} stored")
    return 0


def _list(args: argparse.Namespace, config: SomaConfig) -> int:
    secrets = open_vault(config).list_secrets()
    users = {s.name: users_of(config, s.name) for s in secrets}
    if args.json:
        print(json.dumps([{**asdict(s), "used_by": users[s.name]} for s in secrets], indent=2))
        return 0
    table = [("NAME", "VERSIONS", "CREATED", "UPDATED", "USED BY")]
    table += [
        (s.name, str(s.versions), s.created_at, s.updated_at, ", ".join(users[s.name]) or "-")
        for s in secrets
    ]
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _delete(args: argparse.Namespace, config: SomaConfig) -> int:
    deleted = open_vault(config).delete_secret(args.name)
    print(f"secret {args.name}: {deleted} version(s) deleted")
    return 0


def _rotate(args: argparse.Namespace, config: SomaConfig) -> int:
    vault = open_vault(config)
    count = vault.rotate_kek()
    print(
        f"re-wrapped {count} data key(s) under key-encryption key {vault.provider.current().kek_id}"
    )
    return 0


def _audit(args: argparse.Namespace, config: SomaConfig) -> int:
    for entry in reversed(open_vault(config).audit_log(args.name, args.limit)):
        print(json.dumps(entry))
    return 0


def add_commands(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=None,
        help="configuration file (default $SOMA_CONFIG, then ./soma.toml)",
    )
    commands = parser.add_subparsers(dest="secrets_command", required=True)

    def command(name: str, text: str, handler: Any) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, parents=[common])
        sub.set_defaults(secrets_handler=handler)
        return sub

    set_cmd = command("set", "store a new version (value from stdin or --file)", _set)
    set_cmd.add_argument("name")
    set_cmd.add_argument("--file", help="read the value from this file instead of stdin")
    list_cmd = command("list", "names, versions, dates and users; no values", _list)
    list_cmd.add_argument("--json", action="store_true")
    command("delete", "delete every version of a secret", _delete).add_argument("name")
    command("rotate-kek", "re-wrap every data key under a new KEK", _rotate)
    audit = command("audit", "print the audit log (JSON lines), oldest first", _audit)
    audit.add_argument("name", nargs="?", default=None)
    audit.add_argument("--limit", type=int, default=1000)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        return int(args.secrets_handler(args, config))
    except (ConfigError, VaultError, KekError, UnsafePath, sqlite3.Error) as exc:
        print(f"soma secrets: {exc}", file=sys.stderr)
        # 2: the setup must be fixed first (configuration, key, paths); 1: this command failed.
        return 2 if isinstance(exc, ConfigError | KekError | UnsafePath | VaultSetupError) else 1
    except OSError as exc:
        print(f"soma secrets: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return 1
