"""The process table as /proc shows it: who is whose parent, group, session and environment.

The supervisor reads it to find every process that belongs to a child it started, wherever
that process went: forks (the subtree), a new process group (the child's session), and
orphans it adopted as a subreaper (their environment names the runtime they came from).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    sid: int
    # Clock ticks after boot: with the pid, it names one process (pids are reused).
    start: int
    zombie: bool


def read_proc(pid: int) -> Proc | None:
    """One process from /proc/<pid>/stat; None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return Proc(
        pid=pid,
        ppid=int(fields[1]),
        pgid=int(fields[2]),
        sid=int(fields[3]),
        start=int(fields[19]),
        zombie=fields[0] == b"Z",
    )


def snapshot() -> dict[int, Proc]:
    """Every process now, by pid (processes that vanish while reading are left out)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (proc := read_proc(int(entry))) is not None:
            table[proc.pid] = proc
    return table


def subtree(table: dict[int, Proc], roots: Iterable[int]) -> set[int]:
    """`roots` (those in `table`) and all their descendants."""
    children: dict[int, list[int]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    found: set[int] = set()
    pending = [pid for pid in roots if pid in table]
    while pending:
        pid = pending.pop()
        if pid not in found:
            found.add(pid)
            pending.extend(children.get(pid, ()))
    return found


def has_environ_entry(pid: int, entry: bytes) -> bool:
    """Whether the environment `pid` was started with holds `entry` (b"NAME=value"); False
    when it cannot be read (gone, or not ours to read)."""
    try:
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
