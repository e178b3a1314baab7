"""The http organ and credential binding, against a real local HTTP server."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from sidecar.credentials import Credential, HostNotAllowed, needed
from sidecar.organs.http import HttpOrgan
from soma_runtime import Executive, FunctionCard, Stimulus
from soma_runtime.config import CredentialSection
from tests.fake_upstream import FakeUpstream, encodings

SECRET = "sk-http-organ-0123456789"
ECHOED = 'ek/echo+key="0123 4567"'  # a value whose encodings all differ


def credential(
    *hosts: str, kind: str = "bearer", name: str | None = None, value: str = SECRET
) -> Credential:
    inject = {"kind": kind, **({"name": name} if name else {})}
    settings = CredentialSection.model_validate(
        {"name": "api", "inject": inject, "hosts": list(hosts)}
    )
    return Credential(settings, value)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream()
    yield server
    server.close()


@pytest.fixture(scope="module")
def listener() -> Iterator[FakeUpstream]:
    """Another server on the same loopback address: an agent's own listener, say."""
    server = FakeUpstream()
    yield server
    server.close()


@pytest.fixture
async def executive() -> AsyncIterator[Executive]:
    executive = Executive([HttpOrgan()])
    await executive.start()
    yield executive
    await executive.stop()


async def request(
    executive: Executive, input: dict[str, Any], cred: Credential | None = None
) -> Any:
    credentials = {"api": cred} if cred else {}
    stimulus = Stimulus("http.request", input, {}, caller="t", credentials=credentials)
    return (await executive.stimulate(stimulus)).output


@pytest.mark.parametrize(
    ("kind", "name", "where"),
    [
        ("bearer", None, ("authorization", f"Bearer {SECRET}")),
        ("header", "X-Api-Key", ("x-api-key", SECRET)),
        ("query", "key", ("path", f"/v1/echo?q=1&key={SECRET}")),
    ],
)
async def test_each_injection_kind(
    executive: Executive,
    upstream: FakeUpstream,
    kind: str,
    name: str | None,
    where: tuple[str, str],
) -> None:
    out = await request(
        executive,
        {"url": f"{upstream.url}/v1/echo?q=1", "credential": "api"},
        credential(upstream.url, kind=kind, name=name),
    )
    assert out["status"] == 200
    received = upstream.requests[-1]
    field, value = where
    assert (received.path if field == "path" else received.headers[field]) == value
    # the upstream echoed what it got; the agent sees the answer without the value
    assert SECRET not in json.dumps(out)
    assert "[REDACTED]" in out["body"]


async def test_a_redirect_echoing_a_query_credential_never_carries_it_on(
    executive: Executive, upstream: FakeUpstream
) -> None:
    """A redirect keeping the query string (`$request_uri`) brings the credential back in its
    Location: it is stripped before the next hop and never returned."""
    before = len(upstream.requests)
    target = f"{upstream.other_host_url}/v1/echo"
    out = await request(
        executive,
        {"url": f"{upstream.url}/v1/redirect?to={target}", "credential": "api"},
        credential(upstream.url, kind="query", name="key"),
    )
    assert out["credential_dropped"] is True
    assert SECRET not in json.dumps(out)
    assert all(SECRET not in r.path for r in upstream.requests[before + 1 :])
    kept = await request(
        executive,
        {
            "url": f"{upstream.url}/v1/redirect?to={target}",
            "credential": "api",
            "follow_redirects": False,
        },
        credential(upstream.url, kind="query", name="key"),
    )
    assert SECRET not in json.dumps(kept)


async def test_a_credential_is_refused_for_other_hosts(
    executive: Executive, upstream: FakeUpstream
) -> None:
    before = len(upstream.requests)
    out = await request(
        executive,
        {"url": f"{upstream.other_host_url}/v1/echo", "credential": "api"},
        credential(upstream.url),
    )
    assert out["error"] == "HostNotAllowed"
    assert len(upstream.requests) == before  # nothing was sent


async def test_a_redirect_to_another_host_drops_the_credential(
    executive: Executive, upstream: FakeUpstream
) -> None:
    target = f"{upstream.other_host_url}/v1/echo"
    out = await request(
        executive,
        {"url": f"{upstream.url}/v1/redirect?to={target}", "credential": "api"},
        credential(upstream.url),
    )
    assert out["status"] == 200 and out["redirects"] == 1 and out["credential_dropped"] is True
    assert out["url"] == target
    last = upstream.requests[-1]
    assert last.headers["host"].startswith("localhost") and "authorization" not in last.headers


