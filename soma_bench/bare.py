"""The baselines' servers, in one process of their own: what Soma is compared with.

    python -m soma_bench.bare DIR

- `DIR/grpc.sock`: a grpc.aio server on uvloop with the sidecar's `Stimulate` answering
  `input_json` back, and a bidirectional stream (`/soma_bench.Bare/Echo`) echoing raw frames
  (an 8-byte call id and the payload), which a client multiplexes calls over;
- `DIR/raw.sock`: a uvloop Unix-socket echo, the floor: no framing, no gRPC;
- an HTTP/1.1 upstream on loopback answering every POST with a small JSON body (keep-alive),
  for the gateway's case.

When all serve, it writes `DIR/ready.json` with the HTTP port.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import uvloop

from sdk.protocol.soma.v1 import sidecar_pb2 as pb

STREAM_METHOD = "/soma_bench.Bare/Echo"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # the sidecar's default limit
UPSTREAM_REPLY = json.dumps(
    {"id": "bench", "object": "chat.completion", "choices": [{"message": {"content": "hi"}}]}
).encode()


async def stimulate(request: pb.StimulateRequest, context: Any) -> pb.StimulateResponse:
    return pb.StimulateResponse(ok=True, output_json=request.input_json)


async def echo_stream(frames: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for frame in frames:
        yield frame


async def raw_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 20):
        writer.write(data)
    writer.close()


async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Just enough HTTP/1.1 for a keep-alive client: read the head and the body (by
    Content-Length, or chunked as a streaming proxy sends it), answer 200 with a fixed JSON
    body."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    reply = head % len(UPSTREAM_REPLY) + UPSTREAM_REPLY
    try:
        while True:
            fields = {}
            for line in (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                fields[name.strip().lower()] = value.strip().lower()
            if fields.get(b"transfer-encoding") == b"chunked":
                while size := int((await reader.readline()).split(b";")[0], 16):
                    await reader.readexactly(size + 2)
                await reader.readline()  # the empty line after the last chunk
            else:
                await reader.readexactly(int(fields.get(b"content-length", b"0")))
            writer.write(reply)
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    writer.close()


async def main(directory: Path) -> None:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    server = grpc.aio.server(options=options)
    unary: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(
        stimulate,
        request_deserializer=pb.StimulateRequest.FromString,
        response_serializer=pb.StimulateResponse.SerializeToString,
    )
    stream: grpc.RpcMethodHandler[Any, Any] = grpc.stream_stream_rpc_method_handler(
        echo_stream  # raw bytes both ways
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler("soma.v1.Sidecar", {"Stimulate": unary}),
            grpc.method_handlers_generic_handler("soma_bench.Bare", {"Echo": stream}),
        )
    )
    server.add_insecure_port(f"unix:{directory / 'grpc.sock'}")
    await server.start()
    raw = await asyncio.start_unix_server(raw_echo, directory / "raw.sock")
    http = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = http.sockets[0].getsockname()[1]
    ready = directory / "ready.json"
    ready.with_suffix(".tmp").write_text(json.dumps({"http_port": port, "pid": os.getpid()}))
    ready.with_suffix(".tmp").rename(ready)
    async with raw, http:
        await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.run(main(Path(sys.argv[1])))
