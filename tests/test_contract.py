"""The contract tests of section 5 of the specification, for every built-in organ."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema.validators import validator_for

from sidecar.loading import resolve_organ_class
from sidecar.organs import BUILTIN_ORGANS
from sidecar.vault.async_vault import AsyncVault
from sidecar.vault.open import open_vault
from soma_runtime import Executive, Organ, OrganEnvironment, Stimulus
from soma_runtime.config import parse_config
from tests.fake_upstream import FakeUpstream

BLOB = base64.b64encode(b"claim form").decode()

# One valid input per function (run in card order, so `vault.store` comes before
# `vault.retrieve`), and inputs its schema must refuse. A built-in function missing here
# fails `test_every_function_has_contract_inputs`. "{url}" is a local upstream's address.
VALID: dict[str, dict[str, Any]] = {
    "system.echo": {"param": "value", "nested": {"list": [1, 2, 3]}},
    "system.ping": {},
    "vault.store": {
        "key": "claim-1",
        "data": BLOB,
        "metadata": {"kind": "form"},
        "embedding": [0.1, 0.2, 0.3],
    },
    "vault.retrieve": {"key": "claim-1"},
    "vault.delete": {"key": "claim-0"},
    "vault.list": {"prefix": "claim-", "limit": 10},
    "similarity.search": {"vector": [0.1, 0.2, 0.25], "k": 3},
    "http.request": {"method": "GET", "url": "{url}/v1/echo"},
}
INVALID: dict[str, list[Any]] = {
    "system.echo": ["not an object", [1, 2]],
    "system.ping": [{"wrong": "schema"}, 7],
    "vault.store": [
        {"wrong": "schema"},
        {"key": "../etc/passwd", "data": BLOB},
        {"key": "a/b", "data": BLOB},
        {"key": "k", "data": 5},
    ],
    "vault.retrieve": [{"wrong": "schema"}, {"key": ".."}, {"key": ""}],
    "vault.delete": [{"wrong": "schema"}],
    "vault.list": [{"limit": 0}, {"limit": 5000}, {"wrong": 1}],
    "similarity.search": [
        {"wrong": "schema"},
        {"vector": []},
        {"vector": ["a"]},
        {"vector": [1.0], "k": 0},
    ],
    "http.request": [
        {"wrong": "schema"},
        {"url": "ftp://example.com"},
        {"url": "http://x", "method": "BREW"},
        {"url": "http://x", "body": "a", "json": {}},
    ],
}


@pytest.fixture(scope="module")
def local_url() -> Iterator[str]:
    upstream = FakeUpstream()
    yield upstream.url
    upstream.close()


def valid_input(name: str, url: str) -> dict[str, Any]:
    return json.loads(json.dumps(VALID[name]).replace("{url}", url))  # type: ignore[no-any-return]


@pytest.fixture(params=sorted(BUILTIN_ORGANS))
async def organ(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Organ]:
    config = parse_config(
        {"soma": {"state_dir": str(tmp_path / "state"), "runtime_dir": str(tmp_path / "run")}}
    )
    vault = AsyncVault(lambda: open_vault(config, durable=False))
    organ = resolve_organ_class(request.param)()
    organ.configure({}, OrganEnvironment(config.state_dir, config.runtime_dir, {AsyncVault: vault}))
    await organ.start()
    yield organ
    await organ.stop()
    await vault.close()


def test_organ_description_complete(organ: Organ) -> None:
    card = organ.describe()
    assert card.description and card.version and card.division and card.subsystem
    assert 3 <= len(card.tags) <= 8
    assert card.execution_modes
    functions = card.all_functions()
    assert functions
    for fn in functions:
        assert len(fn.description) > 20, fn.name
        assert 2 <= len(fn.tags) <= 5, fn.name
        assert 2 <= len(fn.examples) <= 4, fn.name
        assert all(tag == tag.lower() and " " not in tag for tag in fn.tags), fn.name
        assert fn.slo.p95_latency_ms > 0 and fn.slo.queue_cap, fn.name


def test_every_function_has_contract_inputs(organ: Organ) -> None:
    names = {fn.name for fn in organ.describe().all_functions()}
    assert names <= VALID.keys(), f"add contract inputs for {sorted(names - VALID.keys())}"


async def test_stimulus_response_contract(organ: Organ, local_url: str) -> None:
    executive = Executive([organ])
    for fn in organ.describe().all_functions():
        stimulus = Stimulus(fn.name, valid_input(fn.name, local_url), {"trace_id": "t"})
        response = await executive.stimulate(stimulus)
        assert response.ok, (fn.name, response.output)
        assert response.latency_ms > 0
        validator_for(fn.output_schema)(fn.output_schema).validate(response.output)

    response = await organ.stimulate(Stimulus("nonexistent.function", {}, {}))
    assert not response.ok
    assert response.output == {"error": "UnsupportedOperation", "op": "nonexistent.function"}


async def test_valid_and_invalid_inputs(organ: Organ, local_url: str) -> None:
    executive = Executive([organ])
    card = organ.describe()
    for fn in card.all_functions():
        executive.validate_stimulus(card.name, fn.name, valid_input(fn.name, local_url))
        for bad in INVALID[fn.name]:
            response = await executive.stimulate(Stimulus(fn.name, bad, {}))
            assert not response.ok
            assert response.output["error"] == "InvalidInput", (fn.name, bad)
            assert response.output["path"].startswith("$")


async def test_sub_organ_routing(organ: Organ, local_url: str) -> None:
    for sub in organ.describe().sub_organs:
        for fn in sub.functions:
            stimulus = Stimulus(fn.name, valid_input(fn.name, local_url), {})
            response = await organ.stimulate(stimulus)
            assert response.ok, (fn.name, response.output)
