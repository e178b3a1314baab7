"""The supervisor's main loop: start everything in order, keep it alive, stop it in order.

Start: the runtime directory's lock and the listening sockets (held for the supervisor's
whole life and handed to each sidecar it starts), the sidecar, then (once it serves) every
runtime; then READY=1. Stop (SIGTERM or SIGINT): STOPPING=1, runtimes first (SIGTERM, grace,
SIGKILL; each with every process it started), then the sidecar, then any orphan still
adopted. If the sidecar is given up on (FATAL), the supervisor stops the runtimes and exits 1,
so that systemd can restart the whole service; if the sidecar refused its setup (exit 2 before
it served: a bad organ, key or path), or a runtime's command cannot be executed at its first
start (a typo, a missing file), at once and with 2, which the unit's
`RestartPreventExitStatus=2` does not restart. Every wait of the stop is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Awaitable
from typing import Any

import structlog

from soma_runtime import jsonline, runtime_lock
from soma_runtime.config import SomaConfig
from soma_runtime.exit_status import SETUP_ERROR
from soma_runtime.gateway_sockets import bridge_listener
from soma_runtime.layout import RuntimeLayout
from soma_runtime.supervisor import keeper
from soma_runtime.supervisor.child import State, Supervised
from soma_runtime.supervisor.children import RuntimeChild, SidecarChild, gateway_socket
from soma_runtime.supervisor.control import same_user
from soma_runtime.supervisor.ending import end
from soma_runtime.supervisor.notify import Notifier
from soma_runtime.supervisor.reaper import REAPER
from soma_runtime.supervisor.sidecar_link import SidecarLink
from soma_runtime.unix import Peer, ensure_private_dir, remove_socket

log = structlog.get_logger(component="supervisor")
# Seconds a child's task gets, after its process is stopped, to unregister it and drain its
# output; one still running then is cancelled.
_SETTLE = 10.0
# Seconds the output of stopped children gets to reach EOF once every process is gone.
_DRAIN = 1.0


class Supervisor:
    def __init__(self, config: SomaConfig, notifier: Notifier | None = None) -> None:
        self.config = config
        self.layout = RuntimeLayout(config.runtime_dir)
        self.notifier = notifier or Notifier()
        self.link = link = SidecarLink(self.layout.admin_socket)
        with contextlib.ExitStack() as held:
            # Before any port is bound: a second supervisor is refused, not met with "in use".
            # Passed by `make run`, which took it before touching the directory, or taken.
            lock = runtime_lock.inherit(config.runtime_dir, "soma supervise", os.environ)
            held.callback(lock.release)
            self.gateway_sockets = {
                r.name: held.enter_context(gateway_socket()) for r in config.runtime if r.gateways
            }
            bridges = {b.name: held.enter_context(bridge_listener(b)) for b in config.bridge}
            # The lock and the listening sockets end with the supervisor, not with a sidecar.
            self._held = held.pop_all()
        self.sidecar = SidecarChild(config, link, lock.fd, self.gateway_sockets, bridges)
        self.runtimes = [
            RuntimeChild(config, spec, link, self.layout, self._port(spec.name))
            for spec in config.runtime
        ]
        for child in self.children:
            child.on_change = self._status_changed
        self._stop = asyncio.Event()
        self._ready = False

    def _port(self, runtime: str) -> int | None:
        sock = self.gateway_sockets.get(runtime)
        return sock.getsockname()[1] if sock is not None else None

    @property
    def children(self) -> list[Supervised]:
        return [self.sidecar, *self.runtimes]

    async def run(self) -> int:
        """Supervise until a stop signal (exit 0), until the sidecar is given up on (exit 1;
        2 when it refused its setup), or until a runtime's command cannot be executed at its
        first start (exit 2: the configuration names it wrongly)."""
        began = time.monotonic()
        ensure_private_dir(self.config.state_dir)
        self.layout.prepare()
        control = await jsonline.serve(self.layout.supervisor_socket, self._control, same_user)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        watchdog = asyncio.create_task(self._watchdog())
        tasks: dict[Supervised, asyncio.Task[None]] = {}
        # Before any child: if this process is SIGKILLed, the keeper ends what it left.
        guard = keeper.start()
        try:
            REAPER.install()  # before any child starts: its orphans are ours to stop and reap
            REAPER.started(guard.pid, lambda: _reap(guard))  # ours, not an orphan
            tasks[self.sidecar] = asyncio.create_task(self.sidecar.run())
            if await self._first(self.sidecar.ready.wait(), tasks[self.sidecar]):
                for runtime in self.runtimes:
                    tasks[runtime] = asyncio.create_task(runtime.run())
                await self._first(
                    asyncio.gather(*(r.first_start.wait() for r in self.runtimes)),
                    tasks[self.sidecar],
                )
            if (
                not self._stop.is_set()
                and self.sidecar.state != State.FATAL
                and not self._refused()
            ):
                self._ready = True
                log.info(
                    "ready", seconds=round(time.monotonic() - began, 3), runtimes=len(self.runtimes)
                )
                self.notifier.send("READY=1", f"STATUS={self.summary()}")
                await self._first(asyncio.Event().wait(), tasks[self.sidecar])
        finally:
            by_signal = self._stop.is_set()
            self.notifier.send("STOPPING=1", f"STATUS=stopping ({self.summary()})")
            refused = self._refused()
            reason = f"sidecar {self.sidecar.state}"
            if by_signal or refused:
                reason = "signal" if by_signal else f"setup error of {', '.join(refused)}"
            log.info("stopping", reason=reason)
            # Runtimes first, and wait until each is unregistered, then the sidecar.
            await asyncio.gather(*(r.stop() for r in self.runtimes))
            await _settle([t for c, t in tasks.items() if c is not self.sidecar])
            await self.sidecar.stop()
            await _settle(list(tasks.values()))
            # Orphans whose runtime could not be told (they left its session and environment).
            await end(REAPER.orphans, self._grace(), child="orphans")
            guard.terminate()  # a clean stop leaves nothing for it to do
            await asyncio.to_thread(guard.wait, 5.0)
            REAPER.uninstall()
            await asyncio.gather(*(c.drain(_DRAIN) for c in self.children))
            watchdog.cancel()
            self._held.close()
            control.close()
            remove_socket(self.layout.supervisor_socket)
            log.info("stopped")
        if by_signal:
            return 0
        return SETUP_ERROR if refused else 1

    async def _first(self, awaitable: Awaitable[Any], sidecar_task: asyncio.Task[None]) -> bool:
        """Wait for `awaitable`, a stop signal, or the sidecar task ending (fatal or stopped);
        True when `awaitable` finished first."""
        wanted = asyncio.ensure_future(awaitable)
        stop = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait(
            {wanted, stop, sidecar_task}, return_when=asyncio.FIRST_COMPLETED
        )
        losers = [task for task in (wanted, stop) if task not in done]
        for task in losers:
            task.cancel()
        await asyncio.gather(*losers, return_exceptions=True)
        return wanted in done

    def _refused(self) -> list[str]:
        """The children that refused their setup: nothing here can fix them."""
        return [child.name for child in self.children if child.setup_error]

    def _grace(self) -> float:
        return max(child.policy.stop_timeout for child in self.children)

    def summary(self) -> str:
        running = sum(r.state == State.RUNNING for r in self.runtimes)
        return f"sidecar {self.sidecar.state}; {running}/{len(self.runtimes)} runtimes running"

    def _status_changed(self) -> None:
        if self._ready:
            self.notifier.send(f"STATUS={self.summary()}")

    async def _watchdog(self) -> None:
        """WATCHDOG=1 at half of WATCHDOG_USEC, for as long as this event loop keeps turning."""
        interval = self.notifier.watchdog_interval
        if interval is None:
            return
        while True:
            self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _control(self, message: jsonline.Message, peer: Peer) -> jsonline.Message:
        if message.get("op") == "status":
            return {
                "ok": True,
                "summary": self.summary(),
                "children": [child.snapshot() for child in self.children],
                # Calls per runtime and per function against its SLO; None: no answer.
                "sidecar": await self.link.status(),
            }
        return {"ok": False, "error": "bad_request", "message": "unknown op"}


async def _settle(tasks: list[asyncio.Task[None]]) -> None:
    """Wait for the tasks of stopped children, at most `_SETTLE` seconds; cancel the rest."""
    if not tasks:
        return
    _, late = await asyncio.wait(tasks, timeout=_SETTLE)
    for task in late:
        log.error("child_task_late", task=task.get_name())
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _reap(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        REAPER.reaped(process.pid)
