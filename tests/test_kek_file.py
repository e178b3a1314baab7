"""The key-encryption key file: never written or read through a planted link, never taken
from another user, and every problem with it a clear message with exit code 2.

"Another user" is uid 65534 (nobody), given files with chown/lchown, which needs root (as in
CI); those tests are skipped otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sidecar.vault.kek import KekError, KeyFileProvider
from sidecar.vault.open import VaultSetupError, open_vault
from soma_runtime.config import SomaConfig, parse_config
from tests.helpers import SOMA, child_env, run_soma

OTHER_UID = 65534
as_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="giving files to another uid (chown) needs root"
)


def make_config(tmp_path: Path, **vault: object) -> SomaConfig:
    return parse_config({"soma": {"state_dir": str(tmp_path / "state")}, "vault": vault})


def state_dir(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    state.chmod(0o700)
    return state


def write_key(path: Path, uid: int | None = None) -> None:
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    if uid is not None:
        os.chown(path, uid, uid)


def test_links_planted_at_the_temporary_names_are_not_written_through(tmp_path: Path) -> None:
    """Old temporary names were `.<key>.<pid>.tmp`: a link planted there made the process
    overwrite (O_TRUNC) whatever the link pointed at."""
    state = state_dir(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for name in ("kek", "kek.next"):
        (state / f".{name}.{os.getpid()}.tmp").symlink_to(victim)
    provider = KeyFileProvider(state / "kek")
    provider.stage_rotation()
    assert victim.read_text() == "precious"
    for key in (state / "kek", state / "kek.next"):
        info = key.lstat()
        assert key.is_file() and not key.is_symlink() and info.st_nlink == 1, key
        assert len(key.read_bytes()) == 32
    assert sorted(p.name for p in state.iterdir() if p.name.endswith(".tmp")) == sorted(
        f".{name}.{os.getpid()}.tmp" for name in ("kek", "kek.next")
    )  # no temporary file of ours is left behind


def test_a_link_planted_at_the_rotation_lock_is_not_followed(tmp_path: Path) -> None:
    vault = open_vault(make_config(tmp_path))
    vault.set_secret("api", b"value")
    target = tmp_path / "elsewhere"
    (tmp_path / "state" / "kek.lock").symlink_to(target)
    with pytest.raises(
        KekError, match=r"kek\.lock: it is a symbolic link, which is never followed"
    ):
        vault.rotate_kek()
    assert not target.exists()  # O_CREAT through the link would have made it
    (tmp_path / "state" / "kek.lock").unlink()
    assert vault.rotate_kek() == 1  # the next rotation, without the link, works


@as_root
def test_a_rotation_lock_of_another_user_is_refused(tmp_path: Path) -> None:
    vault = open_vault(make_config(tmp_path))
    lock = tmp_path / "state" / "kek.lock"
    lock.write_bytes(b"")
    os.chown(lock, OTHER_UID, OTHER_UID)
    with pytest.raises(KekError, match=r"kek\.lock is not a regular file owned by uid 0"):
        vault.rotate_kek()


@as_root
def test_a_key_planted_by_another_user_in_a_shared_directory_is_refused(tmp_path: Path) -> None:
    """`vault.kek_file` in a directory others can write to (sticky, like /tmp): another user
    created the key file first, so they know the key that would seal every secret."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    write_key(shared / "kek", uid=OTHER_UID)
    config = make_config(tmp_path, kek_file=str(shared / "kek"))
    with pytest.raises(VaultSetupError, match=re.escape(f"{shared} is writable by other users")):
        open_vault(config)
    shared.chmod(0o755)  # even in a directory only we can write to, the key is not ours
    with pytest.raises(VaultSetupError, match=f"{shared / 'kek'} belongs to uid {OTHER_UID}"):
        open_vault(config)


