"""The `http` organ: one outbound HTTP request, with an injected credential bound to its hosts.

The caller names a credential in the input; the sidecar checks the runtime may use it and
hands it over beside the stimulus. The credential is attached only while the request goes to
one of the credential's origins (scheme, host and port): a redirect anywhere else continues
without it. Redirects are followed by hand for exactly that reason. With a credential, the
caller may not set Host, and the answer (headers, Location, body) is scrubbed of the value in
every encoding before the agent sees it. Responses are bounded (`max_response_bytes`),
requests time out, a request that cannot be sent as described is an InvalidInput naming the
field, and error messages name hosts, never URLs (a query parameter may carry a credential).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NotRequired
from urllib.parse import urljoin

import httpx2
import structlog
from pydantic import ConfigDict, Field, with_config
from typing_extensions import TypedDict  # pydantic needs it for TypedDict on 3.11

from sidecar.credentials import Credential
from sidecar.scrub import scrubbable
from soma_runtime import (
    ErrorKind,
    FunctionCard,
    OrganCard,
    OrganEnvironment,
    OrganFailure,
    ResidencyPolicy,
    RoutedOrgan,
    SloConfig,
    Stimulus,
    schema_of,
    tracing,
)
from soma_runtime import function as organ_function
from soma_runtime.hosts import upstream_host
from soma_runtime.redaction import REDACTED

log = structlog.get_logger(component="http")

VERSION = "0.1.0"
MAX_REDIRECTS = 5
REDIRECTS = frozenset({301, 302, 303, 307, 308})
DEFAULT_MAX_RESPONSE = 1024 * 1024
LIMIT_MAX_RESPONSE = 16 * 1024 * 1024
# What replaces an echoed credential. The organ answers JSON, where no Content-Length has to
# stay true (the gateway, which relays bytes, masks with a same-length run of `*` instead).
MASK = REDACTED.encode()


# A body is text or JSON, never both; inputs refuse fields they do not define.
@with_config(ConfigDict(extra="forbid", json_schema_extra={"not": {"required": ["body", "json"]}}))
class RequestInput(TypedDict):
    method: NotRequired[Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]]
    url: Annotated[str, Field(pattern="^https?://", max_length=8192)]
    headers: NotRequired[
        Annotated[
            dict[str, str],
            Field(
                description="Names are HTTP tokens, values printable ASCII. With a "
                "credential, Host may not be set: the URL's host is sent."
            ),
        ]
    ]
    body: NotRequired[Annotated[str, Field(description="Request body as text.")]]
    json: NotRequired[
        Annotated[Any, Field(description="Request body as JSON (sets Content-Type).")]
    ]
    credential: NotRequired[Annotated[str, Field(description="Name of a credential to inject.")]]
    timeout_s: NotRequired[Annotated[float, Field(gt=0, le=300)]]
    max_response_bytes: NotRequired[Annotated[int, Field(ge=1, le=LIMIT_MAX_RESPONSE)]]
    follow_redirects: NotRequired[bool]


class RequestOutput(TypedDict):
    status: int
    headers: dict[str, str]
    body: NotRequired[Annotated[str, Field(description="The body, when it is UTF-8 text.")]]
    body_base64: NotRequired[Annotated[str, Field(description="The body, otherwise.")]]
    url: Annotated[str, Field(description="The final URL, after redirects.")]
    redirects: int
    credential_dropped: NotRequired[
        Annotated[bool, Field(description="True when a redirect left the credential's hosts.")]
    ]


_REQUEST = FunctionCard(
    name="http.request",
    description=(
        "Make one outbound HTTP request, optionally with a credential the sidecar injects; the "
        "credential is only ever sent to its own hosts (scheme, host and port), and never "
        "handed back if the upstream echoes it. Returns status, headers and body."
    ),
    tags=["network", "http", "write", "credentials"],
    examples=[
        "Call a REST API with the team's API key without ever seeing the key",
        "Fetch a JSON document from a public URL",
        "POST a webhook payload with a bearer token injected by the sidecar",
    ],
    input_schema=schema_of(RequestInput),
    output_schema=schema_of(RequestOutput),
    slo=SloConfig(p95_latency_ms=2000, max_error_rate=0.01, queue_cap=256),
    residency=ResidencyPolicy.GLOBAL,
    idempotent=False,
    side_effects=["network call to the URL's host"],
    credentials=["input:credential"],
)


class HttpOrgan(RoutedOrgan):
    """Outbound HTTP for agents, with credentials they never hold."""

    card = OrganCard(
        name="http",
        version=VERSION,
        description="Outbound HTTP requests with credentials injected by the sidecar and bound to "
        "their hosts.",
        division="network",
        subsystem="http",
        tags=["network", "http", "credentials", "integration"],
        execution_modes=["sidecar"],
        functions=[],
        author="Soma Runtime",
        repository="https://github.com/soma-runtime/soma-runtime",
    )

    def __init__(self) -> None:
        self.max_response_bytes = DEFAULT_MAX_RESPONSE
        self._client: httpx2.AsyncClient | None = None

    def configure(self, settings: Mapping[str, Any], env: OrganEnvironment) -> None:
        """`max_response_bytes`: the default limit on a response body (1 MiB)."""
        unknown = set(settings) - {"max_response_bytes"}
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}")
        limit = settings.get("max_response_bytes", self.max_response_bytes)
        if not isinstance(limit, int) or not 1 <= limit <= LIMIT_MAX_RESPONSE:
            raise ValueError(
                f"max_response_bytes must be an integer from 1 to {LIMIT_MAX_RESPONSE}"
            )
        self.max_response_bytes = limit

    async def start(self) -> None:
        # trust_env=False: no proxies or .netrc credentials picked up behind the config's back.
        self._client = httpx2.AsyncClient(follow_redirects=False, trust_env=False)

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    @organ_function(_REQUEST)
    async def request(self, input: RequestInput, stimulus: Stimulus) -> RequestOutput:
        credential = self._credential(input, stimulus)
        method = input.get("method", "GET")
        url = input["url"]
        if problem := _url_problem(url):
            raise _invalid("$.url", problem)
        headers = _checked_headers(input.get("headers", {}), credential)
        if parent := tracing.incoming(stimulus.context.get(tracing.TRACEPARENT)):
            # The upstream's span is a child of this call's: it replaces any the caller wrote.
            headers = {k: v for k, v in headers.items() if k.lower() != tracing.TRACEPARENT}
            headers[tracing.TRACEPARENT] = parent
        content: bytes | None = None
        if "body" in input:
            try:
                content = input["body"].encode()
            except UnicodeEncodeError:
                raise _invalid("$.body", "must be Unicode text (no lone surrogates)") from None
        elif "json" in input:
            content = json.dumps(input["json"]).encode()
            headers.setdefault("Content-Type", "application/json")
        if credential is not None and not credential.allows(url):
            raise OrganFailure(
                "HostNotAllowed",
                f"credential {credential.name!r} is not sent to {upstream_host(url)!r}",
                credential=credential.name,
            )
        timeout = float(input.get("timeout_s", 30.0))
        limit = int(input.get("max_response_bytes", self.max_response_bytes))
        dropped = False
        for redirects in range(MAX_REDIRECTS + 1):
            send_url, send_headers = url, dict(headers)
            if credential is not None:
                url = send_url = credential.strip(url)  # a redirect may echo a query credential
                if credential.allows(url):
                    send_url, extra = credential.attach(url)
                    replaced = {name.lower() for name in extra}
                    send_headers = {
                        k: v for k, v in send_headers.items() if k.lower() not in replaced
                    }
                    send_headers.update(extra)
                elif not dropped:
                    dropped = True
                    log.warning(
                        "credential_dropped",
                        credential=credential.name,
                        host=upstream_host(url),
                        op=stimulus.op,
                    )
            reply = await self._send(
                method, send_url, url, send_headers, content, timeout, limit, credential is not None
            )
            if credential is not None:
                reply = reply.scrubbed(credential)
            location = reply.header("location")
            if not (input.get("follow_redirects", True) and reply.status in REDIRECTS and location):
                return reply.output(url, redirects, dropped)
            host, url = upstream_host(url), urljoin(url, location)
            if problem := _url_problem(url):
                raise OrganFailure("BadRedirect", f"{host!r} redirected to a URL that {problem}")
            if reply.status == 303 or (reply.status in (301, 302) and method == "POST"):
                method, content = "GET", None
                headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        raise OrganFailure("TooManyRedirects", f"more than {MAX_REDIRECTS} redirects")

    @staticmethod
    def _credential(input: RequestInput, stimulus: Stimulus) -> Credential | None:
        name = input.get("credential")
        if not name:
            return None
        credential = stimulus.credentials.get(name)
        if not isinstance(credential, Credential):
            raise OrganFailure("CredentialUnavailable", f"credential {name!r} was not provided")
        return credential

    async def _send(
        self,
        method: str,
        send_url: str,
        url: str,
        headers: dict[str, str],
        content: bytes | None,
        timeout: float,
        limit: int,
        scrub: bool,
    ) -> _Reply:
        assert self._client is not None, "the organ was not started"
        host = upstream_host(url)
        try:
            async with self._client.stream(
                method, send_url, headers=headers, content=content, timeout=timeout
            ) as response:
                if scrub and not scrubbable(response.headers):
                    raise OrganFailure(
                        "UnscrubbableResponse",
                        f"{host!r} answered in a content-encoding that cannot be checked for "
                        "an echoed credential",
                    )
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > limit:
                        raise OrganFailure(
                            "ResponseTooLarge", f"the response from {host!r} exceeds {limit} bytes"
                        )
                return _Reply(response.status_code, list(response.headers.raw), bytes(body))
        except httpx2.TimeoutException:
            raise OrganFailure("Timeout", f"{host!r} did not answer within {timeout}s") from None
        except httpx2.HTTPError as exc:
            # The exception text can contain the URL, and a query credential with it.
            raise OrganFailure(
                "Unreachable", f"request to {host!r} failed: {type(exc).__name__}"
            ) from None
        except (httpx2.InvalidURL, ValueError) as exc:
            # The caller's URL and headers were checked; what is left is a credential value
            # that cannot travel in a header (not ASCII, say). Its text may hold the value.
            raise OrganFailure(
                "InvalidRequest", f"the request to {host!r} cannot be encoded: {type(exc).__name__}"
            ) from None


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((_text(v) for k, v in self.headers if k.lower() == name.encode()), None)

    def scrubbed(self, credential: Credential) -> _Reply:
        """Without the credential's value in any form: an upstream echoing the key back (in
        a Location, any header or the body) must not hand it to the agent."""
        scrubber = credential.scrubber
        headers = [(scrubber.scrub(k, MASK), scrubber.scrub(v, MASK)) for k, v in self.headers]
        return _Reply(self.status, headers, scrubber.scrub(self.body, MASK))

    def output(self, url: str, redirects: int, dropped: bool) -> RequestOutput:
        out: RequestOutput = {
            "status": self.status,
            "headers": {_text(k).lower(): _text(v) for k, v in self.headers},
            "url": url,
            "redirects": redirects,
        }
        try:
            out["body"] = self.body.decode("utf-8")
        except UnicodeDecodeError:
            out["body_base64"] = base64.b64encode(self.body).decode()
        if dropped:
            out["credential_dropped"] = True
        return out


def _text(raw: bytes) -> str:
    """A header as text: UTF-8 when it is, else Latin-1 (what httpx2 does)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


