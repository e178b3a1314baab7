"""The contract tests of section 5 of the specification, for every built-in organ."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from jsonschema.validators import validator_for

from sidecar.loading import resolve_organ_class
from sidecar.organs import BUILTIN_ORGANS
from soma_runtime import Executive, Organ, OrganEnvironment, Stimulus

# One valid input per function, and inputs its schema must refuse. A built-in function
# missing here fails `test_every_function_has_contract_inputs`.
VALID: dict[str, dict[str, Any]] = {
    "system.echo": {"param": "value", "nested": {"list": [1, 2, 3]}},
    "system.ping": {},
}
INVALID: dict[str, list[Any]] = {
    "system.echo": ["not an object", [1, 2]],
    "system.ping": [{"wrong": "schema"}, 7],
}


@pytest.fixture(params=sorted(BUILTIN_ORGANS))
async def organ(request: pytest.FixtureRequest, tmp_path: Path) -> Organ:
    organ = resolve_organ_class(request.param)()
    organ.configure(
        {}, OrganEnvironment(state_dir=tmp_path / "state", runtime_dir=tmp_path / "run")
    )
    await organ.start()
    yield organ
    await organ.stop()


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


def test_schemas_are_valid_json_schema(organ: Organ) -> None:
    for fn in organ.describe().all_functions():
        for schema in (fn.input_schema, fn.output_schema):
            validator_for(schema).check_schema(schema)


def test_every_function_has_contract_inputs(organ: Organ) -> None:
    names = {fn.name for fn in organ.describe().all_functions()}
    assert names <= VALID.keys(), f"add contract inputs for {sorted(names - VALID.keys())}"


async def test_stimulus_response_contract(organ: Organ) -> None:
    executive = Executive([organ])
    for fn in organ.describe().all_functions():
        response = await executive.stimulate(Stimulus(fn.name, VALID[fn.name], {"trace_id": "t"}))
        assert response.ok, (fn.name, response.output)
        assert response.latency_ms > 0
        validator_for(fn.output_schema)(fn.output_schema).validate(response.output)

    response = await organ.stimulate(Stimulus("nonexistent.function", {}, {}))
    assert not response.ok
    assert response.output == {"error": "UnsupportedOperation", "op": "nonexistent.function"}


async def test_valid_and_invalid_inputs(organ: Organ) -> None:
    executive = Executive([organ])
    card = organ.describe()
    for fn in card.all_functions():
        executive.validate_stimulus(card.name, fn.name, VALID[fn.name])
        for bad in INVALID[fn.name]:
            response = await executive.stimulate(Stimulus(fn.name, bad, {}))
            assert not response.ok
            assert response.output["error"] == "InvalidInput"
            assert response.output["path"].startswith("$")


async def test_sub_organ_routing(organ: Organ) -> None:
    for sub in organ.describe().sub_organs:
        for fn in sub.functions:
            response = await organ.stimulate(Stimulus(fn.name, VALID[fn.name], {}))
            assert response.ok, (fn.name, response.output)
