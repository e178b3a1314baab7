"""`[[upstream]]` tables: MCP servers whose tools the sidecar hosts as organ functions.

An upstream is reached over Streamable HTTP (`url`) or started as a subprocess speaking MCP
on stdio (`command`). Its credential, a `[[credential]]` of the vault, is sent as that
credential's header (HTTP: the upstream's origin must be among the credential's hosts, as for
a gateway) or put in the subprocess's environment as `credential_env` (stdio).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from soma_runtime.hosts import check_credential_reaches

NAME = r"^[a-z][a-z0-9_-]{0,63}$"  # an organ name: the upstream's functions are NAME.<tool>
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class UpstreamSection(BaseModel):
    """One upstream MCP server hosted as the organ `name`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME)
    # No user info or backslash in the authority (see GatewaySection.upstream).
    url: str | None = Field(default=None, pattern=r"^https?://[^/?#@\\]+(/[^?#]*)?$")
    command: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, min_length=1)
    credential: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    # stdio only: the environment variable of the subprocess that holds the credential.
    credential_env: str | None = Field(default=None, pattern=ENV_NAME)
    # Seconds one call (connection included) may take before it is `DeadlineExceeded`.
    timeout: float = Field(default=30.0, gt=0.0, le=3600.0)
    # Seconds between two reads of the tool list (list-changed notifications aside).
    refresh_interval: float = Field(default=60.0, ge=1.0, le=86400.0)
    # Tools seen when the upstream has no pinned tool at all: "approve" pins them (trust on
    # first use, logged); "quarantine" holds them until `soma upstream approve`.
    first_use: Literal["approve", "quarantine"] = "approve"

    @model_validator(mode="after")
    def _one_transport(self) -> UpstreamSection:
        if (self.url is None) == (self.command is None):
            raise ValueError("give exactly one of url (Streamable HTTP) or command (stdio)")
        if self.credential_env is not None and self.command is None:
            raise ValueError("credential_env: only for a stdio upstream (command)")
        if self.credential is not None and self.command is not None and not self.credential_env:
            raise ValueError("credential_env: required to pass a credential to a stdio upstream")
        if self.credential_env is not None and self.credential_env.startswith("SOMA_"):
            raise ValueError("credential_env: SOMA_* variables are reserved")
        return self


def _references_resolve(
    upstreams: list[UpstreamSection], info: ValidationInfo
) -> list[UpstreamSection]:
    """Names unique, each credential configured, an HTTP upstream among its credential's hosts.

    Runs as the `upstream` field's validator, so `credential` (declared before it) is known."""
    credentials: dict[str, Any] = {c.name: c for c in info.data.get("credential", [])}
    seen: set[str] = set()
    for index, upstream in enumerate(upstreams):
        key = f"upstream[{index}]"
        if upstream.name in seen:
            raise ValueError(f"{key}.name: {upstream.name!r} is used twice")
        seen.add(upstream.name)
        if upstream.credential is None:
            continue
        if upstream.credential not in credentials:
            raise ValueError(f"{key}.credential: no [[credential]] named {upstream.credential!r}")
        if upstream.url is not None:
            check_credential_reaches(credentials, upstream.credential, upstream.url, key, "url")
    return upstreams


UpstreamSections = Annotated[list[UpstreamSection], AfterValidator(_references_resolve)]
