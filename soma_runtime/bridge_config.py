"""`[[bridge]]` tables: MCP bridge instances, each a named MCP server over Streamable HTTP
exposing a chosen subset of organ functions to MCP clients, behind API keys and/or OAuth."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from soma_runtime.listeners import (
    HTTP_MAX_CONNECTIONS,
    HTTP_MAX_HEADER_BYTES,
    HTTP_REQUEST_TIMEOUT_S,
)

MiB = 1024 * 1024
NAME = r"^[a-z0-9][a-z0-9_-]{0,63}$"
# Asymmetric JWS algorithms only: `none` and the HMAC family can never be configured, so a
# token signed with a public key used as an HMAC secret has no algorithm to pass with.
JwtAlgorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"
]
DEFAULT_ALGORITHMS: tuple[JwtAlgorithm, ...] = ("RS256", "ES256", "EdDSA")
Scope = Annotated[str, Field(pattern=r"^[\x21\x23-\x5b\x5d-\x7e]{1,128}$")]  # RFC 6749 scope-token


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _listen(text: str) -> str:
    """`IP:PORT` with a literal IP (a name could resolve anywhere) and a port from 0 (pick a
    free one) to 65535; IPv6 in brackets."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be IP:PORT with a port from 0 to 65535")
    try:
        ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        raise ValueError(f"{host!r} is not a literal IP address") from None
    return text


class RateSection(_Section):
    """A token bucket per API key or token subject: `per_key` calls per second, `burst` at once."""

    per_key: float = Field(gt=0.0, le=1e6)
    burst: int = Field(ge=1, le=1_000_000)


class OAuthSection(_Section):
    """The bridge as an OAuth 2.1 resource server: bearer JWTs from `issuer`, verified with
    the keys of `jwks` (a file path, or an https URL fetched and cached)."""

    issuer: str = Field(min_length=1)
    jwks: str = Field(min_length=1)
    # Required for every request to the instance.
    scopes: list[Scope] = Field(default_factory=list)
    # Also required to call a tool that is not read-only (a client can be given read-only
    # access).
    write_scopes: list[Scope] = Field(default_factory=list)
    algorithms: list[JwtAlgorithm] = Field(default_factory=lambda: list(DEFAULT_ALGORITHMS))
    # Seconds of clock skew tolerated on exp/nbf/iat.
    leeway: float = Field(default=30.0, ge=0.0, le=300.0)
    # The JWKS is fetched again for an unknown `kid` at most once per this many seconds.
    jwks_refresh_interval: float = Field(default=60.0, ge=1.0, le=86400.0)

    @model_validator(mode="after")
    def _https_jwks(self) -> OAuthSection:
        if "://" in self.jwks and not self.jwks.startswith("https://"):
            raise ValueError("jwks: a URL must be https (or give a file path)")
        return self


class BridgeAuthSection(_Section):
    api_keys: bool = True
    oauth: OAuthSection | None = None
    rate: RateSection | None = None

    @model_validator(mode="after")
    def _some_auth(self) -> BridgeAuthSection:
        if not self.api_keys and self.oauth is None:
            raise ValueError("a bridge needs api_keys = true or an oauth table (no open bridges)")
        return self


class BridgeSection(_Section):
    """One MCP bridge instance: Streamable HTTP at `http://<listen>/mcp`."""

    name: str = Field(pattern=NAME)
    listen: Annotated[str, AfterValidator(_listen)] = "127.0.0.1:0"
    # Functions exposed, by name or glob; functions with one of `expose_tags` are exposed too.
    expose: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    expose_tags: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    # Credentials organs may use for calls through this instance.
    credentials: list[Annotated[str, Field(pattern=NAME)]] = Field(default_factory=list)
    # "safe": names valid for model APIs (^[a-zA-Z0-9_-]{1,64}$, see sidecar.bridge.names);
    # "dotted": the function names themselves.
    tool_names: Literal["safe", "dotted"] = "safe"
    discovery: Literal["list", "search"] = "list"
    # The URL clients reach this instance at (behind a proxy); the resource URL OAuth tokens
    # must name as their audience. Default: http://<listen>/mcp with the bound port.
    public_url: str | None = Field(default=None, pattern=r"^https?://[^/?#@\\]+(/[^?#]*)?$")
    max_request_bytes: int = Field(default=4 * MiB, ge=1024, le=64 * MiB)
    # What a client may hold, authenticated or not (sidecar.http_server): connections open at
    # once on the port (beyond it, the oldest one not being answered is closed), bytes of a
    # request's line and headers, seconds for a request's head to arrive (from the connection
    # or the previous answer) and then for its body.
    max_connections: int = Field(default=HTTP_MAX_CONNECTIONS, ge=2, le=4096)
    max_header_bytes: int = Field(default=HTTP_MAX_HEADER_BYTES, ge=1024, le=MiB)
    request_timeout: float = Field(default=HTTP_REQUEST_TIMEOUT_S, gt=0.0, le=300.0)
    # `subscriptions/listen` streams open at once, each holding a connection: on the
    # instance, and per API key or token subject.
    max_listen_streams: int = Field(default=32, ge=1, le=4095)
    max_listen_streams_per_caller: int = Field(default=8, ge=1, le=4095)
    auth: BridgeAuthSection = Field(default_factory=BridgeAuthSection)

    @model_validator(mode="after")
    def _public_beyond_loopback(self) -> BridgeSection:
        # Host and Origin are checked against the resource URL (DNS-rebinding protection),
        # which a wildcard or LAN address does not give.
        if not ipaddress.ip_address(self.host).is_loopback and self.public_url is None:
            raise ValueError("public_url: required when listen is not a loopback address")
        return self

    @model_validator(mode="after")
    def _streams_leave_connections(self) -> BridgeSection:
        if self.max_listen_streams >= self.max_connections:
            raise ValueError(
                "max_listen_streams: must be below max_connections (each stream holds a "
                "connection; calls need the others)"
            )
        if self.max_listen_streams_per_caller > self.max_listen_streams:
            raise ValueError("max_listen_streams_per_caller: must not exceed max_listen_streams")
        return self

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].removeprefix("[").removesuffix("]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


def _unique(bridges: list[BridgeSection]) -> list[BridgeSection]:
    seen: set[str] = set()
    for index, bridge in enumerate(bridges):
        if bridge.name in seen:
            raise ValueError(f"bridge[{index}].name: {bridge.name!r} is used twice")
        seen.add(bridge.name)
    return bridges


BridgeSections = Annotated[list[BridgeSection], AfterValidator(_unique)]
