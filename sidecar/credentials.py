"""Credential injection: what a call needs, whether its runtime may have it, and the value.

A function's card lists the credentials it needs (by name, or `input:<field>` for the one its
input names). For each, the sidecar checks the calling runtime's `credentials`, decrypts the
secret at call time (the use is audited), and hands the organ a `Credential` beside the
stimulus. A `Credential` attaches itself only to requests for its own origins (scheme, host
and port: see `soma_runtime.hosts`).

Decrypted credentials are kept in memory for `vault.credential_cache_s` seconds (0: never),
at most `MAX_CACHED` of them, so a burst of calls costs one decrypt rather than one each.
Every use is still checked against what its runtime may use and still audited. A cached copy
is served only while the vault's secrets generation is the one it was read under: any change
to the secrets (`soma secrets set`, `delete`, `rotate-kek`, from any process) revokes every
copy at once, checked on each hit (a few microseconds, no thread hop).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx2

from sidecar.scrub import Scrubber
from sidecar.vault.async_vault import AsyncVault
from sidecar.vault.store import AuditRow, RecordUnreadable, Vault, VaultError
from soma_runtime.cards import FunctionCard
from soma_runtime.config import CredentialSection
from soma_runtime.hosts import Origin, upstream_host
from soma_runtime.redaction import redactor

INPUT_PREFIX = "input:"
MAX_CACHED = 1024  # decrypted credentials held at once, by (runtime, credential)


class CredentialDenied(Exception):
    """The runtime may not use that credential (answered PERMISSION_DENIED)."""

    def __init__(self, runtime: str, credential: str) -> None:
        super().__init__(f"runtime {runtime!r} may not use credential {credential!r}")
        self.credential = credential


class HostNotAllowed(Exception):
    """The request's URL is not one the credential may be sent to."""


