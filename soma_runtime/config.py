"""The TOML configuration, validated by pydantic; every error names the key at fault.

Relative paths are resolved against the directory of the configuration file, so the same
file means the same thing whatever directory `soma` is started from. That directory holds
the file itself and, by default, `.soma/state` (the vault and its key) and `.soma/run`
(sockets); `module:Class` organs are imported from it; runtimes start in it unless their `cwd`
says otherwise, and so does the systemd unit (`WorkingDirectory=`).
"""

from __future__ import annotations

import os
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from soma_runtime.bridge_config import BridgeSections
from soma_runtime.hosts import Binding, Origin, check_credential_reaches
from soma_runtime.upstream_config import UpstreamSections

DEFAULT_CONFIG_NAME = "soma.toml"
MiB = 1024 * 1024


def _expandable(path: Path) -> Path:
    """A `~user/...` path names a user that exists (it is expanded when used)."""
    try:
        path.expanduser()
    except RuntimeError:
        raise ValueError(f"{str(path).split('/')[0]}: no such user") from None
    return path


# Every path in the file: `~` and `~user` are allowed, an unknown user is a config error.
ConfigPath = Annotated[Path, AfterValidator(_expandable)]


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SomaSection(_Section):
    """Where state and runtime files live. Only the file says so ($STATE_DIRECTORY and
    $RUNTIME_DIRECTORY are not read): the service and an operator's `soma status` or
    `soma secrets` on the host must reach the same sockets and the same vault, and systemd sets
    those variables for the service alone. `soma systemd-unit` has systemd manage the
    directories the file names (see `soma_runtime.systemd_unit`)."""

    state_dir: ConfigPath = Path(".soma/state")
    runtime_dir: ConfigPath = Path(".soma/run")


class LoggingSection(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # auto: JSON when stderr is not a terminal, readable text when it is.
    format: Literal["auto", "json", "console"] = "auto"
    # Level of the sidecar's `call` event, one per call. Debug by default: the SLO histograms
    # already count calls and their latency, and the event costs tens of microseconds a call.
    # Refusals and errors are logged at warning/info whatever this says.
    calls: Literal["debug", "info"] = "debug"


RUNTIME_NAME = r"^[a-z0-9][a-z0-9-]{0,31}$"
NAME = r"^[a-z0-9][a-z0-9_-]{0,63}$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class RestartPolicy(_Section):
    """How a supervised process is restarted: exponential backoff with jitter, within a budget.

    The n-th consecutive restart waits between half and all of
    `min(backoff_max, backoff_initial * 2**(n-1))` seconds. After `max_restarts` consecutive
    restarts the process is left down (FATAL). A run of at least `stable_after` seconds
    resets the count. Stopping sends SIGTERM, then SIGKILL after `stop_timeout` seconds.
    """

    restart: Literal["always", "on-failure", "never"] = "on-failure"
    backoff_initial: float = Field(default=0.5, gt=0.0, le=60.0)
    backoff_max: float = Field(default=30.0, gt=0.0, le=3600.0)
    max_restarts: int = Field(default=5, ge=0, le=1000)
    stable_after: float = Field(default=10.0, ge=0.0)
    stop_timeout: float = Field(default=5.0, ge=0.0, le=300.0)


class SidecarSection(RestartPolicy):
    """The sidecar process.

    `socket` is where `soma sidecar` serves when run on its own (under `soma supervise` every
    runtime gets its own socket instead); `organs` lists built-in short names or
    `module:Class` import paths. The restart settings apply when the supervisor runs it.
    """

    restart: Literal["always", "on-failure", "never"] = "always"
    backoff_initial: float = Field(default=0.2, gt=0.0, le=60.0)
    backoff_max: float = Field(default=5.0, gt=0.0, le=3600.0)
    max_restarts: int = Field(default=10, ge=0, le=1000)
    stable_after: float = Field(default=30.0, ge=0.0)
    # Seconds the sidecar gets to start serving before the start counts as failed.
    start_timeout: float = Field(default=30.0, gt=0.0, le=600.0)

    socket: ConfigPath | None = None
    organs: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=lambda: ["system"])
    # Largest request or response message accepted, in bytes.
    max_message_bytes: int = Field(default=4 * MiB, ge=1024, le=64 * MiB)
    # Deepest JSON nesting accepted in an input.
    max_input_depth: int = Field(default=64, ge=1, le=512)
    # Seconds in-flight calls get to finish at shutdown.
    grace_period: float = Field(default=5.0, ge=0.0, le=300.0)
    # Open connections one runtime's gRPC socket accepts; more are closed at once, so one
    # runtime can never take the descriptors the others need.
    max_connections: int = Field(default=32, ge=1, le=4096)
    # Seconds a new connection has to finish its HTTP/2 handshake, and an idle connection
    # (no call in flight) is kept open.
    connection_handshake_timeout: float = Field(default=5.0, gt=0.0, le=300.0)
    connection_idle_timeout: float = Field(default=300.0, gt=0.0, le=86400.0)
    # Calls one Stream may have in flight (read but not yet answered); beyond it the stream
    # is not read, so HTTP/2 flow control holds the client back.
    stream_max_in_flight: int = Field(default=256, ge=1, le=65536)
    # Under `soma supervise`: every `liveness_interval` seconds the supervisor asks the
    # sidecar to exercise every runtime channel; after `liveness_failures` failed checks in a
    # row the sidecar is restarted.
    liveness_interval: float = Field(default=5.0, gt=0.0, le=3600.0)
    liveness_failures: int = Field(default=3, ge=1, le=100)


