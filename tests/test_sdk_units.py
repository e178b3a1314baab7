"""SDK pieces that need no sidecar: environment, companion paths, errors, idempotency."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

import sdk
from sdk import _auth, _wire, protocol
from sdk._core import ACCEPT_TIMEOUT_S, MAX_ACCEPT_TIMEOUT_S, Call, ClientCore, Retry
from sdk.types import Response


def test_from_env_outside_a_runtime_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOMA_SIDECAR_ADDRESS", raising=False)
    with pytest.raises(sdk.SomaError, match="SOMA_SIDECAR_ADDRESS is not set"):
        sdk.Client.from_env()
    with pytest.raises(sdk.SomaError, match="SOMA_SIDECAR_ADDRESS is not set"):
        sdk.AsyncClient.from_env()


def test_companion_paths() -> None:
    assert protocol.socket_path("unix:///run/soma/rt/claims.sock") == "/run/soma/rt/claims.sock"
    assert protocol.socket_path("unix:relative.sock") == "relative.sock"
    assert protocol.socket_path("localhost:50051") is None
    assert protocol.auth_socket_for("/run/rt/claims.sock") == "/run/rt/claims.auth.sock"
    assert protocol.token_file_for("/run/sidecar.sock") == "/run/sidecar.token"
    assert protocol.auth_socket_for("/run/odd") == "/run/odd.auth.sock"


def test_the_token_is_read_from_the_inherited_descriptor_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fd = os.memfd_create("token", 0)  # inheritable, as a runtime receives it
    os.write(fd, b"a" * 64)
    try:
        monkeypatch.setenv("SOMA_TOKEN_FD", str(fd))
        assert _auth.token_from_env() == "a" * 64
        assert not os.get_inheritable(fd)  # the runtime's own children will not get it
        assert _auth.token_from_env() == "a" * 64  # a second client reads the cached value
    finally:
        os.close(fd)
        _auth._fd_tokens.pop(fd, None)


def test_token_file_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    path = f"{tmp_path}/t.token"
    with open(path, "w") as out:
        out.write("b" * 64 + "\n")
    monkeypatch.delenv("SOMA_TOKEN_FD", raising=False)
    monkeypatch.setenv("SOMA_TOKEN_FILE", path)
    assert _auth.token_from_env() == "b" * 64
    monkeypatch.setenv("SOMA_TOKEN_FILE", f"{tmp_path}/missing")
    with pytest.raises(sdk.SomaError, match="cannot read the token file"):
        _auth.token_from_env()


def test_a_handshake_with_no_sidecar_ends_at_the_deadline(tmp_path: os.PathLike[str]) -> None:
    import time

    started = time.monotonic()
    with pytest.raises((sdk.Unavailable, sdk.DeadlineExceeded)):
        _auth.handshake(f"{tmp_path}/absent.auth.sock", "t", time.monotonic() + 0.3)
    assert time.monotonic() - started < 2


def test_idempotency_map_covers_sub_organ_functions() -> None:
    cards = [
        {
            "functions": [{"name": "a.x", "idempotent": True}],
            "sub_organs": [{"functions": [{"name": "s.y", "idempotent": False}]}],
        }
    ]
    assert _wire.idempotency(cards) == {"a.x": True, "s.y": False}


@pytest.mark.parametrize(
    ("output", "error"),
    [
        ({"error": "UnsupportedOperation", "op": "x"}, sdk.UnsupportedOperation),
        ({"error": "InvalidInput", "path": "$.a", "message": "m"}, sdk.InvalidInput),
        ({"error": "Overloaded"}, sdk.Overloaded),
        ({"error": "NotFound", "message": "gone"}, sdk.OrganError),
        ("not an object", sdk.OrganError),
    ],
)
def test_organ_answers_map_to_typed_errors(output: object, error: type[Exception]) -> None:
    response = Response(ok=False, output=output, latency_ms=1.0)
    with pytest.raises(error) as info:
        response.raise_for_error("x.y")
    assert type(info.value) is error
    assert isinstance(info.value, sdk.SomaError)
    Response(ok=True, output={}, latency_ms=1.0).raise_for_error("x.y")  # no error when ok


def test_a_client_of_a_socket_that_does_not_exist_fails_at_once(tmp_path: Path) -> None:
    """A mistyped path is named at once instead of waiting out the 30 s deadline."""
    import asyncio

    missing = tmp_path / "nowhere.sock"
    with (
        sdk.Client(f"unix://{missing}") as client,
        pytest.raises(sdk.Unavailable, match=str(missing)),
    ):
        client.call("system.echo", {})

    async def call_async() -> None:
        async with sdk.AsyncClient(f"unix://{missing}") as client:
            await client.call("system.echo", {})

    with pytest.raises(sdk.Unavailable, match=str(missing)):
        asyncio.run(call_async())


def test_a_supervised_client_waits_for_its_socket_rather_than_failing_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under `soma supervise` the socket existed before the runtime started: missing, it is
    being replaced (a sidecar restart, a channel server revived after a crash), so even a
    first call waits for it, up to its deadline."""
    import asyncio

    monkeypatch.setenv(protocol.ADDRESS_ENV, f"unix://{tmp_path / 'rt.sock'}")
    for name in (protocol.TOKEN_FD_ENV, protocol.TOKEN_FILE_ENV, protocol.AUTH_SOCKET_ENV):
        monkeypatch.delenv(name, raising=False)  # no handshake: the call itself waits
    with sdk.Client.from_env(timeout=0.3) as client, pytest.raises(sdk.DeadlineExceeded):
        client.call("system.echo", {})

    async def call_async() -> None:
        async with sdk.AsyncClient.from_env(timeout=0.3) as client:
            await client.call("system.echo", {})

    with pytest.raises(sdk.DeadlineExceeded):
        asyncio.run(call_async())


