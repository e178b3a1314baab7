"""Another user on the machine tries every file of a running service.

As `nobody` (the test forks and drops to uid/gid 65534), connect to every socket, list every
directory and read every file under the runtime and state directories, and read a runtime's
token descriptor and environment through /proc. Everything must be refused. The service runs
in a directory whose parents others may traverse, so only Soma's own modes stand in the way.
Symlinks planted by another user are helper B's regression tests (tests of `unix.py` and the
KEK file), not repeated here.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.attack import tally
from tests.attack.cluster import Cluster
from tests.helpers import process_environ

NOBODY = 65534

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to act as a second user (setuid to nobody, 65534)"
)


@pytest.fixture
def open_parent() -> Iterator[Path]:
    """A directory others may traverse (0711), unlike pytest's 0700 temporary directories."""
    path = Path(tempfile.mkdtemp(prefix="soma-2nd-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path)


def try_as_nobody(paths: list[str]) -> dict[str, str]:
    """What uid 65534 gets for each path: "refused", or what it managed to do."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become nobody, try everything, report, exit
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            results = {path: attempt(path) for path in paths}
            os.write(write, json.dumps(results).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as stream:
        return json.loads(stream.read())  # type: ignore[no-any-return]


def attempt(path: str) -> str:
    try:
        info = os.stat(path)
        if stat.S_ISSOCK(info.st_mode):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(path)
            return "connected"
        if stat.S_ISDIR(info.st_mode):
            return f"listed {len(os.listdir(path))} entries"
        with open(path, "rb") as stream:
            return f"read {len(stream.read(64))} bytes"
    except PermissionError:
        return "refused"
    except OSError as exc:
        return type(exc).__name__


def test_another_user_reaches_nothing_of_a_running_service(open_parent: Path) -> None:
    cluster = Cluster(open_parent, {"alpha": ["system.*", "vault.*"]}).start()
    try:
        stored = cluster.relay("alpha").call("vault.store", {"key": "k", "data": "aGk="})
        assert stored["response"]["ok"], stored  # the vault file and the KEK exist now
        run, state = cluster.run.run_dir, cluster.run.tmp / "state"
        targets = [run, state, *run.rglob("*"), *state.rglob("*")]
        alpha = cluster.run.child("alpha")["pid"]
        token_fd = process_environ(alpha)["SOMA_TOKEN_FD"]
        proc = [f"/proc/{alpha}/fd/{token_fd}", f"/proc/{alpha}/environ"]
        results = try_as_nobody([str(p) for p in targets] + proc)
        tally.count("attacks", "second user: file, socket or /proc access", len(results))
        assert {p: r for p, r in results.items() if r != "refused"} == {}
        assert any(p.endswith(".sock") for p in results)
        assert any(Path(p).name.startswith("kek") for p in results)
    finally:
        cluster.stop()
