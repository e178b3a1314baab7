"""The runtime the attack suites supervise: `python -m tests.attack.agent MODE ARG`.

Only a runtime's own processes can get a session on its channel (the handshake checks the
caller's pid), so the suites cannot call through a runtime's channel themselves. This agent
does it for them, in one of three modes:

- `relay SOCKET`: answers JSON lines on SOCKET (see `Relay`): a call through the SDK, a raw
  gRPC call with bytes chosen by the test, or a helper process to spawn;
- `writer REPORT`: writes numbered vault keys and non-idempotent `acme.record` ids as fast as
  it can, one JSON line per answer in REPORT, so a test can check what was acknowledged;
- `mixed REPORT`: the soak's traffic (echo, vault writes read back, bad inputs, unknown and
  denied ops), one JSON line of counts and latencies per second in REPORT.

It stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc

import sdk
from sdk import _auth, protocol
from sdk._core import arguments_from_env
from soma_runtime import jsonline
from soma_runtime.supervisor.control import same_user
from soma_runtime.unix import Peer
from tests.attack.sockets import send_and_read

stopping = threading.Event()
STREAM = "/soma.v1.Sidecar/Stream"


class Report:
    """A JSON-lines file that several threads append to."""

    def __init__(self, path: Path) -> None:
        self._out = path.open("a")
        self._lock = threading.Lock()

    def __call__(self, **fields: Any) -> None:
        line = json.dumps(fields) + "\n"
        with self._lock:
            self._out.write(line)
            self._out.flush()


class RawCaller:
    """gRPC calls whose request bytes are exactly what the test chose (no serializer), with
    this runtime's session, renewed once when a restarted sidecar no longer knows it."""

    def __init__(self) -> None:
        target, auth = arguments_from_env()
        self._token, self._auth_socket = auth["token"], auth["auth_socket"]
        self._channel = grpc.insecure_channel(target, options=protocol.CHANNEL_OPTIONS)
        self._session: str | None = None

    def refusal(self, message: jsonline.Message) -> str | None:
        """Why a handshake with the token in `message` is refused; None when it is not."""
        assert self._auth_socket is not None and self._token is not None
        token = self._token if message.get("token") is None else str(message["token"])
        try:
            _auth.handshake(self._auth_socket, token, time.monotonic() + 5)
        except sdk.SomaError as exc:
            return str(exc)
        return None

    def session(self) -> str:
        """This runtime's session (made now if it has none yet)."""
        assert self._token is not None and self._auth_socket is not None
        if self._session is None:
            self._session = _auth.handshake(self._auth_socket, self._token, time.monotonic() + 5)
        return self._session

    def call(self, path: str, payload: bytes, timeout: float) -> tuple[str, bytes | None]:
        assert self._token is not None and self._auth_socket is not None
        rpc: Any = self._channel.unary_unary(path)  # no serializers: bytes in, bytes out
        deadline = time.monotonic() + timeout
        for attempt in range(2):
            if self._session is None:
                self._session = _auth.handshake(self._auth_socket, self._token, deadline)
            try:
                reply = rpc(
                    payload,
                    timeout=max(0.01, deadline - time.monotonic()),
                    metadata=protocol.bearer_metadata(self._session),
                    wait_for_ready=True,
                )
            except grpc.RpcError as exc:
                code: grpc.StatusCode = exc.code()
                if code == grpc.StatusCode.UNAUTHENTICATED and attempt == 0:
                    self._session = None
                    continue
                return code.name, None
            return "OK", reply
        raise AssertionError("unreachable")

    def stream(
        self, frames: list[bytes], half_close: bool, timeout: float
    ) -> tuple[str, list[bytes]]:
        """A `Stream` RPC whose frames are exactly `frames`, then half-closed (the answers
        read until it ends) or cancelled once they are sent (a client that goes away with
        calls in flight). The status name and the answers' bytes."""
        assert self._token is not None and self._auth_socket is not None
        rpc: Any = self._channel.stream_stream(STREAM)  # no serializers: bytes in, bytes out
        deadline = time.monotonic() + timeout
        sent, cancelled = threading.Event(), threading.Event()

        def outgoing() -> Iterator[bytes]:
            yield from frames
            sent.set()
            if not half_close:
                cancelled.wait()  # no half-close: the RPC is cancelled instead

        if self._session is None:
            self._session = _auth.handshake(self._auth_socket, self._token, deadline)
        call = rpc(
            outgoing(),
            timeout=max(0.01, deadline - time.monotonic()),
            metadata=protocol.bearer_metadata(self._session),
            wait_for_ready=True,
        )
        answers: list[bytes] = []
        if not half_close:
            if not call.add_callback(sent.set):  # the sidecar ended it early (a bad frame)
                sent.set()
            sent.wait(timeout)
            call.cancel()
            cancelled.set()
            return "CANCELLED", answers
        try:
            answers.extend(call)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            if code == grpc.StatusCode.UNAUTHENTICATED:
                self._session = None  # a restarted sidecar: the next stream gets a new one
            return code.name, answers
        return "OK", answers


