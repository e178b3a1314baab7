"""Logging: structlog, JSON lines in production and readable text on a terminal.

One processor pipeline serves structlog loggers and the standard library's loggers (grpc,
asyncio, uvicorn), so every line a process writes has the same shape.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Literal, TextIO

import structlog
from structlog.typing import Processor

Format = Literal["auto", "json", "console"]


def _shared_processors(extra: Sequence[Processor]) -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        *extra,
    ]


def configure_logging(
    level: str = "info",
    fmt: Format = "auto",
    stream: TextIO | None = None,
    processors: Sequence[Processor] = (),
) -> None:
    """Configure structlog and the stdlib root logger to write to `stream` (stderr).

    `processors` run after the standard fields are added and before rendering (the place
    for redaction).
    """
    out = stream if stream is not None else sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    shared = _shared_processors(processors)
    numeric = logging.getLevelNamesMapping()[level.upper()]
    # The console renderer formats exceptions itself; JSON needs them turned into text first.
    tail: list[Processor] = [structlog.processors.format_exc_info] if as_json else []
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
