"""Credentials end to end: secrets set with the CLI, injected by the sidecar into the http
organ and the model gateway, bound to their hosts, never in a runtime or a log."""

from __future__ import annotations

import json
import os
import select
import socket
from collections.abc import Iterator
from urllib.parse import quote_plus

import httpx2
import pytest

from sidecar.gateway import LIMITS as GATEWAY_LIMITS
from tests.fake_upstream import FakeUpstream, encodings
from tests.helpers import (
    SupervisorRun,
    process_environ,
    read_report,
    run_soma,
    set_secret,
    wait_until,
)

UPSTREAM_KEY = "sk-upstream-0123456789abcdef"
APIKEY_VALUE = "ak-never-used-0123456789"
MIRROR_KEY = 'mk/mirror+key="0123 4567"'  # echoed back by /v1/mirror; its encodings all differ
ACCENTED_KEY = "clé-0123456789"  # cannot travel in a header
ROTATING_KEYS = ("rk-first-0123456789", "rk-second-0123456789", "rk-third-0123456789")
SECRETS = (UPSTREAM_KEY, APIKEY_VALUE, MIRROR_KEY, ACCENTED_KEY, *ROTATING_KEYS)
# Every form a secret may be logged or echoed in.
LEAKS = tuple(form for secret in SECRETS for form in encodings(secret))

ORGANS = ("system", "http")
BODY = """
[[credential]]
name = "upstream"
hosts = ["{upstream}"]

[[credential]]
name = "apikey"
inject = {{ kind = "header", name = "X-Api-Key" }}
hosts = ["{upstream}"]

[[credential]]
name = "mirror"
hosts = ["{upstream}"]

[[credential]]
name = "mirror-query"
secret = "mirror"
inject = {{ kind = "query", name = "api_key" }}
hosts = ["{upstream}"]

[[gateway]]
name = "model"
upstream = "{upstream}/v1"
credential = "upstream"
base_url_env = "OPENAI_BASE_URL"
api_key_env = "OPENAI_API_KEY"

[[gateway]]
name = "forbidden"
upstream = "{upstream}/v1"
credential = "upstream"
base_url_env = "FORBIDDEN_BASE_URL"
api_key_env = "FORBIDDEN_API_KEY"
max_request_bytes = 4096

[[credential]]
name = "accented"
hosts = ["{upstream}"]

[[gateway]]
name = "accented"
upstream = "{upstream}/v1"
credential = "accented"
base_url_env = "ACCENTED_BASE_URL"
api_key_env = "ACCENTED_API_KEY"

[[gateway]]
name = "small"
upstream = "{upstream}/v1"
credential = "upstream"
base_url_env = "SMALL_BASE_URL"
api_key_env = "SMALL_API_KEY"
max_request_bytes = 4096

[[gateway]]
name = "mirror"
upstream = "{upstream}/v1"
credential = "mirror"
base_url_env = "MIRROR_BASE_URL"
api_key_env = "MIRROR_API_KEY"

[[gateway]]
name = "mirror-query"
upstream = "{upstream}/v1"
credential = "mirror-query"
base_url_env = "MIRROR_QUERY_BASE_URL"
api_key_env = "MIRROR_QUERY_API_KEY"

[[credential]]
name = "rotating"
hosts = ["{upstream}"]

[[gateway]]
name = "rotating"
upstream = "{upstream}/v1"
credential = "rotating"
base_url_env = "ROTATING_BASE_URL"
api_key_env = "ROTATING_API_KEY"

[[runtime]]
name = "agent"
command = ["python", "-m", "tests.fixtures.agents", "credentials", "agent.jsonl"]
allow = ["http.request"]
credentials = ["upstream"]
gateways = ["model", "mirror", "mirror-query", "accented", "small", "rotating"]
env = {{ UPSTREAM = "{upstream}", OTHER = "{other}" }}

[[runtime]]
name = "bystander"
command = ["python", "-c", "import signal; signal.pause()"]
allow = ["system.*"]
gateways = ["small"]
"""


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream()
    yield server
    server.close()