def sdk_outcome(call: Callable[[], sdk.Response]) -> dict[str, Any]:
    """An SDK call's answer as JSON: the organ's response, or the typed error it raised."""
    try:
        response = call()
    except sdk.TransportError as exc:
        return {"transport": exc.code, "details": exc.details}
    except sdk.SomaError as exc:
        return {"client": type(exc).__name__, "details": str(exc)}
    return {"response": {"ok": response.ok, "output": response.output}}


class Relay:
    """Requests, one JSON object a line:

    - `{"op": "ping"}` → `{"ok": true, "pid": ...}`
    - `{"op": "call", "fn": OP, "input": ..., "timeout": s}` → `sdk_outcome` under `"result"`
    - `{"op": "raw", "path": "/soma.v1.Sidecar/Stimulate", "payload": b64, "timeout": s}` →
      `{"ok": true, "code": "OK" | status name, "reply": b64 | null}`
    - `{"op": "stream", "frames": [b64], "half_close": bool, "timeout": s}` → `{"ok": true,
      "code": status name, "answers": [b64]}` (see `RawCaller.stream`)
    - `{"op": "spawn"}` → a helper process (`sleep`) started, `{"ok": true, "pid": ...}`
    - `{"op": "send", "path": SOCKET, "file": PATH, "wait_for_socket": bool}` → the bytes of
      PATH written to a socket from inside this runtime's process tree (see `send_and_read`),
      `{"ok": true, "closed": bool, "answer": b64}`
    - `{"op": "session"}` → `{"ok": true, "session": S}`: the runtime's own session for raw
      calls, handed over (a leak)
    - `{"op": "handshake", "token": T}` → a handshake with token T (null: the runtime's own)
      on this runtime's handshake socket, from inside its tree: `{"ok": true, "refused":
      null | message}`
    """

    def __init__(self) -> None:
        self.client = sdk.Client.from_env(timeout=30)
        self.raw = RawCaller()
        self.helpers: list[subprocess.Popen[bytes]] = []

    async def handle(self, message: jsonline.Message, peer: Peer) -> jsonline.Message:
        op = message.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "call":
            fn, payload, timeout = message["fn"], message.get("input"), message.get("timeout", 10)
            result = await asyncio.to_thread(
                sdk_outcome, lambda: self.client.stimulate(fn, payload, timeout=timeout)
            )
            return {"ok": True, "result": result}
        if op == "raw":
            code, reply = await asyncio.to_thread(
                self.raw.call,
                message["path"],
                base64.b64decode(message["payload"]),
                message.get("timeout", 10),
            )
            encoded = None if reply is None else base64.b64encode(reply).decode()
            return {"ok": True, "code": code, "reply": encoded}
        if op == "stream":
            code, answers = await asyncio.to_thread(
                self.raw.stream,
                [base64.b64decode(frame) for frame in message["frames"]],
                bool(message.get("half_close", True)),
                message.get("timeout", 10),
            )
            encoded = [base64.b64encode(answer).decode() for answer in answers]
            return {"ok": True, "code": code, "answers": encoded}
        if op == "send":
            data = Path(message["file"]).read_bytes()
            try:
                answer, closed = await asyncio.to_thread(
                    partial(
                        send_and_read,
                        message["path"],
                        data,
                        message.get("timeout", 5.0),
                        wait_for_socket=bool(message.get("wait_for_socket")),
                    )
                )
            except OSError as exc:  # the server does not accept: the test's check will say
                return {"ok": True, "closed": True, "error": type(exc).__name__}
            return {"ok": True, "closed": closed, "answer": base64.b64encode(answer).decode()}
        if op == "handshake":
            return {"ok": True, "refused": await asyncio.to_thread(self.raw.refusal, message)}
        if op == "session":
            return {"ok": True, "session": await asyncio.to_thread(self.raw.session)}
        if op == "spawn":
            helper = await asyncio.to_thread(subprocess.Popen, ["sleep", "300"])
            self.helpers.append(helper)
            return {"ok": True, "pid": helper.pid}
        return {"ok": False, "error": "bad_request", "message": f"unknown op {op!r}"}


async def relay(socket_path: Path) -> None:
    server = await jsonline.serve(socket_path, Relay().handle, same_user)
    async with server:
        await asyncio.to_thread(stopping.wait)


