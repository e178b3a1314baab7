"""Capability cards: the fields of the UMA + MCP specification, validated by pydantic.

A card is what discovery, validation, the MCP bridge and the exported `cards/` files are
built from, so a card that could mislead any of them is refused when it is built:
schemas must be valid JSON Schema, names must be dotted and unique, and nothing may hold a
JSON `null` (TOML has no null, and exported cards must round-trip).

A function's schemas are written by hand as JSON Schema dicts, or derived from typed models
with `schema_of` (a pydantic model, or a `typing_extensions.TypedDict` whose handlers then get
typed dicts), as the mcp SDK derives tool schemas from signatures.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, JsonSchemaValue
from pydantic_core import CoreSchema

FUNCTION_NAME = r"^[a-z][a-z0-9_-]*(\.[a-z][a-z0-9_-]*)+$"
ORGAN_NAME = r"^[a-z][a-z0-9_-]*$"
CREDENTIAL_REF = r"^(input:[a-z_][a-z0-9_]*|[a-z0-9][a-z0-9_-]{0,63})$"


def schema_of(shape: type[Any]) -> dict[str, Any]:
    """The JSON Schema of a typed model, for a card's `input_schema` or `output_schema`.

    `Annotated[..., Field(...)]` constraints become the schema's (`pattern`, bounds, lengths),
    `NotRequired` fields are left out of `required`, `ConfigDict(extra="forbid")` is
    `additionalProperties: false`, and nested models stay in `$defs` (the validator resolves
    them). The titles pydantic derives from Python names are dropped: they only repeat them.
    """
    return TypeAdapter(shape).json_schema(schema_generator=_Untitled)


class _Untitled(GenerateJsonSchema):
    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def generate(self, schema: CoreSchema, mode: JsonSchemaMode = "validation") -> JsonSchemaValue:
        generated = super().generate(schema, mode)
        for model in [generated, *generated.get("$defs", {}).values()]:
            model.pop("title", None)
        return generated


class _Card(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ResidencyPolicy(StrEnum):
    """Where a function may execute."""

    LOCAL = "Local"
    REGIONAL = "Regional"
    GLOBAL = "Global"


class SloConfig(_Card):
    """Service level objectives of one function; `queue_cap` bounds its in-flight calls."""

    p95_latency_ms: int = Field(ge=0)
    max_error_rate: float = Field(ge=0.0, le=1.0)
    queue_cap: int | None = Field(default=None, ge=1)


class FunctionCard(_Card):
    """One operation.

    `credentials` is an extension: the credentials the sidecar must resolve for a call, each
    a credential name (`"openai"`) or `"input:<field>"` for the credential the input's field
    names (how `http.request` takes one per call). The sidecar checks the calling runtime may
    use each, decrypts it and hands it to the organ beside the stimulus, never inside it.
    """

    name: str = Field(pattern=FUNCTION_NAME)
    description: str = Field(min_length=1)
    tags: list[str]
    examples: list[str]
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    slo: SloConfig
    residency: ResidencyPolicy
    idempotent: bool
    side_effects: list[str]
    credentials: list[Annotated[str, Field(pattern=CREDENTIAL_REF)]] = Field(default_factory=list)

    @field_validator("input_schema", "output_schema")
    @classmethod
    def _valid_json_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        _reject_null(schema, "$")
        try:
            validator_for(schema).check_schema(schema)
        except SchemaError as exc:
            raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
        return schema


class SubOrganCard(_Card):
    """A component of a composite organ; its functions are reached through the parent."""

    name: str = Field(pattern=ORGAN_NAME)
    description: str = Field(min_length=1)
    tags: list[str]
    functions: list[FunctionCard]


class OrganCard(_Card):
    """Everything discovery needs to know about an organ."""

    name: str = Field(pattern=ORGAN_NAME)
    version: str = Field(min_length=1)
    description: str = Field(min_length=1)
    division: str
    subsystem: str
    tags: list[str]
    execution_modes: list[str]
    functions: list[FunctionCard]
    sub_organs: list[SubOrganCard] = Field(default_factory=list)
    author: str | None = None
    repository: str | None = None

    @model_validator(mode="after")
    def _unique_function_names(self) -> OrganCard:
        seen: set[str] = set()
        for function in self.all_functions():
            if function.name in seen:
                raise ValueError(f"function {function.name!r} is declared twice")
            seen.add(function.name)
        return self

    def all_functions(self) -> list[FunctionCard]:
        """The organ's own functions, then those of its sub-organs."""
        return [*self.functions, *(f for sub in self.sub_organs for f in sub.functions)]

    def function(self, name: str) -> FunctionCard | None:
        """The card of one function (sub-organ functions included), or None."""
        return next((f for f in self.all_functions() if f.name == name), None)


def _reject_null(value: Any, path: str) -> None:
    if value is None:
        raise ValueError(f"{path} is null; cards cannot hold null (TOML has none)")
    if isinstance(value, dict):
        for key, item in value.items():
            _reject_null(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _reject_null(item, f"{path}[{index}]")
