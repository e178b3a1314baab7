"""The gateway's upstream connections (sidecar.gateway_transport) under httpcore2's pool:
plain HTTP, TLS with the certificate checked, and every failure as httpcore2's own error."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpcore2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidecar.gateway_transport import AsyncioBackend

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def serve(answer: bytes | None, tls: ssl.SSLContext | None = None) -> asyncio.Server:
    """A server that reads a request's head and sends `answer` (None: never answers)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if answer is None:
            await reader.read()  # holds the connection until the client goes
        else:
            writer.write(answer)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[httpcore2.AsyncConnectionPool]:
    cert, _ = self_signed(tmp_path)
    trusting = ssl.create_default_context(cafile=str(cert))
    async with httpcore2.AsyncConnectionPool(
        ssl_context=trusting, network_backend=AsyncioBackend()
    ) as pool:
        yield pool


def port_of(server: asyncio.Server) -> int:
    port: int = server.sockets[0].getsockname()[1]
    return port


async def get(pool: httpcore2.AsyncConnectionPool, url: str, read_s: float = 10.0) -> bytes:
    host = url.split("/")[2].encode()
    timeout = {"connect": 5.0, "read": read_s, "write": 5.0, "pool": 5.0}
    response = await pool.request(
        "GET", url, headers=[(b"host", host)], extensions={"timeout": timeout}
    )
    assert response.status == 200
    return response.content


async def test_plain_and_tls_upstreams(pool: httpcore2.AsyncConnectionPool, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    cert, key = self_signed(tmp_path / "other")  # not the certificate the pool trusts
    plain = await serve(ANSWER)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")  # the trusted one
    secure = await serve(ANSWER, tls)
    untrusted_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    untrusted_tls.load_cert_chain(cert, key)
    untrusted = await serve(ANSWER, untrusted_tls)
    try:
        assert await get(pool, f"http://127.0.0.1:{port_of(plain)}/") == b"hello"
        assert await get(pool, f"https://localhost:{port_of(secure)}/") == b"hello"
        with pytest.raises(httpcore2.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await get(pool, f"https://localhost:{port_of(untrusted)}/")
    finally:
        for server in (plain, secure, untrusted):
            server.close()


async def test_failures_are_httpcore2_errors(pool: httpcore2.AsyncConnectionPool) -> None:
    silent = await serve(None)
    closed = await serve(b"")  # closes without answering
    refused = await serve(ANSWER)
    refused_port = port_of(refused)
    refused.close()
    await refused.wait_closed()
    try:
        with pytest.raises(httpcore2.ReadTimeout):
            await get(pool, f"http://127.0.0.1:{port_of(silent)}/", read_s=0.2)
        with pytest.raises(httpcore2.RemoteProtocolError):
            await get(pool, f"http://127.0.0.1:{port_of(closed)}/")
        with pytest.raises(httpcore2.ConnectError):
            await get(pool, f"http://127.0.0.1:{refused_port}/")
    finally:
        silent.close()
        closed.close()
