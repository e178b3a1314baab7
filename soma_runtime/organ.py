"""The `Organ` contract and `RoutedOrgan`, a helper that does the routine parts of one.

An organ is anything with `async stimulate(stimulus) -> Response` and `describe() -> OrganCard`.
`RoutedOrgan` adds what nearly every organ needs: it routes each op to the method declared for
it with `@function(FunctionCard(...))`, forwards sub-organ ops to the sub-organ, measures
`latency_ms`, answers unknown ops with `UnsupportedOperation`, and builds the organ card from the
method declarations so the card and the code cannot disagree.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from soma_runtime.cards import FunctionCard, OrganCard, SubOrganCard
from soma_runtime.contract import Response, Stimulus, unsupported

_S = TypeVar("_S")


@dataclass(frozen=True, slots=True)
class OrganEnvironment:
    """What the host tells an organ about where it runs, and the services it shares.

    `services` maps a type to the host's one instance of it (the sidecar puts its vault handle
    there), so organs share what the host opened instead of opening their own, and the core
    needs to know nothing of what a host provides.
    """

    state_dir: Path
    runtime_dir: Path
    services: Mapping[type[Any], object] = field(default_factory=dict)

    def service(self, kind: type[_S]) -> _S:
        """The host's instance of `kind`; `ValueError` when this host provides none."""
        found = self.services.get(kind)
        if not isinstance(found, kind):
            raise ValueError(f"this host provides no {kind.__name__}, which the organ needs")
        return found


class Organ(ABC):
    """An organ: a module exposing functions described by its capability card.

    Only `stimulate` and `describe` are required. Hosts call the optional hooks in this
    order: `configure` (with the organ's own `[organ.<name>]` config table; raise
    `ValueError` to reject it), `start` before the first call, `stop` at shutdown.
    """

    @abstractmethod
    async def stimulate(self, stimulus: Stimulus) -> Response:
        """Handle one call. Unknown ops answer `UnsupportedOperation`; they do not raise."""

    @abstractmethod
    def describe(self) -> OrganCard:
        """The organ's capability card."""

    def configure(self, settings: Mapping[str, Any], env: OrganEnvironment) -> None:
        """Receive the organ's config table; the default accepts only an empty one."""
        if settings:
            raise ValueError(f"takes no settings (got {sorted(settings)})")

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open resources before the first call."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Release resources at shutdown."""


class OrganFailure(Exception):
    """Raised by a `RoutedOrgan` handler to answer `ok=false` with `{"error": kind, ...}`."""

    def __init__(self, kind: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.details = details

    def response(self, latency_ms: float) -> Response:
        return Response.failure(self.kind, latency_ms, message=self.message, **self.details)


Handler = Callable[[Any, Any, Stimulus], Awaitable[Any]]
_H = TypeVar("_H", bound=Handler)


def function(card: FunctionCard) -> Callable[[_H], _H]:
    """Declare a `RoutedOrgan` method as the handler of `card.name`.

    The method is `async def handler(self, input, stimulus) -> output`; raise `OrganFailure`
    for an expected failure.
    """

    def mark(handler: _H) -> _H:
        handler.__soma_function__ = card  # type: ignore[attr-defined]
        return handler

    return mark


class RoutedOrgan(Organ):
    """An organ whose functions are methods marked with `@function(...)`.

    Subclasses set `card` to the organ-level fields (leave `functions` empty: they are
    collected from the methods) and may list `sub_organs`, whose functions are routed to them.
    """

    card: ClassVar[OrganCard]
    _handlers: ClassVar[dict[str, tuple[FunctionCard, str]]]
    sub_organs: tuple[Organ, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        handlers: dict[str, tuple[FunctionCard, str]] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                card = getattr(value, "__soma_function__", None)
                if isinstance(card, FunctionCard):
                    handlers[card.name] = (card, attr)
        cls._handlers = handlers

    def describe(self) -> OrganCard:
        subs = [_as_sub_organ_card(sub.describe()) for sub in self.sub_organs]
        functions = [card for card, _ in self._handlers.values()]
        return self.card.model_copy(update={"functions": functions, "sub_organs": subs})

    @cached_property
    def _sub_routes(self) -> dict[str, Organ]:
        return {f.name: sub for sub in self.sub_organs for f in sub.describe().all_functions()}

    async def stimulate(self, stimulus: Stimulus) -> Response:
        started = time.perf_counter()
        entry = self._handlers.get(stimulus.op)
        if entry is None:
            sub = self._sub_routes.get(stimulus.op)
            if sub is not None:
                return await sub.stimulate(stimulus)
            return unsupported(stimulus.op, _elapsed_ms(started))
        handler = getattr(self, entry[1])
        try:
            output = await handler(stimulus.input, stimulus)
        except OrganFailure as failure:
            return failure.response(_elapsed_ms(started))
        return Response(ok=True, output=output, latency_ms=_elapsed_ms(started))


def _as_sub_organ_card(card: OrganCard) -> SubOrganCard:
    return SubOrganCard(
        name=card.name, description=card.description, tags=card.tags, functions=card.all_functions()
    )


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