@pytest.fixture(scope="module")
def scenario(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[SupervisorRun]:
    tmp = tmp_path_factory.mktemp("credentials")
    body = BODY.format(upstream=upstream.url, other=upstream.other_host_url)
    config = SupervisorRun.write(tmp, body, ORGANS)  # the CLI reads it before the run starts
    set_secret(config, "upstream", UPSTREAM_KEY)
    set_secret(config, "apikey", APIKEY_VALUE)
    set_secret(config, "mirror", MIRROR_KEY)
    set_secret(config, "accented", ACCENTED_KEY)
    run = SupervisorRun(tmp, body, organs=ORGANS, logging='calls = "info"\n')
    run.wait_ready()
    wait_until(
        lambda: any(r.get("ready") for r in read_report(tmp / "agent.jsonl")),
        60,
        "the agent to report",
    )
    yield run
    assert run.stop() == 0, run.proc.output()


def agent_report(run: SupervisorRun) -> dict[str, object]:
    return read_report(run.tmp / "agent.jsonl")[0]


def test_an_allowed_credential_is_injected(scenario: SupervisorRun, upstream: FakeUpstream) -> None:
    report = agent_report(scenario)
    assert report["echo_status"] == 200 and report["echo_saw_auth"] is True
    echo = next(
        r
        for r in upstream.requests
        if r.path == "/v1/echo" and r.headers.get("host", "").startswith("127.0.0.1")
    )
    assert echo.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_a_credential_the_runtime_may_not_use_is_permission_denied(
    scenario: SupervisorRun, upstream: FakeUpstream
) -> None:
    assert agent_report(scenario)["not_allowed"] == "PERMISSION_DENIED"
    assert all(r.headers.get("x-api-key") != APIKEY_VALUE for r in upstream.requests)
    wait_until(
        lambda: any(e.get("credential") == "apikey" for e in scenario.events("credential_denied")),
        what="the deny logged",
    )


def test_a_credential_is_never_sent_to_another_host(
    scenario: SupervisorRun, upstream: FakeUpstream
) -> None:
    report = agent_report(scenario)
    assert report["other_host"] == "HostNotAllowed"
    redirect = report["redirect"]
    assert redirect == {"status": 200, "dropped": True, "auth_at_other": None}
    at_other = [r for r in upstream.requests if r.headers.get("host", "").startswith("localhost")]
    assert at_other  # the redirect was followed...
    assert all("authorization" not in r.headers for r in at_other)  # ...without the credential


def test_the_gateway_swaps_the_placeholder_for_the_real_key(
    scenario: SupervisorRun, upstream: FakeUpstream
) -> None:
    report = agent_report(scenario)
    assert report["gateway_status"] == 200
    assert report["gateway_answer"]["choices"][0]["message"]["content"] == "hello"
    completions = [r for r in upstream.requests if r.path == "/v1/chat/completions"]
    assert len(completions) == 2  # the plain and the streamed call; the wrong key never arrived
    assert {r.headers["authorization"] for r in completions} == {f"Bearer {UPSTREAM_KEY}"}
    assert json.loads(completions[0].body) == {"model": "m", "messages": []}
    assert report["wrong_key_status"] == 401


def test_the_gateway_streams_server_sent_events_through(scenario: SupervisorRun) -> None:
    report = agent_report(scenario)
    assert report["stream_type"] == "text/event-stream"
    assert report["stream_events"] == ['{"n": 0}', '{"n": 1}', '{"n": 2}', "[DONE]"]
    # streamed as produced, not buffered: the events arrived spread over the upstream's gaps
    assert report["stream_spread_s"] >= 2.5 * FakeUpstream.EVENT_GAP_S


def agent_gateway(run: SupervisorRun) -> tuple[int, str, str]:
    """The agent's gateway port, base URL and placeholder, as a same-user process reads them."""
    environ = process_environ(run.child("agent")["pid"])
    base_url = environ["OPENAI_BASE_URL"]
    return int(base_url.rsplit(":", 1)[1].split("/")[0]), base_url, environ["OPENAI_API_KEY"]


def test_the_runtime_environment_holds_only_the_placeholder(scenario: SupervisorRun) -> None:
    port, base_url, placeholder = agent_gateway(scenario)
    assert placeholder.startswith("soma_pk_") and len(placeholder) > 40
    assert base_url == f"http://127.0.0.1:{port}/model"
    assert "OPENAI_API_KEY" not in process_environ(scenario.child("bystander")["pid"])
    seen_inside = agent_report(scenario)["environ"]
    assert seen_inside["OPENAI_API_KEY"] == placeholder  # os.environ, as the agent saw it
    assert not any(secret in str(seen_inside) for secret in SECRETS)


def test_every_use_is_audited(scenario: SupervisorRun) -> None:
    result = run_soma("secrets", "audit", "upstream", "--config", str(scenario.config))
    assert result.returncode == 0, result.stderr
    uses = [json.loads(line) for line in result.stdout.splitlines()]
    assert {(u["runtime"], u["organ"], u["op"]) for u in uses if u["action"] == "use"} >= {
        ("agent", "http", "http.request"),
        ("agent", "gateway", "model"),
    }
    listing = run_soma("secrets", "list", "--config", str(scenario.config))
    assert "agent (upstream, gateway model, gateway small)" in listing.stdout
    assert not any(secret in result.stdout + listing.stdout for secret in SECRETS)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_leaked_placeholder_is_worthless_to_another_user(scenario: SupervisorRun) -> None:
    port, _, placeholder = agent_gateway(scenario)
    request = (
        f"POST /model/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {placeholder}\r\n"
        "Content-Length: 2\r\nConnection: close\r\n\r\n{}"
    ).encode()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        os.setgid(65534)
        os.setuid(65534)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        os.write(write, answer.split(b"\r\n", 1)[0])
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    with os.fdopen(read, "rb") as stream:
        assert stream.read() == b"HTTP/1.1 403 Forbidden"


def test_gateway_refusals(scenario: SupervisorRun, upstream: FakeUpstream) -> None:
    port, _, placeholder = agent_gateway(scenario)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {placeholder}"}
    before = len(upstream.requests)
    with httpx2.Client(trust_env=False, timeout=10) as http:
        assert http.post(f"{base}/nope/x", headers=auth, json={}).status_code == 404
        assert (
            http.post(f"{base}/forbidden/chat/completions", headers=auth, json={}).status_code
            == 403
        )
        too_big = http.post(
            f"{base}/model/chat/completions", headers=auth, content=b"x" * (40 * 1024 * 1024)
        )
        assert too_big.status_code == 413
        assert "soma_gateway" in too_big.text
    assert len(upstream.requests) == before  # none of them reached the upstream
    wait_until(
        lambda: {e["status"] for e in scenario.events("gateway_refused")} >= {404, 403, 413},
        what="the refusals logged",
    )


def test_a_body_without_a_length_is_refused_once_it_exceeds_the_limit(
    scenario: SupervisorRun, upstream: FakeUpstream
) -> None:
    """Chunked, so no Content-Length says it is too big: the gateway counts as it reads."""
    port, _, placeholder = agent_gateway(scenario)

    def chunks() -> Iterator[bytes]:
        yield b"x" * (64 * 1024)  # one chunk beyond the limit: none of it is sent on

    with httpx2.Client(trust_env=False, timeout=10) as http:
        answer = http.post(
            f"http://127.0.0.1:{port}/small/echo",
            headers={"Authorization": f"Bearer {placeholder}"},
            content=chunks(),
        )
    assert answer.status_code == 413 and "4096 bytes" in answer.json()["error"]["message"]
    wait_until(
        lambda: any(e.get("gateway") == "small" for e in scenario.events("gateway_refused")),
        what="the refusal logged",
    )


def test_the_gateway_keeps_paths_and_repeated_headers_as_sent(
    scenario: SupervisorRun, upstream: FakeUpstream
) -> None:
    port, _, placeholder = agent_gateway(scenario)
    headers = [
        (b"Authorization", f"Bearer {placeholder}".encode()),
        (b"X-Multi", b"one"),
        (b"X-Multi", b"two"),
        (b"X-Name", "café".encode("latin-1")),  # beyond ASCII: passed on as it came
    ]
    with httpx2.Client(trust_env=False, timeout=10) as http:
        answer = http.get(f"http://127.0.0.1:{port}/model/files/a%2Fb%3Fc", headers=headers)
    assert answer.status_code == 404  # the upstream's answer
    seen = upstream.requests[-1]
    assert seen.path == "/v1/files/a%2Fb%3Fc"
    assert [v for k, v in seen.header_list if k == "x-multi"] == ["one", "two"]
    assert seen.headers["x-name"] == "café"


def test_a_credential_that_cannot_be_a_header_is_refused_clearly(
    scenario: SupervisorRun, upstream: FakeUpstream
) -> None:
    port, _, placeholder = agent_gateway(scenario)
    before = len(upstream.requests)
    with httpx2.Client(trust_env=False, timeout=10) as http:
        answer = http.get(
            f"http://127.0.0.1:{port}/accented/echo",
            headers={"Authorization": f"Bearer {placeholder}"},
        )
    assert answer.status_code == 500 and "not ASCII" in answer.json()["error"]["message"]
    assert len(upstream.requests) == before and ACCENTED_KEY not in answer.text


def test_a_client_that_goes_away_stops_the_upstream_stream(
    scenario: SupervisorRun, upstream: FakeUpstream
) -> None:
    port, _, placeholder = agent_gateway(scenario)
    before = upstream.aborted_streams
    with (
        httpx2.Client(trust_env=False, timeout=10) as http,
        http.stream(
            "POST",
            f"http://127.0.0.1:{port}/model/chat/completions",
            headers={"Authorization": f"Bearer {placeholder}"},
            json={"stream": True},
        ) as stream,
    ):
        first = next(stream.iter_lines())
        assert first.startswith("data: ")
    # the gateway noticed the disconnect and closed its upstream connection mid-stream
    wait_until(lambda: upstream.aborted_streams > before, 10, "the upstream stream to be cut")
    wait_until(lambda: scenario.events("client_gone"), what="the disconnect logged")


def test_a_client_that_goes_away_mid_body_is_let_go(
    scenario: SupervisorRun, upstream: FakeUpstream
) -> None:
    """It promised 100 bytes and sent 10: nothing is answered, nothing fails, the port
    serves on."""
    port, _, placeholder = agent_gateway(scenario)

    def gateway_uses() -> int:
        audit = run_soma("secrets", "audit", "upstream", "--config", str(scenario.config))
        return audit.stdout.count('"op": "model"')

    before = gateway_uses()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            f"POST /model/echo HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {placeholder}\r\nContent-Length: 100\r\n\r\n".encode()
            + b"x" * 10
        )
        # admitted (its credential resolved) before the client goes
        wait_until(lambda: gateway_uses() > before, 20, "the credential to be used")
    wait_until(
        lambda: any(e["status"] == 0 for e in scenario.events("client_gone")),
        what="the disconnect logged",
    )
    assert "Exception in ASGI application" not in scenario.proc.output()


