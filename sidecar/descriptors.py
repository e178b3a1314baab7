"""The sidecar's file-descriptor budget.

Every runtime's sockets may hold a bounded number of connections (`[sidecar].max_connections`
from the runtime's tree and `OUTSIDER_MAX_CONNECTIONS` from elsewhere on the gRPC socket,
`HANDSHAKE_MAX_CONNECTIONS` on the handshake socket). The sidecar raises
its soft descriptor limit to the hard one and checks at start that all channels at their caps
still leave `RESERVE` descriptors for everything else (the vault, logs, the gateway), so one
runtime holding every connection it may hold never makes another's handshake, a restarted
runtime's new channel or a vault write fail for want of a descriptor.
"""

from __future__ import annotations

import resource

from sidecar.server import OUTSIDER_MAX_CONNECTIONS
from soma_runtime.config import ConfigError, SomaConfig
from soma_runtime.jsonline import HANDSHAKE_MAX_CONNECTIONS

RESERVE = 256
# Listening sockets and the watcher's probe connection of one channel.
_PER_CHANNEL_OVERHEAD = 4


def per_channel(config: SomaConfig) -> int:
    caps = config.sidecar.max_connections + OUTSIDER_MAX_CONNECTIONS + HANDSHAKE_MAX_CONNECTIONS
    return caps + _PER_CHANNEL_OVERHEAD


def ensure_budget(config: SomaConfig, supervised: bool) -> int:
    """Raise the soft limit as far as allowed; the limit now in force. `ConfigError` when the
    channels' caps would not fit in it with the reserve to spare."""
    channels = len(config.runtime) if supervised else 1
    needed = channels * per_channel(config) + RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and needed > soft:
        raise ConfigError(
            f"sidecar.max_connections: {channels} channel(s) at "
            f"{per_channel(config)} descriptors each plus a reserve of {RESERVE} need "
            f"{needed} file descriptors, but the limit is {soft} (raise LimitNOFILE= or lower "
            "sidecar.max_connections)"
        )
    return int(soft)
