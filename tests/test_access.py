"""Channel identities: token digests, sessions and allow-lists."""

from __future__ import annotations

from sidecar.access import MAX_SESSIONS, AllowList, Channel, token_digest


def channel(token: str = "t" * 64) -> Channel:
    c = Channel(name="claims", allow=AllowList(["system.*"]))
    c.reset(token_digest(token), pid=123, pending=False)
    return c


def test_only_the_digest_is_kept_and_the_token_matches() -> None:
    c = channel("secret-token")
    assert c.token == token_digest("secret-token") and c.token != b"secret-token"
    assert c.token_matches("secret-token")
    assert not c.token_matches("secret-tokeN")
    assert not Channel(name="x", allow=AllowList([])).token_matches("anything")


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