@as_root
def test_a_key_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    state = state_dir(tmp_path)
    write_key(state / "kek", uid=OTHER_UID)
    with pytest.raises(KekError, match=f"{state / 'kek'} belongs to uid {OTHER_UID}, not to uid 0"):
        KeyFileProvider(state / "kek")
    os.chown(state / "kek", 0, 0)
    KeyFileProvider(state / "kek")  # root's key is root's


def test_a_key_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    state = state_dir(tmp_path)
    os.mkfifo(state / "kek", 0o600)  # opened without blocking, then refused
    with pytest.raises(KekError, match="kek is not a regular file"):
        KeyFileProvider(state / "kek")


def test_a_link_at_the_key_path_is_never_followed(tmp_path: Path) -> None:
    state = state_dir(tmp_path)
    real = tmp_path / "real-kek"
    write_key(real)
    (state / "kek").symlink_to(real)  # even to a good key: point vault.kek_file at it instead
    with pytest.raises(KekError, match="is a symbolic link, which is never followed"):
        KeyFileProvider(state / "kek")


def secrets_list(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "soma.toml"
    config.write_text(f'[soma]\nstate_dir = "{tmp_path / "state"}"\n')
    return run_soma("secrets", "list", "--config", str(config))


def sidecar_config(tmp_path: Path) -> Path:
    config = tmp_path / "sidecar.toml"
    config.write_text(
        f'[soma]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[sidecar]\nsocket = "{tmp_path}/run/s.sock"\norgans = ["system", "vault"]\n'
    )
    return config


def test_a_dangling_link_at_the_key_path_exits_2_with_a_message(tmp_path: Path) -> None:
    state = state_dir(tmp_path)
    target = tmp_path / "nowhere" / "kek"
    (state / "kek").symlink_to(target)
    secrets = secrets_list(tmp_path)
    assert secrets.returncode == 2, secrets.stderr
    assert f"soma secrets: the key-encryption key {state / 'kek'} is a symbolic link" in (
        secrets.stderr
    )
    sidecar = run_soma("sidecar", "--config", str(sidecar_config(tmp_path)))
    assert sidecar.returncode == 2, sidecar.stderr
    assert f"soma sidecar: the key-encryption key {state / 'kek'} is a symbolic link" in (
        sidecar.stderr
    )
    for result in (secrets, sidecar):
        assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "nowhere").exists()


def mount_namespaces() -> bool:
    """Whether this process may make a private mount namespace (root with CAP_SYS_ADMIN)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, check=False)
    return probe.returncode == 0


def soma_on_read_only(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`soma ARGS` in a mount namespace of its own where `directory` is mounted read-only (as
    systemd's ProtectSystem= does): root would pass a mode check, not a read-only mount."""
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    namespace = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
    return subprocess.run(
        [*namespace, str(directory), SOMA, *args],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(not mount_namespaces(), reason="needs a private mount namespace (unshare)")
def test_a_read_only_state_dir_exits_2_with_a_message(tmp_path: Path) -> None:
    state = state_dir(tmp_path)
    config = tmp_path / "soma.toml"
    config.write_text(f'[soma]\nstate_dir = "{state}"\n')
    for args, prefix in (
        (("secrets", "list", "--config", str(config)), "soma secrets"),
        (("sidecar", "--config", str(sidecar_config(tmp_path))), "soma sidecar"),
    ):
        result = soma_on_read_only(state, *args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(
            f"{prefix}: cannot write the key-encryption key {state / 'kek'}: "
            "Read-only file system; its directory must be writable by uid 0"
        ), result.stderr
        assert "Traceback" not in result.stderr
    # A key that is there already (from a credential or an earlier run) opens the vault only
    # if SQLite can make its database there too.
    write_key(state / "kek")
    result = soma_on_read_only(state, "secrets", "list", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert f"cannot create the vault database {state / 'vault.db'}: Read-only" in result.stderr
    assert secrets_list(tmp_path).returncode == 0  # writable again outside the namespace
