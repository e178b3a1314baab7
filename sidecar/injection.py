"""Credential injection before a call: the executive's `before` hook, for any caller.

What a runtime's channel does for its calls (sidecar/service.py) and a bridge instance does
for its: the credentials the card asks for, checked against what the caller may use,
decrypted after admission (an overloaded function never pays for a decrypt)."""

from __future__ import annotations

import dataclasses

import structlog

from sidecar.credentials import CredentialBroker, needed
from sidecar.vault.store import VaultError
from soma_runtime import FunctionCard, Response, Stimulus

log = structlog.get_logger(component="sidecar")


async def inject_credentials(
    broker: CredentialBroker,
    organ: str,
    card: FunctionCard,
    stimulus: Stimulus,
    *,
    caller: str,
    allowed: frozenset[str],
) -> Stimulus | Response:
    """The stimulus with its credentials; `CredentialDenied` when `caller` may not use one,
    a `CredentialUnavailable` response when the vault cannot give it."""
    names = needed(card, stimulus.input)
    if not names:
        return stimulus
    try:
        credentials = await broker.resolve(
            names, runtime=caller, allowed=allowed, organ=organ, op=stimulus.op
        )
    except VaultError as exc:
        log.error(
            "credential_unavailable",
            runtime=caller,
            op=stimulus.op,
            error=str(exc),
            trace_id=stimulus.context.get("trace_id"),
        )
        return Response.failure("CredentialUnavailable", op=stimulus.op, message=str(exc))
    return dataclasses.replace(stimulus, credentials=credentials)
