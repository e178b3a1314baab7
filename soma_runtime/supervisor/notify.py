"""systemd's notify protocol, spoken directly (datagrams to $NOTIFY_SOCKET)."""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger(component="supervisor")


class Notifier:
    """Sends `READY=1`, `STATUS=...`, `WATCHDOG=1`, `STOPPING=1`; silent without NOTIFY_SOCKET."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # "@name" is an abstract socket: a leading NUL byte in the address.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID")
        mine = watchdog_pid is None or watchdog_pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2_000_000 if usec.isdigit() and mine else None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def send(self, *assignments: str) -> None:
        if not self._address:
            return
        payload = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Never block the event loop on a receiver that is not reading: drop instead.
                sock.setblocking(False)
                sock.sendto(payload, self._address)
        except BlockingIOError:
            log.warning("notify_dropped", message=assignments[0])
        except OSError as exc:
            log.warning("notify_failed", error=str(exc))