def stream_core(idempotent: dict[str, bool] | None) -> ClientCore:
    core = ClientCore("unix:///nowhere.sock", "t" * 64, None, "/nowhere.auth.sock", 30.0)
    core.session = "s1"
    if idempotent is not None:
        core.learn_cards(
            [{"functions": [{"name": k, "idempotent": v} for k, v in idempotent.items()]}]
        )
    return core


def test_a_refusal_is_about_the_session_the_attempt_carried() -> None:
    """A call sent with session s1 is refused UNAUTHENTICATED by a restarted sidecar after
    another call has already dropped s1 (replacing the broken stream): the refusal still
    gets this call one new session. It used to look at the client's session (None by then)
    and raise `Unauthenticated` at once."""
    core = stream_core(None)
    call = Call("a.read", None)
    assert core.attempt(call) == protocol.bearer_metadata("s1")
    core.replace_stream("s1", accepted=True)  # another call's doing
    assert core.session is None
    assert core.after_failure(call, grpc.StatusCode.UNAUTHENTICATED) is Retry.NEW_SESSION
    assert core.needs_session(call)
    core.session = "s2"
    assert not core.needs_session(call)
    core.attempt(call)
    # Refused again, with the new session: final.
    assert core.after_failure(call, grpc.StatusCode.UNAUTHENTICATED) is Retry.RAISE


def test_the_bound_on_acceptance_grows_while_streams_go_unaccepted() -> None:
    """A sidecar merely slow under load gets longer each time; one accepted stream resets it."""
    core = stream_core(None)
    assert core.accept_timeout == ACCEPT_TIMEOUT_S
    core.replace_stream("s1", accepted=False)
    assert core.accept_timeout == 2 * ACCEPT_TIMEOUT_S
    for _ in range(10):
        core.replace_stream(None, accepted=False)
    assert core.accept_timeout == MAX_ACCEPT_TIMEOUT_S
    core.replace_stream(None, accepted=True)
    assert core.accept_timeout == ACCEPT_TIMEOUT_S


def test_a_broken_stream_resends_only_what_is_safe() -> None:
    """The decisions behind reconnecting, without any I/O: a call cut off on a stream that
    was serving is sent again only when its function is idempotent; a stream refused as it
    opened ran nothing, so its calls get one new session; the next stream always opens with
    a fresh session."""
    unavailable, unauthenticated = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED
    core = stream_core({"a.read": True, "a.write": False})
    read, write = Call("a.read", None), Call("a.write", None)
    assert core.after_stream_end(read, unavailable, "s1", accepted=True) is Retry.RESEND
    assert core.after_stream_end(write, unavailable, "s1", accepted=True) is Retry.RAISE
    # The next stream opens with a fresh session, at once after one that was serving...
    assert core.replace_stream("s1", accepted=True) == 0.0
    assert core.session is None and core.needs_session(read)
    # ...and after a pause after one that was refused: no busy loop.
    assert core.replace_stream("s0", accepted=False) > 0
    # A stopping sidecar answers new calls UNAVAILABLE: that stream takes no more.
    assert core.retires_stream(unavailable) and not core.retires_stream(grpc.StatusCode.NOT_FOUND)
    # A call answered UNAUTHENTICATED: the session was revoked and the stream is ending.
    assert core.retires_stream(unauthenticated)
    # Refused at open (never accepted, so no frame was sent): nothing ran, and even a
    # non-idempotent call goes again: at once after UNAVAILABLE, with one new session after
    # UNAUTHENTICATED.
    assert core.after_stream_end(write, unavailable, "s1", accepted=False) is Retry.RESEND
    core.session = "s2"
    assert core.after_stream_end(write, unauthenticated, "s2", accepted=False) is Retry.NEW_SESSION
    assert core.needs_session(write)
    core.session = "s3"
    assert core.after_stream_end(write, unauthenticated, "s3", accepted=False) is Retry.RAISE
    # Revoked once accepted (answered or not): reported as a cut-off, decided like one.
    code, details = ClientCore.stream_end_status(unauthenticated, "revoked", accepted=True)
    assert code == unavailable and "revoked" in details
    assert ClientCore.stream_end_status(unauthenticated, "x", accepted=False)[0] == unauthenticated
    # Cards not known yet: ask them first.
    assert stream_core(None).after_stream_end(read, unavailable, "s1", True) is Retry.ASK_CARDS


def test_the_transport_is_checked_and_metadata_built_once_per_session() -> None:
    with pytest.raises(ValueError, match="transport"):
        ClientCore("unix:///x.sock", None, None, None, 1.0, transport="carrier-pigeon")
    core = stream_core(None)
    assert core.metadata() is core.metadata() == (("authorization", "Bearer s1"),)
    core.session = None
    assert core.metadata() == ()
