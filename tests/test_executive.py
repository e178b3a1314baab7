"""The executive: discovery, validation, invocation, SLOs and pathways (section 4)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from soma_runtime import (
    Executive,
    FunctionCard,
    InvalidStimulus,
    PathwayStep,
    Response,
    Stimulus,
    UnknownFunction,
    UnknownOrgan,
)
from tests.fixtures.organs import Acme, Composite, Manual


async def wait_for_in_flight(executive: Executive, name: str, n: int) -> None:
    async def reached() -> None:
        # Polls the executive's own counter with a deadline: there is no event to wait on.
        while next(s for s in executive.function_stats() if s.name == name).in_flight < n:  # noqa: ASYNC110
            await asyncio.sleep(0.001)

    await asyncio.wait_for(reached(), 5)


@pytest.fixture
def executive() -> Executive:
    return Executive([Acme(), Composite(), Manual()])


def names(pairs: list[tuple[str, object]]) -> list[str]:
    return [card.name for _, card in pairs]  # type: ignore[attr-defined]


def test_list_functions_includes_sub_organs_under_their_parent(executive: Executive) -> None:
    listed = {card.name: organ for organ, card in executive.list_functions()}
    assert listed["counter.add"] == "composite"
    assert listed["acme.greet"] == "acme"
    assert listed["manual.upper"] == "manual"


def test_search_by_name_description_tag_and_example(executive: Executive) -> None:
    assert names(executive.search_functions("greet"))[0] == "acme.greet"
    assert "counter.add" in names(executive.search_functions("sum"))  # description
    assert "counter.add" in names(executive.search_functions("math"))  # tag
    assert "acme.greet" in names(executive.search_functions("new user"))  # example words
    assert executive.search_functions("no-such-word") == []


def test_search_needs_every_word_and_ranks_name_hits_first(executive: Executive) -> None:
    assert names(executive.search_functions("double integer")) == ["composite.double"]
    ranked = names(executive.search_functions("math"))
    assert set(ranked) == {"counter.add", "composite.double"}
    assert names(executive.search_functions("add"))[0] == "counter.add"


def test_search_with_tag_and_empty_query_lists_the_tag(executive: Executive) -> None:
    assert names(executive.search_functions("", tag="math")) == ["composite.double", "counter.add"]
    assert names(executive.search_functions("add", tag="MATH")) == ["counter.add"]
    assert executive.search_functions("", tag="absent") == []


def test_functions_with_tag(executive: Executive) -> None:
    assert set(names(executive.functions_with_tag("greeting"))) == {"acme.greet"}


def test_get_organ_card(executive: Executive) -> None:
    card = executive.get_organ_card("composite")
    assert card is not None
    assert [s.name for s in card.sub_organs] == ["counter"]
    assert executive.get_organ_card("nope") is None


def test_validate_stimulus(executive: Executive) -> None:
    executive.validate_stimulus("acme", "acme.greet", {"name": "Ada"})
    with pytest.raises(InvalidStimulus) as info:
        executive.validate_stimulus("acme", "acme.greet", {"name": 5})
    assert info.value.path == "$.name"
    assert "string" in info.value.message
    with pytest.raises(UnknownOrgan):
        executive.validate_stimulus("nope", "acme.greet", {})
    with pytest.raises(UnknownFunction):
        executive.validate_stimulus("manual", "acme.greet", {})


async def test_stimulate_organ_routes_sub_organ_functions_through_the_parent(
    executive: Executive,
) -> None:
    response = await executive.stimulate_organ("composite", "counter.add", {"a": 2, "b": 3})
    assert response.ok and response.output == {"a": 5, "b": 1}
    wrong = await executive.stimulate_organ("acme", "counter.add", {"a": 2, "b": 3})
    assert wrong.output == {"error": "UnsupportedOperation", "op": "counter.add"}
    with pytest.raises(UnknownOrgan):
        await executive.stimulate_organ("nope", "counter.add", {})


async def test_invalid_input_names_the_path_and_never_reaches_the_organ(
    executive: Executive,
) -> None:
    response = await executive.stimulate(Stimulus("acme.greet", {"name": "", "x": 1}, {}))
    assert response.output["error"] == "InvalidInput"
    assert response.output["path"].startswith("$")


async def test_validation_messages_never_echo_the_value(executive: Executive) -> None:
    secret = "sk-live-0123456789abcdef"
    response = await executive.stimulate(Stimulus("counter.add", {"a": secret, "b": 1}, {}))
    assert response.output["error"] == "InvalidInput"
    assert response.output["path"] == "$.a"
    assert secret not in str(response.output)


async def test_an_organ_that_raises_is_internal_without_a_trace(executive: Executive) -> None:
    response = await executive.stimulate(Stimulus("acme.fail", {}, {"trace_id": "abc"}))
    assert not response.ok
    assert response.output["error"] == "Internal"
    assert response.output["trace_id"] == "abc"
    assert "hunter2" not in str(response.output) and "Traceback" not in str(response.output)
    # and the executive keeps serving
    assert (await executive.stimulate(Stimulus("acme.greet", {"name": "Ada"}, {}))).ok


async def test_organ_failure_is_a_typed_answer(executive: Executive) -> None:
    response = await executive.stimulate(Stimulus("acme.refuse", {"key": "k1"}, {}))
    assert response.output == {"error": "NotFound", "message": "no such thing", "key": "k1"}


async def test_queue_cap_answers_overloaded_at_once(executive: Executive) -> None:
    slow = [
        asyncio.create_task(executive.stimulate(Stimulus("acme.slow", {"ms": 300}, {})))
        for _ in range(2)
    ]
    await wait_for_in_flight(executive, "acme.slow", 2)
    over = await asyncio.wait_for(executive.stimulate(Stimulus("acme.slow", {"ms": 0}, {})), 0.2)
    assert over.output["error"] == "Overloaded"
    assert over.output["queue_cap"] == 2
    assert all(r.ok for r in await asyncio.gather(*slow))
    after = await executive.stimulate(Stimulus("acme.slow", {"ms": 0}, {}))
    assert after.ok


async def test_admission_comes_before_the_work_done_for_a_call(executive: Executive) -> None:
    """An overloaded function answers before its credentials are resolved (a decrypt and an
    audit write); a call answered in the organ's place gives its slot back."""
    resolved: list[str] = []

    async def resolve(organ: str, card: FunctionCard, stimulus: Stimulus) -> Stimulus | Response:
        resolved.append(stimulus.op)
        if stimulus.input["ms"] == 1:
            return Response.failure("CredentialUnavailable", op=stimulus.op)
        return dataclasses.replace(stimulus, credentials={"key": "value"})

    slow = [
        asyncio.create_task(executive.stimulate(Stimulus("acme.slow", {"ms": 300}, {}), resolve))
        for _ in range(2)
    ]
    await wait_for_in_flight(executive, "acme.slow", 2)
    over = await executive.stimulate(Stimulus("acme.slow", {"ms": 0}, {}), resolve)
    assert over.output["error"] == "Overloaded"
    assert len(resolved) == 2  # the refused call cost no resolution
    assert all(r.ok for r in await asyncio.gather(*slow))
    answered = await executive.stimulate(Stimulus("acme.slow", {"ms": 1}, {}), resolve)
    assert answered.output["error"] == "CredentialUnavailable"
    stats = {s.name: s for s in executive.function_stats()}["acme.slow"]
    assert stats.in_flight == 0


