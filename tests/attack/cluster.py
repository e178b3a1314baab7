"""A real `soma supervise` whose runtimes are relays (`tests.attack.agent relay`): the suites
act through a runtime's own authenticated channel by asking its relay."""

from __future__ import annotations

import base64
import os
import uuid
from pathlib import Path
from typing import Any

from soma_runtime import jsonline
from tests.helpers import SupervisorRun, wait_until

ORGANS = ("system", "vault", "tests.fixtures.organs:Acme")


class Relay:
    """The test's end of one relay runtime."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def request(self, message: dict[str, Any], timeout: float = 15.0) -> dict[str, Any]:
        answer = jsonline.request_sync(self.path, message, timeout)
        assert answer.get("ok"), answer
        return answer

    def pid(self) -> int | None:
        """The relay's pid, None while it does not answer."""
        try:
            return int(self.request({"op": "ping"}, timeout=2.0)["pid"])
        except OSError:
            return None

    def call(self, fn: str, payload: Any, timeout: float = 5.0) -> dict[str, Any]:
        """The SDK's answer: `{"response": {"ok", "output"}}`, `{"transport": CODE}` or
        `{"client": ERROR}` (the SDK refused to send it)."""
        answer = self.request({"op": "call", "fn": fn, "input": payload, "timeout": timeout})
        result: dict[str, Any] = answer["result"]
        return result

    def raw(self, path: str, payload: bytes, timeout: float = 5.0) -> tuple[str, bytes | None]:
        """A gRPC call to `path` whose request message is exactly `payload`."""
        answer = self.request(
            {
                "op": "raw",
                "path": path,
                "payload": base64.b64encode(payload).decode(),
                "timeout": timeout,
            },
            timeout=timeout + 10,
        )
        reply = answer["reply"]
        return answer["code"], None if reply is None else base64.b64decode(reply)

    def stream(
        self, frames: list[bytes], half_close: bool, timeout: float = 10.0
    ) -> tuple[str, list[bytes]]:
        """A `Stream` RPC on this runtime's channel whose frames are exactly `frames` (see
        `RawCaller.stream` in tests.attack.agent): its status name and its answers."""
        answer = self.request(
            {
                "op": "stream",
                "frames": [base64.b64encode(frame).decode() for frame in frames],
                "half_close": half_close,
                "timeout": timeout,
            },
            timeout=timeout + 10,
        )
        return answer["code"], [base64.b64decode(a) for a in answer["answers"]]

    def send(self, path: str, data: bytes, wait_for_socket: bool = False) -> bool:
        """Write `data` to the socket at `path` from inside this runtime's process tree; True
        when the server closed the connection. `wait_for_socket`: see `send_and_read`."""
        return self.exchange(path, data, wait_for_socket=wait_for_socket)[1]

    def exchange(
        self, path: str, data: bytes, timeout: float = 5.0, wait_for_socket: bool = False
    ) -> tuple[bytes, bool]:
        """`send`, with what the server answered before it closed or went quiet."""
        # In a file: the relay's own requests are lines of at most jsonline.MAX_LINE bytes.
        payload = self.path.with_name(f"payload-{uuid.uuid4().hex}")
        payload.write_bytes(data)
        try:
            answer = self.request(
                {
                    "op": "send",
                    "path": path,
                    "file": str(payload),
                    "timeout": timeout,
                    "wait_for_socket": wait_for_socket,
                },
                timeout=timeout + 10,
            )
        finally:
            payload.unlink(missing_ok=True)
        return base64.b64decode(answer.get("answer", "")), bool(answer["closed"])

    def handshake_refusal(self, token: str | None = None) -> str | None:
        """Why the runtime's handshake socket refuses `token` (default: the runtime's own)
        when presented from inside the runtime's own process tree (None: it gave a session)."""
        refused = self.request({"op": "handshake", "token": token})["refused"]
        return None if refused is None else str(refused)

    def session(self) -> str:
        """The session the runtime's raw calls carry, handed over as a leak would."""
        return str(self.request({"op": "session"})["session"])

    def spawn(self) -> int:
        return int(self.request({"op": "spawn"})["pid"])

    def serves(self, timeout: float = 5.0) -> bool:
        """Whether a real SDK call through this runtime's channel gets the right answer."""
        nonce = uuid.uuid4().hex
        result = self.call("system.echo", {"nonce": nonce}, timeout)
        return result.get("response") == {"ok": True, "output": {"nonce": nonce}}


class Cluster:
    """Supervisor, sidecar and one relay runtime per entry of `runtimes` (name → allow-list)."""

    def __init__(
        self,
        tmp: Path,
        runtimes: dict[str, list[str]],
        organs: tuple[str, ...] = ORGANS,
        extra: str = "",
    ) -> None:
        self.relay_dir = tmp / "relay"
        self.relay_dir.mkdir(mode=0o700, exist_ok=True)
        body = extra
        for name, allow in runtimes.items():
            listed = ", ".join(f'"{pattern}"' for pattern in allow)
            body += f"""
[[runtime]]
name = "{name}"
command = ["python", "-m", "tests.attack.agent", "relay", "{self.relay_dir / name}.sock"]
allow = [{listed}]
backoff_initial = 0.05
backoff_max = 0.2
max_restarts = 1000
"""
        self.names = list(runtimes)
        self.run = SupervisorRun(tmp, body, organs=organs)

    def start(self) -> Cluster:
        self.run.wait_ready()
        for name in self.names:
            wait_until(lambda n=name: self.relay(n).pid(), 20, f"relay {name} to answer")
        return self

    def relay(self, name: str) -> Relay:
        return Relay(self.relay_dir / f"{name}.sock")

    def grpc_socket(self, name: str) -> str:
        return os.fspath(self.run.run_dir / "rt" / f"{name}.sock")

    def auth_socket(self, name: str) -> Path:
        return self.run.run_dir / "rt" / f"{name}.auth.sock"

    def stop(self) -> None:
        assert self.run.stop() == 0, self.run.proc.output()