class RuntimeSection(RestartPolicy):
    """One agent runtime: an argv command the supervisor runs with its own sidecar channel."""

    name: str = Field(pattern=RUNTIME_NAME)
    command: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    # Functions this runtime may call, as globs over op names ("system.*", "vault.retrieve").
    allow: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    # Credentials organs may use on this runtime's behalf, and outbound gateways it may use.
    credentials: list[Annotated[str, Field(pattern=NAME)]] = Field(default_factory=list)
    gateways: list[Annotated[str, Field(pattern=NAME)]] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    # Working directory; default: the directory of the configuration file.
    cwd: ConfigPath | None = None


class VaultSection(_Section):
    """Where the key-encryption key (KEK) comes from.

    `auto` uses the systemd credential when `$CREDENTIALS_DIRECTORY/<credential>` exists (the
    unit's `LoadCredential=`), else the key file.
    """

    kek: Literal["auto", "file", "systemd-credential"] = "auto"
    # A 32-byte key, created 0600 on first use; relative to the state directory.
    kek_file: ConfigPath = Path("kek")
    credential: str = Field(default="soma-kek", pattern=NAME)


class InjectSection(_Section):
    """How a credential is attached to a request."""

    kind: Literal["bearer", "header", "query"] = "bearer"
    # The header or query parameter name (for `header` and `query`).
    name: str | None = Field(default=None, min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")

    @model_validator(mode="after")
    def _name_when_needed(self) -> InjectSection:
        if self.kind == "bearer" and self.name is not None:
            raise ValueError("name: only for kind = 'header' or 'query'")
        if self.kind != "bearer" and self.name is None:
            raise ValueError(f"name: required for kind = {self.kind!r}")
        return self


def _binding(text: str) -> str:
    Binding.parse(text)  # raises ValueError naming the problem
    return text


class CredentialSection(_Section):
    """A secret of the vault that organs may attach to outbound requests, to `hosts` only."""

    name: str = Field(pattern=NAME)
    # The vault secret holding the value; default: the credential's name.
    secret: str | None = Field(default=None, pattern=NAME)
    inject: InjectSection = Field(default_factory=InjectSection)
    # Where the credential may be sent, and nowhere else: host names ("api.example.com",
    # "*.example.com": https on port 443) or origins ("https://api.example.com:8443",
    # "http://127.0.0.1:8080"; plain http to loopback only). See soma_runtime.hosts.
    hosts: list[Annotated[str, AfterValidator(_binding)]] = Field(min_length=1)

    @cached_property
    def bindings(self) -> tuple[Binding, ...]:
        return tuple(Binding.parse(text) for text in self.hosts)

    def allows(self, origin: Origin) -> bool:
        """Whether one of the bindings admits `origin`."""
        return any(binding.allows(origin) for binding in self.bindings)

    @property
    def secret_name(self) -> str:
        return self.secret or self.name


class GatewaySection(_Section):
    """An outbound HTTP gateway: runtimes call the sidecar with a placeholder key, the sidecar
    forwards to `upstream` with the real credential."""

    name: str = Field(pattern=NAME)
    # No user info or backslash in the authority: parsers disagree on where such a host ends.
    upstream: str = Field(pattern=r"^https?://[^/?#@\\]+(/[^?#]*)?$")
    credential: str = Field(pattern=NAME)
    # Set in the runtime to this gateway's URL on the sidecar, and to the runtime's placeholder.
    base_url_env: str = Field(pattern=ENV_NAME)
    api_key_env: str = Field(pattern=ENV_NAME)
    # Seconds to wait for the upstream to start answering, and largest request body.
    timeout: float = Field(default=300.0, gt=0.0, le=3600.0)
    max_request_bytes: int = Field(default=32 * MiB, ge=1024, le=1024 * MiB)


class SomaConfig(_Section):
    """The whole file. `organ` holds each organ's own settings table, keyed by organ name."""

    soma: SomaSection = Field(default_factory=SomaSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    sidecar: SidecarSection = Field(default_factory=SidecarSection)
    organ: dict[str, dict[str, Any]] = Field(default_factory=dict)
    vault: VaultSection = Field(default_factory=VaultSection)
    credential: list[CredentialSection] = Field(default_factory=list)
    gateway: list[GatewaySection] = Field(default_factory=list)
    runtime: list[RuntimeSection] = Field(default_factory=list)
    bridge: BridgeSections = Field(default_factory=list)
    upstream: UpstreamSections = Field(default_factory=list)

    @model_validator(mode="after")
    def _references_resolve(self) -> SomaConfig:
        for table in ("runtime", "credential", "gateway"):
            _unique_names(table, getattr(self, table))
        credentials = {c.name: c for c in self.credential}
        for index, gateway in enumerate(self.gateway):
            key = f"gateway[{index}]"
            check_credential_reaches(
                credentials, gateway.credential, gateway.upstream, key, "upstream"
            )
            for env_key in ("base_url_env", "api_key_env"):
                if getattr(gateway, env_key).startswith("SOMA_"):
                    raise ValueError(f"{key}.{env_key}: SOMA_* variables are reserved")
        gateways = {g.name for g in self.gateway}
        for index, runtime in enumerate(self.runtime):
            for field, known in (("credentials", credentials), ("gateways", gateways)):
                for name in getattr(runtime, field):
                    if name not in known:
                        raise ValueError(f"runtime[{index}].{field}: {name!r} is not configured")
        return self

    # Set by `load_config`: the file this came from, for resolving relative paths.
    source: Path | None = Field(default=None, exclude=True)

    def resolve(self, path: Path) -> Path:
        """`path` made absolute against the config file's directory. Normalised without
        following links: whoever uses it checks every component, links included (see
        `soma_runtime.unix.open_directory`)."""
        path = path.expanduser()
        if path.is_absolute():
            return Path(os.path.normpath(path))
        base = self.source.parent if self.source is not None else Path.cwd()
        return Path(os.path.normpath(base / path))

    @property
    def state_dir(self) -> Path:
        return self.resolve(self.soma.state_dir)

    @property
    def runtime_dir(self) -> Path:
        return self.resolve(self.soma.runtime_dir)


def _unique_names(table: str, entries: list[Any]) -> None:
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        if entry.name in seen:
            raise ValueError(f"{table}[{index}].name: {entry.name!r} is used twice")
        seen.add(entry.name)


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
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: it nests too deeply") from None
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
        message = message.removeprefix("Value error, ")
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
