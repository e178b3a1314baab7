"""The gateway example binds no fixed port: its stand-in model API listens where the example
put it, so the example's credential reaches the stand-in and no process that holds the port
the example once used."""

from __future__ import annotations

import hashlib
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from examples.gateway_demo import EXAMPLE_KEY
from tests.helpers import REPO, Process, child_env, wait_until

OLD_PORT = 8765  # the port the example was fixed on


@pytest.fixture
def squatter() -> Iterator[socket.socket | None]:
    """Another process's listener on the old port (None when something else holds it)."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", OLD_PORT))
    except OSError:
        sock.close()
        yield None
        return
    sock.listen()
    sock.setblocking(False)
    yield sock
    sock.close()


def test_the_gateway_example_sends_its_key_only_to_its_own_stand_in(
    tmp_path: Path, squatter: socket.socket | None
) -> None:
    demo = Process(
        [sys.executable, "-m", "examples.gateway_demo", "--dir", str(tmp_path / "demo")],
        tmp_path / "demo.log",
        env=child_env(WRITER_INTERVAL="60"),
        cwd=REPO,
    )
    fingerprint = hashlib.sha256(EXAMPLE_KEY.encode()).hexdigest()[:12]
    try:
        wait_until(
            lambda: "model said" in demo.output() or demo.proc.poll() is not None,
            45,
            "the writer's first answer",
        )
        output = demo.output()
        assert "model said" in output, output
        assert "model-api: listening on http://127.0.0.1:" in output
        assert f"a key whose sha256 starts {fingerprint}" in output  # the real key, not ours
        if squatter is not None:
            with pytest.raises(BlockingIOError):
                squatter.accept()  # nothing ever connected to the old port
    finally:
        demo.signal(signal.SIGTERM)
        assert demo.stop(timeout=30) == 0, demo.output()