# An HTTP token (RFC 9110): what a header name may be.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Visible ASCII, space and tab: what a header value may be (httpx2 sends ASCII only).
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _invalid(path: str, message: str) -> OrganFailure:
    """An InvalidInput answer like the executive's: the path, and a message that never
    repeats the value."""
    return OrganFailure(ErrorKind.INVALID_INPUT, message, path=path)


def _url_problem(url: str) -> str | None:
    """What stops httpx2 from sending a request to `url`, or None."""
    if _CONTROL.search(url):
        return "contains a control character"
    try:
        parsed = httpx2.URL(url)
    except (httpx2.InvalidURL, ValueError):
        return "cannot be parsed (check the host name and the port)"
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        return "is not an http(s) URL with a host"
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        return "has a port outside 1 to 65535"
    return None


def _checked_headers(headers: dict[str, str], credential: Credential | None) -> dict[str, str]:
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name):
            raise _invalid("$.headers", "a header name is not an HTTP token")
        if not _FIELD_VALUE.fullmatch(value):
            raise _invalid(f"$.headers.{name}", "must be printable ASCII text")
        if credential is not None and name.lower() == "host":
            # A shared front end routes by Host: the key would reach another virtual host.
            raise _invalid(
                f"$.headers.{name}", "may not be set with a credential (the URL's host is sent)"
            )
    return dict(headers)
