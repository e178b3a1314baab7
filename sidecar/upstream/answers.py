"""What an upstream answers, made fit to hand on to runtimes and MCP clients.

Scrubbed: an upstream may echo the credential it was given (a hostile one will), so every
string it sends back (tool definitions, content blocks, structured content, error messages,
resource contents, dictionary keys) has every form of that credential masked (see
sidecar.scrub), and the base64 payloads of images, audio and resource blobs are decoded,
masked and encoded again. A form that masking strings cannot reach (the value as a JSON
number, or spread over several strings) fails the call (`UnscrubbableResponse`) rather than
go out.

Shaped: a tool that declared an output schema answers its structured content (which the
organ checked against the approved schema); one that declared none answers its content blocks and,
when it sent some all the same, its structured content (`cards.UNDECLARED_OUTPUT`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable
from typing import Any

from mcp.types import CallToolResult, Tool

from sidecar.scrub import Scrubber
from sidecar.wire import encode_output
from soma_runtime.contract import Response
from soma_runtime.redaction import forms_pattern, secret_forms

# The content blocks whose field holds base64: `data` of images and audio.
_PAYLOAD_TYPES = frozenset({"image", "audio"})


class Unmaskable(Exception):
    """A form of a value is where masking strings cannot reach."""


class Scrub:
    """Masks the values of the credentials an upstream was given, in what it answers.

    A string holding a form holds, in JSON text, the form's JSON-escaped spelling; so the
    forms of each value's JSON-escaped spellings are looked for too. Then a JSON text in which
    none is found has no string holding one, and most answers are checked in one pass over
    their JSON (a few milliseconds a megabyte) rather than string by string.
    """

    __slots__ = ("_pattern", "_scrubber")

    def __init__(self, values: Iterable[str]) -> None:
        spellings = {
            spelling
            for value in values
            for spelling in (value, json.dumps(value)[1:-1], encode_output(value)[1:-1].decode())
        }
        forms = {form for spelling in spellings for form in secret_forms(spelling) if form}
        # Bytes (JSON text, payloads) through the scrubber; strings through the same forms
        # as one pattern, ten times faster on a short string than encoding it first.
        self._scrubber = Scrubber(spellings) if forms else None
        self._pattern = re.compile(forms_pattern(forms)) if forms else None

    def _finds(self, data: bytes) -> bool:
        return self._scrubber is not None and self._scrubber.scrub(data) != data

    def _text(self, text: str) -> str:
        assert self._pattern is not None
        return self._pattern.sub(lambda match: "*" * len(match[0]), text)

    def _value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._text(value)
        if isinstance(value, list):
            return [self._value(item) for item in value]
        if isinstance(value, dict):
            return {self._text(key): self._value(item) for key, item in value.items()}
        return value

    def answer(self, value: Any) -> tuple[Any, bytes]:
        """`value` (JSON) with every form masked in its strings (keys too), and its JSON text;
        `Unmaskable` when a form is left (a number, or spread over strings), `ValueError` when
        it is not JSON."""
        data = encode_output(value)
        if not self._finds(data):
            return value, data
        value = self._value(value)
        data = encode_output(value)
        if self._finds(data):
            raise Unmaskable
        return value, data

    def payload(self, text: str) -> str:
        """A base64 payload with the values masked in the bytes it stands for (inside a longer
        payload a value's base64 is no form of it)."""
        if self._scrubber is None:
            return text
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return text  # not base64: masked as a string
        masked = self._scrubber.scrub(raw)
        return text if masked is raw else base64.b64encode(masked).decode()

    def block(self, block: dict[str, Any]) -> dict[str, Any]:
        """A content block with its base64 payload (image, audio, resource blob) masked."""
        resource = block.get("resource")
        if block.get("type") in _PAYLOAD_TYPES and isinstance(block.get("data"), str):
            return {**block, "data": self.payload(block["data"])}
        if isinstance(resource, dict) and isinstance(resource.get("blob"), str):
            return {**block, "resource": {**resource, "blob": self.payload(resource["blob"])}}
        return block

    def tool(self, tool: Tool) -> Tool:
        """A tool definition with every form masked; `Unmaskable` as `answer`."""
        dumped = tool.model_dump(mode="json", by_alias=True)
        masked, _ = self.answer(dumped)
        return tool if masked is dumped else Tool.model_validate(masked)


def response(
    result: CallToolResult, declared: bool, scrub: Scrub, latency_ms: float, op: str
) -> Response:
    """The organ's response to a call that the upstream answered with `result` (its content
    blocks' payloads masked; the rest is masked with the whole answer)."""
    content = [
        scrub.block(block.model_dump(mode="json", by_alias=True, exclude_none=True))
        for block in result.content
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