def test_the_gateway_scrubs_echoed_credentials_from_every_answer(
    scenario: SupervisorRun, upstream: FakeUpstream
) -> None:
    """A hostile upstream echoes the key in every encoding, in headers, a Location and the
    body, under any status; what the agent gets has none of them, with the same length."""
    port, _, placeholder = agent_gateway(scenario)
    base = f"http://127.0.0.1:{port}"
    bearer = {"Authorization": f"Bearer {placeholder}"}
    with httpx2.Client(trust_env=False, timeout=10) as http:
        answers = [
            http.get(f"{base}/mirror/mirror?location=1", headers=bearer),
            http.get(f"{base}/mirror/mirror?status=401", headers=bearer),
            http.get(f"{base}/mirror-query/mirror", params={"api_key": placeholder}),
            http.get(f"{base}/mirror-query/mirror?status=401&api_key={placeholder}&location=1"),
        ]
    sent = [r for r in upstream.requests if "/mirror" in r.path][-4:]
    assert [r.headers.get("authorization") for r in sent[:2]] == [f"Bearer {MIRROR_KEY}"] * 2
    assert all(quote_plus(MIRROR_KEY) in r.path for r in sent[2:])  # the query credential
    assert [a.status_code for a in answers] == [200, 401, 200, 401]
    for answer in answers:
        raw = answer.text + str(answer.headers.multi_items())
        assert [form for form in encodings(MIRROR_KEY) if form in raw] == []
        assert int(answer.headers["content-length"]) == len(answer.content)
        assert "*" * len(MIRROR_KEY) in answer.text  # the echo was there, masked
        assert "*" * len(MIRROR_KEY) in answer.headers["x-echo"]
    assert "api_key=" + "*" * len(quote_plus(MIRROR_KEY)) in answers[3].headers["location"]


