"""Pinned tool definitions of upstream MCP servers, in the state directory's `upstream-pins.db`.

A tool's definition (name, description, input and output schemas, annotations) is hashed;
the hash approved by the operator is its pin. The sidecar records every definition it sees;
a tool whose seen definition differs from its pin (or that has no pin) is quarantined until
`soma upstream approve` copies the seen definition over the pin. Defends against an upstream
that changes a tool's description or schema after it was trusted (a "rug pull").

Each row also holds the tool's function name (see `names`): given when the tool is first
seen, approved with the definition, and from then on kept for as long as the pin is.
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

from sidecar.upstream.names import assign
from soma_runtime.unix import ensure_private_dir, private_umask

PINS_FILE = "upstream-pins.db"
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS upstream_pins (
    upstream TEXT NOT NULL, tool TEXT NOT NULL, digest TEXT NOT NULL,
    definition TEXT NOT NULL, approved REAL NOT NULL, function TEXT,
    PRIMARY KEY (upstream, tool))""",
    """CREATE TABLE IF NOT EXISTS upstream_seen (
    upstream TEXT NOT NULL, tool TEXT NOT NULL, digest TEXT NOT NULL,
    definition TEXT NOT NULL, seen REAL NOT NULL, function TEXT,
    PRIMARY KEY (upstream, tool))""",
)
_TABLES = ("upstream_pins", "upstream_seen")


def canonical(definition: Mapping[str, Any]) -> str:
    return json.dumps(definition, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(definition: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(definition).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ToolState:
    """One tool of one upstream: its pinned and its last seen definition (JSON text), and its
    function name (the approved one, else the one it was seen under)."""

    tool: str
    pinned: str | None
    seen: str | None
    function: str | None

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
        if not _has_function_column(db):
            # A database written before function names were kept: add the columns (once,
            # whichever process gets here first). Its pins are named at the next record.
            db.execute("BEGIN IMMEDIATE")
            if not _has_function_column(db):
                for table in _TABLES:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN function TEXT")
            db.execute("COMMIT")
        return db

    def record(
        self, upstream: str, definitions: Iterable[Mapping[str, Any]], *, first_use: bool
    ) -> Recorded:
        """Record what the upstream lists now, naming each tool (an approved tool keeps its
        name; see `names`); pins everything seen when `first_use` and the upstream has no
        pin at all."""
        now = time.time()
        rows = {d["name"]: (digest(d), canonical(d)) for d in definitions}
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            pins = _pins(db, upstream)
            kept = _name_pins(db, upstream, pins)
            names = kept | assign(upstream, rows, kept)
            db.execute("DELETE FROM upstream_seen WHERE upstream = ?", (upstream,))
            seen = [(upstream, tool, *rows[tool], now, names.get(tool)) for tool in rows]
            db.executemany("INSERT INTO upstream_seen VALUES (?, ?, ?, ?, ?, ?)", seen)
            pinned_now: list[str] = []
            if first_use and not pins:
                db.executemany("INSERT INTO upstream_pins VALUES (?, ?, ?, ?, ?, ?)", seen)
                pins = {tool: (hashed, names.get(tool)) for tool, (hashed, _) in rows.items()}
                pinned_now = list(rows)
            db.execute("COMMIT")
        approved = {
            tool for tool, (hashed, _) in rows.items() if tool in pins and pins[tool][0] == hashed
        }
        named = {names[tool]: tool for tool in rows if tool in names}
        return Recorded(approved, pinned_now, named)

    def states(self, upstream: str) -> list[ToolState]:
        """Every tool pinned or seen, by name."""
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT tool, max(pinned), max(seen), coalesce(max(pinned_as), max(seen_as))"
                " FROM (SELECT tool, definition AS pinned, NULL AS seen, function AS pinned_as,"
                " NULL AS seen_as FROM upstream_pins WHERE upstream = ?1 UNION ALL"
                " SELECT tool, NULL, definition, NULL, function FROM upstream_seen"
                " WHERE upstream = ?1) GROUP BY tool ORDER BY tool",
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
            # A tool approved before keeps its name; a new one gets the name it was seen under.
            db.executemany(
                "INSERT OR REPLACE INTO upstream_pins"
                " SELECT s.upstream, s.tool, s.digest, s.definition, ?,"
                " coalesce(p.function, s.function) FROM upstream_seen AS s"
                " LEFT JOIN upstream_pins AS p ON p.upstream = s.upstream AND p.tool = s.tool"
                " WHERE s.upstream = ? AND s.tool = ?",
                [(now, upstream, s.tool) for s in changed],
            )
        return [s.tool for s in changed]


@dataclass(frozen=True, slots=True)
class Recorded:
    """What `record` found: the approved tools (seen definition equal to the pin), those
    pinned now as first use, and `{function name: tool}` of every tool seen."""

    approved: set[str]
    pinned_now: list[str]
    names: dict[str, str]


def _has_function_column(db: sqlite3.Connection) -> bool:
    return all(
        any(column[1] == "function" for column in db.execute(f"PRAGMA table_info({table})"))
        for table in _TABLES
    )


def _pins(db: sqlite3.Connection, upstream: str) -> dict[str, tuple[str, str | None]]:
    """`{tool: (digest, function name)}` of the upstream's pins."""
    rows = db.execute(
        "SELECT tool, digest, function FROM upstream_pins WHERE upstream = ?", (upstream,)
    ).fetchall()
    return {tool: (hashed, function) for tool, hashed, function in rows}


def _name_pins(
    db: sqlite3.Connection, upstream: str, pins: Mapping[str, tuple[str, str | None]]
) -> dict[str, str]:
    """`{tool: function name}` of every pin; pins approved before names were kept get theirs
    now (by the same rule, among themselves, before any tool not approved)."""
    kept = {tool: function for tool, (_, function) in pins.items() if function is not None}
    unnamed = [tool for tool, (_, function) in pins.items() if function is None]
    if not unnamed:
        return kept
    named = assign(upstream, unnamed, kept)
    db.executemany(
        "UPDATE upstream_pins SET function = ? WHERE upstream = ? AND tool = ?",
        [(function, upstream, tool) for tool, function in named.items()],
    )
    return kept | named
