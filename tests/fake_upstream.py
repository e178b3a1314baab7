"""A real HTTP server on loopback standing in for an upstream API (an LLM provider, a REST
service). It records every request it gets, so tests can see which key reached it."""

from __future__ import annotations

import base64
import gzip
import http.server
import json
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, quote_plus, urlsplit


def encodings(value: str) -> list[str]:
    """The forms an echoing upstream hands a value back in: as is, URL-encoded, base64 and
    JSON-escaped (written here independently of the code under test)."""
    raw = value.encode()
    forms = [value, quote(value, safe=""), quote(value), quote_plus(value), json.dumps(value)[1:-1]]
    for encoded in (base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()):
        forms += [encoded, encoded.rstrip("=")]
    return list(dict.fromkeys(forms))


# What `/v1/models` answers: a model API's list of models.
MODELS = {"object": "list", "data": [{"id": "example", "object": "model", "created": 0}]}


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    header_list: list[tuple[str, str]]


class FakeUpstream:
    """`/v1/echo` answers with the auth it saw; `/v1/models` lists `MODELS`;
    `/v1/redirect?to=URL` redirects (with
    `keep_query`, carrying the request's query string along);
    `/v1/chat/completions` answers like a model API, as server-sent events when asked to
    stream (0.3 s between events).

    Like a hostile upstream, `/v1/mirror` echoes the credentials it got (the query's values,
    the bearer token, X-Api-Key) in every encoding, in its body (with `?status=N`, under that
    status; with `?encoding=gzip`, compressed, whatever the client accepts; `?encoding=br`
    only claims to be), in an `X-Echo` header and, with `?location=1`, in a Location holding
    the whole request path; `/v1/mirror-sse` streams them as server-sent events, each value
    split in two writes (`SPLIT_GAP_S` apart) so that it crosses a chunk boundary."""

    EVENT_GAP_S = 0.3
    SPLIT_GAP_S = 0.05

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
                elif parts.path.endswith("/models"):
                    self._json(200, MODELS)
                elif parts.path.endswith("/mirror"):
                    self._mirror(parts.query)
                elif parts.path.endswith("/mirror-sse"):
                    self._mirror_sse(parts.query)
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

            def _echoed(self, query: str) -> list[str]:
                values = [v for vs in parse_qs(query).values() for v in vs]
                scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
                if scheme.lower() == "bearer":
                    values.append(token)
                values += self.headers.get_all("X-Api-Key") or []
                return [form for value in values for form in encodings(value)]

            def _mirror(self, query: str) -> None:
                params = parse_qs(query)
                echoed = self._echoed(query)
                data = json.dumps({"path": self.path, "echo": echoed}, ensure_ascii=False)
                body = (data + "\n" + "\n".join(echoed)).encode()
                self.send_response(int(params.get("status", ["200"])[0]))
                self.send_header("Content-Type", "application/json")
                if "encoding" in params:  # whatever the client accepts
                    coding = params["encoding"][0]
                    body = gzip.compress(body) if coding == "gzip" else body
                    self.send_header("Content-Encoding", coding)
                self.send_header("Content-Length", str(len(body)))
                for form in echoed:
                    self.send_header("X-Echo", form)
                if "location" in params:
                    self.send_header("Location", self.path)
                self.end_headers()
                self.wfile.write(body)

            def _mirror_sse(self, query: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for form in self._echoed(query):
                    half = len(form) // 2
                    self.wfile.write(f"data: {form[:half]}".encode())
                    self.wfile.flush()
                    time.sleep(upstream.SPLIT_GAP_S)  # the rest comes in another chunk
                    self.wfile.write(f"{form[half:]}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

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
