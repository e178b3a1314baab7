"""Host binding: which hosts a credential may be sent to, and over which schemes."""

from __future__ import annotations

from urllib.parse import urlsplit

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def upstream_host(url: str) -> str:
    """The lower-case host name of an http(s) URL."""
    return (urlsplit(url).hostname or "").lower()


def host_allowed(host: str, patterns: list[str]) -> bool:
    """Whether `host` is one of `patterns` (exact, or "*.example.com" for its subdomains)."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        pattern = pattern.lower().rstrip(".")
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and host != pattern[2:]:
                return True
        elif host == pattern:
            return True
    return False


def secure_url(url: str) -> bool:
    """https, or http to a loopback host (where nothing crosses a network)."""
    parts = urlsplit(url)
    return parts.scheme == "https" or (
        parts.scheme == "http" and (parts.hostname or "").lower() in LOOPBACK_HOSTS
    )
