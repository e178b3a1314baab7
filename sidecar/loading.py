"""Turning the configuration's `organs` list into configured organ instances.

An entry is a built-in short name (`"system"`) or an import path `"module:Class"`. The class
is instantiated with no arguments; settings reach it through `Organ.configure`, which gets the
`[organ.<name>]` table named after the organ's card (an empty table when there is none), and
the services the host shares with its organs (the sidecar's vault) through `OrganEnvironment`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from sidecar.organs import BUILTIN_ORGANS
from soma_runtime import Organ, OrganEnvironment
from soma_runtime.cards import OrganCard
from soma_runtime.config import ConfigError, SomaConfig


def resolve_organ_class(spec: str) -> type[Organ]:
    """The organ class a config entry names; `ValueError` says why it cannot be used."""
    path = BUILTIN_ORGANS.get(spec, spec)
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        known = ", ".join(sorted(BUILTIN_ORGANS))
        raise ValueError(
            f"{spec!r} is neither a built-in organ ({known}) nor a 'module:Class' path"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Organ)):
        raise ValueError(f"{path!r} is not an Organ subclass")
    return cls


_NO_SERVICES: Mapping[type[Any], object] = MappingProxyType({})


def load_organs(
    config: SomaConfig, services: Mapping[type[Any], object] = _NO_SERVICES
) -> list[Organ]:
    """Instantiate and configure every organ of `config.sidecar.organs`, in order, then one
    organ per `[[upstream]]` MCP server (which takes no `[organ.<name>]` table)."""
    env = OrganEnvironment(config.state_dir, config.runtime_dir, services)
    organs: list[Organ] = []
    names: set[str] = set()
    for index, spec in enumerate(config.sidecar.organs):
        key = f"sidecar.organs[{index}]"
        try:
            organ = resolve_organ_class(spec)()
            name = organ.describe().name
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        except Exception as exc:
            raise ConfigError(
                f"{key}: {spec!r} failed to load: {type(exc).__name__}: {exc}"
            ) from None
        if name in names:
            raise ConfigError(f"{key}: organ {name!r} is listed twice")
        names.add(name)
        try:
            organ.configure(config.organ.get(name, {}), env)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"organ.{name}: {exc}") from None
        organs.append(organ)
    # An upstream's functions are `<name>.<tool>`: no organ may have that namespace, now or
    # once a built-in organ is added to the list.
    builtins = [resolve_organ_class(spec)().describe() for spec in BUILTIN_ORGANS]
    taken = _namespaces(builtins, "built-in organ") | _namespaces(
        [organ.describe() for organ in organs], "organ"
    )
    if config.upstream:
        from sidecar.upstream.organ import UpstreamOrgan  # the mcp SDK: for upstreams only
    for index, upstream in enumerate(config.upstream):
        holder = taken.get(upstream.name)
        if holder is not None:
            raise ConfigError(
                f"upstream[{index}].name: {upstream.name!r} is taken by the {holder}; "
                "give the upstream another name"
            )
        organs.append(UpstreamOrgan(upstream, env, config.sidecar.max_message_bytes))
    unused = sorted(set(config.organ) - {organ.describe().name for organ in organs})
    if unused:
        raise ConfigError(f"organ.{unused[0]}: no organ of that name is loaded")
    return organs


def _namespaces(cards: list[OrganCard], kind: str) -> dict[str, str]:
    """Each first segment of a function name the organs of `cards` use, or could use (their
    names, their sub-organs' names), and what uses it."""
    taken: dict[str, str] = {}
    for card in cards:
        organ = f"{kind} {card.name!r}"
        taken.setdefault(card.name, organ)
        for sub in card.sub_organs:
            taken.setdefault(sub.name, f"sub-organ {sub.name!r} of {organ}")
        for function in card.all_functions():
            taken.setdefault(function.name.split(".")[0], f"function {function.name!r} of {organ}")
    return taken