async def test_stats_record_latency_and_error_rate_against_the_slo(executive: Executive) -> None:
    for _ in range(9):
        await executive.stimulate(Stimulus("acme.greet", {"name": "Ada"}, {}))
    await executive.stimulate(Stimulus("acme.greet", {}, {}))  # caller error
    for _ in range(3):
        await executive.stimulate(Stimulus("acme.fail", {}, {}))
    stats = {s.name: s for s in executive.function_stats()}
    greet = stats["acme.greet"]
    assert greet.count == 10 and greet.caller_errors == 1 and greet.error_rate == 0.0
    assert greet.p50_ms is not None and greet.p50_ms <= greet.p95_ms <= greet.p99_ms  # type: ignore[operator]
    assert greet.meets_slo
    fail = stats["acme.fail"]
    assert fail.errors == 3 and fail.error_rate == 1.0 and not fail.meets_slo
    assert fail.errors_by_kind == {"Internal": 3}


async def test_pathway_feeds_each_output_to_the_next_step(executive: Executive) -> None:
    steps = [
        PathwayStep("composite", "composite.double"),
        PathwayStep("composite", "counter.add"),
        PathwayStep("composite", "composite.double"),
    ]
    response = await executive.pathway(steps, {"a": 3, "b": 4})
    assert response.ok
    assert response.output == {"a": 2 * (6 + 4), "b": 1}
    assert response.latency_ms > 0


async def test_pathway_stops_at_the_first_failure(executive: Executive) -> None:
    steps = [
        PathwayStep("composite", "composite.double"),
        PathwayStep("acme", "acme.greet"),
        PathwayStep("acme", "acme.fail"),
    ]
    response = await executive.pathway(steps, {"a": 1})
    assert not response.ok
    assert response.output["error"] == "InvalidInput" and response.output["step"] == 1
    stats = {s.name: s for s in executive.function_stats()}
    assert stats["acme.fail"].count == 0


async def test_pathway_with_an_unknown_organ_runs_nothing(executive: Executive) -> None:
    with pytest.raises(UnknownOrgan):
        await executive.pathway(
            [PathwayStep("acme", "acme.slow"), PathwayStep("ghost", "x.y")], {"ms": 0}
        )
    assert {s.name: s for s in executive.function_stats()}["acme.slow"].count == 0


def test_duplicate_organs_and_functions_are_refused() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        Executive([Acme(), Acme()])

    class Impostor(Acme):
        card = Acme.card.model_copy(update={"name": "impostor"})

    with pytest.raises(ValueError, match="already provided by organ 'acme'"):
        Executive([Acme(), Impostor()])


async def test_start_and_stop_reach_every_organ() -> None:
    acme = Acme()
    executive = Executive([acme, Manual()])
    await executive.start()
    assert acme.started
    await executive.stop()
    assert acme.stopped
