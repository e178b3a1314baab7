"""TCP listening sockets for the HTTP servers Soma runs (the gateway, MCP bridges, examples).

They are made with `IPPROTO_TCP`, not the default 0: asyncio sets TCP_NODELAY only on sockets
whose protocol says TCP, and accepted sockets inherit the listener's. Without it, an HTTP/1.1
server writing an answer's head and body separately waits on the client's delayed ACK, about
40 ms a request on a kept-alive connection (measured on an MCP bridge: 44 ms → 1.5 ms).
"""

from __future__ import annotations

import ipaddress
import socket

# What the clients of one HTTP port may hold (see sidecar.http_server): connections open at
# once, bytes of a request's line and headers, seconds for a request's head to arrive. The
# gateway's ports hold these; a bridge's are its defaults (`[[bridge]]`).
HTTP_MAX_CONNECTIONS = 64
HTTP_MAX_HEADER_BYTES = 64 * 1024
HTTP_REQUEST_TIMEOUT_S = 10.0


def tcp_listener(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A listening socket on a literal IP address (`port` 0 picks a free one); OSError when it
    cannot be bound."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
