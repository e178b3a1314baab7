"""Host binding: the origins (scheme, host, port) a credential may be sent to.

A binding is written `api.example.com` (https on port 443), `*.example.com` (its subdomains,
https on 443) or as an origin, `https://api.example.com:8443` or `http://127.0.0.1:8080`
(the port defaults to the scheme's: 443 or 80). Plain http is only accepted for loopback
hosts, where nothing crosses a network. The port is part of the binding because anything on
the machine can listen on another loopback port, an agent included.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_PORTS = {"https": 443, "http": 80}

_HOST = r"(?:\*\.)?[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]"
# A bare host, or an origin; a port only with its scheme ("127.0.0.1:8080" would leave the
# reader guessing between http and https).
_BINDING = re.compile(
    rf"^(?P<host>{_HOST})$"
    rf"|^(?P<scheme>https?)://(?P<origin_host>{_HOST})(?::(?P<port>\d{{1,5}}))?/?$"
)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a request goes: lower-case scheme and host (IDNA, no brackets, no final dot)
    and the port, explicit or the scheme's default."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, scheme: str, host: str, port: int | None) -> Origin:
        scheme = scheme.lower()
        if port is None:
            port = DEFAULT_PORTS.get(scheme, 0)
        return cls(scheme, host.lower().rstrip("."), port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Binding:
    """One entry of a credential's `hosts`."""

    scheme: str
    host: str  # exact, or "*.example.com" for its subdomains
    port: int

    @classmethod
    def parse(cls, text: str) -> Binding:
        """The binding `text` names; `ValueError` saying what is wrong otherwise."""
        found = _BINDING.match(text)
        if found is None:
            raise ValueError(
                f"{text!r} is not a host (api.example.com, *.example.com) or an origin "
                "(https://api.example.com:8443, http://127.0.0.1:8080)"
            )
        scheme = found["scheme"] or "https"
        host = (found["host"] or found["origin_host"]).strip("[]").lower().rstrip(".")
        if found["port"] is None:
            port = DEFAULT_PORTS[scheme]
        else:
            port = int(found["port"])
            if not 1 <= port <= 65535:
                raise ValueError(f"{text!r}: the port must be from 1 to 65535")
        if scheme == "http" and host not in LOOPBACK_HOSTS:
            raise ValueError(f"{text!r}: plain http is only for loopback hosts; use https")
        return cls(scheme, host, port)

    def allows(self, origin: Origin) -> bool:
        if origin.scheme != self.scheme or origin.port != self.port:
            return False
        if self.host.startswith("*."):
            return origin.host.endswith(self.host[1:]) and origin.host != self.host[2:]
        return origin.host == self.host

    def __str__(self) -> str:
        return str(Origin(self.scheme, self.host, self.port))


def url_origin(url: str) -> Origin:
    """The origin of an http(s) URL as the standard library parses it (for configuration;
    the sidecar checks requests with the parser of the client that sends them)."""
    parts = urlsplit(url)
    return Origin.of(parts.scheme, parts.hostname or "", parts.port)


def upstream_host(url: str) -> str:
    """The lower-case host name of an http(s) URL, for messages (never the whole URL: a
    query parameter may carry a credential)."""
    return (urlsplit(url).hostname or "").lower()


def check_credential_reaches(
    credentials: Mapping[str, Any], name: str, url: str, key: str, field: str
) -> None:
    """`ValueError` naming `key.field` (or `key.credential`) unless the configured credential
    `name` may be sent to `url`'s origin: what a gateway's and an upstream's config promise."""
    credential = credentials.get(name)
    if credential is None:
        raise ValueError(f"{key}.credential: no [[credential]] named {name!r}")
    try:
        origin = url_origin(url)
    except ValueError:
        raise ValueError(f"{key}.{field}: the port must be from 1 to 65535") from None
    if not credential.allows(origin):
        raise ValueError(
            f"{key}.{field}: {origin} is not among credential {credential.name!r}'s hosts "
            f"{credential.hosts} (a bare host name means https on port 443)"
        )
