"""`soma systemd-unit`: a unit file that runs `soma supervise` as a notify service.

The service uses the directories the configuration names, exactly as an operator's commands on
the host do. When one lies under the base systemd manages (`/run` and `/var/lib` for the system
manager; `$XDG_RUNTIME_DIR` and `$XDG_STATE_HOME` for a user's), the unit has systemd create it
(`RuntimeDirectory=`, `StateDirectory=`); any other directory a system unit may write
(`ReadWritePaths=`), and then it must exist before the service starts.

A system unit always names its user (`User=`, `Group=`): without one, systemd runs the
supervisor and every agent as root. By default it is the owner of the configuration file, who
normally also ran `soma secrets set` and owns the state directory; a file owned by root is
refused unless root is asked for by name.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from soma_runtime.config import SomaConfig

# What the system unit's PrivateTmp= replaces with the service's own empty directories.
_PRIVATE_TMP = (Path("/tmp"), Path("/var/tmp"))  # noqa: S108 - refused here, never used


class UnitError(Exception):
    """The unit cannot be written as asked; the message says what to change."""


@dataclass(frozen=True, slots=True)
class Account:
    """Who a system unit runs as."""

    user: str
    group: str
    uid: int
    gids: frozenset[int]  # its groups, for judging what it can read
    why: str  # how it was chosen, for the unit's comment


def service_account(config: SomaConfig, user: str | None, group: str | None) -> Account:
    """The account named, or else the configuration file's owner (never root by default)."""
    assert config.source is not None
    if user is None:
        owner = config.source.stat().st_uid
        if owner == 0:
            raise UnitError(
                f"{config.source} belongs to root, so the agents would run as root: name the "
                "user to run them as with --service-user NAME (--service-user root if you "
                "mean it)"
            )
        try:
            entry = pwd.getpwuid(owner)
        except KeyError:
            raise UnitError(
                f"{config.source} belongs to uid {owner}, which has no user name: "
                "name the user with --service-user NAME"
            ) from None
        why = f"the owner of {config.source}; --service-user NAME to choose another"
    else:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise UnitError(f"--service-user: no user {user!r} on this host") from None
        why = "--service-user"
    try:
        group_entry = grp.getgrgid(entry.pw_gid) if group is None else grp.getgrnam(group)
    except KeyError:
        if group is None:
            raise UnitError(
                f"{entry.pw_name}'s primary group (gid {entry.pw_gid}) has no name on this "
                "host: name the group to run as with --service-group NAME"
            ) from None
        raise UnitError(f"--service-group: no group {group!r} on this host") from None
    gids = frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid)) | {group_entry.gr_gid}
    return Account(entry.pw_name, group_entry.gr_name, entry.pw_uid, gids, why)


# Hardening that needs the system manager (a --user manager cannot apply it unprivileged).
_SYSTEM_HARDENING = """\
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
CapabilityBoundingSet=
AmbientCapabilities=
SystemCallArchitectures=native
"""


def soma_executable() -> str:
    """The `soma` script of the running installation (absolute: units need absolute paths)."""
    beside = Path(sys.executable).parent / "soma"
    if beside.exists():
        return str(beside)
    found = shutil.which("soma")
    return str(Path(found).resolve()) if found else str(beside)


def _bases(user: bool) -> dict[str, Path | None]:
    """Where systemd creates `RuntimeDirectory=` and `StateDirectory=` for this manager."""
    if not user:
        return {"RuntimeDirectory": Path("/run"), "StateDirectory": Path("/var/lib")}
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    state = os.environ.get("XDG_STATE_HOME") or Path("~/.local/state").expanduser()
    return {
        "RuntimeDirectory": Path(runtime) if runtime else None,
        "StateDirectory": Path(state),
    }


def _placements(config: SomaConfig, *, user: bool) -> list[tuple[str, Path, Path | None]]:
    """The runtime and state directories: the setting that has systemd manage each, the path,
    and the path relative to systemd's base (None: the directory is not systemd's)."""
    bases = _bases(user)
    placed = []
    for setting, path in (
        ("RuntimeDirectory", config.runtime_dir),
        ("StateDirectory", config.state_dir),
    ):
        base = bases[setting]
        managed = base is not None and path != base and path.is_relative_to(base)
        placed.append((setting, path, path.relative_to(base) if managed and base else None))
    return placed


def _directories(config: SomaConfig, *, user: bool, account: Account | None) -> str:
    """The lines that give the service the configured runtime and state directories."""
    lines: list[str] = []
    writable: list[str] = []
    for setting, path, managed in _placements(config, user=user):
        if managed is not None:  # systemd creates it, owned by the unit's user
            lines += [f"{setting}={managed}", f"{setting}Mode=0700"]
        elif not user:  # the system unit's ProtectSystem/ProtectHome make the rest read-only
            writable.append(str(path))
    if writable:
        assert account is not None
        owner = f"-o {account.user} -g {account.group}"
        lines += [
            f"# These must exist before it starts, owned by {account.user} (ProtectHome= and",
            "# ProtectSystem= make everything else read-only; these stay writable):",
            f"#   install -d -m 0700 {owner} {' '.join(writable)}",
            *(f"ReadWritePaths={path}" for path in writable),
        ]
    return "\n".join(lines)


def _read_paths(config: SomaConfig) -> list[tuple[str, Path]]:
    """What the service reads before anything else: its executable and its configuration."""
    assert config.source is not None
    return [
        ("the soma executable", Path(soma_executable())),
        ("the configuration file", config.source),
    ]


