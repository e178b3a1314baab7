"""The listening sockets the supervisor holds for its whole life and hands to each sidecar it
starts, so that their ports never change across sidecar restarts and nothing else can take
them meanwhile: the gateway's (one per runtime) and the MCP bridge instances' (one each).
They are inherited descriptors, named in an environment variable as `name=fd,name=fd`: the
supervisor writes it (`handed`), the sidecar reads it (`sockets_from_env`)."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from soma_runtime.bridge_config import BridgeSection
from soma_runtime.config import ConfigError
from soma_runtime.listeners import tcp_listener

SOCKETS_ENV = "SOMA_GATEWAY_SOCKETS"
BRIDGE_SOCKETS_ENV = "SOMA_BRIDGE_SOCKETS"


def handed(sockets: Mapping[str, socket.socket]) -> str:
    """The environment variable's value naming `sockets` (their descriptors are passed too)."""
    return ",".join(f"{name}={sock.fileno()}" for name, sock in sockets.items())


def sockets_from_env(variable: str) -> dict[str, socket.socket]:
    """The listening sockets named in the environment variable `variable` (written by
    `handed`), by name; ValueError or OSError when it names no usable descriptor."""
    raw = os.environ.get(variable, "")
    sockets = {}
    for item in filter(None, raw.split(",")):
        name, _, fd = item.partition("=")
        sockets[name] = socket.socket(fileno=int(fd))
    return sockets


def bridge_listener(section: BridgeSection) -> socket.socket:
    """The listening socket of a bridge instance; `ConfigError` when it cannot be bound."""
    try:
        sock = tcp_listener(section.host, section.port)
    except OSError as exc:
        raise ConfigError(
            f"bridge {section.name!r}: cannot listen on {section.listen}: {exc.strerror}"
        ) from None
    sock.setblocking(False)
    return sock
