"""The supervisor's control socket, and the client `soma status` uses."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from soma_runtime import jsonline
from soma_runtime.unix import Peer


def same_user(peer: Peer) -> str | None:
    """Only the service user (and root) may ask."""
    if peer.uid not in (os.geteuid(), 0):
        return f"uid {peer.uid} is not the service user"
    return None


def fetch_status(socket_path: Path, timeout: float = 5.0) -> dict[str, Any]:
    """The supervisor's status; `OSError` when no supervisor answers."""
    answer = jsonline.request_sync(socket_path, {"op": "status"}, timeout)
    if not answer.get("ok"):
        raise OSError(f"the supervisor refused: {answer.get('message') or answer.get('error')}")
    return answer


def format_status(status: dict[str, Any]) -> str:
    """A table: one child a line."""
    header = ("NAME", "KIND", "STATE", "PID", "UPTIME", "RESTARTS", "LAST EXIT")
    rows = [header]
    for child in status["children"]:
        uptime = child["uptime_s"]
        rows.append(
            (
                child["name"],
                child["kind"],
                child["state"],
                "-" if child["pid"] is None else str(child["pid"]),
                "-" if uptime is None else _duration(uptime),
                str(child["restarts"]),
                child["last_exit"] or "-",
            )
        )
    return format_table(rows)


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows (the first a header) in left-aligned columns two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _duration(seconds: float) -> str:
    whole = int(seconds)
    if whole < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
