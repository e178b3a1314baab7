"""What an upstream answers, made fit to hand on to runtimes and MCP clients.

Scrubbed: an upstream may echo the credential it was given (a hostile one will), so every
string it sends back (tool definitions, content blocks, structured content, error messages,
resource contents, dictionary keys) has every form of that credential masked (see
sidecar.scrub), and the base64 payloads of images, audio and resource blobs are decoded,
masked and encoded again: inside a longer payload a value's own base64 is no form of it. A
form that masking strings cannot reach (the value as a JSON number, or spread over several
strings) fails the call (`UnscrubbableResponse`) rather than go out.

Shaped: a tool that declared an output schema answers its structured content (which the
client checked against that schema); one that declared none answers its content blocks and,
when it sent some all the same, its structured content (`cards.UNDECLARED_OUTPUT`).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import Any

from mcp.types import CallToolResult, Tool

from sidecar.scrub import Scrubber
from soma_runtime.contract import Response

# The fields that hold base64: `data` of image and audio blocks, `blob` of resource contents.
_PAYLOAD_TYPES = frozenset({"image", "audio"})


class Scrub:
    """Masks the values of the credentials an upstream was given, in what it answers."""

    __slots__ = ("_scrubbers",)

    def __init__(self, scrubbers: Iterable[Scrubber]) -> None:
        self._scrubbers = tuple(scrubbers)

    def _bytes(self, data: bytes) -> bytes:
        for scrubber in self._scrubbers:
            data = scrubber.scrub(data)
        return data

    def text(self, text: str) -> str:
        if not self._scrubbers:
            return text
        data = text.encode()
        masked = self._bytes(data)
        # The mask replaces whole forms, so it never splits a UTF-8 sequence.
        return text if masked is data else masked.decode()

    def payload(self, text: str) -> str:
        """A base64 payload with the values masked in the bytes it stands for."""
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return self.text(text)
        masked = self._bytes(raw)
        return self.text(text) if masked == raw else base64.b64encode(masked).decode()

    def value(self, value: Any) -> Any:
        """A JSON value with every string (keys too) and payload masked."""
        if not self._scrubbers:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.value(item) for item in value]
        if isinstance(value, dict):
            payloads = {"blob"} | ({"data"} if value.get("type") in _PAYLOAD_TYPES else set())
            return {
                self.text(key): (
                    self.payload(item)
                    if key in payloads and isinstance(item, str)
                    else self.value(item)
                )
                for key, item in value.items()
            }
        return value

    def tool(self, tool: Tool) -> Tool:
        if not self._scrubbers:
            return tool
        return Tool.model_validate(self.value(tool.model_dump(mode="json", by_alias=True)))

    def finds(self, data: bytes) -> bool:
        """Whether some form of a value is still in `data`."""
        return self._bytes(data) != data


def response(result: CallToolResult, declared: bool, latency_ms: float, op: str) -> Response:
    """The organ's response to a call that the upstream answered with `result`."""
    content = [
        block.model_dump(mode="json", by_alias=True, exclude_none=True) for block in result.content
    ]
    if result.is_error:
        text = " ".join(b.get("text", "") for b in content if b.get("type") == "text")
        return Response.failure("UpstreamError", latency_ms, op=op, message=text, content=content)
    if declared:
        return Response(ok=True, output=result.structured_content, latency_ms=latency_ms)
    output: dict[str, Any] = {"content": content}
    if result.structured_content is not None:
        output["structuredContent"] = result.structured_content
    return Response(ok=True, output=output, latency_ms=latency_ms)
