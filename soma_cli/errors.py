"""The one way a command reports failure: a message and an exit status, no traceback."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from soma_runtime.config import SomaConfig

from soma_runtime.exit_status import RUNTIME_FAILURE, SETUP_ERROR

__all__ = ["RUNTIME_FAILURE", "SETUP_ERROR", "CommandError", "load"]


class CommandError(Exception):
    """A command's failure; `main` prints `soma <command>: <message>` and exits `code`."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def load(path: Path | None) -> SomaConfig:
    """The configuration, or a `CommandError` with exit 2 naming the file and key at fault."""
    from soma_runtime.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise CommandError(str(exc), SETUP_ERROR) from None
