"""Example agent "triage": checks the sidecar's health and what it may call.

Its allow-list has only `system.ping`, so it also shows what a refused call looks like.
"""

from __future__ import annotations

import os

import sdk
from examples._loop import every


def main() -> None:
    with sdk.Client.from_env() as client:
        runtime = os.environ["SOMA_RUNTIME"]
        callable_ops = [m.name for m in client.search()]
        print(f"{runtime}: may call {callable_ops}", flush=True)
        try:
            client.call("system.echo", {"probe": True})
        except sdk.PermissionDenied as exc:
            print(f"{runtime}: system.echo refused as expected ({exc.code})", flush=True)

        def check(n: int) -> None:
            pong = client.call("system.ping", {})
            print(
                f"{runtime}: sidecar pid {pong['pid']} up {pong['uptime_s']}s (check {n})",
                flush=True,
            )

        every(float(os.environ.get("TRIAGE_INTERVAL", "5")), check)


if __name__ == "__main__":
    main()
