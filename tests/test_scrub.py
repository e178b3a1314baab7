"""Scrubbing secrets out of echoed answers, whole and streamed."""

from __future__ import annotations

import random

from sidecar.scrub import Scrubber, scrubbable
from tests.fake_upstream import encodings

SECRET = 'ek/echo+key="0123 4567"'
OTHER = "sk-other-0123456789abcdef"


def body_with_every_form(rng: random.Random) -> bytes:
    parts = [b"prefix ", *(f"<{f}>".encode() for f in encodings(SECRET)), b" and "]
    parts += [f"{f}{f}".encode() for f in encodings(OTHER)]  # adjacent occurrences
    parts.append(bytes(rng.randrange(256) for _ in range(64)))
    rng.shuffle(parts)
    return b"".join(parts)


def test_every_form_is_masked_and_lengths_are_kept() -> None:
    scrubber = Scrubber([SECRET, OTHER])
    body = body_with_every_form(random.Random(1))
    out = scrubber.scrub(body)
    assert len(out) == len(body)
    assert not any(f.encode() in out for f in encodings(SECRET) + encodings(OTHER))
    assert b"prefix " in out and b" and " in out  # the rest is untouched
    assert scrubber.scrub(b"a " + SECRET.encode(), b"[X]") == b"a [X]"


def test_a_stream_is_scrubbed_like_the_whole_body_however_it_is_cut() -> None:
    """A value split across chunks, at every possible place, is still replaced."""
    scrubber = Scrubber([SECRET, OTHER])
    rng = random.Random(7)
    for _ in range(200):
        body = body_with_every_form(rng)
        cuts = sorted(rng.sample(range(1, len(body)), rng.randrange(1, 40)))
        stream = scrubber.stream()
        pieces = zip([0, *cuts], [*cuts, len(body)], strict=True)
        out = b"".join(stream.feed(body[a:b]) for a, b in pieces)
        assert out + stream.flush() == scrubber.scrub(body)
    for cut in range(1, len(SECRET)):  # one byte at a time, and every single split
        stream = scrubber.stream()
        data = f"data: {SECRET}\n\n".encode()
        out = stream.feed(data[: 6 + cut]) + stream.feed(data[6 + cut :]) + stream.flush()
        assert out == b"data: " + b"*" * len(SECRET) + b"\n\n"


def test_a_stream_holds_back_only_what_may_start_a_secret() -> None:
    """An event with no secret in it goes out at once (server-sent events stay live)."""
    stream = Scrubber([SECRET]).stream()
    assert stream.feed(b'data: {"n": 1}\n\n') == b'data: {"n": 1}\n\n'
    assert stream.feed(b"data: ek/ec") == b"data: "  # maybe the start of the secret
    assert stream.feed(b"ho!") == b"ek/echo!"  # it was not
    assert stream.feed(b"") == b""
    assert stream.feed(b"x ek") == b"x "
    assert stream.flush() == b"ek"  # the end: nothing more can complete it


def test_only_encodings_the_client_decodes_are_scrubbable() -> None:
    assert scrubbable({}) and scrubbable({"content-encoding": "gzip"})
    assert scrubbable({"content-encoding": "identity"}) and scrubbable({"content-encoding": ""})
    assert scrubbable({"content-encoding": "deflate, gzip"})
    assert not scrubbable({"content-encoding": "br"})
    assert not scrubbable({"content-encoding": "gzip, zstd"})


def test_an_empty_value_scrubs_nothing() -> None:
    scrubber = Scrubber([""])
    assert scrubber.scrub(b"body") == b"body"
    stream = scrubber.stream()
    assert stream.feed(b"body") == b"body" and stream.flush() == b""
