"""`soma bridge keys create|list|revoke` and `soma mcp stdio`: MCP clients' access to the
bridge instances of the configuration. The stdio relay itself is `soma_cli.mcp_relay`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING

from soma_cli.errors import RUNTIME_FAILURE, SETUP_ERROR, CommandError, load

if TYPE_CHECKING:
    from soma_runtime.bridge_config import BridgeSection
    from soma_runtime.config import SomaConfig

KEY_ENV = "SOMA_BRIDGE_KEY"


def _section(config: SomaConfig, name: str) -> BridgeSection:
    """The `[[bridge]]` named `name`, with API keys on; else exit 2."""
    for section in config.bridge:
        if section.name == name:
            if not section.auth.api_keys:
                raise CommandError(f"bridge {name!r} has api_keys = false", SETUP_ERROR)
            return section
    known = ", ".join(b.name for b in config.bridge) or "none"
    raise CommandError(f"no [[bridge]] named {name!r} (configured: {known})", SETUP_ERROR)


def create_key(args: argparse.Namespace) -> int:
    """The key goes alone to stdout (so `> file` captures exactly it), the rest to stderr."""
    from sidecar.bridge.keys import KeyStore

    config = load(args.config)
    _section(config, args.bridge)
    if args.expires is not None and not 0 < args.expires <= 36500:
        raise CommandError("--expires: a number of days from 0 to 36500", SETUP_ERROR)
    info, key = KeyStore(config.state_dir).create(args.bridge, args.label, args.expires)
    expiry = f"expires {_when(info.expires)}" if info.expires is not None else "never expires"
    print(
        f"key {info.id} for bridge {info.bridge} ({expiry}); shown once, keep it now:",
        file=sys.stderr,
    )
    print(key)
    return 0


def list_keys(args: argparse.Namespace) -> int:
    from sidecar.bridge.keys import KeyStore

    config = load(args.config)
    keys = KeyStore(config.state_dir).list(args.bridge)
    now = time.time()
    rows = [
        {
            "id": k.id,
            "bridge": k.bridge,
            "label": k.label,
            "created": _when(k.created),
            "expires": _when(k.expires) if k.expires is not None else None,
            "status": "revoked"
            if k.revoked is not None
            else "expired"
            if k.expires is not None and k.expires <= now
            else "valid",
        }
        for k in keys
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ("id", "bridge", "label", "created", "expires", "status")
    table = [tuple(c.upper() for c in columns)]
    table += [tuple(row[c] or "-" for c in columns) for row in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    return 0


def revoke_key(args: argparse.Namespace) -> int:
    from sidecar.bridge.keys import KeyStore

    config = load(args.config)
    if not KeyStore(config.state_dir).revoke(args.key_id):
        raise CommandError(f"no valid key {args.key_id!r}", RUNTIME_FAILURE)
    print(f"key {args.key_id} revoked (a running sidecar refuses it within a second)")
    return 0


def _when(timestamp: float | None) -> str:
    assert timestamp is not None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def mcp_stdio(args: argparse.Namespace) -> int:
    import anyio

    from sidecar.bridge.published import published_url
    from soma_cli.mcp_relay import relay

    config = load(args.config)
    section = _section(config, args.bridge)
    key = os.environ.get(KEY_ENV, "").strip()
    if not key:
        raise CommandError(
            f"{KEY_ENV} is not set: put one of bridge {section.name!r}'s API keys there"
            f" (`soma bridge keys create --bridge {section.name}`)",
            SETUP_ERROR,
        )
    url = published_url(config.runtime_dir, section.name)
    if url is None:
        raise CommandError(
            f"no sidecar serves bridge {section.name!r} (start it with `soma supervise`)",
            RUNTIME_FAILURE,
        )
    anyio.run(relay, section.name, config.runtime_dir, url, key)
    return 0
