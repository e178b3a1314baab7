"""The shape every example agent shares: work on a timer until SIGTERM or SIGINT."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable


def every(seconds: float, work: Callable[[int], None]) -> None:
    """Call `work(n)` for n = 1, 2, ... every `seconds` until the process is asked to stop."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    n = 0
    while not stop.is_set():
        n += 1
        work(n)
        stop.wait(seconds)
