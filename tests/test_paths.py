"""Runtime and state directories: reached only through links and parents that root or this
user control, so another local user can never redirect a socket, a token or the vault.

"Another user" is uid 65534 (nobody): files and links are given to it with chown/lchown, which
needs root (as in CI); the tests that need that are skipped otherwise.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from sidecar.vault.open import VaultSetupError, open_vault
from soma_runtime.config import parse_config
from soma_runtime.unix import (
    UnsafePath,
    ensure_private_dir,
    open_directory,
    prepare_socket_path,
)
from tests.helpers import SupervisorRun, run_soma

OTHER_UID = 65534
as_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="giving files to another uid (chown) needs root"
)


def foreign_link(link: Path, target: Path) -> Path:
    """A symbolic link at `link` to `target`, owned by another user (who could re-point it)."""
    link.symlink_to(target)
    os.lchown(link, OTHER_UID, OTHER_UID)
    return link


def private(directory: Path) -> Path:
    directory.mkdir(mode=0o700)
    directory.chmod(0o700)
    return directory


@as_root
def test_a_link_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    """The link's target is ours and private: what is refused is that someone else can re-point
    it, at a socket directory of their own, after the check."""
    link = foreign_link(tmp_path / "run", private(tmp_path / "real"))
    with pytest.raises(
        UnsafePath, match=re.escape(f"{link} is a symbolic link owned by uid {OTHER_UID}")
    ):
        ensure_private_dir(link)
    # ... anywhere on the path, not only as the last component
    on_the_way = re.escape(f"{link} (on the way to {link / 'rt'}) is a symbolic link")
    with pytest.raises(UnsafePath, match=on_the_way):
        ensure_private_dir(link / "rt")
    with pytest.raises(UnsafePath, match="symbolic link owned by uid 65534"):
        prepare_socket_path(link / "claims.sock")
    assert list((tmp_path / "real").iterdir()) == []  # nothing was created through it


def test_links_owned_by_root_or_this_user_are_followed(tmp_path: Path) -> None:
    """Only root or this user can re-point them, so they are as trustworthy as the directory."""
    real = private(tmp_path / "real")
    (tmp_path / "absolute").symlink_to(real)
    (tmp_path / "relative").symlink_to("real/../real")
    ensure_private_dir(tmp_path / "absolute")
    ensure_private_dir(tmp_path / "relative" / "rt")
    assert stat.S_IMODE((real / "rt").stat().st_mode) == 0o700


@as_root
def test_a_parent_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    """Its owner could rename our private directory away and put their own in its place."""
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    run = private(theirs / "run")
    with pytest.raises(
        UnsafePath, match=re.escape(f"{theirs} (on the way to {run}) belongs to uid {OTHER_UID}")
    ):
        ensure_private_dir(run)


def test_a_parent_writable_by_others_is_refused_unless_sticky(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(
        UnsafePath,
        match=re.escape(f"{shared} (on the way to {shared / 'run'}) is writable by other"),
    ):
        ensure_private_dir(shared / "run")
    assert not (shared / "run").exists()
    shared.chmod(0o1777)  # like /tmp: others cannot rename or delete our entries
    ensure_private_dir(shared / "run")
    assert stat.S_IMODE((shared / "run").stat().st_mode) == 0o700


def test_nothing_is_created_through_a_dangling_link(tmp_path: Path) -> None:
    (tmp_path / "run").symlink_to(tmp_path / "elsewhere" / "run")
    with pytest.raises(
        UnsafePath,
        match=re.escape(
            f"{tmp_path / 'elsewhere'} (on the way to {tmp_path / 'run'}) does not exist"
        ),
    ):
        ensure_private_dir(tmp_path / "run")
    assert not (tmp_path / "elsewhere").exists()


def test_a_file_in_the_way_and_a_link_loop_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(UnsafePath, match="is not a directory"):
        ensure_private_dir(tmp_path / "file" / "run")
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(UnsafePath, match="too many symbolic links"):
        ensure_private_dir(tmp_path / "loop")


def test_the_descriptor_is_the_checked_directory(tmp_path: Path) -> None:
    real = private(tmp_path / "real")
    fd = open_directory(real, private=True)
    try:
        assert os.path.samestat(os.fstat(fd), real.stat())
    finally:
        os.close(fd)


@as_root
def test_soma_supervise_refuses_a_runtime_dir_linked_by_another_user(tmp_path: Path) -> None:
    """The reported attack: the link's owner re-points it and receives a runtime's token."""
    real = private(tmp_path / "real")
    link = foreign_link(tmp_path / "run", real)
    config = SupervisorRun.write(tmp_path, "")
    text = config.read_text().replace('runtime_dir = "run"', f'runtime_dir = "{link}"')
    config.write_text(text)
    result = run_soma("supervise", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert f"soma supervise: {link} is a symbolic link owned by uid {OTHER_UID}" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(real.iterdir()) == []


@as_root
def test_a_state_dir_linked_by_another_user_gets_no_key_and_no_vault(tmp_path: Path) -> None:
    real = private(tmp_path / "real")
    link = foreign_link(tmp_path / "state", real)
    config = tmp_path / "soma.toml"
    config.write_text(f'[soma]\nstate_dir = "{link}"\n')
    result = run_soma("secrets", "list", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert f"soma secrets: {link} is a symbolic link owned by uid {OTHER_UID}" in result.stderr
    assert list(real.iterdir()) == []  # neither `kek` nor `vault.db` was written there
    supervise = run_soma("supervise", "--config", str(config))
    assert supervise.returncode == 2, supervise.stderr
    assert f"{link} is a symbolic link owned by uid {OTHER_UID}" in supervise.stderr


def test_vault_files_that_are_links_are_refused(tmp_path: Path) -> None:
    """SQLite follows links: the database and its WAL are checked before it opens them, and the
    database is created exclusively."""
    state = private(tmp_path / "state")
    config = parse_config({"soma": {"state_dir": str(state)}})
    elsewhere = tmp_path / "elsewhere"
    for name in ("vault.db", "vault.db-wal"):
        (state / name).symlink_to(elsewhere)
        with pytest.raises(VaultSetupError, match=re.escape(f"{state / name} is not a regular")):
            open_vault(config)
        assert not elsewhere.exists()
        (state / name).unlink()
    open_vault(config).set_secret("api", b"value")
    assert stat.S_IMODE((state / "vault.db").stat().st_mode) == 0o600
