"""Pinned tool definitions of upstream MCP servers, in the state directory's `upstream-pins.db`.

A tool's definition (name, description, input and output schemas, annotations) is hashed;
the hash approved by the operator is its pin. The sidecar records every definition it sees;
a tool whose seen definition differs from its pin (or that has no pin) is quarantined until
`soma upstream approve` copies the seen definition over the pin. Defends against an upstream
that changes a tool's description or schema after it was trusted (a "rug pull").
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Mapping
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soma_runtime.unix import ensure_private_dir, private_umask

PINS_FILE = "upstream-pins.db"
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS upstream_pins (
    upstream TEXT NOT NULL, tool TEXT NOT NULL, digest TEXT NOT NULL,
    definition TEXT NOT NULL, approved REAL NOT NULL, PRIMARY KEY (upstream, tool))""",
    """CREATE TABLE IF NOT EXISTS upstream_seen (
    upstream TEXT NOT NULL, tool TEXT NOT NULL, digest TEXT NOT NULL,
    definition TEXT NOT NULL, seen REAL NOT NULL, PRIMARY KEY (upstream, tool))""",
)


def canonical(definition: Mapping[str, Any]) -> str:
    return json.dumps(definition, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(definition: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(definition).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ToolState:
    """One tool of one upstream: its pinned and its last seen definition (JSON text)."""

    tool: str
    pinned: str | None
    seen: str | None

    @property
    def quarantined(self) -> bool:
        return self.seen is not None and self.seen != self.pinned


class PinStore:
    """The two tables; each method opens its own short connection (CLI and sidecar are
    different processes)."""

    def __init__(self, state_dir: Path) -> None:
        self._state_dir = state_dir
        self.path = state_dir / PINS_FILE

    def _connect(self) -> sqlite3.Connection:
        ensure_private_dir(self._state_dir)
        with private_umask():
            db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        for statement in _SCHEMA:
            db.execute(statement)
        return db

    def record(
        self, upstream: str, definitions: Iterable[Mapping[str, Any]], *, first_use: bool
    ) -> tuple[set[str], list[str]]:
        """Record what the upstream lists now; returns the names of the approved tools
        (seen definition equal to the pin) and those pinned now as first use (only when
        `first_use` and the upstream has no pin at all)."""
        now = time.time()
        rows = [(d["name"], digest(d), canonical(d)) for d in definitions]
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM upstream_seen WHERE upstream = ?", (upstream,))
            db.executemany(
                "INSERT INTO upstream_seen VALUES (?, ?, ?, ?, ?)",
                [(upstream, name, hashed, text, now) for name, hashed, text in rows],
            )
            pinned_now: list[str] = []
            if first_use and not _pins(db, upstream):
                db.executemany(
                    "INSERT INTO upstream_pins VALUES (?, ?, ?, ?, ?)",
                    [(upstream, name, hashed, text, now) for name, hashed, text in rows],
                )
                pinned_now = [name for name, _, _ in rows]
            pins = _pins(db, upstream)
            db.execute("COMMIT")
        return {name for name, hashed, _ in rows if pins.get(name) == hashed}, pinned_now

    def states(self, upstream: str) -> list[ToolState]:
        """Every tool pinned or seen, by name."""
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT tool, max(pinned), max(seen) FROM ("
                " SELECT tool, definition AS pinned, NULL AS seen FROM upstream_pins"
                " WHERE upstream = ?1 UNION ALL"
                " SELECT tool, NULL, definition FROM upstream_seen WHERE upstream = ?1)"
                " GROUP BY tool ORDER BY tool",
                (upstream,),
            ).fetchall()
        return [ToolState(*row) for row in rows]

    def approve(self, upstream: str, tool: str | None = None) -> list[str]:
        """Pin the seen definition of `tool` (every quarantined tool when None); returns the
        tools approved."""
        changed = [
            s for s in self.states(upstream) if s.quarantined and (tool is None or s.tool == tool)
        ]
        now = time.time()
        with closing(self._connect()) as db:
            db.executemany(
                "INSERT OR REPLACE INTO upstream_pins"
                " SELECT upstream, tool, digest, definition, ? FROM upstream_seen"
                " WHERE upstream = ? AND tool = ?",
                [(now, upstream, s.tool) for s in changed],
            )
        return [s.tool for s in changed]


def _pins(db: sqlite3.Connection, upstream: str) -> dict[str, str]:
    rows = db.execute(
        "SELECT tool, digest FROM upstream_pins WHERE upstream = ?", (upstream,)
    ).fetchall()
    return dict(rows)
