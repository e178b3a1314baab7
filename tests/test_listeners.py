"""Soma's TCP listeners get TCP_NODELAY on every connection they accept: an HTTP/1.1 answer
written in two parts is never held back waiting for the client's delayed ACK (~40 ms)."""

from __future__ import annotations

import asyncio
import socket

from soma_runtime.listeners import tcp_listener


async def nodelay_of_accepted(listener: socket.socket) -> int:
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_connect, sock=listener)
    async with server:
        port = listener.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        value = await asyncio.wait_for(accepted, 10)
        writer.close()
    return value


async def test_accepted_connections_have_tcp_nodelay() -> None:
    assert await nodelay_of_accepted(tcp_listener("127.0.0.1", 0)) == 1


async def test_a_plain_socket_would_not() -> None:
    """What the helper exists for: asyncio skips sockets whose proto is 0."""
    plain = socket.socket()
    plain.bind(("127.0.0.1", 0))
    plain.listen()
    assert await nodelay_of_accepted(plain) == 0
