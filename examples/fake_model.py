"""A stand-in for a model provider's API (OpenAI-style `/v1/chat/completions`), so the gateway
example runs on a machine without network access. It prints where it listens, and a
fingerprint of the key it received, never the key, so you can check it got the real one and
not the placeholder:

    printf 'sk-example-key-0123456789' | sha256sum | cut -c1-12

It listens on a free loopback port (`--port 0`, the default) or on a listening socket it
inherits (`--fd`, as examples.gateway_demo starts it): never on a fixed port another process
might hold.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import time
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from soma_runtime.listeners import tcp_listener


async def completions(request: Request) -> Response:
    key = request.headers.get("authorization", "").removeprefix("Bearer ")
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:12]
    print(f"model-api: request with a key whose sha256 starts {fingerprint}", flush=True)
    body = await request.json()
    prompt = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
    answer = f"You said {len(prompt.split())} words."
    if not body.get("stream"):
        return JSONResponse(
            {
                "id": f"cmpl-{int(time.time())}",
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}],
            }
        )

    async def events() -> AsyncIterator[str]:
        for word in answer.split():
            chunk = {"choices": [{"index": 0, "delta": {"content": word + " "}}]}
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.fake_model")
    parser.add_argument("--port", type=int, default=0, help="loopback port (0: a free one)")
    parser.add_argument("--fd", type=int, help="serve on this inherited listening socket")
    args = parser.parse_args()
    if args.fd is not None:
        sock = socket.socket(fileno=args.fd)
    else:
        sock = tcp_listener("127.0.0.1", args.port)
    host, port = sock.getsockname()
    print(f"model-api: listening on http://{host}:{port}", flush=True)
    app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    main()