def test_the_gateway_never_relays_a_body_it_cannot_scrub(
    scenario: SupervisorRun, upstream: FakeUpstream
) -> None:
    """It asks for identity; a gzip body sent anyway is relayed decoded (and scrubbed), and
    a coding it cannot decode is refused rather than passed on unread."""
    port, _, placeholder = agent_gateway(scenario)
    bearer = {"Authorization": f"Bearer {placeholder}", "Accept-Encoding": "gzip, br"}
    with httpx2.Client(trust_env=False, timeout=10) as http:
        zipped = http.get(f"http://127.0.0.1:{port}/mirror/mirror?encoding=gzip", headers=bearer)
        assert upstream.requests[-1].headers["accept-encoding"] == "identity"
        brotli = http.get(f"http://127.0.0.1:{port}/mirror/mirror?encoding=br", headers=bearer)
    assert zipped.status_code == 200 and "content-encoding" not in zipped.headers
    assert "*" * len(MIRROR_KEY) in zipped.text
    assert [form for form in encodings(MIRROR_KEY) if form in zipped.text] == []
    assert brotli.status_code == 502 and "content-encoding" in brotli.json()["error"]["message"]


def test_the_gateway_scrubs_a_key_split_across_streamed_chunks(
    scenario: SupervisorRun, upstream: FakeUpstream
) -> None:
    """Server-sent events echoing the key, each value cut in two writes: still scrubbed.
    (That events still stream as they come: test_the_gateway_streams_server_sent_events_through.)"""
    port, _, placeholder = agent_gateway(scenario)
    bearer = {"Authorization": f"Bearer {placeholder}"}
    with (
        httpx2.Client(trust_env=False, timeout=10) as http,
        http.stream("GET", f"http://127.0.0.1:{port}/mirror/mirror-sse", headers=bearer) as sse,
    ):
        assert sse.headers["content-type"] == "text/event-stream"
        events = [line for line in sse.iter_lines() if line.startswith("data: ")]
    assert len(events) == len(encodings(MIRROR_KEY)) + 1 and events[-1] == "data: [DONE]"
    assert all(set(event[len("data: ") :]) == {"*"} for event in events[:-1])
    assert [form for form in encodings(MIRROR_KEY) if form in "".join(events)] == []


