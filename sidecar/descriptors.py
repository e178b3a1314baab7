"""The sidecar's file-descriptor budget.

Every runtime's sockets may hold a bounded number of connections (`[sidecar].max_connections`
from the runtime's tree and `OUTSIDER_MAX_CONNECTIONS` from elsewhere on the gRPC socket,
`HANDSHAKE_MAX_CONNECTIONS` on the handshake socket), and so may every HTTP port (each bridge's
`max_connections`, the metrics endpoint's, each runtime's gateway port). The sidecar raises its
soft descriptor limit to the hard one and checks at start that all of them at their caps still
leave `RESERVE` descriptors for everything else (the vault, logs, upstream connections), so a
client holding every connection it may hold never makes a runtime's handshake, a restarted
runtime's new channel or a vault write fail for want of a descriptor.
"""

from __future__ import annotations

import resource

from sidecar.gateway import LIMITS as GATEWAY_LIMITS
from sidecar.server import OUTSIDER_MAX_CONNECTIONS
from soma_runtime.config import ConfigError, SomaConfig
from soma_runtime.jsonline import HANDSHAKE_MAX_CONNECTIONS

RESERVE = 256
# Listening sockets and the watcher's probe connection of one channel.
_PER_CHANNEL_OVERHEAD = 4


def per_channel(config: SomaConfig) -> int:
    caps = config.sidecar.max_connections + OUTSIDER_MAX_CONNECTIONS + HANDSHAKE_MAX_CONNECTIONS
    return caps + _PER_CHANNEL_OVERHEAD


def http_ports(config: SomaConfig, supervised: bool) -> dict[str, int]:
    """Descriptors each kind of HTTP port may hold at its cap (its listening socket too)."""
    ports = {"bridge": sum(b.max_connections + 1 for b in config.bridge)}
    if config.metrics.listen is not None:
        ports["metrics"] = config.metrics.max_connections + 1
    if supervised:  # gateway ports are the supervisor's, one per runtime that uses gateways
        gateways = sum(1 for r in config.runtime if r.gateways)
        ports["gateway"] = gateways * (GATEWAY_LIMITS.max_connections + 1)
    return ports


def ensure_budget(config: SomaConfig, supervised: bool) -> int:
    """Raise the soft limit as far as allowed; the limit now in force. `ConfigError` when the
    caps would not fit in it with the reserve to spare."""
    channels = len(config.runtime) if supervised else 1
    ports = http_ports(config, supervised)
    needed = channels * per_channel(config) + sum(ports.values()) + RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and needed > soft:
        held = ", ".join(f"{kind} ports {n}" for kind, n in ports.items() if n)
        raise ConfigError(
            f"sidecar.max_connections: {channels} channel(s) at "
            f"{per_channel(config)} descriptors each{', ' if held else ''}{held} and a reserve "
            f"of {RESERVE} need {needed} file descriptors, but the limit is {soft} (raise "
            "LimitNOFILE= or lower sidecar.max_connections or a bridge's max_connections)"
        )
    return int(soft)
