"""The executive: discovery, validation, invocation and pathways over a set of organs.

It is the one place a call passes through on its way to an organ, so everything the
contract promises is enforced here, for every organ alike: unknown ops, input validation
(validators compiled once at registration), the `queue_cap` of each function's SLO, the
latency and error record of each function, and an organ that raises.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from soma_runtime.cards import FunctionCard, OrganCard
from soma_runtime.contract import ErrorKind, Response, Stimulus, unsupported
from soma_runtime.organ import Organ
from soma_runtime.search import has_tag, search_functions
from soma_runtime.slo import FunctionStats, FunctionStatsSnapshot
from soma_runtime.validation import InputValidator

log = structlog.get_logger("soma.executive")


class UnknownOrgan(LookupError):
    """No organ of that name is registered."""


class UnknownFunction(LookupError):
    """The organ has no function of that name."""


class InvalidStimulus(ValueError):
    """The input does not match the function's input schema."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True, slots=True)
class PathwayStep:
    """One step of a pathway: the function to call and the context to send with it."""

    organ: str
    function: str
    context: dict[str, str] = field(default_factory=dict)


# Runs after validation and admission, just before the organ: returns the stimulus to
# deliver (with what it resolved for it, such as credentials), answers in the organ's place
# with a Response, or raises to refuse the call outright.
BeforeCall = Callable[[str, FunctionCard, Stimulus], Awaitable[Stimulus | Response]]


@dataclass(slots=True)
class _Route:
    organ_name: str
    organ: Organ
    card: FunctionCard
    validator: InputValidator
    stats: FunctionStats


