"""Example agent "claims": files a claim through the sidecar every few seconds and keeps it,
encrypted, in the vault organ.

It knows nothing but its environment: `sdk.Client.from_env()` finds the channel, the token
and the handshake socket that `soma supervise` gave this runtime.
"""

from __future__ import annotations

import base64
import json
import os

import sdk
from examples._loop import every


def main() -> None:
    with sdk.Client.from_env() as client:
        runtime = os.environ["SOMA_RUNTIME"]

        def file_claim(n: int) -> None:
            claim = {"claim_id": f"C-{n:04d}", "amount": 100 * n, "currency": "EUR"}
            echoed = client.call("system.echo", claim)
            stored = client.call(
                "vault.store",
                {
                    "key": claim["claim_id"],
                    "data": base64.b64encode(json.dumps(claim).encode()).decode(),
                    "metadata": {"amount": claim["amount"]},
                },
            )
            print(
                f"{runtime}: filed claim {echoed['claim_id']} for {echoed['amount']} EUR "
                f"(kept in the vault, revision {stored['revision']})",
                flush=True,
            )

        every(float(os.environ.get("CLAIMS_INTERVAL", "3")), file_claim)


if __name__ == "__main__":
    main()
