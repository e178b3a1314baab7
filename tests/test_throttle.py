"""Failed attempts and the warnings they cause are bounded per peer; success never is."""

from __future__ import annotations

import json
import socket
from typing import Any

from sdk import protocol
from soma_runtime.throttle import MAX_KEYS, RepeatedWarnings, TokenBuckets
from tests.helpers import Process, session_metadata, wait_until
from tests.test_channel_resilience import echo_ok, socket_of


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))


def test_buckets_refill_at_their_rate_and_keys_are_independent() -> None:
    clock = Clock()
    buckets = TokenBuckets(burst=2, rate=0.5, clock=clock)
    assert [buckets.take("a") for _ in range(2)] == [0.0, 0.0]
    assert buckets.take("a") == 2.0  # one token every 2 s, taken in advance
    assert buckets.take("a") == 4.0  # a peer that keeps failing waits longer
    assert buckets.take("a") == 4.0  # up to burst / rate
    assert buckets.take("b") == 0.0
    clock.now = 8.0
    assert buckets.take("a") == 0.0


def test_buckets_forget_the_least_recently_seen_key_first() -> None:
    buckets = TokenBuckets(burst=1, rate=0.001, clock=Clock())
    for key in range(MAX_KEYS + 1):
        buckets.take(key)
    assert buckets.take(0) == 0.0  # forgotten, so full again
    assert buckets.take(MAX_KEYS) > 0.0


def test_a_flood_of_warnings_costs_a_few_lines_and_a_count() -> None:
    clock, out = Clock(), Recorder()
    warnings = RepeatedWarnings(out, burst=3, every_s=10.0, clock=clock)
    for n in range(1000):
        warnings.warning("refused", "peer", n=n)
    assert len(out.lines) == 3
    clock.now = 40.0
    warnings.warning("refused", "peer", n=1000)
    assert out.lines[-1] == ("refused", {"n": 1000, "repeated": 997})
    for n in range(5):  # the two tokens left, then three held back
        warnings.warning("refused", "peer", n=n)
    warnings.flush()
    assert len(out.lines) == 6  # the next line is not due yet
    clock.now = 50.0
    warnings.flush()
    assert out.lines[-1] == ("refused", {"n": 4, "repeated": 2})
    clock.now = 100.0
    warnings.flush()
    assert len(out.lines) == 7  # nothing held back any more


def handshake(auth: str, token: str) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(auth)
        sock.sendall(json.dumps({"token": token}).encode() + b"\n")
        answer: dict[str, Any] = json.loads(sock.makefile("rb").readline())
    return answer


def test_wrong_tokens_are_logged_in_aggregate_and_never_slow_the_right_one(
    sidecar: tuple[Process, str],
) -> None:
    proc, target = sidecar
    auth = protocol.auth_socket_for(socket_of(target))
    for _ in range(8):
        assert handshake(auth, "0" * 64)["error"] == "unauthenticated"
        # The right token is answered with a session at once, whatever failed before it.
        assert echo_ok(target, session_metadata(target))
    refused = lambda: [  # noqa: E731
        json.loads(line) for line in proc.output().splitlines() if '"handshake_refused"' in line
    ]
    assert len(refused()) == 5  # the burst; the rest are counted ...
    wait_until(  # ... and the count is logged when the next line is due (10 s)
        lambda: len(refused()) + sum(r.get("repeated", 0) for r in refused()) == 8,
        timeout=20,
        what="every refusal logged or counted",
    )
    assert len(refused()) == 6
