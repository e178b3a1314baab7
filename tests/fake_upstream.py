"""A real HTTP server on loopback standing in for an upstream API (an LLM provider, a REST
service). It records every request it gets, so tests can see which key reached it."""

from __future__ import annotations

import http.server
import json
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    header_list: list[tuple[str, str]]


class FakeUpstream:
    """`/v1/echo` answers with the auth it saw; `/v1/redirect?to=URL` redirects (with
    `keep_query`, carrying the request's query string along);
    `/v1/chat/completions` answers like a model API, as server-sent events when asked to
    stream (0.3 s between events)."""

    EVENT_GAP_S = 0.3

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.aborted_streams = 0  # streams whose reader went away before the end
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _record(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                pairs = [(k.lower(), v) for k, v in self.headers.items()]
                upstream.requests.append(Seen(self.command, self.path, dict(pairs), body, pairs))
                return body

            def _json(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._record()
                self._route()

            def do_POST(self) -> None:
                body = self._record()
                if self.path.endswith("/chat/completions"):
                    request = json.loads(body or b"{}")
                    if request.get("stream"):
                        self._stream()
                    else:
                        self._json(
                            200,
                            {
                                "id": "cmpl-1",
                                "choices": [{"message": {"role": "assistant", "content": "hello"}}],
                            },
                        )
                    return
                self._route()

            def _route(self) -> None:
                parts = urlsplit(self.path)
                if parts.path.endswith("/echo"):
                    self._json(
                        200,
                        {
                            "authorization": self.headers.get("Authorization"),
                            "x-api-key": self.headers.get("X-Api-Key"),
                            "query": parse_qs(parts.query),
                        },
                    )
                elif parts.path.endswith("/redirect"):
                    params = parse_qs(parts.query)
                    location = params["to"][0]
                    if "keep_query" in params:  # like nginx's `return 301 ...$request_uri`
                        location += "?" + parts.query
                    self.send_response(302)
                    self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif parts.path.endswith("/big"):
                    data = b"x" * (2 * 1024 * 1024)
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                else:
                    self._json(404, {"error": "no such path"})

            def _stream(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                try:
                    for n in range(3):
                        self.wfile.write(f'data: {{"n": {n}}}\n\n'.encode())
                        self.wfile.flush()
                        time.sleep(upstream.EVENT_GAP_S)  # a model producing tokens
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    upstream.aborted_streams += 1

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def other_host_url(self) -> str:
        """The same server under another host name: a different host for host binding."""
        return f"http://localhost:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