class Executive:
    """Organs by name and their functions by fully-qualified op."""

    def __init__(self, organs: Iterable[Organ] = ()) -> None:
        self._organs: dict[str, Organ] = {}
        self._cards: dict[str, OrganCard] = {}
        self._routes: dict[str, _Route] = {}
        self._listeners: dict[object, Callable[[], None]] = {}
        for organ in organs:
            self.register(organ)

    def on_change(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` whenever an organ's functions change (`refresh`); returns the
        function that unsubscribes it."""
        token = object()
        self._listeners[token] = listener
        return lambda: self._listeners.pop(token, None) and None

    def register(self, organ: Organ) -> OrganCard:
        """Add an organ; its card is read once and its validators compiled now."""
        card = organ.describe()
        if card.name in self._organs:
            raise ValueError(f"organ {card.name!r} is registered twice")
        self._install(organ, card)
        return card

    def refresh(self, name: str) -> OrganCard:
        """Read a registered organ's card again, for an organ whose functions change while it
        runs (an upstream MCP server's tools): its routes are rebuilt; a function it keeps
        with the same SLO keeps its stats."""
        organ = self._organs.get(name)
        if organ is None:
            raise UnknownOrgan(name)
        card = organ.describe()
        if card.name != name:
            raise ValueError(f"organ {name!r} now calls itself {card.name!r}")
        self._install(organ, card)
        for listener in list(self._listeners.values()):
            listener()
        return card

    def _install(self, organ: Organ, card: OrganCard) -> None:
        old = {n: r for n, r in self._routes.items() if r.organ_name == card.name}
        routes: dict[str, _Route] = {}
        for fn in card.all_functions():
            taken = self._routes.get(fn.name)
            if taken is not None and taken.organ_name != card.name:
                raise ValueError(
                    f"function {fn.name!r} of organ {card.name!r} is already provided by "
                    f"organ {taken.organ_name!r}"
                )
            kept = old.get(fn.name)
            stats = (
                kept.stats if kept and kept.card.slo == fn.slo else FunctionStats(fn.name, fn.slo)
            )
            routes[fn.name] = _Route(card.name, organ, fn, InputValidator(fn.input_schema), stats)
        for fn_name in old:
            del self._routes[fn_name]
        self._organs[card.name] = organ
        self._cards[card.name] = card
        self._routes.update(routes)

    # -- discovery ------------------------------------------------------------------------

    def organ_names(self) -> list[str]:
        return list(self._organs)

    def organ_cards(self) -> list[OrganCard]:
        return list(self._cards.values())

    def get_organ_card(self, name: str) -> OrganCard | None:
        return self._cards.get(name)

    def list_functions(self) -> list[tuple[str, FunctionCard]]:
        """Every `(organ, function card)`, sub-organ functions listed under their parent."""
        return [(route.organ_name, route.card) for route in self._routes.values()]

    def search_functions(
        self, query: str, tag: str | None = None
    ) -> list[tuple[str, FunctionCard]]:
        return search_functions(self.list_functions(), query, tag)

    def functions_with_tag(self, tag: str) -> list[tuple[str, FunctionCard]]:
        return [(organ, card) for organ, card in self.list_functions() if has_tag(card, tag)]

    # -- validation and invocation --------------------------------------------------------

    def _route(self, organ: str, function: str) -> _Route:
        if organ not in self._organs:
            raise UnknownOrgan(organ)
        route = self._routes.get(function)
        if route is None or route.organ_name != organ:
            raise UnknownFunction(f"{organ} has no function {function!r}")
        return route

    def validate_stimulus(self, organ: str, function: str, input: Any) -> None:
        """Raise `UnknownOrgan`, `UnknownFunction` or `InvalidStimulus`; None when valid."""
        problem = self._route(organ, function).validator.first_error(input)
        if problem is not None:
            raise InvalidStimulus(problem.path, problem.message)

    async def stimulate_organ(
        self, organ: str, function: str, input: Any, context: Mapping[str, str] | None = None
    ) -> Response:
        """Call one function of one organ (`UnknownOrgan` if the organ is not registered)."""
        if organ not in self._organs:
            raise UnknownOrgan(organ)
        route = self._routes.get(function)
        stimulus = Stimulus(op=function, input=input, context=dict(context or {}))
        if route is None or route.organ_name != organ:
            return unsupported(function)
        return await self._call(route, stimulus)

    async def stimulate(self, stimulus: Stimulus, before: BeforeCall | None = None) -> Response:
        """Route a stimulus by its op to whichever organ provides it."""
        route = self._routes.get(stimulus.op)
        if route is None:
            return unsupported(stimulus.op)
        return await self._call(route, stimulus, before)

    async def _call(
        self, route: _Route, stimulus: Stimulus, before: BeforeCall | None = None
    ) -> Response:
        started = time.perf_counter()
        stats = route.stats
        problem = route.validator.first_error(stimulus.input)
        if problem is not None:
            stats.record(_elapsed_ms(started), ErrorKind.INVALID_INPUT)
            return Response.failure(
                ErrorKind.INVALID_INPUT,
                _elapsed_ms(started),
                path=problem.path,
                message=problem.message,
            )
        # Admission before any work on the call's behalf (a credential costs a decrypt and an
        # audit write): an overloaded function answers at once.
        if not stats.try_admit():
            return Response.failure(
                ErrorKind.OVERLOADED,
                _elapsed_ms(started),
                op=stimulus.op,
                queue_cap=stats.slo.queue_cap,
                message="too many calls in flight for this function; retry later",
            )
        error: str | None = "Refused"
        try:
            if before is not None:
                prepared = await before(route.organ_name, route.card, stimulus)
                if isinstance(prepared, Response):
                    error = prepared.error or "Failed"
                    return prepared
                stimulus = prepared
            error = "Cancelled"
            # The organ's answer, in this coroutine rather than one more per call; an organ
            # that raises or answers nonsense is an Internal error.
            try:
                response = await route.organ.stimulate(stimulus)
                if not isinstance(response, Response):
                    raise TypeError(f"organ returned {type(response).__name__}, not Response")
            except Exception:
                response = _organ_failed(route, stimulus, started)
            error = None if response.ok else (response.error or "Failed")
            return response
        finally:
            stats.release(_elapsed_ms(started), error)

    async def pathway(self, steps: Iterable[PathwayStep], initial_input: Any) -> Response:
        """Run steps in order, each step's output the next one's input; stop at the first failure.

        All organs are checked before the first step runs, so an unknown organ never leaves a
        pathway half done. A failure's output gains `"step"`: the index of the failing step.
        """
        plan = list(steps)
        for step in plan:
            if step.organ not in self._organs:
                raise UnknownOrgan(step.organ)
        current = initial_input
        latency_ms = 0.0
        cost: float | None = None
        for index, step in enumerate(plan):
            response = await self.stimulate_organ(step.organ, step.function, current, step.context)
            latency_ms += response.latency_ms
            if response.cost is not None:
                cost = (cost or 0.0) + response.cost
            if not response.ok:
                output = (
                    response.output
                    if isinstance(response.output, dict)
                    else {"error": "Failed", "output": response.output}
                )
                return Response(False, {**output, "step": index}, latency_ms, cost)
            current = response.output
        return Response(True, current, latency_ms, cost)

    # -- SLOs and lifecycle -----------------------------------------------------------------

    def function_stats(self) -> list[FunctionStatsSnapshot]:
        """Each function's latency quantiles and error rate, next to its SLO."""
        return [route.stats.snapshot() for route in self._routes.values()]

    async def start(self) -> None:
        """Start every organ in registration order; on a failure, stop those already started."""
        started: list[Organ] = []
        try:
            for organ in self._organs.values():
                await organ.start()
                started.append(organ)
        except BaseException:
            await _stop_all(reversed(started))
            raise

    async def stop(self) -> None:
        """Stop every organ, last registered first; a failing stop is logged, not raised."""
        await _stop_all(reversed(list(self._organs.values())))


async def _stop_all(organs: Iterable[Organ]) -> None:
    for organ in organs:
        try:
            await organ.stop()
        except Exception:
            log.exception("organ_stop_failed", organ=organ.describe().name)


def _organ_failed(route: _Route, stimulus: Stimulus, started: float) -> Response:
    """Logs the organ's exception (with its traceback) and answers an Internal error."""
    trace_id = stimulus.context.get("trace_id")
    log.exception("organ_failed", organ=route.organ_name, op=stimulus.op, trace_id=trace_id)
    details = {"trace_id": trace_id} if "trace_id" in stimulus.context else {}
    return Response.failure(
        ErrorKind.INTERNAL,
        _elapsed_ms(started),
        op=stimulus.op,
        message="the organ failed; the sidecar's log has the details",
        **details,
    )


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