def writer(client: sdk.Client, report: Report) -> None:
    """Acknowledged writes to check after faults: vault keys w-<n> holding "<runtime>:<n>",
    and ids that the non-idempotent `acme.record` appends to a file."""
    runtime = os.environ["SOMA_RUNTIME"]

    def stores() -> None:
        n = 0
        while not stopping.is_set():
            n += 1
            data = base64.b64encode(f"{runtime}:{n}".encode()).decode()
            try:
                client.call("vault.store", {"key": f"w-{n}", "data": data})
                report(op="store", n=n, ok=True)
            except sdk.SomaError as exc:
                if stopping.is_set():  # cut off by our own client's close: not the sidecar's
                    return
                report(op="store", n=n, ok=False, error=type(exc).__name__)

    def records() -> None:
        while not stopping.is_set():
            record = uuid.uuid4().hex
            try:
                client.call("acme.record", {"id": record, "ms": 5})
                report(op="record", id=record, ok=True)
            except sdk.SomaError as exc:
                if stopping.is_set():
                    return
                report(op="record", id=record, ok=False, error=type(exc).__name__)

    for loop in (stores, records):
        threading.Thread(target=loop, daemon=True).start()


class Mix:
    """The soak's traffic for one thread: every call's outcome is counted by `op:outcome`,
    and a write it made is read back and compared (a mismatch counts as `lost_write`)."""

    KEYS = 32  # per thread: the vault holds a bounded set of keys, however long the soak

    def __init__(self, client: sdk.Client, thread: int, stats: Stats) -> None:
        self.client = client
        self.thread = thread
        self.stats = stats
        self.acked: dict[str, str] = {}
        self.rng = random.Random()

    def step(self) -> None:
        choice = self.rng.random()
        if choice < 0.4:
            self.run("system.echo", {"n": self.rng.random(), "pad": "x" * 64})
        elif choice < 0.65:
            key = f"k{self.thread}-{self.rng.randrange(self.KEYS)}"
            data = base64.b64encode(os.urandom(48)).decode()
            if self.run("vault.store", {"key": key, "data": data}) == "ok":
                self.acked[key] = data
        elif choice < 0.85 and self.acked:
            key = self.rng.choice(list(self.acked))
            expected = self.acked[key]
            self.run("vault.retrieve", {"key": key}, check=lambda o: o["data"] == expected)
        elif choice < 0.9:
            self.run("vault.store", {"key": "../escape", "data": "not base64"})  # InvalidInput
        elif choice < 0.95:
            self.run("system.nope", {})  # UnsupportedOperation
        else:
            self.run("acme.fail", {})  # not on the allow-list: PermissionDenied

    def run(self, op: str, payload: Any, check: Callable[[Any], bool] | None = None) -> str:
        started = time.perf_counter()
        try:
            output = self.client.call(op, payload)
            outcome = "ok" if check is None or check(output) else "lost_write"
        except sdk.OrganError as exc:
            outcome = exc.kind
        except sdk.TransportError as exc:
            # The base class stands for a status the SDK has no name for: keep the status.
            name = type(exc).__name__
            outcome = f"{name}({exc.code})" if type(exc) is sdk.TransportError else name
        except sdk.SomaError as exc:
            outcome = type(exc).__name__
        self.stats.add(f"{op}:{outcome}", (time.perf_counter() - started) * 1000)
        return outcome


class Stats:
    """Counts and latencies since the last flush (at most `SAMPLES` latencies kept)."""

    SAMPLES = 2000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._latencies: list[float] = []
        self._seen = 0
        self._rng = random.Random()

    def add(self, key: str, latency_ms: float) -> None:
        with self._lock:
            self._counts[key] += 1
            self._seen += 1
            if len(self._latencies) < self.SAMPLES:
                self._latencies.append(latency_ms)
            else:
                slot = self._rng.randrange(self._seen)
                if slot < self.SAMPLES:
                    self._latencies[slot] = latency_ms

    def flush(self) -> tuple[dict[str, int], list[float]]:
        with self._lock:
            counts, latencies = dict(self._counts), self._latencies
            self._counts, self._latencies, self._seen = Counter(), [], 0
        return counts, latencies


def mixed(client: sdk.Client, report: Report, threads: int = 3) -> None:
    stats = Stats()

    def loop(thread: int) -> None:
        mix = Mix(client, thread, stats)
        while not stopping.is_set():
            mix.step()

    def flusher() -> None:
        while not stopping.wait(1.0):  # a report period, not a synchronisation
            counts, latencies = stats.flush()
            report(t=time.time(), counts=counts, latency_ms=[round(x, 3) for x in latencies])

    for thread in range(threads):
        threading.Thread(target=loop, args=(thread,), daemon=True).start()
    threading.Thread(target=flusher, daemon=True).start()


def main() -> None:
    mode, arg = sys.argv[1], Path(sys.argv[2])
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    if mode == "relay":
        asyncio.run(relay(arg))
        return
    report = Report(arg)
    with sdk.Client.from_env(timeout=10) as client:
        {"writer": writer, "mixed": mixed}[mode](client, report)
        report(ready=True, pid=os.getpid())
        stopping.wait()
    report(stopped=True, pid=os.getpid())


if __name__ == "__main__":
    main()
