"""The sidecar's parts are stopped in reverse order whatever fails while they start."""

from __future__ import annotations

from pathlib import Path

from soma_runtime.gateway_sockets import SOCKETS_ENV
from tests.helpers import SOMA, Process, child_env, write_config


def sockets_left(run: Path) -> list[Path]:
    return sorted(p for p in run.rglob("*") if p.is_socket())


def test_a_gateway_that_cannot_start_leaves_no_socket_behind(tmp_path: Path) -> None:
    """The admin socket is served before the gateway starts: a gateway fd that is no socket
    stops the start with a message naming the variable, and the admin socket goes too."""
    config = write_config(tmp_path / "soma.toml", '[soma]\nruntime_dir = "run"\nstate_dir = "s"\n')
    argv = [SOMA, "sidecar", "--supervised", "--config", str(config)]
    env = child_env(**{SOCKETS_ENV: "claims=987"})  # not an open descriptor in the child
    sidecar = Process(argv, tmp_path / "sidecar.log", env=env)
    assert sidecar.wait() == 2  # a setup error (HandedSocketsUnusable)
    assert (tmp_path / "run").is_dir()  # it got as far as preparing the runtime directory
    assert sockets_left(tmp_path / "run") == []
    assert f"{SOCKETS_ENV}: the gateway sockets passed cannot be used" in sidecar.output()


def test_a_local_channel_that_cannot_hand_out_its_token_is_closed(tmp_path: Path) -> None:
    """The channel serves before its token file is written: when that write fails, the
    channel's sockets are closed and removed on the way out."""
    run = tmp_path / "run"
    config = write_config(
        tmp_path / "soma.toml",
        f'[soma]\nstate_dir = "s"\n[sidecar]\nsocket = "{run}/sidecar.sock"\n',
    )
    run.mkdir(mode=0o700)
    (run / "sidecar.token").mkdir()  # the token cannot be written there
    sidecar = Process([SOMA, "sidecar", "--config", str(config)], tmp_path / "sidecar.log")
    assert sidecar.wait() == 1
    assert "IsADirectoryError" in sidecar.output()
    assert sockets_left(run) == []