async def test_without_a_credential_and_without_following(
    executive: Executive, upstream: FakeUpstream
) -> None:
    out = await request(
        executive, {"url": f"{upstream.url}/v1/redirect?to=/v1/echo", "follow_redirects": False}
    )
    assert out["status"] == 302 and out["headers"]["location"] == "/v1/echo"
    posted = await request(
        executive, {"method": "POST", "url": f"{upstream.url}/v1/echo", "json": {"a": 1}}
    )
    assert posted["status"] == 200
    assert upstream.requests[-1].body == b'{"a": 1}'


async def test_limits_and_failures_are_typed(executive: Executive, upstream: FakeUpstream) -> None:
    big = await request(executive, {"url": f"{upstream.url}/v1/big", "max_response_bytes": 1000})
    assert big["error"] == "ResponseTooLarge"
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        slow = await request(executive, {"url": f"http://127.0.0.1:{port}/", "timeout_s": 0.3})
    assert slow["error"] == "Timeout"
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    gone = await request(executive, {"url": f"http://127.0.0.1:{port}/?key={SECRET}"})
    assert gone["error"] == "Unreachable"
    assert SECRET not in str(gone) and str(port) not in gone["message"]  # host only, no URL
    missing = await request(executive, {"url": f"{upstream.url}/v1/echo", "credential": "api"})
    assert missing["error"] == "CredentialUnavailable"


async def test_a_credential_bound_to_a_loopback_port_never_reaches_another_port(
    executive: Executive, upstream: FakeUpstream, listener: FakeUpstream
) -> None:
    """Anything on the machine may listen on another loopback port: an agent's own server
    gets nothing, asked directly or through a redirect, whether the binding names the port
    or is a bare host (which means https on 443)."""
    for binding in (upstream.url, "127.0.0.1"):
        direct = await request(
            executive,
            {"url": f"{listener.url}/v1/echo", "credential": "api"},
            credential(binding),
        )
        assert direct["error"] == "HostNotAllowed"
    assert listener.requests == []
    out = await request(
        executive,
        {"url": f"{upstream.url}/v1/redirect?to={listener.url}/v1/echo", "credential": "api"},
        credential(upstream.url),
    )
    assert out["status"] == 200 and out["credential_dropped"] is True
    assert upstream.requests[-1].headers["authorization"] == f"Bearer {SECRET}"
    assert [r.headers.get("authorization") for r in listener.requests] == [None]


async def test_a_caller_host_header_cannot_route_the_key_elsewhere(
    executive: Executive, upstream: FakeUpstream
) -> None:
    """A shared front end routes by Host: with a credential, Host comes from the URL only."""
    before = len(upstream.requests)
    for name in ("Host", "host"):
        out = await request(
            executive,
            {
                "url": f"{upstream.url}/v1/echo",
                "headers": {name: "attacker.example"},
                "credential": "api",
            },
            credential(upstream.url),
        )
        assert out["error"] == "InvalidInput" and out["path"] == f"$.headers.{name}"
    assert len(upstream.requests) == before  # nothing was sent
    out = await request(
        executive, {"url": f"{upstream.url}/v1/echo", "credential": "api"}, credential(upstream.url)
    )
    assert out["status"] == 200
    assert upstream.requests[-1].headers["host"] == f"127.0.0.1:{upstream.port}"
    # without a credential there is nothing to protect: a Host header is the caller's business
    plain = await request(
        executive, {"url": f"{upstream.url}/v1/echo", "headers": {"Host": "virtual.example"}}
    )
    assert plain["status"] == 200 and upstream.requests[-1].headers["host"] == "virtual.example"


@pytest.mark.parametrize(("kind", "name"), [("query", "api_key"), ("bearer", None)])
async def test_an_echoing_upstream_never_hands_the_key_back_in_any_encoding(
    executive: Executive, upstream: FakeUpstream, kind: str, name: str | None
) -> None:
    """Body, headers and Location: raw, URL-encoded both ways, base64, JSON-escaped."""
    cred = credential(upstream.url, kind=kind, name=name, value=ECHOED)
    for query in ("location=1", "status=401"):
        out = await request(
            executive,
            {
                "url": f"{upstream.url}/v1/mirror?{query}",
                "credential": "api",
                "follow_redirects": False,
            },
            cred,
        )
        assert out["body"].count("[REDACTED]") > len(encodings(ECHOED))  # it did echo
        text = json.dumps(out, ensure_ascii=False)
        leaked = [form for form in encodings(ECHOED) if form in text or form in out["body"]]
        assert leaked == []
        if query == "location=1" and kind == "query":
            assert out["headers"]["location"].endswith("api_key=[REDACTED]")
    assert out["status"] == 401
    assert "[REDACTED]" in out["headers"]["x-echo"]
    zipped = await request(
        executive, {"url": f"{upstream.url}/v1/mirror?encoding=gzip", "credential": "api"}, cred
    )
    assert "[REDACTED]" in zipped["body"] and ECHOED not in zipped["body"]  # decoded, scrubbed
    unknown = await request(
        executive, {"url": f"{upstream.url}/v1/mirror?encoding=br", "credential": "api"}, cred
    )
    assert unknown["error"] == "UnscrubbableResponse"


