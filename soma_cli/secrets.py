"""`soma secrets set|list|delete|rotate-kek|audit`: the I/O around `sidecar.secret_admin`.

Values come from a terminal (without echo), standard input or a file, never from the command
line: argv is visible to every user through `ps` and /proc.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from soma_cli.errors import RUNTIME_FAILURE, SETUP_ERROR, CommandError, load

if TYPE_CHECKING:
    from soma_runtime.config import SomaConfig


def _run(args: argparse.Namespace, operation: Callable[[SomaConfig], Any]) -> Any:
    """`operation` on the loaded configuration, its errors turned into exit 2 or 1."""
    from sidecar.secret_admin import FAILURES, SETUP_ERRORS
    from soma_runtime.config import ConfigError

    config = load(args.config)
    try:
        return operation(config)
    except (ConfigError, *SETUP_ERRORS) as exc:
        raise CommandError(str(exc), SETUP_ERROR) from None
    except FAILURES as exc:
        if isinstance(exc, OSError) and exc.strerror is not None:
            raise CommandError(f"{exc.strerror}: {exc.filename}", RUNTIME_FAILURE) from None
        raise CommandError(str(exc), RUNTIME_FAILURE) from None


def _read_value(args: argparse.Namespace) -> bytes:
    """The value, or exit 2 when there is none or too much: the operator's input is wrong,
    and nothing was stored (the vault would refuse it too, but as a failure, exit 1)."""
    from sidecar.vault.store import MAX_SECRET_BYTES

    if args.file is not None:
        source = str(args.file)
        try:
            raw: bytes = args.file.read_bytes()
        except OSError as exc:
            raise CommandError(f"{exc.strerror}: {exc.filename}", RUNTIME_FAILURE) from None
    elif sys.stdin.isatty():
        import getpass

        source = "the terminal"
        # Not echoed: a secret typed on a terminal must not stay on the screen or in scrollback.
        raw = getpass.getpass(f"Value for {args.name}: ").encode()
    else:
        source = "standard input"
        raw = sys.stdin.buffer.read(MAX_SECRET_BYTES + 2)
    # One trailing newline is what `echo` and editors add, not part of the secret.
    value = raw.removesuffix(b"\n").removesuffix(b"\r")
    if not value:
        raise CommandError(
            f"secret {args.name!r}: no value: {source} gave nothing "
            "(type it at the prompt, pipe it in, or use --file PATH); nothing stored",
            SETUP_ERROR,
        )
    if len(value) > MAX_SECRET_BYTES:
        raise CommandError(
            f"secret {args.name!r}: the value from {source} is over {MAX_SECRET_BYTES} bytes; "
            "nothing stored",
            SETUP_ERROR,
        )
    return value


def warn_missing_secrets(config: SomaConfig) -> None:
    """At the sidecar's start: a warning, with the command that fixes it, for each configured
    credential whose secret is not in the vault (every use of it would fail until then)."""
    import structlog

    from sidecar import secret_admin

    if not config.credential:
        return
    try:
        stored = {s["name"] for s in secret_admin.list_secrets(config)}
    except (*secret_admin.SETUP_ERRORS, *secret_admin.FAILURES):
        return  # the sidecar reports a vault it cannot use where it uses it
    log = structlog.get_logger(component="sidecar")
    for credential in config.credential:
        if credential.secret_name not in stored:
            log.warning(
                "credential_secret_missing",
                credential=credential.name,
                secret=credential.secret_name,
                fix=f"soma secrets set {credential.secret_name} --config {config.source}",
            )


def set_secret(args: argparse.Namespace) -> int:
    from sidecar import secret_admin

    value = _read_value(args)
    version = _run(args, lambda config: secret_admin.set_secret(config, args.name, value))
    print(f"secret {args.name}: version {version} stored")
    return 0


def list_(args: argparse.Namespace) -> int:
    from sidecar import secret_admin

    secrets: list[dict[str, Any]] = _run(args, secret_admin.list_secrets)
    if args.json:
        print(json.dumps(secrets, indent=2))
        return 0
    table = [("NAME", "VERSIONS", "CREATED", "UPDATED", "USED BY")]
    table += [
        (
            s["name"],
            str(s["versions"]),
            s["created_at"],
            s["updated_at"],
            ", ".join(s["used_by"]) or "-",
        )
        for s in secrets
    ]
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def delete(args: argparse.Namespace) -> int:
    from sidecar import secret_admin

    deleted = _run(args, lambda config: secret_admin.delete_secret(config, args.name))
    print(f"secret {args.name}: {deleted} version(s) deleted")
    return 0


def rotate(args: argparse.Namespace) -> int:
    from sidecar import secret_admin

    count, kek_id = _run(args, secret_admin.rotate_kek)
    print(f"re-wrapped {count} data key(s) under key-encryption key {kek_id}")
    return 0


def audit(args: argparse.Namespace) -> int:
    from sidecar import secret_admin

    entries = _run(args, lambda config: secret_admin.audit_log(config, args.name, args.limit))
    for entry in entries:
        print(json.dumps(entry))
    return 0
