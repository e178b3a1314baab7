"""uvicorn inside the sidecar's event loop, bounded for clients that may be hostile: the
outbound gateway's ports and the MCP bridges' share that loop with every runtime's channel,
so nothing a client sends before it is authenticated may cost the loop more than a bounded
amount of time, memory or descriptors.

uvicorn's httptools protocol bounds none of it: the request line and headers grow without
limit (httptools joins each header's pieces into one bytes object, so an endless header costs
time quadratic in its length: 13 MiB took 2 s of the loop), a connection that sends nothing
is kept forever, and a head sent a byte at a time holds its connection as long as the client
likes. `BoundedHttpTools` adds, per port:
- a cap on connections: beyond it, the oldest connection not being answered (waiting for a
  request, or idle between two) is closed, so a client that fills the port with idle
  connections is pushed out by the next one that connects; when every connection is being
  answered, the newcomer is closed (`to_close`, the metrics endpoint's policy too);
- a bound on the bytes of a request's head, checked before httptools sees them (431);
- a deadline for each head: `request_timeout` seconds from the connection, or from the end of
  the previous answer, whatever arrives meanwhile (408; a silent connection is just closed).
A refused connection is read no further and cut a timeout later.

(h11, uvicorn's other protocol, bounds the head's size itself but none of the rest, and cost
about 180 µs more CPU per request than httptools with these bounds: 240 µs against 60 µs,
protocol and a trivial app, measured when choosing.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import TypeVar

import structlog
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from soma_runtime.throttle import RepeatedWarnings

C = TypeVar("C")


def to_close(
    connections: Collection[C], cap: int, idle: Callable[[C], bool], arrived: Callable[[C], float]
) -> C | None:
    """The connection a port closes when `connections`, the newcomer among them, are more
    than `cap` (None within it): the oldest one not being answered (`idle`; the newcomer is),
    so that idle connections, however many a client opens, never keep the next one out."""
    if len(connections) <= cap:
        return None
    return min((c for c in connections if idle(c)), key=arrived, default=None)


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What the clients of one port may hold. `name` is who serves (`gateway`, `bridge`):
    the component of its log events, and the prefix of their names."""

    name: str
    max_connections: int
    max_header_bytes: int
    request_timeout: float


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside the sidecar's loop: the sidecar, not uvicorn, owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class BoundedHttpTools(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools) within `limits` (see the module's docstring).
    Made per set of limits by `bounded_http`: uvicorn builds protocols from a class."""

    limits: HttpLimits
    warnings: RepeatedWarnings

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._awaiting_head = True  # the request's head has not all arrived
        self._head_bytes = 0
        self._refused = False
        self._connected_at = self.loop.time()
        # One timer at a time, moved lazily: arming and disarming at every request costs
        # an attribute, not a timer.
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._arm_deadline()
        closing = to_close(self.connections, self.limits.max_connections, _idle, _arrived)
        if isinstance(closing, BoundedHttpTools):  # the port's connections are all of this class
            self._warn("connections_capped")
            closing._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed httptools no more of a head than `max_header_bytes`."""
        while data and not self._refused and not self.transport.is_closing():
            if not self._awaiting_head:
                super().data_received(data)
                return
            room = self.limits.max_header_bytes - self._head_bytes
            if room <= 0:
                self._refuse(431, "the request line and headers are too large")
                return
            piece, data = (data, b"") if len(data) <= room else (data[:room], data[room:])
            self._head_bytes += len(piece)
            super().data_received(piece)  # may complete the head: the rest is a body

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._head_bytes = 0
        self._deadline = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # The next bytes are the next request's head; its deadline starts once this one is
        # answered (the client waits for the answer first).
        self._awaiting_head = True

    def on_response_complete(self) -> None:
        answered_next = bool(self.pipeline)  # a pipelined request, whose head has arrived
        super().on_response_complete()
        if not answered_next:
            # Also bounds what is left of a request answered before its body was read.
            self._arm_deadline()

    def _idle(self) -> bool:
        """Not being answered (nor closed already): closing it loses no request."""
        return not self.transport.is_closing() and (
            not self.pipeline and (self.cycle is None or self.cycle.response_complete)
        )

    def _arm_deadline(self) -> None:
        self._deadline = self.loop.time() + self.limits.request_timeout
        if self._timer is None:
            self._timer = self.loop.call_at(self._deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self._timer = None
        if self._deadline is None:
            return  # disarmed meanwhile
        if self.loop.time() < self._deadline:  # moved meanwhile
            self._timer = self.loop.call_at(self._deadline, self._check_deadline)
            return
        self._deadline = None
        if self._refused or self.transport.is_closing():
            # Refused or closed a timeout ago: time to cut it, whatever the peer still sends
            # or has not read.
            self.transport.abort()
        elif self._awaiting_head and self._head_bytes > 0:
            self._refuse(408, "the request's head did not arrive in time")
        else:
            self._close()  # an idle connection, or the rest of a request already answered

    def _refuse(self, status: int, message: str) -> None:
        self._warn("headers_too_large" if status == 431 else "request_timeout")
        body = message.encode()
        self.transport.write(
            STATUS_LINE[status]
            + b"content-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            + b"content-length: %d\r\n\r\n" % len(body)
            + body
        )
        # The answer, then a FIN, so a client that reads sees it even while it still sends;
        # what it sends is no longer read (it costs nothing), and the connection is cut a
        # timeout later. Closing now would reset it, and the answer could be lost.
        self._refused = True
        self.transport.pause_reading()
        self.transport.write_eof()
        self._arm_deadline()

    def _close(self) -> None:
        """Close once what was written is sent, or a timeout later regardless."""
        self.transport.close()
        self._arm_deadline()

    def _warn(self, what: str) -> None:
        port = self.server[1] if self.server else None
        self.warnings.warning(f"{self.limits.name}_{what}", port, port=port)


def _idle(connection: object) -> bool:
    return isinstance(connection, BoundedHttpTools) and connection._idle()


def _arrived(connection: object) -> float:
    assert isinstance(connection, BoundedHttpTools)  # only idle ones are compared
    return connection._connected_at


def bounded_http(limits: HttpLimits) -> type[BoundedHttpTools]:
    """The protocol class for uvicorn's `http=` that serves within `limits`."""
    warnings = RepeatedWarnings(structlog.get_logger(component=limits.name))
    return type("BoundedHttpTools", (BoundedHttpTools,), {"limits": limits, "warnings": warnings})
