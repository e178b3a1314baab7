"""Configuration: every bad file gets an error naming the key; paths resolve from the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.loading import load_organs
from soma_runtime.config import ConfigError, load_config


def load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "soma.toml"
    path.write_text(text)
    return load_config(path)


def test_defaults_and_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    config = load(tmp_path, '[sidecar]\nsocket = "run/s.sock"\n')
    assert config.sidecar.organs == ["system"]
    assert config.resolve(config.sidecar.socket) == tmp_path / "run" / "s.sock"  # type: ignore[arg-type]
    assert config.state_dir == tmp_path / ".soma" / "state"


def test_only_the_file_names_the_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd sets these for the service alone: an operator's command would miss it."""
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/soma")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/soma")
    config = load(tmp_path, "")
    assert config.state_dir == tmp_path / ".soma" / "state"
    assert config.runtime_dir == tmp_path / ".soma" / "run"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[sidecar]\nsockt = "x"\n', "sidecar.sockt: unknown key"),
        (
            '[sidecar]\norgans = ["system", 3]\n',
            "sidecar.organs[1]: Input should be a valid string",
        ),
        ('[sidecar]\norgans = "system"\n', "sidecar.organs: Input should be a valid list"),
        (
            "[sidecar]\nmax_message_bytes = 1\n",
            "sidecar.max_message_bytes: Input should be greater",
        ),
        ('[logging]\nlevel = "loud"\n', "logging.level: Input should be"),
        ("[surprise]\n", "surprise: unknown key"),
        ("[sidecar\n", "not valid TOML"),
        (  # its lines would read as the sidecar's
            '[[runtime]]\nname = "sidecar"\ncommand = ["x"]\n',
            "runtime[0].name: 'sidecar' is the sidecar's name",
        ),
    ],
)
def test_bad_files_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert message in str(info.value)
    assert str(tmp_path / "soma.toml") in str(info.value)


def test_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "bin.toml")


@pytest.mark.parametrize(
    ("organs", "extra", "message"),
    [
        ('"nope"', "", "sidecar.organs[0]: 'nope' is neither a built-in organ"),
        ('"no_such_module:X"', "", "sidecar.organs[0]: cannot import 'no_such_module'"),
        ('"tests.fixtures.organs:NotAnOrgan"', "", "is not an Organ subclass"),
        ('"system", "system"', "", "sidecar.organs[1]: organ 'system' is listed twice"),
        ('"system"', "[organ.ghost]\nx = 1\n", "organ.ghost: no organ of that name is loaded"),
        ('"system"', "[organ.system]\nx = 1\n", "organ.system: takes no settings"),
        (
            '"tests.fixtures.organs:Acme"',
            "[organ.acme]\ngreeting = 5\n",
            "organ.acme: greeting must be a string",
        ),
    ],
)
def test_bad_organ_entries_name_the_key(
    tmp_path: Path, organs: str, extra: str, message: str
) -> None:
    config = load(tmp_path, f"[sidecar]\norgans = [{organs}]\n{extra}")
    with pytest.raises(ConfigError) as info:
        load_organs(config)
    assert message in str(info.value)


def test_organ_settings_reach_the_organ(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        '[sidecar]\norgans = ["tests.fixtures.organs:Acme"]\n[organ.acme]\ngreeting = "Ahoy"\n',
    )
    (acme,) = load_organs(config)
    assert acme.greeting == "Ahoy"  # type: ignore[attr-defined]
