"""The TOML configuration, validated by pydantic; every error names the key at fault.

Relative paths are resolved against the directory of the configuration file, so the same
file means the same thing whatever directory `soma` is started from.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_CONFIG_NAME = "soma.toml"
MiB = 1024 * 1024


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SomaSection(_Section):
    """Where state and runtime files live ($STATE_DIRECTORY / $RUNTIME_DIRECTORY win)."""

    state_dir: Path = Path(".soma/state")
    runtime_dir: Path = Path(".soma/run")


class LoggingSection(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # auto: JSON when stderr is not a terminal, readable text when it is.
    format: Literal["auto", "json", "console"] = "auto"


class SidecarSection(_Section):
    """The sidecar process.

    `socket` is where `soma sidecar` serves when run on its own; `organs` lists built-in
    short names or `module:Class` import paths.
    """

    socket: Path | None = None
    organs: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=lambda: ["system"])
    # Largest request or response message accepted, in bytes.
    max_message_bytes: int = Field(default=4 * MiB, ge=1024, le=64 * MiB)
    # Deepest JSON nesting accepted in an input.
    max_input_depth: int = Field(default=64, ge=1, le=512)
    # Seconds in-flight calls get to finish at shutdown.
    grace_period: float = Field(default=5.0, ge=0.0, le=300.0)


class SomaConfig(_Section):
    """The whole file. `organ` holds each organ's own settings table, keyed by organ name."""

    soma: SomaSection = Field(default_factory=SomaSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    sidecar: SidecarSection = Field(default_factory=SidecarSection)
    organ: dict[str, dict[str, Any]] = Field(default_factory=dict)

    # Set by `load_config`: the file this came from, for resolving relative paths.
    source: Path | None = Field(default=None, exclude=True)

    def resolve(self, path: Path) -> Path:
        """`path` made absolute against the config file's directory."""
        path = path.expanduser()
        if path.is_absolute():
            return path
        base = self.source.parent if self.source is not None else Path.cwd()
        return (base / path).resolve()

    @property
    def state_dir(self) -> Path:
        env = os.environ.get("STATE_DIRECTORY")
        return Path(env.split(":")[0]) if env else self.resolve(self.soma.state_dir)

    @property
    def runtime_dir(self) -> Path:
        env = os.environ.get("RUNTIME_DIRECTORY")
        return Path(env.split(":")[0]) if env else self.resolve(self.soma.runtime_dir)


def default_config_path() -> Path:
    """`$SOMA_CONFIG`, else `./soma.toml`."""
    return Path(os.environ.get("SOMA_CONFIG") or DEFAULT_CONFIG_NAME)


def load_config(path: Path | None = None) -> SomaConfig:
    """Read and validate a configuration file; `ConfigError` names what is wrong."""
    path = path if path is not None else default_config_path()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, source=path.resolve())


def parse_config(data: dict[str, Any], source: Path | None = None) -> SomaConfig:
    """Validate an already-parsed configuration mapping."""
    try:
        config = SomaConfig.model_validate(data)
    except ValidationError as exc:
        where = f"{source}: " if source is not None else ""
        raise ConfigError(where + format_errors(exc)) from None
    return config.model_copy(update={"source": source})


def format_errors(exc: ValidationError) -> str:
    """One line per problem, each starting with the dotted key (`runtime[0].name: ...`)."""
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        key = _dotted(error["loc"])
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        lines.append(f"{key}: {message}" if key else message)
    return "; ".join(lines)


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
