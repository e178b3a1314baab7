"""A stand-in for a model provider's API (OpenAI-style `/v1/chat/completions`), so the gateway
example runs on a machine without network access. It prints a fingerprint of the key it
received, never the key, so you can check it got the real one and not the placeholder:

    printf 'sk-example-key' | sha256sum | cut -c1-12
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


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

    async def events():  # type: ignore[no-untyped-def]
        for word in answer.split():
            chunk = {"choices": [{"index": 0, "delta": {"content": word + " "}}]}
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
