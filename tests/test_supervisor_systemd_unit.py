"""`soma systemd-unit`: the unit's text, what it refuses, and `systemd-analyze verify`.

No systemd runs the unit here (the test machines have no systemd as PID 1): these tests hold
what the unit says, and let systemd's own parser check it when `systemd-analyze` is installed.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, SOMA, child_env

SYSTEMD_DIRS = '[soma]\nruntime_dir = "{run}/soma"\nstate_dir = "{state}/soma"\n'
_TMP = (Path("/tmp"), Path("/var/tmp"))


@pytest.fixture
def place() -> Iterator[Path]:
    """A directory a system unit may use: not under /tmp, which the unit refuses (beside
    the checkout, as for an operator who runs it from a checkout in a home directory)."""
    if any(Path(SOMA).is_relative_to(tmp) for tmp in _TMP):
        pytest.skip("this checkout is under /tmp, which a system unit cannot use")
    base = REPO / ".soma"
    base.mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="unit-test-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path)


def someone_else() -> pwd.struct_passwd:
    """A user who is not root, not the one running the tests, and not `nobody` (systemd
    warns about a unit running as nobody)."""
    for entry in sorted(pwd.getpwall(), key=lambda e: e.pw_uid):
        if entry.pw_uid not in (0, os.geteuid()) and entry.pw_name != "nobody":
            return entry
    pytest.skip("no other user on this host")


def unit(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SOMA, "systemd-unit", *args],
        env=env or child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def analyze_verify(path: Path, text: str, *, user: bool, env: dict[str, str]) -> None:
    """systemd's own parser accepts the unit, without a warning about it."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    path.write_text(text)
    check = subprocess.run(
        [analyze, *(["--user"] if user else []), "verify", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    assert path.name not in check.stderr, check.stderr  # no warnings about our unit


@pytest.mark.parametrize(
    ("user", "managed"),
    [(False, True), (False, False), (True, True), (True, False)],
    ids=["system", "system-project-dirs", "user", "user-project-dirs"],
)
def test_systemd_unit_passes_systemd_analyze_verify(
    tmp_path: Path, place: Path, user: bool, managed: bool
) -> None:
    """The unit has systemd manage the configured directories when they lie under its bases;
    otherwise it lets the system service write them (they are never swapped for others)."""
    env = child_env(XDG_RUNTIME_DIR=str(tmp_path / "xdg"), XDG_STATE_HOME=str(tmp_path / "st"))
    (tmp_path / "xdg").mkdir(mode=0o700)  # a user manager needs one to resolve %t
    run, state = (tmp_path / "xdg", tmp_path / "st") if user else ("/run", "/var/lib")
    home = tmp_path if user else place  # a system unit refuses /tmp (below)
    config = home / "soma.toml"
    config.write_text(SYSTEMD_DIRS.format(run=run, state=state) if managed else "")
    account = someone_else()
    as_whom = ["--user"] if user else ["--service-user", account.pw_name]
    result = unit("--config", str(config), *as_whom, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    expected = [
        "Type=notify",
        "WatchdogSec=30s",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "NoNewPrivileges=yes",
        # TERM to the supervisor alone (it stops everything in order), then the cgroup's
        # SIGKILL for anything left once it is gone, even after its own SIGKILL
        "KillMode=mixed",
    ]
    if managed:
        expected += ["RuntimeDirectory=soma", "StateDirectory=soma"]
    elif not user:
        expected += [
            f"ReadWritePaths={home}/.soma/run",
            f"ReadWritePaths={home}/.soma/state",
        ]
    if not user:
        group = grp.getgrgid(account.pw_gid).gr_name
        expected += [
            "ProtectSystem=strict",
            "ProtectHome=read-only",
            "PrivateTmp=yes",
            f"User={account.pw_name}",
            f"Group={group}",
        ]
    for line in expected:
        assert line in lines
    if not managed:
        assert "RuntimeDirectory=" not in result.stdout
        assert "StateDirectory=" not in result.stdout
    if user:  # a user's manager runs everything as that user
        assert not [line for line in lines if line.startswith(("User=", "Group="))]
    analyze_verify(tmp_path / "soma.service", result.stdout, user=user, env=env)


def test_a_system_unit_runs_as_the_owner_of_the_configuration_by_default(place: Path) -> None:
    """Without --service-user, the agents run as whoever owns soma.toml, never as root by
    default (systemd's default for a unit without User=)."""
    config = place / "soma.toml"
    config.write_text("")
    owner = pwd.getpwuid(os.geteuid())
    if owner.pw_uid == 0:  # root may hand the file to someone else, as an operator would
        owner = someone_else()
        os.chown(config, owner.pw_uid, owner.pw_gid)
    result = unit("--config", str(config))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"User={owner.pw_name}" in lines
    assert f"Group={grp.getgrgid(owner.pw_gid).gr_name}" in lines
    assert f"# The supervisor and every agent run as this user (the owner of {config};" in (
        result.stdout
    )
    # The directories the service must own, and the command that makes them so.
    group = grp.getgrgid(owner.pw_gid).gr_name
    assert f"#   install -d -m 0700 -o {owner.pw_name} -g {group} {place}/.soma/run" in (
        result.stdout
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can own a file as root")
def test_a_system_unit_never_runs_as_root_unless_asked_by_name(place: Path) -> None:
    config = place / "soma.toml"
    config.write_text("")
    refused = unit("--config", str(config))
    assert refused.returncode == 2
    assert refused.stdout == ""  # no unit at all, so none gets installed by accident
    assert refused.stderr == (
        f"soma systemd-unit: {config} belongs to root, so the agents would run as root: name "
        "the user to run them as with --service-user NAME (--service-user root if you mean it)\n"
    )
    asked = unit("--config", str(config), "--service-user", "root")
    assert asked.returncode == 0, asked.stderr
    assert "User=root" in asked.stdout.splitlines()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--service-user", "no-such-user-here"], "--service-user: no user 'no-such-user-here'"),
        (["--service-group", "no-such-group-here"], "--service-group: no group 'no-such-group"),
        (["--user", "--service-user", "root"], "--service-user and --service-group are for a"),
    ],
    ids=["unknown-user", "unknown-group", "user-manager"],
)
def test_the_service_account_options_are_checked(
    place: Path, args: list[str], message: str
) -> None:
    config = place / "soma.toml"
    config.write_text("")
    if os.geteuid() == 0:
        os.chown(config, someone_else().pw_uid, -1)
    result = unit("--config", str(config), *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"soma systemd-unit: {message}"), result.stderr


def test_a_named_group_is_written(place: Path) -> None:
    config = place / "soma.toml"
    config.write_text("")
    account, group = someone_else(), grp.getgrgid(0).gr_name
    result = unit(
        "--config", str(config), "--service-user", account.pw_name, "--service-group", group
    )
    assert result.returncode == 0, result.stderr
    assert f"Group={group}" in result.stdout.splitlines()


def test_a_system_unit_refuses_paths_under_tmp(tmp_path: Path, place: Path) -> None:
    """PrivateTmp=yes gives the service its own empty /tmp and /var/tmp: a configuration,
    a state directory or a working directory there would not be found, nor shared with
    `soma status` and `soma secrets` on the host. A user unit (no PrivateTmp) is fine."""
    name = someone_else().pw_name
    in_tmp = tmp_path / "soma.toml"
    in_tmp.write_text("")
    refused = unit("--config", str(in_tmp), "--service-user", name)
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert "PrivateTmp=yes" in refused.stderr
    assert f"the configuration file {in_tmp}; soma.runtime_dir {tmp_path}/.soma/run;" in (
        refused.stderr
    )
    assert unit("--config", str(in_tmp), "--user").returncode == 0

    outside = place / "soma.toml"
    outside.write_text(
        '[soma]\nstate_dir = "/var/tmp/soma-state"\n'
        '[[runtime]]\nname = "a"\ncommand = ["true"]\ncwd = "/tmp/agent"\n'
    )
    refused = unit("--config", str(outside), "--service-user", name)
    assert refused.returncode == 2
    assert "soma.state_dir /var/tmp/soma-state; runtime[0].cwd /tmp/agent." in refused.stderr
    assert str(outside) not in refused.stderr


def test_what_the_service_user_could_not_use_is_warned_about(place: Path) -> None:
    """A checkout in a home directory the service user cannot enter (0700), and a directory
    the unit must write that belongs to someone else: warnings on stderr, the unit on stdout."""
    other = someone_else()
    place.chmod(0o755)  # made 0700: here only the home directory below keeps others out
    home = place / "home"
    home.mkdir(mode=0o700)
    config = home / "soma.toml"
    config.write_text('[soma]\nstate_dir = "/var/lib/soma-test-state"\nruntime_dir = "run"\n')
    (home / "run").mkdir(mode=0o700)
    result = unit("--config", str(config), "--service-user", other.pw_name)
    assert result.returncode == 0, result.stderr
    assert f"User={other.pw_name}" in result.stdout.splitlines()
    # The first directory from / that others cannot enter: `home`, unless an ancestor in the
    # checkout (.soma, made 0700 by whatever ran first) closes the way before it.
    closed = next(d for d in [*reversed(home.parents), home] if not d.stat().st_mode & 0o001)
    warnings = result.stderr.splitlines()
    assert warnings == [
        f"soma systemd-unit: warning: {other.pw_name} has no access to {closed}, so the service "
        f"cannot read the configuration file {config}: run it as the owner (--service-user), "
        f"or install where {other.pw_name} can read",
        f"soma systemd-unit: warning: {home}/run belongs to uid {os.geteuid()}, not to "
        f"{other.pw_name}: the service will refuse it (chown -R {other.pw_name}:"
        f"{grp.getgrgid(other.pw_gid).gr_name} {home}/run)",
    ]
    # As the owner of both: nothing to warn about.
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert unit("--config", str(config), "--service-user", me).stderr == ""


def test_a_service_user_whose_primary_group_has_no_name_is_told_so(place: Path) -> None:
    """A user whose primary gid has no group entry, and no --service-group: the refusal says
    that, not "no group None". The user exists only in a private mount namespace, where a
    copy of /etc/passwd naming it is mounted over the real one."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("needs root and unshare(1) to add a user in a private mount namespace")
    gid = next(g for g in range(4242, 65000) if g not in {e.gr_gid for e in grp.getgrall()})
    passwd = place / "passwd"
    ghost = f"ghost:x:{gid}:{gid}:a user of no group:/nonexistent:/bin/false\n"
    passwd.write_text(Path("/etc/passwd").read_text() + ghost)
    config = place / "soma.toml"
    config.write_text("")
    script = 'mount --bind "$0" /etc/passwd && exec "$@"'
    argv = [SOMA, "systemd-unit", "--config", str(config), "--service-user", "ghost"]
    result = subprocess.run(
        [unshare, "--mount", "sh", "-c", script, str(passwd), *argv],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "mount" in result.stderr and "soma systemd-unit" not in result.stderr:
        pytest.skip(f"cannot mount in a private namespace here: {result.stderr.strip()}")
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"soma systemd-unit: ghost's primary group (gid {gid}) has no name on this host: "
        "name the group to run as with --service-group NAME\n"
    )
