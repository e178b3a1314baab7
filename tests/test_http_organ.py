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
from tests.fake_upstream import FakeUpstream

SECRET = "sk-http-organ-0123456789"


def credential(
    kind: str = "bearer", name: str | None = None, hosts: tuple[str, ...] = ("127.0.0.1",)
) -> Credential:
    inject = {"kind": kind, **({"name": name} if name else {})}
    settings = CredentialSection.model_validate(
        {"name": "api", "inject": inject, "hosts": list(hosts)}
    )
    return Credential(settings, SECRET)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
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
        credential(kind, name),
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
        credential("query", "key"),
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
        credential("query", "key"),
    )
    assert SECRET not in json.dumps(kept)


async def test_a_credential_is_refused_for_other_hosts(
    executive: Executive, upstream: FakeUpstream
) -> None:
    before = len(upstream.requests)
    out = await request(
        executive, {"url": f"{upstream.other_host_url}/v1/echo", "credential": "api"}, credential()
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
        credential(),
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


def test_host_binding_rules() -> None:
    cred = credential(hosts=("api.example.com", "*.example.org"))
    assert cred.allows("https://api.example.com/v1")
    assert cred.allows("https://API.example.com./v1")
    assert not cred.allows("http://api.example.com/v1")  # plain http off loopback
    assert not cred.allows("https://api.example.com.evil.net/")
    assert not cred.allows("https://evil.net/?host=api.example.com")
    assert cred.allows("https://eu.example.org/") and not cred.allows("https://example.org/")
    assert credential().allows("http://127.0.0.1:8080/")  # loopback may be plain http
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
