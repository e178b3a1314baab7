"""What every SDK client decides, without any I/O: where it connects, which session a call
carries, and whether a failed call is sent again. `sdk.Client` and `sdk.AsyncClient` are short
loops around this core that do the I/O it asks for (the model is httpx's `BaseClient`).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from enum import Enum
from typing import Any

import grpc

from sdk import _auth, _wire, protocol
from sdk.errors import SomaError, Unavailable

DEFAULT_TIMEOUT = 30.0
TRANSPORTS = ("stream", "unary")
REOPEN_PAUSE = 0.02  # before replacing a stream that was refused (see `replace_stream`)
# How long a new stream may wait for the sidecar's acceptance before it is given up and
# replaced, which is always safe: no frame is sent before acceptance. A sidecar accepts in
# well under a millisecond; a stream that reached a channel server just as its grpcio main
# loop crashed is held by that dying server, never accepted nor ended, until the caller's
# deadline (30 s by default). Doubled for each stream in a row given up on, so a sidecar
# that is merely slow under load is waited for longer.
ACCEPT_TIMEOUT_S = 1.0
MAX_ACCEPT_TIMEOUT_S = 16.0


def arguments_from_env() -> tuple[str, dict[str, str | None]]:
    """The target, and the token and handshake socket, that `soma supervise` gives a runtime,
    as arguments for `Client` and `AsyncClient`."""
    target = os.environ.get(protocol.ADDRESS_ENV)
    if not target:
        raise SomaError(
            f"{protocol.ADDRESS_ENV} is not set; is this process running under `soma supervise`?"
        )
    auth = {
        "token": _auth.token_from_env(),
        "auth_socket": os.environ.get(protocol.AUTH_SOCKET_ENV),
    }
    return target, auth


class Retry(Enum):
    """What to do after a call failed."""

    NEW_SESSION = "new_session"  # refused before anything ran: make a session, send again
    RESEND = "resend"  # safe to send again: nothing ran, or running twice is harmless
    ASK_CARDS = "ask_cards"  # the function's card decides: fetch the cards, then ask again
    RAISE = "raise"


@dataclass(slots=True)
class Call:
    """One call across its attempts. `op` None marks a call that is always safe to repeat."""

    op: str | None
    deadline: float | None
    stale: str | None = None  # a session this call saw refused
    # The session its last attempt carried: a refusal is about that one, whatever the
    # client's session is by the time the refusal comes (another call may have replaced it).
    sent_with: str | None = None

    def remaining(self) -> float | None:
        return _wire.remaining(self.deadline)


class ClientCore:
    """A client's state and decisions.

    Without an explicit token, a token file beside the socket (`<name>.token`, which only the
    sidecar's user can read) is used when there is one: that is how `soma sidecar` run on its
    own hands out access.
    """

    def __init__(
        self,
        target: str,
        token: str | None,
        token_file: str | None,
        auth_socket: str | None,
        timeout: float | None,
        transport: str = "stream",
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
        self.target = target
        self.timeout = timeout
        self.streaming = transport == "stream"
        self.path = protocol.socket_path(target)
        if token is None and token_file is not None:
            token = _auth.read_token_file(token_file)
        if token is None and self.path is not None:
            beside = protocol.token_file_for(self.path)
            if os.path.exists(beside):
                token = _auth.read_token_file(beside)
        self.token = token
        self.auth_socket = auth_socket or (
            protocol.auth_socket_for(self.path) if self.path else None
        )
        # The session and the metadata every call carries with it, built once per session
        # rather than per call, and replaced together (read without the client's lock).
        self._credentials: tuple[str | None, tuple[tuple[str, str], ...]] = (None, ())
        self._idempotent: dict[str, bool] | None = None
        self._socket_known = False  # see `start`
        self._ids = itertools.count(1)  # call ids on streams; next() is atomic in CPython
        self.accept_timeout = ACCEPT_TIMEOUT_S  # for the next stream opened

    @property
    def session(self) -> str | None:
        return self._credentials[0]

    @session.setter
    def session(self, session: str | None) -> None:
        self._credentials = (session, protocol.bearer_metadata(session) if session else ())

    def start(self, op: str | None, timeout: float | None) -> Call:
        """A new call. Until the socket is known to exist (a call reached the sidecar once, or
        `socket_promised`), a socket that does not exist is an error at once (a mistyped path
        should not wait the whole deadline); afterwards it means the sidecar is restarting or
        replacing the channel's server, and the call waits for it."""
        if not self._socket_known and self.path is not None and not os.path.exists(self.path):
            raise Unavailable("UNAVAILABLE", f"no sidecar socket at {self.path}")
        return Call(op, _wire.deadline_after(timeout if timeout is not None else self.timeout))

    def needs_session(self, call: Call) -> bool:
        """Whether a handshake must come before the next attempt."""
        if self.token is None or self.auth_socket is None:
            return False
        return self.session is None or self.session == call.stale

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self._credentials[1]

    def attempt(self, call: Call) -> tuple[tuple[str, str], ...]:
        """The metadata of `call`'s next unary attempt, noting the session it carries."""
        call.sent_with, metadata = self._credentials
        return metadata

    def next_id(self) -> int:
        return next(self._ids)

    def succeeded(self) -> None:
        self._socket_known = True

    def socket_promised(self) -> None:
        """The supervisor made the socket before it started this process (`from_env`): the
        first call already waits for a sidecar that is restarting."""
        self._socket_known = True

    def after_failure(self, call: Call, code: grpc.StatusCode) -> Retry:
        """After a unary call failed with `code`, or a call on a stream was answered with a
        `CallError` of that code (the same meaning)."""
        if code == grpc.StatusCode.UNAUTHENTICATED and call.sent_with and call.stale is None:
            # A restarted sidecar forgot the session; it refused before any organ ran. A
            # second refusal in the same call is final.
            call.stale = call.sent_with
            return Retry.NEW_SESSION
        # UNAVAILABLE: the sidecar could not be reached or went away. CANCELLED (never the
        # client's own cancellation, which raises differently): a sidecar stopping or
        # replacing a channel's server cut the call off. Either way it may not have run.
        if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            return Retry.RAISE
        if call.op is None:
            return Retry.RESEND
        if self._idempotent is None:
            return Retry.ASK_CARDS
        # Cut off mid-call: it may have run, so only an idempotent function runs again.
        return Retry.RESEND if self._idempotent.get(call.op, False) else Retry.RAISE

    def after_stream_end(
        self, call: Call, code: grpc.StatusCode, session: str | None, accepted: bool
    ) -> Retry:
        """After the stream `call` was put on ended with `code` (as `stream_end_status`
        reports it) before answering it. `session` is the one the stream opened with;
        `accepted`: whether the sidecar had accepted the stream. Unaccepted, the stream sent
        no frame (see sdk._stream): nothing ran, and any call may be sent again."""
        if accepted:  # calls in flight may have run
            return self.after_failure(call, code)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            if session is None or call.stale is not None:
                return Retry.RAISE  # a second refusal is final
            call.stale = session
            return Retry.NEW_SESSION
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            return Retry.RESEND  # a stopping or unreachable sidecar
        return Retry.RAISE

    def replace_stream(self, session: str | None, accepted: bool) -> float:
        """Before opening a stream in place of one that opened with `session` (ended, or
        retired by a stopping sidecar); returns how long to pause first.

        The new stream opens with a fresh session: most often a sidecar restart ended the
        old one, and the new sidecar would refuse the old session only after the stream
        opened. The pause follows a stream that was refused (a stopping sidecar refuses new
        streams at once), so that reconnecting is no busy loop."""
        if session is not None and self.session == session:
            self.session = None
        self.accept_timeout = (
            ACCEPT_TIMEOUT_S if accepted else min(2 * self.accept_timeout, MAX_ACCEPT_TIMEOUT_S)
        )
        return 0.0 if accepted else REOPEN_PAUSE

    @staticmethod
    def retires_stream(code: grpc.StatusCode) -> bool:
        """Whether a call's answer means its stream takes no more calls. UNAVAILABLE: the
        sidecar is stopping; it answers the stream's calls in flight, then ends it.
        UNAUTHENTICATED: the stream's session was revoked; the stream is ending (a call sent
        again on it would be cut off by that end, not refused)."""
        return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)

    @staticmethod
    def stream_end_status(
        code: grpc.StatusCode, details: str, accepted: bool
    ) -> tuple[grpc.StatusCode, str]:
        """The status a call still on a stream that ended with `code` failed with. A session
        revoked after the stream was accepted cut its calls off, and they may have run, as
        in a restart: UNAVAILABLE."""
        if code == grpc.StatusCode.UNAUTHENTICATED and accepted:
            return grpc.StatusCode.UNAVAILABLE, f"cut off: {details}"
        return code, details

    def learn_cards(self, cards: list[dict[str, Any]]) -> None:
        self._idempotent = _wire.idempotency(cards)