def test_a_runtime_cannot_hold_more_gateway_connections_than_its_cap(
    scenario: SupervisorRun,
) -> None:
    """Idle connections cost the sidecar a descriptor each: beyond the cap, a port closes
    them as it accepts them, and serves again once the runtime lets go of the others."""
    port, base_url, placeholder = agent_gateway(scenario)
    fds = f"/proc/{scenario.child('sidecar')['pid']}/fd"
    before = len(os.listdir(fds))
    opened = [
        socket.create_connection(("127.0.0.1", port))
        for _ in range(3 * GATEWAY_LIMITS.max_connections)
    ]
    try:
        closed: set[socket.socket] = set()

        def closed_by_the_sidecar() -> int:
            readable, _, _ = select.select([s for s in opened if s not in closed], [], [], 0.1)
            closed.update(s for s in readable if s.recv(1) == b"")
            return len(closed)

        wait_until(
            lambda: closed_by_the_sidecar() >= 2 * GATEWAY_LIMITS.max_connections,
            10,
            "the connections beyond the cap to be closed",
        )
        assert len(os.listdir(fds)) - before <= GATEWAY_LIMITS.max_connections + 2
        wait_until(lambda: scenario.events("gateway_connections_capped"), what="the cap logged")
        # the cap is each port's own: another runtime's port serves meanwhile
        environ = process_environ(scenario.child("bystander")["pid"])
        with httpx2.Client(trust_env=False, timeout=10) as http:
            answer = http.get(
                f"{environ['SMALL_BASE_URL']}/echo",
                headers={"Authorization": f"Bearer {environ['SMALL_API_KEY']}"},
            )
        assert answer.status_code == 200
    finally:
        for sock in opened:
            sock.close()

    def serves() -> bool:
        with httpx2.Client(trust_env=False, timeout=10) as http:
            try:
                answer = http.post(
                    f"{base_url}/chat/completions",
                    headers={"Authorization": f"Bearer {placeholder}"},
                    json={"model": "m", "messages": []},
                )
            except httpx2.TransportError:
                return False
            return answer.status_code == 200

    wait_until(serves, 10, "the port to serve again")


