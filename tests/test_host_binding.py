"""Credential bindings in the configuration: origins (scheme, host, port), bare hosts."""

from __future__ import annotations

from typing import Any

import pytest

from soma_runtime.config import ConfigError, parse_config
from soma_runtime.hosts import Binding, Origin


def test_bindings_parse_with_default_ports() -> None:
    assert Binding.parse("api.example.com") == Binding("https", "api.example.com", 443)
    assert Binding.parse("*.Example.com.") == Binding("https", "*.example.com", 443)
    assert Binding.parse("https://api.example.com:8443") == Binding(
        "https", "api.example.com", 8443
    )
    assert Binding.parse("http://127.0.0.1") == Binding("http", "127.0.0.1", 80)
    assert Binding.parse("http://[::1]:8080/") == Binding("http", "::1", 8080)
    assert str(Binding.parse("http://[::1]:8080")) == "http://[::1]:8080"
    for bad, why in [
        ("http://api.example.com", "plain http is only for loopback"),
        ("https://api.example.com:0", "port must be from 1 to 65535"),
        ("https://api.example.com:70000", "port must be from 1 to 65535"),
        ("https://user@api.example.com", "is not a host"),
        ("https://api.example.com/v1", "is not a host"),
        ("ftp://api.example.com", "is not a host"),
        ("api.example.com:8443", "is not a host"),  # a port needs its scheme
    ]:
        with pytest.raises(ValueError, match=why):
            Binding.parse(bad)
    wildcard = Binding.parse("*.example.com")
    assert wildcard.allows(Origin.of("https", "eu.example.com", None))
    assert not wildcard.allows(Origin.of("https", "example.com", None))
    assert not wildcard.allows(Origin.of("https", "eu.example.com", 8443))


def config(hosts: list[str], upstream: str) -> dict[str, Any]:
    return {
        "credential": [{"name": "model", "hosts": hosts}],
        "gateway": [
            {
                "name": "model",
                "upstream": upstream,
                "credential": "model",
                "base_url_env": "MODEL_BASE_URL",
                "api_key_env": "MODEL_API_KEY",
            }
        ],
    }


def test_a_gateway_upstream_must_be_one_of_its_credentials_origins() -> None:
    parse_config(config(["http://127.0.0.1:8765"], "http://127.0.0.1:8765/v1"))
    parse_config(config(["api.openai.com"], "https://api.openai.com/v1"))
    parse_config(config(["api.openai.com"], "https://api.openai.com:443/v1"))
    for hosts, upstream, message in [
        (["127.0.0.1"], "http://127.0.0.1:8765/v1", "is not among credential 'model'"),
        (["http://127.0.0.1:8765"], "http://127.0.0.1:8766/v1", "is not among"),
        (["api.openai.com"], "https://api.openai.com:8443/v1", "is not among"),
        (["api.openai.com"], "https://x\\@api.openai.com/v1", "gateway[0].upstream"),
        (["api.openai.com"], "https://x@api.openai.com/v1", "gateway[0].upstream"),
        (["http://api.openai.com"], "http://api.openai.com/v1", "credential[0].hosts[0]"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            parse_config(config(hosts, upstream))