class Credential:
    """A decrypted credential bound to its origins. Its value is not in its repr or str."""

    __slots__ = ("_scrubber", "_settings", "_value", "inject", "name")

    def __init__(self, settings: CredentialSection, value: str) -> None:
        self.name = settings.name
        self.inject = settings.inject
        self._settings = settings
        self._value = value
        self._scrubber: Scrubber | None = None

    def __repr__(self) -> str:
        return f"Credential({self.name!r}, hosts={self._settings.hosts!r})"

    __str__ = __repr__

    def allows(self, url: str) -> bool:
        """Whether this credential may go to `url`: its scheme, host and port are those of
        one of the credential's bindings, as the client that sends the request parses them."""
        origin = request_origin(url)
        return origin is not None and self._settings.allows(origin)

    def attach(self, url: str) -> tuple[str, dict[str, str]]:
        """The URL and the headers to send for a request to `url` with this credential
        (a header, or a query parameter in the URL); `HostNotAllowed` for any other origin."""
        extra: dict[str, str] = {}
        if self.inject.kind == "bearer":
            extra["Authorization"] = f"Bearer {self._value}"
        elif self.inject.kind == "header":
            assert self.inject.name is not None
            extra[self.inject.name] = self._value
        else:
            assert self.inject.name is not None
            query = [
                *parse_qsl(urlsplit(self.strip(url)).query, keep_blank_values=True),
                (self.inject.name, self._value),
            ]
            url = urlunsplit(urlsplit(url)._replace(query=urlencode(query)))
        if not self.allows(url):  # the URL that is sent, after any rewriting
            raise HostNotAllowed(f"credential {self.name!r} is not sent to {upstream_host(url)!r}")
        return url, extra

    def strip(self, url: str) -> str:
        """`url` without this credential's query parameter (a redirect may carry it back)."""
        if self.inject.kind != "query":
            return url
        parts = urlsplit(url)
        query = [
            (k, v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
            if k != self.inject.name
        ]
        return urlunsplit(parts._replace(query=urlencode(query)))

    def reveal(self) -> str:
        """The value itself, for what has no URL to bind it to: the environment of a stdio
        upstream MCP server the sidecar starts, and what masks it in everything an upstream
        answers (sidecar.upstream). Never log it."""
        return self._value

    @property
    def scrubber(self) -> Scrubber:
        """Finds this credential's value, in every form, in anything echoed back to a caller."""
        if self._scrubber is None:
            self._scrubber = Scrubber([self._value])
        return self._scrubber


def request_origin(url: str) -> Origin | None:
    """The origin a request for `url` goes to, parsed as httpx2 parses it when it sends the
    request (two parsers that disagree would let a URL pass the check for one host and be
    sent to another); None when httpx2 cannot parse it."""
    try:
        parsed = httpx2.URL(url)
        host = parsed.raw_host.decode("ascii")
    except (httpx2.InvalidURL, ValueError):
        return None
    return Origin.of(parsed.scheme, host, parsed.port)


def needed(card: FunctionCard, input: Mapping[str, Any]) -> list[str]:
    """The credential names a call of `card` with `input` needs."""
    names = []
    for ref in card.credentials:
        if ref.startswith(INPUT_PREFIX):
            value = input.get(ref[len(INPUT_PREFIX) :])
            if isinstance(value, str) and value:
                names.append(value)
        else:
            names.append(ref)
    return names


class CredentialBroker:
    """Resolves credentials for calls; the vault is only opened if some call needs it."""

    def __init__(
        self, settings: list[CredentialSection], vault: AsyncVault, *, cache_s: float = 0.0
    ) -> None:
        self._settings = {c.name: c for c in settings}
        self._vault = vault
        self._cache_s = cache_s
        # (runtime, credential) -> (expiry on the monotonic clock, generation, credential);
        # keyed by runtime too, so that no entry is ever shared across callers.
        self._cache: OrderedDict[tuple[str, str], tuple[float, int, Credential]] = OrderedDict()
        self.cache_hits = 0

    def settings(self, name: str) -> CredentialSection | None:
        return self._settings.get(name)

    @property
    def cache_size(self) -> int:
        return len(self._cache)

    async def resolve(
        self, names: list[str], *, runtime: str, allowed: frozenset[str], organ: str, op: str
    ) -> dict[str, Credential]:
        """Decrypt each credential in `names` for `runtime`; `CredentialDenied` if it may not
        use one, `VaultError` if a value cannot be read (or its use cannot be audited)."""
        for name in names:
            if name not in allowed or name not in self._settings:
                raise CredentialDenied(runtime, name)
        resolved = {}
        generation = self._vault.generation() if self._cache_s > 0 and self._cache else None
        for name in names:
            settings = self._settings[name]
            credential = self._cached(runtime, name, generation)
            if credential is None:
                credential = await self._decrypt(settings, runtime, organ, op)
            else:
                self.cache_hits += 1
            await self._vault.audit(AuditRow(settings.secret_name, "use", runtime, organ, op))
            resolved[name] = credential
        return resolved

    def _cached(self, runtime: str, name: str, generation: int | None) -> Credential | None:
        entry = self._cache.get((runtime, name))
        if entry is None or generation is None:
            return None
        expires, read_under, credential = entry
        if read_under != generation or expires <= time.monotonic():
            del self._cache[(runtime, name)]
            return None
        return credential

    async def _decrypt(
        self, settings: CredentialSection, runtime: str, organ: str, op: str
    ) -> Credential:
        secret = settings.secret_name
        try:
            generation, raw = await self._vault.run(Vault.open_secret, secret)
        except RecordUnreadable:
            await self._vault.audit(AuditRow(secret, "use-failed", runtime, organ, op))
            raise
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise VaultError(f"secret {secret!r} is not UTF-8 text") from None
        redactor.add(value)
        credential = Credential(settings, value)
        if self._cache_s > 0:
            key = (runtime, settings.name)
            self._cache[key] = (time.monotonic() + self._cache_s, generation, credential)
            self._cache.move_to_end(key)
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        return credential
