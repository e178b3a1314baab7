"""Logging: structlog, JSON lines in production and readable text on a terminal.

One processor pipeline serves structlog loggers and the standard library's loggers (grpc,
asyncio, uvicorn), so every line a process writes has the same shape.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import Processor

from soma_runtime.redaction import redactor

Format = Literal["auto", "json", "console"]

# The HTTP client logs every request's full URL at INFO and DEBUG ("HTTP Request: GET
# https://...?api_key=..."), query credentials included: only its warnings are wanted. The
# redactor stays the net for what it still says.
QUIET_LOGGERS = ("httpx2", "httpcore2")

# Set by the supervisor in every child's environment (as systemd sets JOURNAL_STREAM): the
# child's stderr is read by the supervisor, which re-emits each JSON event as its own line in
# the configured format. So a child writes JSON there whatever the format says; rendered
# twice, its lines would arrive nested in the supervisor's, with two timestamps.
TO_SUPERVISOR_ENV = "SOMA_LOG_TO_SUPERVISOR"
# Set by the supervisor for the child it trusts (the sidecar): the descriptor of the
# supervisor's own log stream, and the name the child's lines carry there. That child renders
# its events itself, in the configured format, and writes them straight to that stream; the
# supervisor never reads them (see soma_runtime.supervisor.process).
DIRECT_FD_ENV = "SOMA_LOG_FD"
DIRECT_NAME_ENV = "SOMA_LOG_CHILD"
# The write buffer of the direct stream: larger than any line (strings are bounded by the
# redactor, tracebacks at 64 KiB), so that each line, flushed at once, is one write(2): atomic
# on a pipe up to PIPE_BUF, and not split by us on the journal's stream socket or a file.
_DIRECT_BUFFER = 1 << 18
_timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)


def _timestamp(logger: object, method: str, event: structlog.typing.EventDict) -> Any:
    """The time of the event: a child's event the supervisor re-emits keeps the child's."""
    if "timestamp" in event:
        return event
    return _timestamper(logger, method, event)


# Shared by structlog events and stdlib records; the redactor runs after exceptions are text.
_SHARED: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    _timestamp,
    structlog.processors.StackInfoRenderer(),
    structlog.processors.format_exc_info,
    redactor,
]


def configure_logging(
    level: str = "info",
    fmt: Format = "auto",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and the stdlib root logger to write to `stream` (stderr).

    Every event passes the redactor last, after exceptions are formatted, so nothing that
    looks like a credential reaches the output, and no string in it is unboundedly long.
    """
    direct = _direct_stream() if stream is None else None
    out = stream if stream is not None else (direct[0] if direct else sys.stderr)
    to_supervisor = direct is None and stream is None and os.environ.get(TO_SUPERVISOR_ENV) == "1"
    as_json = fmt == "json" or to_supervisor or (fmt == "auto" and not out.isatty())
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    numeric = logging.getLevelNamesMapping()[level.upper()]
    shared = _SHARED if direct is None else [_named(direct[1]), *_SHARED]
    structlog.configure(
        processors=[*shared, renderer],
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
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


def _direct_stream() -> tuple[TextIO, str] | None:
    """The supervisor's log stream and this child's name there, when the supervisor gave
    them (and took them out of the environment, so that no process this one starts sees
    them; the descriptor is not inherited either)."""
    fd, name = os.environ.pop(DIRECT_FD_ENV, None), os.environ.pop(DIRECT_NAME_ENV, None)
    if fd is None or name is None:
        return None
    os.set_inheritable(int(fd), False)
    stream = open(int(fd), "w", buffering=_DIRECT_BUFFER, encoding="utf-8", errors="replace")  # noqa: SIM115
    return stream, name


def _named(name: str) -> Processor:
    """Adds `child=name` to every event, as the supervisor adds it to its children's lines."""

    def add(logger: object, method: str, event: structlog.typing.EventDict) -> Any:
        event["child"] = name
        return event

    return add
