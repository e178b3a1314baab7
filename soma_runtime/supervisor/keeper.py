"""The last resort for a supervisor killed with SIGKILL: `python -m soma_runtime.supervisor.keeper`.

A supervisor that stops normally ends every process its children started. One killed with
SIGKILL cannot: its direct children die with it (a parent-death signal), but helpers they
started are re-parented to init. So the supervisor starts this small process first, in a
session of its own. It waits, on a pidfd, for the supervisor to exit, then kills every
process of this user whose environment carries the supervisor's instance mark
(`SOMA_SUPERVISOR=<instance>`, set for every child and inherited by whatever they start),
round after round until none is left. After a normal stop it finds none and exits.

Under systemd the unit's cgroup is the backstop as well; a helper that rewrites its own
environment escapes this keeper, not the cgroup.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import signal
import subprocess
import sys
import time

from soma_runtime.supervisor.proctree import has_environ_entry, read_proc

INSTANCE_ENV = "SOMA_SUPERVISOR"
# This supervisor process's mark; children inherit it through their environment.
INSTANCE = secrets.token_hex(8)
_ROUNDS = 20
_PAUSE = 0.05


def mark() -> dict[str, str]:
    """The environment entry that marks a process as this supervisor's."""
    return {INSTANCE_ENV: INSTANCE}


def start() -> subprocess.Popen[bytes]:
    """Start the keeper of this supervisor process (it outlives us on purpose)."""
    env = {k: v for k, v in os.environ.items() if k != INSTANCE_ENV}
    return subprocess.Popen(
        [sys.executable, "-m", __name__, str(os.getpid()), INSTANCE],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # a signal to the supervisor's group does not reach it
    )


def kill_marked(instance: str) -> int:
    """SIGKILL every process carrying `instance`'s mark, until a look finds none; how many
    were killed."""
    entry = f"{INSTANCE_ENV}={instance}".encode()
    me = os.getpid()
    killed = 0
    for _ in range(_ROUNDS):
        found = 0
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == me:
                continue
            pid = int(name)
            try:
                fd = os.pidfd_open(pid)  # held first: the pid cannot be recycled under us
            except OSError:
                continue
            try:
                proc = read_proc(pid)
                if proc is not None and not proc.zombie and has_environ_entry(pid, entry):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                        found += 1
            finally:
                os.close(fd)
        killed += found
        if not found:
            break
        time.sleep(_PAUSE)  # a killed process may have forked: look again
    return killed


def main() -> None:
    supervisor, instance = int(sys.argv[1]), sys.argv[2]
    with contextlib.suppress(KeyboardInterrupt):
        try:
            fd = os.pidfd_open(supervisor)
        except ProcessLookupError:
            pass  # already gone
        else:
            select.select([fd], [], [])  # readable once the supervisor has exited
        kill_marked(instance)


if __name__ == "__main__":
    main()
