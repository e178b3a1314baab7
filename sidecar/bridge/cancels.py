"""Cancellation sent as `notifications/cancelled` (the 2025-era clients' way to cancel).

A stateless instance serves each POST on its own, so a client's cancel arrives as a request of
its own and the SDK, which keeps nothing across requests, drops it: the organ ran to the end.
The instance keeps its tool calls in flight by caller and JSON-RPC request id, and the guard
hands each cancel it sees to `InFlight.cancel` with the caller it authenticated. Request ids
are chosen by clients, so a cancel reaches only a call of the same principal (API key or token
subject); two calls of one principal under one id (two clients sharing a key) are ambiguous,
and neither is cancelled rather than perhaps the wrong one. What cannot be told apart is a late
cancel: client A's cancel that arrives after A's call ended cancels client B's call of the same
key, if B's runs under the same id at that moment (clients number their requests alike). Keys
are per client for that reason too; a 2026-07-28 client cancels by closing the request's
stream instead, which cancels exactly its own call in the guard.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import anyio
import structlog
from mcp.shared.dispatcher import coerce_request_id
from mcp.types import RequestId

log = structlog.get_logger(component="bridge")

T = TypeVar("T")


class InFlight:
    """The tool calls running on one instance, by (principal id, request id)."""

    def __init__(self) -> None:
        self._calls: dict[tuple[str, RequestId], list[anyio.CancelScope]] = {}

    async def run(self, principal: str, request_id: RequestId, call: Awaitable[T]) -> T | None:
        """`call`'s result; None when the caller cancelled it."""
        # "7" and 7 name one request, as the SDK correlates them.
        key = (principal, coerce_request_id(request_id))
        scope = anyio.CancelScope()
        self._calls.setdefault(key, []).append(scope)
        try:
            with scope:
                return await call
        finally:
            scopes = self._calls[key]
            scopes.remove(scope)
            if not scopes:
                del self._calls[key]
        return None

    def cancel(self, principal: str, request_id: RequestId) -> None:
        scopes = self._calls.get((principal, coerce_request_id(request_id)), [])
        if len(scopes) == 1:
            scopes[0].cancel()
        elif scopes:
            log.warning("bridge_cancel_ambiguous", principal=principal, calls=len(scopes))
