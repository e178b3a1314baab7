"""Files Soma writes for others to read (bridge URLs, the local channel's token, `make run`'s
keys, the vault's key-encryption key) go through one writer: whatever another process of the
user planted beside them in advance (a link, a file under the temporary name) is never written
through, and the file written is 0600 whatever the umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from soma_runtime.owned_files import OwnedFile


@pytest.fixture
def open_umask() -> Iterator[None]:
    previous = os.umask(0)
    yield
    os.umask(previous)


def test_a_link_planted_at_a_temporary_name_is_not_written_through(
    tmp_path: Path, open_umask: None
) -> None:
    """The temporary name was `.<name>.<pid>`: anyone could plant a link there to a file of
    their choosing, and the token was written into it."""
    victim = tmp_path / "victim"
    victim.write_text("unchanged\n")
    target = tmp_path / "sidecar.token"
    (tmp_path / f".{target.name}.{os.getpid()}").symlink_to(victim)
    written = OwnedFile.write(target, "secret\n")
    assert victim.read_text() == "unchanged\n"
    assert target.read_text() == "secret\n"
    assert written.path == target


def test_a_file_planted_at_a_temporary_name_does_not_lend_its_mode(
    tmp_path: Path, open_umask: None
) -> None:
    target = tmp_path / "local.url"
    planted = tmp_path / f".{target.name}.{os.getpid()}"
    planted.write_text("")
    planted.chmod(0o666)  # opened by its name, it kept its mode for what was written
    OwnedFile.write(target, "http://127.0.0.1:1/mcp\n")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert planted.read_text() == ""


def test_a_link_at_the_target_is_replaced_never_followed(tmp_path: Path, open_umask: None) -> None:
    victim = tmp_path / "victim"
    victim.write_text("unchanged\n")
    target = tmp_path / "bridge-local.key"
    target.symlink_to(victim)
    OwnedFile.write(target, "soma_id_secret\n")
    assert victim.read_text() == "unchanged\n"
    assert not target.is_symlink()
    assert stat.S_IMODE(target.lstat().st_mode) == 0o600
    assert target.read_text() == "soma_id_secret\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_file_replaced_by_a_fifo_is_left_alone_without_blocking(tmp_path: Path) -> None:
    """What removal reads to tell its own file from another's is opened without blocking and
    never through a link: a FIFO or a link swapped in is someone else's file."""
    target = tmp_path / "sidecar.token"
    written = OwnedFile.write(target, "secret\n")
    target.unlink()
    os.mkfifo(target)
    written.remove()
    assert stat.S_ISFIFO(target.lstat().st_mode)
    target.unlink()
    target.symlink_to(tmp_path / "elsewhere")
    written.remove()
    assert target.is_symlink()
