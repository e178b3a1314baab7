"""Channel identities: token digests, sessions and allow-lists."""

from __future__ import annotations

import pytest

from sidecar.access import MAX_SESSIONS, AllowList, Channel, token_digest


def channel(token: str = "t" * 64) -> Channel:
    c = Channel(name="claims", allow=AllowList(["system.*"]))
    c.reset(token_digest(token), pid=123, pending=False)
    return c


def test_only_the_digest_is_kept_and_the_token_matches() -> None:
    token = "5e" * 32
    c = channel(token)
    assert c.token == token_digest(token) and c.token != token.encode()
    assert c.token_matches(token)
    assert not c.token_matches(token[:-1] + "f")
    assert not Channel(name="x", allow=AllowList([])).token_matches(token)


@pytest.mark.parametrize("presented", ["", "\ud800" * 64, "5E" * 32, "5e" * 32 + "\n", "x"])
def test_a_malformed_token_or_session_is_refused_not_an_error(presented: str) -> None:
    c = channel("5e" * 32)
    assert not c.token_matches(presented)
    assert not c.session_matches(presented)


def test_sessions_die_with_a_new_identity() -> None:
    c = channel()
    session = c.open_session()
    assert c.session_matches(session)
    altered = session[:-1] + ("1" if session[-1] == "0" else "0")  # always one digit off
    assert not c.session_matches(altered)
    c.reset(token_digest("new"), pid=124, pending=False)
    assert not c.session_matches(session)
    assert not c.token_matches("t" * 64)


def test_sessions_are_bounded() -> None:
    c = channel()
    first = c.open_session()
    later = [c.open_session() for _ in range(MAX_SESSIONS)]
    assert not c.session_matches(first)
    assert all(c.session_matches(s) for s in later)


def test_allow_lists_are_globs_over_ops() -> None:
    allow = AllowList(["system.*", "vault.retrieve", "sim?larity.search"])
    assert allow.allows("system.echo") and allow.allows("vault.retrieve")
    assert allow.allows("similarity.search")
    assert not allow.allows("vault.store") and not allow.allows("systemXecho")
    assert not allow.allows("xsystem.echo")
    assert not AllowList([]).allows("system.echo")
    assert AllowList(["*"]).allows("anything.at.all")
