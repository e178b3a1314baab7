"""Capability cards: validation, TOML/JSON round trips, export, drift check, file search."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Annotated, Any, NotRequired

import pytest
from pydantic import ConfigDict, Field, ValidationError, with_config
from typing_extensions import TypedDict  # pydantic needs it for TypedDict on 3.11

from soma_runtime import FunctionCard, OrganCard, schema_of
from soma_runtime.card_files import (
    card_from_json,
    card_from_toml,
    card_to_json,
    card_to_toml,
    check_cards,
    export_cards,
    functions_of,
    load_cards,
)
from soma_runtime.search import search_functions
from soma_runtime.validation import InputValidator
from tests.fixtures.organs import Acme, Composite, Manual, fn_card
from tests.helpers import REPO, child_env, run_soma

CARDS = [Acme().describe(), Composite().describe(), Manual().describe()]


@pytest.mark.parametrize("organ_card", CARDS, ids=lambda c: c.name)
def test_toml_and_json_round_trip(organ_card: OrganCard) -> None:
    assert card_from_toml(card_to_toml(organ_card)) == organ_card
    assert card_from_json(card_to_json(organ_card)) == organ_card


def test_toml_follows_the_specification_layout() -> None:
    text = card_to_toml(Composite().describe())
    assert "[organ]" in text and "[[functions]]" in text and "[[sub_organs]]" in text
    assert "[[sub_organs.functions]]" in text


def schema_card(schema: dict[str, Any]) -> FunctionCard:
    return fn_card("x.y", schema)


def test_invalid_json_schema_is_refused() -> None:
    with pytest.raises(ValidationError, match="not a valid JSON Schema"):
        schema_card({"type": "no-such-type"})


def test_null_in_a_schema_is_refused_because_toml_has_none() -> None:
    with pytest.raises(ValidationError, match=r"\$.default is null"):
        schema_card({"type": "object", "default": None})


def test_function_names_must_be_dotted_and_unique() -> None:
    with pytest.raises(ValidationError):
        fn_card("nodots", {"type": "object"})
    fn = fn_card("a.b", {"type": "object"})
    with pytest.raises(ValidationError, match="declared twice"):
        OrganCard(
            name="o",
            version="1",
            description="d",
            division="x",
            subsystem="y",
            tags=[],
            execution_modes=[],
            functions=[fn, fn],
        )


@with_config(ConfigDict(extra="forbid", regex_engine="python-re"))
class Line(TypedDict):
    sku: Annotated[str, Field(pattern=r"^(?!x)[a-z]+$")]
    count: Annotated[int, Field(ge=1, le=9)]


@with_config(ConfigDict(extra="forbid"))
class Order(TypedDict):
    lines: Annotated[list[Line], Field(min_length=1)]
    note: NotRequired[Annotated[str, Field(max_length=5)]]


ORDER_BY_HAND = {
    "type": "object",
    "properties": {
        "lines": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^(?!x)[a-z]+$"},
                    "count": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["sku", "count"],
                "additionalProperties": False,
            },
        },
        "note": {"type": "string", "maxLength": 5},
    },
    "required": ["lines"],
    "additionalProperties": False,
}


def test_a_schema_derived_from_a_typed_dict_validates_like_the_hand_written_one() -> None:
    derived = fn_card("shop.order", schema_of(Order)).input_schema
    assert "$defs" in derived  # the nested model stays a reference the validator resolves
    by_model, by_hand = InputValidator(derived), InputValidator(ORDER_BY_HAND)
    line = {"sku": "ab", "count": 2}
    assert by_model.first_error({"lines": [line], "note": "hi"}) is None
    refused: list[Any] = [
        {"lines": [{"sku": "ab\n", "count": 2}]},  # "$" is the end of the text, as in ECMA
        {"lines": [{"sku": "xa", "count": 2}]},
        {"lines": [{"sku": "ab", "count": 10}]},
        {"lines": [{"sku": "ab"}]},
        {"lines": [{**line, "extra": 1}]},
        {"lines": []},
        {"lines": [line], "note": "too long"},
        {"lines": [line], "surprise": True},
        {},
        [],
    ]
    for bad in refused:
        error = by_model.first_error(bad)
        assert error is not None, bad
        assert error == by_hand.first_error(bad), bad


def test_a_card_with_derived_schemas_round_trips() -> None:
    card = (
        Manual()
        .describe()
        .model_copy(update={"functions": [fn_card("shop.order", schema_of(Order))]})
    )
    assert card_from_toml(card_to_toml(card)) == card


def test_unknown_card_fields_are_refused() -> None:
    data = json.loads(card_to_json(Manual().describe()))
    data["functions"][0]["surprise"] = 1
    with pytest.raises(ValidationError, match="surprise"):
        OrganCard.model_validate(data)


def test_export_then_check_then_drift(tmp_path: Path) -> None:
    written = export_cards(CARDS, tmp_path)
    assert sorted(p.name for p in written) == sorted(
        f"{c.name}.{ext}" for c in CARDS for ext in ("toml", "json")
    )
    assert check_cards(CARDS, tmp_path) == []

    (tmp_path / "acme.json").write_text((tmp_path / "acme.json").read_text().replace("1.2.3", "9"))
    (tmp_path / "manual.toml").unlink()
    (tmp_path / "ghost.toml").write_text("")
    problems = {(d.file, d.problem) for d in check_cards(CARDS, tmp_path)}
    assert problems == {
        ("acme.json", "differs"),
        ("manual.toml", "missing"),
        ("ghost.toml", "stale"),
    }


def test_search_works_on_exported_files_alone(tmp_path: Path) -> None:
    export_cards(CARDS, tmp_path)
    found = search_functions(functions_of(load_cards(tmp_path)), "add", None)
    assert [(organ, fn.name) for organ, fn in found] == [("composite", "counter.add")]


def test_repository_cards_match_the_code() -> None:
    """`soma cards check` is part of the suite: exported cards never drift from the code."""
    result = run_soma("cards", "check")
    assert result.returncode == 0, result.stderr


def test_cards_check_fails_on_drift(tmp_path: Path) -> None:
    export = run_soma("cards", "export", "--dir", str(tmp_path))
    assert export.returncode == 0, export.stderr
    (tmp_path / "system.toml").write_text("# edited by hand\n")
    check = run_soma("cards", "check", "--dir", str(tmp_path))
    assert check.returncode == 1
    assert "system.toml: differs" in check.stderr


def test_cards_search_cli_imports_no_organ(tmp_path: Path) -> None:
    """The search reads the files: with organs made unimportable it still answers."""
    export_cards(CARDS, tmp_path)
    probe = (
        "import sys; sys.modules['tests.fixtures.organs'] = None; sys.modules['sidecar'] = None\n"
        "from soma_cli.main import main\n"
        f"main(['cards', 'search', 'add', '--dir', {str(tmp_path)!r}, '--json'])\n"
    )
    result = subprocess.run(
        [__import__("sys").executable, "-c", probe],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert [f["function"]["name"] for f in found] == ["counter.add"]
    assert found[0]["organ"] == "composite"


def test_cards_search_cli_with_tag_only() -> None:
    result = run_soma("cards", "search", "--tag", "health")
    assert result.returncode == 0, result.stderr
    assert "system.ping" in result.stdout and "system.echo" not in result.stdout
