"""Scrubbing secret values out of what upstreams send back (they may echo what they got).

Every form of a value (`soma_runtime.redaction.secret_forms`: raw, URL-encoded, base64,
JSON-escaped) is replaced, in whole buffers (`Scrubber.scrub`) or in a stream
(`StreamScrubber`), where a value may arrive split across chunks. What cannot be caught is
an echo the upstream transformed in some other way (reversed, hashed, re-encoded with
lower-case hex, inside a longer base64 text at an unaligned offset, compressed): bytes that
no longer contain any known form of the value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from soma_runtime.redaction import forms_pattern, secret_forms

# Content codings the HTTP client decodes before the bytes are scrubbed. Anything else (br,
# zstd, or a coding nobody asked for) would reach the caller as opaque, unscrubbed bytes.
SCRUBBABLE_CODINGS = frozenset({"gzip", "deflate"})


def content_codings(headers: Mapping[str, str]) -> list[str]:
    """The codings a response's body is in (`identity`, which means none, left out)."""
    listed = (c.strip().lower() for c in headers.get("content-encoding", "").split(","))
    return [c for c in listed if c and c != "identity"]


def scrubbable(headers: Mapping[str, str]) -> bool:
    """Whether a response's body, as the client decodes it, can be scrubbed."""
    return SCRUBBABLE_CODINGS.issuperset(content_codings(headers))


class Scrubber:
    """Finds every form of some secret values in bytes."""

    __slots__ = ("_firsts", "_forms", "_longest", "_pattern")

    def __init__(self, values: Iterable[str]) -> None:
        forms = {form for value in values for form in secret_forms(value) if form}
        self._pattern = re.compile(forms_pattern(forms).encode())
        self._forms = tuple(form.encode() for form in forms)
        self._longest = max(map(len, self._forms), default=0)
        self._firsts = frozenset(f[0] for f in self._forms)

    def scrub(self, data: bytes, replacement: bytes | None = None) -> bytes:
        """`data` with every form replaced by `replacement`; by default a mask of `*` as
        long as what it hides, so lengths (Content-Length, offsets) stay true."""
        if not self._present(data):
            return data
        return self._pattern.sub(_mask if replacement is None else replacement, data)

    def stream(self) -> StreamScrubber:
        return StreamScrubber(self)

    def _present(self, data: bytes) -> bool:
        # Substring searches are tens of times faster than the alternation: most bodies hold
        # no secret, and then the pattern never runs.
        return any(form in data for form in self._forms)

    def _held_from(self, data: bytes, start: int) -> int:
        """The first index from `start` where the rest of `data` could begin a form that the
        next chunk completes; len(data) when there is none."""
        end = len(data)
        for i in range(max(start, end - self._longest + 1), end):
            if data[i] in self._firsts:
                rest = end - i
                if any(len(f) > rest and data.startswith(f[:rest], i) for f in self._forms):
                    return i
        return end


class StreamScrubber:
    """Scrubs a body chunk by chunk, with a same-length mask.

    Only the bytes that could be the start of a form are held back until the next chunk
    decides (at most the longest form less one byte), so a server-sent event that holds no
    secret goes out at once.
    """

    __slots__ = ("_scrubber", "_tail")

    def __init__(self, scrubber: Scrubber) -> None:
        self._scrubber = scrubber
        self._tail = b""

    def feed(self, chunk: bytes) -> bytes:
        """What can be sent of the stream so far."""
        scrubber = self._scrubber
        data = self._tail + chunk
        held = scrubber._held_from(data, 0)
        out = bytearray()
        pos = 0
        matches = scrubber._pattern.finditer(data) if scrubber._present(data) else ()
        for match in matches:
            if match.start() >= held:
                break  # decided again with the next chunk, which may extend it
            out += data[pos : match.start()]
            out += _mask(match)
            pos = match.end()
            if pos > held:  # the held bytes were inside this match
                held = scrubber._held_from(data, pos)
        out += data[pos:held]
        self._tail = data[held:]
        return bytes(out)

    def flush(self) -> bytes:
        """The rest, at the end of the stream."""
        tail, self._tail = self._tail, b""
        return self._scrubber.scrub(tail)


def _mask(match: re.Match[bytes]) -> bytes:
    return b"*" * (match.end() - match.start())
