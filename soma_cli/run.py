"""`soma supervise` and `soma sidecar`: the two long-running processes."""

from __future__ import annotations

import argparse
import sys

from soma_cli.errors import SETUP_ERROR, CommandError, load


def supervise(args: argparse.Namespace) -> int:
    import asyncio

    from soma_runtime.logs import configure_logging
    from soma_runtime.supervisor.arbiter import Supervisor
    from soma_runtime.unix import UnsafePath

    config = load(args.config)
    configure_logging(config.logging.level, config.logging.format)
    try:
        return asyncio.run(Supervisor(config).run())
    except UnsafePath as exc:  # a runtime or state directory others could redirect
        raise CommandError(str(exc), SETUP_ERROR) from None


def sidecar(args: argparse.Namespace) -> int:
    """Serve until a signal. Every error that stops it before it serves is a setup error
    (exit 2): a bad organ, key or path will fail the same way on every restart."""
    import uvloop

    from sidecar.app import serve
    from sidecar.vault.kek import KekError
    from sidecar.vault.open import VaultSetupError
    from soma_runtime.config import ConfigError
    from soma_runtime.logs import configure_logging
    from soma_runtime.unix import UnsafePath

    config = load(args.config)
    assert config.source is not None
    # Organ modules (`module:Class`) are imported from the configuration file's directory,
    # whether `soma sidecar` runs alone (where sys.path[0] is the script's bin directory) or
    # under `soma supervise` (which starts it there with `python -m soma_cli`).
    sys.path.insert(0, str(config.source.parent))
    configure_logging(config.logging.level, config.logging.format)
    try:
        uvloop.run(serve(config, supervised=args.supervised))
    except (ConfigError, UnsafePath, KekError, VaultSetupError) as exc:
        raise CommandError(str(exc), SETUP_ERROR) from None
    return 0