def test_large_bodies_go_through_both_ways(scenario: SupervisorRun, upstream: FakeUpstream) -> None:
    port, _, placeholder = agent_gateway(scenario)
    bearer = {"Authorization": f"Bearer {placeholder}"}
    sent = bytes(range(256)) * 4096  # 1 MiB
    with httpx2.Client(trust_env=False, timeout=10) as http:
        answer = http.post(f"http://127.0.0.1:{port}/model/echo", headers=bearer, content=sent)
        assert answer.status_code == 200
        assert upstream.requests[-1].body == sent
        big = http.get(f"http://127.0.0.1:{port}/model/big", headers=bearer)
    assert big.status_code == 200 and big.content == b"x" * (2 * 1024 * 1024)
    assert big.headers["content-length"] == str(2 * 1024 * 1024)


def test_every_gateway_request_is_audited_once(scenario: SupervisorRun) -> None:
    """Audit rows are written in batches: all of them land, one per request."""
    port, _, placeholder = agent_gateway(scenario)

    def gateway_uses() -> int:
        audit = run_soma("secrets", "audit", "upstream", "--config", str(scenario.config))
        return audit.stdout.count('"op": "model"')

    before = gateway_uses()
    with httpx2.Client(trust_env=False, timeout=10) as http:
        for _ in range(30):
            answer = http.get(
                f"http://127.0.0.1:{port}/model/echo",
                headers={"Authorization": f"Bearer {placeholder}"},
            )
            assert answer.status_code == 200
    wait_until(lambda: gateway_uses() == before + 30, 10, "30 more audit rows")


def test_the_gateway_follows_every_secret_change_at_once(
    scenario: SupervisorRun, upstream: FakeUpstream
) -> None:
    """Decrypted credentials are cached (5 s by default), yet a secret set, replaced or
    deleted with `soma secrets` is what the very next request gets."""
    port, _, placeholder = agent_gateway(scenario)
    bearer = {"Authorization": f"Bearer {placeholder}"}

    def sent_with() -> str | None:
        with httpx2.Client(trust_env=False, timeout=10) as http:
            answer = http.get(f"http://127.0.0.1:{port}/rotating/echo", headers=bearer)
        if answer.status_code != 200:
            assert answer.status_code == 503, answer.text
            return None
        return upstream.requests[-1].headers["authorization"].removeprefix("Bearer ")

    assert sent_with() is None  # not in the vault yet
    set_secret(scenario.config, "rotating", ROTATING_KEYS[0])
    assert sent_with() == ROTATING_KEYS[0]
    assert sent_with() == ROTATING_KEYS[0]  # from the cache
    set_secret(scenario.config, "rotating", ROTATING_KEYS[1])
    assert sent_with() == ROTATING_KEYS[1]
    deleted = run_soma("secrets", "delete", "rotating", "--config", str(scenario.config))
    assert deleted.returncode == 0, deleted.stderr
    assert sent_with() is None
    set_secret(scenario.config, "rotating", ROTATING_KEYS[2])
    assert sent_with() == ROTATING_KEYS[2]


def test_forwarding_headers_do_not_stand_in_for_the_peer(
    scenario: SupervisorRun, upstream: FakeUpstream
) -> None:
    """The peer check reads the TCP connection itself: an X-Forwarded-For naming another
    address neither refuses the runtime's own request nor changes who is checked."""
    port, _, placeholder = agent_gateway(scenario)
    with httpx2.Client(trust_env=False, timeout=10) as http:
        answer = http.get(
            f"http://127.0.0.1:{port}/model/echo",
            headers={
                "Authorization": f"Bearer {placeholder}",
                "X-Forwarded-For": "203.0.113.9:4444",
                "X-Forwarded-Proto": "https",
            },
        )
    assert answer.status_code == 200
    assert upstream.requests[-1].headers["x-forwarded-for"] == "203.0.113.9:4444"


def test_no_secret_in_any_log_line_or_runtime_environment(scenario: SupervisorRun) -> None:
    """Last of the module: the whole scenario has run."""
    logs = scenario.proc.output()
    assert '"event": "gateway"' in logs and '"op": "http.request"' in logs  # it all happened
    assert "HTTP Request" not in logs  # httpx2's request lines, query credentials included
    hits = [form for form in LEAKS if form in logs]
    for child in scenario.status()["children"]:
        environ = str(process_environ(child["pid"]))
        hits += [f"{child['name']} env" for s in SECRETS if s in environ]
    assert hits == []
