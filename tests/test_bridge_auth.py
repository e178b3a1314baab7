"""Auth of bridge instances over real HTTP: API keys (create, expire, revoke on the running
bridge), OAuth 2.1 bearer JWTs signed here with real keys, scopes, rate and body limits."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.bridge.guard import FAILURE_BURST, MAX_BACKOFF_S
from sidecar.bridge.keys import KeyStore
from sidecar.organs.system import SystemOrgan
from tests.helpers import wait_until
from tests.test_bridge import Ledger, bridge_config, client, running

ISSUER = "https://id.example"
PING = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
ACCEPT = {"accept": "application/json, text/event-stream"}


def post(url: str, headers: dict[str, str], body: Any = PING) -> httpx2.Response:
    """One request from a thread (the bridge serves on the test's event loop)."""
    with httpx2.Client(timeout=10.0) as http:
        return http.post(url, headers={**ACCEPT, **headers}, json=body)


async def apost(url: str, headers: dict[str, str], body: Any = PING) -> httpx2.Response:
    return await asyncio.to_thread(post, url, headers, body)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Issuer:
    """An OAuth issuer of the test: RSA keys, a JWKS file, tokens."""

    def __init__(self, jwks: Path) -> None:
        self.jwks = jwks
        self.keys = {"k1": rsa.generate_private_key(public_exponent=65537, key_size=2048)}
        self.publish()

    def publish(self) -> None:
        keys = []
        for kid, key in self.keys.items():
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        self.jwks.write_text(json.dumps({"keys": keys}))

    def claims(self, audience: str, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": audience, "sub": "alice", "exp": now + 300, "iat": now}
        claims["scope"] = "soma:tools"
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, audience: str, kid: str = "k1", key: Any = None, **overrides: Any) -> str:
        signer = key if key is not None else self.keys[kid]
        claims = self.claims(audience, **overrides)
        return jwt.encode(claims, signer, algorithm="RS256", headers={"kid": kid})

    def public_pem(self) -> bytes:
        return (
            self.keys["k1"]
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def unsigned(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    """A token built by hand: `alg: none`, or HMAC with `secret` (a public key, in the attack)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    if secret is None:
        return signing_input + "."
    return (
        signing_input + "." + b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())
    )


def oauth_config(tmp_path: Path, extra: str = "") -> str:
    return f"""
[[bridge]]
name = "sso"
expose = ["system.*", "ledger.*"]
[bridge.auth]
api_keys = true
{extra}
[bridge.auth.oauth]
issuer = "{ISSUER}"
jwks = "{tmp_path / "jwks.json"}"
scopes = ["soma:tools"]
write_scopes = ["soma:write"]
jwks_refresh_interval = 1.0
"""


async def test_api_keys_create_expire_revoke(tmp_path: Path) -> None:
    config = bridge_config(tmp_path, '[[bridge]]\nname = "one"\nexpose = ["system.*"]\n')
    store = KeyStore(config.state_dir)
    info, key = store.create("one", label="laptop")
    _, expired = store.create("one", expires_days=-1.0)
    assert (config.state_dir / "bridge-keys.db").stat().st_mode & 0o077 == 0
    assert key not in (config.state_dir / "bridge-keys.db").read_bytes().decode("latin-1")
    async with running(config, [SystemOrgan()]) as bridges:
        url = bridges["one"].url
        none = await apost(url, {})
        assert none.status_code == 401
        assert none.headers["www-authenticate"].startswith("Bearer")
        assert (
            await apost(url, {"x-api-key": "soma_" + "0" * 16 + "_" + "0" * 64})
        ).status_code == 401
        assert (await apost(url, {"authorization": f"Bearer {expired}"})).status_code == 401
        # Never from the URL (the MCP authorization spec forbids credentials in query strings).
        assert (await apost(f"{url}?api_key={key}", {})).status_code == 401
        assert (await apost(url, {"x-api-key": key})).status_code == 200
        async with client(url, key) as c:
            assert (await c.call_tool("system_ping", {})).structured_content is not None
        assert [k.label for k in store.list("one")] == ["laptop", ""]
        assert store.revoke(info.id)
        started = time.monotonic()
        await asyncio.to_thread(
            wait_until,
            lambda: post(url, {"x-api-key": key}).status_code == 401,
            2.0,
            "the revoke to take effect",
        )
        assert time.monotonic() - started < 1.5
        assert not store.revoke(info.id)


async def test_refusals_say_what_to_send(tmp_path: Path) -> None:
    """A 401 names what to send (the body always: clients without an OAuth flow show it; the
    challenge once a credential was presented, RFC 6750 §3.1), and so does the 404 that
    clients starting an OAuth sign-in meet at registration (mcp-remote, the Inspector show
    it) on a bridge that does no OAuth."""
    how = "send an API key of this bridge as Authorization: Bearer <key> or x-api-key: <key>"
    config = bridge_config(tmp_path, '[[bridge]]\nname = "one"\nexpose = ["system.*"]\n')
    async with running(config, [SystemOrgan()]) as bridges:
        url = bridges["one"].url
        none = await apost(url, {})
        assert none.status_code == 401
        assert none.headers["www-authenticate"] == 'Bearer realm="soma"'
        assert none.json() == {
            "error": "invalid_token",
            "error_description": f"no credentials: {how}",
        }
        wrong = await apost(url, {"x-api-key": "soma_" + "0" * 16 + "_" + "0" * 64})
        description = f"unknown, expired or revoked API key: {how}"
        assert wrong.json() == {"error": "invalid_token", "error_description": description}
        assert wrong.headers["www-authenticate"] == (
            f'Bearer realm="soma", error="invalid_token", error_description="{description}"'
        )
        origin = url.removesuffix("/mcp")
        for path in [
            "/register",
            "/.well-known/oauth-authorization-server",
            "/.well-known/oauth-protected-resource/mcp",
        ]:
            missing = await asyncio.to_thread(httpx2.post, origin + path, json={})
            assert missing.status_code == 404
            no_oauth = f"the MCP endpoint is /mcp, and this server does no OAuth: {how}"
            assert missing.json() == {"error": "not_found", "error_description": no_oauth}
    Issuer(tmp_path / "jwks.json")
    config = bridge_config(tmp_path, oauth_config(tmp_path))
    async with running(config, [SystemOrgan()]) as bridges:
        url = bridges["sso"].url
        none = await apost(url, {})
        assert none.json()["error_description"] == (
            "no credentials: send an API key of this bridge as Authorization: Bearer <key> or"
            " x-api-key: <key>, or an access token of its authorization server as"
            " Authorization: Bearer <token>"
        )
        assert "error=" not in none.headers["www-authenticate"]
        register = await asyncio.to_thread(httpx2.post, url.removesuffix("/mcp") + "/register")
        assert register.json() == {"error": "not_found"}  # its issuer registers clients


async def test_oauth_tokens(tmp_path: Path) -> None:
    issuer = Issuer(tmp_path / "jwks.json")
    config = bridge_config(tmp_path, oauth_config(tmp_path))
    async with running(config, [SystemOrgan(), Ledger()]) as bridges:
        url = bridges["sso"].url
        ok = issuer.token(url)
        assert (await apost(url, {"authorization": f"Bearer {ok}"})).status_code == 200
        trailing = issuer.token(url + "/")  # exactly one trailing slash is tolerated
        assert (await apost(url, {"authorization": f"Bearer {trailing}"})).status_code == 200
        other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = int(time.time())
        bad = {
            "no token": None,
            "expired": issuer.token(url, exp=now - 120, iat=now - 400),
            "nbf in the future": issuer.token(url, nbf=now + 600),
            "wrong audience": issuer.token("http://127.0.0.1:1/mcp"),
            "double slash": issuer.token(url + "//"),
            "wrong issuer": issuer.token(url, iss="https://evil.example"),
            "bad signature": issuer.token(url, key=other_key),
            "alg none": unsigned({"alg": "none", "kid": "k1"}, issuer.claims(url), None),
            "hs256 with the public key": unsigned(
                {"alg": "HS256", "kid": "k1", "typ": "JWT"}, issuer.claims(url), issuer.public_pem()
            ),
            "unknown kid": issuer.token(url, kid="k9", key=other_key),
            "garbage": "not.a.jwt",
        }
        for case, token in bad.items():
            headers = {"authorization": f"Bearer {token}"} if token else {}
            reply = await apost(url, headers)
            assert reply.status_code == 401, case
            challenge = reply.headers["www-authenticate"]
            assert f'resource_metadata="http://127.0.0.1:{bridges["sso"].port}' in challenge, case
            assert 'scope="soma:tools"' in challenge, case
            assert token is None or 'error="invalid_token"' in challenge, case
        # A valid token without the instance's scope: 403 naming it.
        reply = await apost(url, {"authorization": f"Bearer {issuer.token(url, scope='x')}"})
        assert reply.status_code == 403
        assert 'error="insufficient_scope"' in reply.headers["www-authenticate"]
        assert 'scope="soma:tools"' in reply.headers["www-authenticate"]


async def test_write_scopes_guard_tools_that_are_not_read_only(tmp_path: Path) -> None:
    issuer = Issuer(tmp_path / "jwks.json")
    config = bridge_config(tmp_path, oauth_config(tmp_path))
    ledger = Ledger()
    async with running(config, [SystemOrgan(), ledger]) as bridges:
        url = bridges["sso"].url
        reader = issuer.token(url)
        async with client(url, reader) as c:
            assert not (await c.call_tool("system_echo", {"a": 1})).is_error
        call = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "ledger_append", "arguments": {"n": 1}},
        }
        reply = await apost(url, {"authorization": f"Bearer {reader}"}, call)
        assert reply.status_code == 403
        # Every needed scope in one challenge.
        assert 'scope="soma:tools soma:write"' in reply.headers["www-authenticate"]
        assert ledger.appended == 0
        writer = issuer.token(url, scope="soma:tools soma:write")
        async with client(url, writer) as c:
            assert (await c.call_tool("ledger_append", {"n": 1})).structured_content == {"count": 1}


async def test_unknown_kid_refreshes_the_jwks(tmp_path: Path) -> None:
    issuer = Issuer(tmp_path / "jwks.json")
    config = bridge_config(tmp_path, oauth_config(tmp_path))
    async with running(config, [SystemOrgan()]) as bridges:
        url = bridges["sso"].url
        assert (
            await apost(url, {"authorization": f"Bearer {issuer.token(url)}"})
        ).status_code == 200
        issuer.keys["k2"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        issuer.publish()  # the issuer rotates in a new key
        rotated = issuer.token(url, kid="k2")
        await asyncio.to_thread(
            wait_until,
            lambda: post(url, {"authorization": f"Bearer {rotated}"}).status_code == 200,
            5.0,
            "the JWKS refresh",
        )


async def test_protected_resource_metadata_at_both_well_known_uris(tmp_path: Path) -> None:
    Issuer(tmp_path / "jwks.json")
    config = bridge_config(tmp_path, oauth_config(tmp_path))
    async with running(config, [SystemOrgan()]) as bridges, httpx2.AsyncClient() as http:
        url = bridges["sso"].url
        origin = url.removesuffix("/mcp")
        for path in [
            "/.well-known/oauth-protected-resource/mcp",
            "/.well-known/oauth-protected-resource",
        ]:
            reply = await http.get(origin + path)
            assert reply.status_code == 200, path
            document = reply.json()
            assert document["resource"] == url
            assert document["authorization_servers"] == [ISSUER]
            assert document["scopes_supported"] == ["soma:tools", "soma:write"]


async def test_rate_limit_and_body_limit(tmp_path: Path) -> None:
    config = bridge_config(
        tmp_path,
        '[[bridge]]\nname = "one"\nexpose = ["system.*"]\nmax_request_bytes = 2048\n'
        "[bridge.auth]\nrate = { per_key = 0.5, burst = 2 }\n",
    )
    store = KeyStore(config.state_dir)
    _, key = store.create("one")
    _, other = store.create("one")
    async with running(config, [SystemOrgan()]) as bridges:
        url = bridges["one"].url
        statuses = [(await apost(url, {"x-api-key": key})).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        limited = await apost(url, {"x-api-key": key})
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        # Per key: another key is not slowed by the first one's flood.
        huge = {**PING, "params": {"_meta": {"pad": "x" * 4096}}}
        assert (await apost(url, {"x-api-key": other}, huge)).status_code == 413


async def test_dns_rebinding_is_refused(tmp_path: Path) -> None:
    config = bridge_config(tmp_path, '[[bridge]]\nname = "one"\nexpose = ["system.*"]\n')
    _, key = KeyStore(config.state_dir).create("one")
    async with running(config, [SystemOrgan()]) as bridges:
        url = bridges["one"].url
        evil_host = await apost(url, {"x-api-key": key, "host": "evil.example"})
        assert evil_host.status_code in (400, 421)
        evil_origin = await apost(url, {"x-api-key": key, "origin": "http://evil.example"})
        assert evil_origin.status_code == 403


@pytest.mark.parametrize("listen", ["localhost:0", "127.0.0.1:70000", "127.0.0.1", "0.0.0.0:0"])
def test_listen_must_be_ip_and_port(tmp_path: Path, listen: str) -> None:
    from soma_runtime.config import ConfigError

    with pytest.raises(ConfigError, match="listen"):  # 0.0.0.0 without public_url too
        bridge_config(tmp_path, f'[[bridge]]\nname = "x"\nlisten = "{listen}"\n')


async def test_wrong_keys_slow_down_whatever_address_the_request_claims(tmp_path: Path) -> None:
    """The backoff after failed authentications keys on the connection's own address: an
    `X-Forwarded-For` header, which any local process can write, buys no fresh allowance."""
    config = bridge_config(tmp_path, '[[bridge]]\nname = "one"\nexpose = ["system.*"]\n')
    wrong = "soma_" + "0" * 16 + "_" + "1" * 64

    def attempt(url: str, i: int) -> tuple[int, float]:
        began = time.monotonic()  # in the thread: time spent queued for one is not counted
        reply = post(url, {"x-api-key": wrong, "x-forwarded-for": f"10.9.{i}.1"})
        return reply.status_code, time.monotonic() - began

    async with running(config, [SystemOrgan()]) as bridges:
        url = bridges["one"].url
        tries = [asyncio.to_thread(attempt, url, i) for i in range(2 * FAILURE_BURST + 4)]
        results = await asyncio.gather(*tries)
    assert {status for status, _ in results} == {401}
    # Past the burst each failure waits longer, up to MAX_BACKOFF_S (a lower bound: load only
    # adds to it).
    assert max(took for _, took in results) >= MAX_BACKOFF_S * 0.95
