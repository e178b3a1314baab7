"""SDK pieces, most without a sidecar: environment, companion paths, errors, idempotency,
waiting for a sidecar that is not there yet."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import pytest

import sdk
from sdk import _auth, _wire, protocol
from sdk._core import ACCEPT_TIMEOUT_S, MAX_ACCEPT_TIMEOUT_S, Call, ClientCore, Retry
from sdk.types import Response
from sidecar.access import AllowList, token_digest
from sidecar.channels import socket_paths
from tests.helpers import channel_registry, wait_async


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


async def test_a_handshake_with_no_sidecar_ends_at_the_deadline(tmp_path: Path) -> None:
    """It keeps trying to the deadline, not a moment less, and then says the deadline passed
    (as a call waiting for its socket does), sync and asyncio alike."""
    absent = str(tmp_path / "absent.auth.sock")
    for handshake in (
        lambda deadline: asyncio.to_thread(_auth.handshake, absent, "t", deadline),
        lambda deadline: _auth.handshake_async(absent, "t", deadline),
    ):
        started = time.monotonic()
        deadline = started + 0.3
        with pytest.raises(sdk.SomaError) as info:
            await handshake(deadline)
        assert type(info.value) is sdk.DeadlineExceeded
        assert absent in str(info.value)
        ended = time.monotonic()
        assert ended >= deadline
        assert ended - started < 10  # generous: a loaded machine is slow, not wrong


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


async def test_a_supervised_client_waits_for_its_socket_rather_than_failing_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under `soma supervise` the sockets existed before the runtime started: missing, they are
    being replaced (a sidecar restart), so even a first call waits for them, and is answered
    once the channel is back. The channel opens only once both clients are seen waiting."""
    directory = tmp_path / "rt"
    directory.mkdir(mode=0o700)
    grpc_path, auth_path = socket_paths(directory, "alpha")
    token = secrets.token_hex(32)
    token_file = tmp_path / "alpha.token"
    token_file.write_text(token)
    monkeypatch.setenv(protocol.ADDRESS_ENV, f"unix://{grpc_path}")
    monkeypatch.setenv(protocol.TOKEN_FILE_ENV, str(token_file))
    monkeypatch.setenv(protocol.AUTH_SOCKET_ENV, str(auth_path))
    monkeypatch.delenv(protocol.TOKEN_FD_ENV, raising=False)
    with sdk.Client.from_env(timeout=30) as client:
        async with sdk.AsyncClient.from_env(timeout=30) as async_client:
            sync_call = asyncio.create_task(
                asyncio.to_thread(client.call, "system.echo", {"from": "sync"})
            )
            async_call = asyncio.create_task(async_client.call("system.echo", {"from": "aio"}))
            await wait_async(
                lambda: (
                    thread_runs(_auth.handshake) and task_awaits(async_call, _auth.handshake_async)
                ),
                what="both clients to wait in their handshake",
            )
            assert not grpc_path.exists()
            async with channel_registry(tmp_path) as registry:
                channel = await registry.open("alpha", grpc_path, auth_path, AllowList(["*"]))
                channel.identify(token_digest(token), None, False, None)
                assert await sync_call == {"from": "sync"}
                assert await async_call == {"from": "aio"}


def thread_runs(function: Callable[..., object]) -> bool:
    """Whether some thread of this process is inside `function` right now."""
    code = function.__code__
    for frame in sys._current_frames().values():
        walked: FrameType | None = frame
        while walked is not None:
            if walked.f_code is code:
                return True
            walked = walked.f_back
    return False


def task_awaits(task: asyncio.Task[object], function: Callable[..., object]) -> bool:
    """Whether `task` is suspended inside the coroutine function `function`."""
    code = function.__code__
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None)
        if frame is not None and frame.f_code is code:
            return True
        awaited = getattr(awaited, "cr_await", None)
    return False


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
