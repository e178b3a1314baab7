"""`soma supervise` and `soma sidecar`: the two long-running processes."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from soma_cli.errors import SETUP_ERROR, CommandError, load

if TYPE_CHECKING:
    from soma_runtime.config import SomaConfig


def supervise(args: argparse.Namespace) -> int:
    import asyncio

    from soma_runtime.config import ConfigError
    from soma_runtime.logs import configure_logging
    from soma_runtime.supervisor.arbiter import Supervisor
    from soma_runtime.unix import UnsafePath

    config = load(args.config)
    configure_logging(config.logging.level, config.logging.format)
    try:
        return asyncio.run(Supervisor(config).run())
    # A runtime or state directory others could redirect, or another process serves; a
    # bridge's port that cannot be bound.
    except (UnsafePath, ConfigError) as exc:
        raise CommandError(str(exc), SETUP_ERROR) from None


def sidecar(args: argparse.Namespace) -> int:
    """Serve until a signal. Every error that stops it before it serves is a setup error
    (exit 2): a bad organ, key or path will fail the same way on every restart."""
    import faulthandler

    import uvloop

    from sidecar.app import HandedSocketsUnusable, serve
    from sidecar.handover import HandoverError
    from sidecar.vault.kek import KekError
    from sidecar.vault.open import VaultSetupError
    from soma_cli.secrets import warn_missing_secrets
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
    # A crash inside grpcio's or another extension's C code leaves no Python traceback and
    # no log line; this writes the stack of every thread to stderr instead.
    faulthandler.enable()
    try:
        if args.supervised:
            _check_allow_lists(config)
        warn_missing_secrets(config)
        uvloop.run(serve(config, supervised=args.supervised))
    except (
        ConfigError,
        UnsafePath,
        KekError,
        VaultSetupError,
        HandoverError,
        HandedSocketsUnusable,
    ) as exc:
        raise CommandError(str(exc), SETUP_ERROR) from None
    return 0


def _check_allow_lists(config: SomaConfig) -> None:
    """Refuse a runtime's allow glob that can never match (`ConfigError`); warn about one
    that matches no function today. Organs are only described here, not configured."""
    import structlog

    from sidecar.loading import resolve_organ_class
    from soma_runtime.allow_lists import check_allow_lists

    try:
        cards = [resolve_organ_class(spec)().describe() for spec in config.sidecar.organs]
    except Exception:  # `serve` refuses this organ, naming its key: nothing to check yet
        return
    functions = [f.name for card in cards for f in card.all_functions()]
    log = structlog.get_logger(component="sidecar")
    for unmatched in check_allow_lists(config.runtime, functions):
        log.warning(
            "allow_matches_nothing",
            key=unmatched.key,
            pattern=unmatched.pattern,
            suggestion=unmatched.suggestion,
        )