def _used_paths(config: SomaConfig) -> list[tuple[str, Path]]:
    """Every path the service reads or writes, named as the configuration names it."""
    used = [
        *_read_paths(config),
        ("soma.runtime_dir", config.runtime_dir),
        ("soma.state_dir", config.state_dir),
    ]
    if config.vault.kek_file.is_absolute():
        used.append(("vault.kek_file", config.vault.kek_file))
    used += [
        (f"runtime[{index}].cwd", config.resolve(runtime.cwd))
        for index, runtime in enumerate(config.runtime)
        if runtime.cwd is not None
    ]
    return used


def _check_private_tmp(config: SomaConfig) -> None:
    """Refuse paths under /tmp or /var/tmp: the system unit's PrivateTmp= gives the service
    its own empty ones, so it would not find them, and would not share them with
    `soma status` and `soma secrets` run on the host."""
    inside = [
        f"{name} {path}"
        for name, path in _used_paths(config)
        if any(path.is_relative_to(tmp) for tmp in _PRIVATE_TMP)
    ]
    if inside:
        raise UnitError(
            "the service gets its own empty /tmp and /var/tmp (PrivateTmp=yes), so it would "
            f"not see {'; '.join(inside)}. Move them out of /tmp: a checkout in a home "
            'directory works, or /srv/soma with runtime_dir = "/run/soma" and '
            'state_dir = "/var/lib/soma"'
        )


def _may(account: Account, info: os.stat_result, bits: tuple[int, int, int]) -> bool:
    """Whether the mode bits (owner's, group's, others') grant `account` the access. No
    capability overrides them: the unit's capability set is empty, root's included."""
    if info.st_uid == account.uid:
        return bool(info.st_mode & bits[0])
    if info.st_gid in account.gids:
        return bool(info.st_mode & bits[1])
    return bool(info.st_mode & bits[2])


_SEARCH = (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)
_READ = (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)


def _unreadable(path: Path, account: Account) -> Path | None:
    """The first directory above `path` that `account` may not enter, or `path` itself when
    it may not read it; None when nothing in the way can be seen."""
    for step, bits in [*((d, _SEARCH) for d in reversed(path.parents)), (path, _READ)]:
        try:
            info = step.stat()
        except OSError:
            return None
        if not _may(account, info, bits):
            return step
    return None


def access_warnings(config: SomaConfig, account: Account) -> list[str]:
    """What the system unit's user will likely fail at, judged by owners and mode bits (ACLs
    may grant more): reading the executable and the configuration (a checkout in another
    user's home directory), and owning the directories systemd does not manage for it (the
    sidecar refuses a runtime or state directory that is not its user's)."""
    found = []
    for name, path in _read_paths(config):
        blocked = _unreadable(path, account)
        if blocked is not None:
            found.append(
                f"{account.user} has no access to {blocked}, so the service cannot read {name} "
                f"{path}: run it as the owner (--service-user), or install where "
                f"{account.user} can read"
            )
    for _setting, path, managed in _placements(config, user=False):
        try:
            owner = path.stat().st_uid
        except OSError:
            continue  # created before the start, as the unit's comment says
        if managed is None and owner != account.uid:
            found.append(
                f"{path} belongs to uid {owner}, not to {account.user}: the service will refuse "
                f"it (chown -R {account.user}:{account.group} {path})"
            )
    return found


def unit_file(config: SomaConfig, *, account: Account | None) -> str:
    """The unit's text, for the directories `config` names: a system unit running as
    `account`, or with None a unit for the user's own manager. `UnitError` when the system
    unit could not work (paths under /tmp)."""
    assert config.source is not None
    user = account is None
    if account is not None:
        _check_private_tmp(config)
    grace = max([config.sidecar.stop_timeout, *(r.stop_timeout for r in config.runtime)])
    # The supervisor's stop: the runtimes, the sidecar, then orphans nothing could place.
    stop_timeout = int(3 * grace + config.sidecar.grace_period + 10)
    hardening = "" if user else _SYSTEM_HARDENING
    target = "default.target" if user else "multi-user.target"
    run_as = (
        ""
        if account is None
        else f"# The supervisor and every agent run as this user ({account.why}).\n"
        f"User={account.user}\nGroup={account.group}\n"
    )
    return f"""\
# Generated by `soma systemd-unit{" --user" if user else ""}`.
[Unit]
Description=Soma Runtime supervisor (sidecar and agent runtimes)
Documentation=file://{config.source.parent}/README.md
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
{run_as}ExecStart={soma_executable()} supervise --config {config.source}
WorkingDirectory={config.source.parent}
# Sockets: {config.runtime_dir}; the vault and its key: {config.state_dir}.
# The configuration names them; `soma status` and `soma secrets` on the host use the same.
{_directories(config, user=user, account=account)}
UMask=0077
# The supervisor pings at half this interval while its event loop is healthy.
WatchdogSec=30s
Restart=on-failure
RestartSec=2s
# Exit 2 is a setup error (configuration, organ, key, path): restarting cannot fix it.
RestartPreventExitStatus=2
# SIGTERM reaches the supervisor only: it stops the runtimes (each with every process it
# started), then the sidecar, in order. Then SIGKILL goes to whatever is left in the unit's
# cgroup, as soon as the supervisor has exited or died (even by SIGKILL): the backstop for
# what escaped it. (control-group would SIGTERM every process at once, out of order.)
KillMode=mixed
TimeoutStopSec={stop_timeout}s
# To hand the vault's key-encryption key over as a credential:
# LoadCredential=soma-kek:/etc/soma/kek
NoNewPrivileges=yes
{hardening}
[Install]
WantedBy={target}
"""
