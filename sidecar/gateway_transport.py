"""The gateway's upstream connections on plain asyncio streams, for httpcore2's pool.

httpcore2 reaches the network through a backend; its default goes through anyio (a task
group per connect, cancel scopes around every read), which cost the gateway about 0.3 ms of
CPU per new upstream connection on this machine, as much as aiohttp's whole client. This
backend does the same with `asyncio.open_connection` and `asyncio.timeout` (figures:
benchmarks/gateway_http.py), keeping httpcore2's HTTP/1.1 handling, which relays header bytes
exactly as they came.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore2


class _Stream(httpcore2.AsyncNetworkStream):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError:
            raise httpcore2.ReadTimeout("the upstream sent nothing in time") from None
        except OSError as exc:
            raise httpcore2.ReadError(str(exc)) from None

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            self._writer.write(buffer)
            async with asyncio.timeout(timeout):
                await self._writer.drain()
        except TimeoutError:
            raise httpcore2.WriteTimeout("the upstream took nothing in time") from None
        except OSError as exc:
            raise httpcore2.WriteError(str(exc)) from None

    async def aclose(self) -> None:
        self._writer.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError:
            self._writer.close()
            raise httpcore2.ConnectTimeout("the TLS handshake did not finish in time") from None
        except (OSError, ssl.SSLError) as exc:
            self._writer.close()
            raise httpcore2.ConnectError(str(exc)) from None
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # asked of an idle pooled connection: closed by the peer?
            return self._reader.at_eof() or self._writer.is_closing()
        name = {"client_addr": "sockname", "server_addr": "peername"}.get(info, info)
        return self._writer.get_extra_info(name)


class AsyncioBackend(httpcore2.AsyncNetworkBackend):
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        local = None if local_address is None else (local_address, 0)
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port, local_addr=local)
        except TimeoutError:
            raise httpcore2.ConnectTimeout(f"no connection to {host} in time") from None
        except OSError as exc:
            raise httpcore2.ConnectError(str(exc)) from None
        # A request's head and body go in separate writes: without this, Nagle holds the
        # body back until the upstream acknowledges the head (milliseconds, delayed ACK).
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Stream(reader, writer)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore2.AsyncNetworkStream:
        raise httpcore2.UnsupportedProtocol("the gateway's upstreams are TCP origins")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
