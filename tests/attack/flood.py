"""An attacker flooding an HTTP port, as a separate process (so that its threads never share
a GIL with the client whose latency the test measures):

    python -m tests.attack.flood HOST PORT SECONDS [KEY]

For SECONDS it runs, each in its own threads and reconnecting whenever the server closes:
- `endless_headers`: a request line, then one header line that never ends, as fast as the
  server takes it;
- `slowloris`: a request's head, one byte every half second;
- `slow_body`: a complete head (with `KEY`, when given, so the body is what is awaited), then
  the body one byte every half second;
- `many_connections`: as many idle connections as it can hold, reopened as they are closed.

It prints `flooding` once every kind has a connection open and, at the end, one JSON line:
per kind, the connections opened, the ones the server closed, and the longest a slow
connection was held (seconds).
"""

from __future__ import annotations

import json
import select
import socket
import sys
import threading
import time
from collections import Counter
from typing import Any

HEAD = b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json, text/event-stream\r\n"
CHUNK = b"a" * 65536
HELD_AT_ONCE = 300

opened: Counter[str] = Counter()
closed: Counter[str] = Counter()
held_s: dict[str, float] = {}
lock = threading.Lock()


def note(kind: str, counter: Counter[str]) -> None:
    with lock:
        counter[kind] += 1


def held(kind: str, seconds: float) -> None:
    with lock:
        held_s[kind] = max(held_s.get(kind, 0.0), seconds)


def connect(address: tuple[str, int], kind: str) -> socket.socket | None:
    try:
        sock = socket.create_connection(address, timeout=2.0)
    except OSError:
        time.sleep(0.05)  # the backlog is full: an attacker retries
        return None
    note(kind, opened)
    return sock


def trickle(address: tuple[str, int], until: float, kind: str, head: bytes, body: bytes) -> None:
    """Send `head` at once, then `body` a byte every half second, until the server closes."""
    while time.monotonic() < until:
        sock = connect(address, kind)
        if sock is None:
            continue
        started = time.monotonic()
        stopped = False  # by the server: it answered or closed, either way it stopped waiting
        try:
            sock.sendall(head)
            for byte in body:
                if time.monotonic() >= until:
                    break
                if select.select([sock], [], [], 0.5)[0]:
                    stopped = True
                    break
                sock.sendall(bytes([byte]))
        except OSError:
            stopped = True
        finally:
            held(kind, time.monotonic() - started)
            if stopped:
                note(kind, closed)
            sock.close()


def endless_headers(address: tuple[str, int], until: float) -> None:
    while time.monotonic() < until:
        sock = connect(address, "endless_headers")
        if sock is None:
            continue
        try:
            sock.sendall(HEAD + b"X-Flood: ")
            while time.monotonic() < until:
                sock.sendall(CHUNK)
        except OSError:
            note("endless_headers", closed)
        finally:
            sock.close()


def many_connections(address: tuple[str, int], until: float) -> None:
    socks: list[socket.socket] = []
    while time.monotonic() < until:
        while len(socks) < HELD_AT_ONCE and time.monotonic() < until:
            sock = connect(address, "many_connections")
            if sock is None:
                break
            socks.append(sock)
        readable = select.select(socks, [], [], 0.1)[0] if socks else []
        for sock in readable:
            try:
                data = sock.recv(1)
            except OSError:
                data = b""
            if not data:
                note("many_connections", closed)
                socks.remove(sock)
                sock.close()
    for sock in socks:
        sock.close()


def main(argv: list[str]) -> None:
    host, port, seconds = argv[0], int(argv[1]), float(argv[2])
    key = argv[3] if len(argv) > 3 else None
    address = (host, port)
    until = time.monotonic() + seconds
    auth = f"x-api-key: {key}\r\n".encode() if key else b""
    body_head = HEAD + auth + b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    threads: list[threading.Thread] = []

    def start(target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=(address, until, *args), daemon=True)
        threads.append(thread)
        thread.start()

    for _ in range(2):
        start(endless_headers)
    for _ in range(4):
        start(trickle, "slowloris", HEAD, b"X-Slow: " + b"b" * 10_000)
        start(trickle, "slow_body", body_head, b"{" * 100_000)
    start(many_connections)
    while len(opened) < 4 and time.monotonic() < until:  # every kind has a connection
        time.sleep(0.01)
    print("flooding", flush=True)
    for thread in threads:
        thread.join(seconds + 10.0)
    kinds = sorted(set(opened) | set(closed))
    print(
        json.dumps(
            {
                kind: {
                    "opened": opened[kind],
                    "closed": closed[kind],
                    "held_s": round(held_s.get(kind, 0.0), 2),
                }
                for kind in kinds
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