async def test_every_failure_of_a_described_request_is_typed(
    executive: Executive, upstream: FakeUpstream
) -> None:
    """The caller's URL, headers and body: an InvalidInput naming the field, never the value
    (it might be a secret), and nothing sent."""
    before = len(upstream.requests)
    cases = [
        ({"url": "http://127.0.0.1:99999/"}, "$.url"),
        ({"url": "http://127.0.0.1:0/"}, "$.url"),
        ({"url": "http://127.0.0.1:abc/"}, "$.url"),
        ({"url": f"{upstream.url}/v1/\x01echo"}, "$.url"),
        ({"url": f"{upstream.url}/v1/echo\r\nX-Injected: 1"}, "$.url"),
        ({"url": "http://[::1/"}, "$.url"),
        ({"url": "http:///v1"}, "$.url"),
        (
            {"url": f"{upstream.url}/v1/echo", "headers": {"X-Name": "caf\u00e9"}},
            "$.headers.X-Name",
        ),
        (
            {"url": f"{upstream.url}/v1/echo", "headers": {"X-Name": "a\r\nX-Injected: 1"}},
            "$.headers.X-Name",
        ),
        ({"url": f"{upstream.url}/v1/echo", "headers": {"X Name": "a"}}, "$.headers"),
        ({"url": f"{upstream.url}/v1/echo", "headers": {"caf\u00e9": "a"}}, "$.headers"),
        ({"url": f"{upstream.url}/v1/echo", "method": "POST", "body": "\ud800"}, "$.body"),
    ]
    for input, path in cases:
        out = await request(executive, input)
        assert (out["error"], out["path"]) == ("InvalidInput", path), input
        assert "99999" not in out["message"] and "caf" not in out["message"]
    assert len(upstream.requests) == before
    redirected = await request(
        executive, {"url": f"{upstream.url}/v1/redirect?to=http://127.0.0.1:99999/"}
    )
    assert redirected["error"] == "BadRedirect"
    unsendable = credential(upstream.url, value="clé-0123456789")  # not ASCII: no header
    failed = await request(
        executive, {"url": f"{upstream.url}/v1/echo", "credential": "api"}, unsendable
    )
    assert failed["error"] == "InvalidRequest" and "clé" not in json.dumps(failed)


def test_host_binding_rules() -> None:
    cred = credential("api.example.com", "*.example.org", "https://api.example.com:8443")
    assert cred.allows("https://api.example.com/v1")
    assert cred.allows("https://API.example.com./v1")
    assert cred.allows("https://api.example.com:443/v1") and cred.allows(
        "https://api.example.com:8443/"
    )
    assert not cred.allows("https://api.example.com:444/v1")  # the port is part of the binding
    assert not cred.allows("http://api.example.com/v1")  # plain http off loopback
    assert not cred.allows("https://api.example.com.evil.net/")
    assert not cred.allows("https://evil.net/?host=api.example.com")
    assert cred.allows("https://eu.example.org/") and not cred.allows("https://example.org/")
    assert not cred.allows("https://api.example.com:99999/") and not cred.allows("https://[::1/")
    loopback = credential("http://127.0.0.1:8080")
    assert loopback.allows("http://127.0.0.1:8080/") and loopback.allows("http://127.0.0.1:8080")
    assert not loopback.allows("http://127.0.0.1:8081/")
    assert not loopback.allows("https://127.0.0.1:8080/")
    assert not loopback.allows("http://localhost:8080/")
    bare = credential("127.0.0.1")  # a bare host means https on 443, on loopback too
    assert bare.allows("https://127.0.0.1/") and not bare.allows("http://127.0.0.1:8080/")
    with pytest.raises(HostNotAllowed):
        cred.attach("https://evil.net/")
    assert cred.attach("https://api.example.com/v1") == (
        "https://api.example.com/v1",
        {"Authorization": f"Bearer {SECRET}"},
    )
    assert SECRET not in repr(cred) and SECRET not in str(cred)


def test_needed_credentials_come_from_the_card_and_the_input() -> None:
    card = FunctionCard.model_validate(
        {
            "name": "x.y",
            "description": "d",
            "tags": [],
            "examples": [],
            "input_schema": {"type": "object"},
            "output_schema": {"type": "object"},
            "slo": {"p95_latency_ms": 1, "max_error_rate": 0.1},
            "residency": "Local",
            "idempotent": True,
            "side_effects": [],
            "credentials": ["fixed", "input:credential"],
        }
    )
    assert needed(card, {"credential": "chosen"}) == ["fixed", "chosen"]
    assert needed(card, {}) == ["fixed"]
    assert needed(card, {"credential": 5}) == ["fixed"]
