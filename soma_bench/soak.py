"""The long case: does the sidecar's memory stay flat over a million calls after warm-up?

`sdk.AsyncClient` (its default transport) keeps 32 calls in flight against the standalone
sidecar; its RSS is read after a warm-up of a tenth of the calls and then every tenth.
Growth is the last reading less the first after warm-up; a leak of even 100 bytes a call
would show as 90 MB over a million calls, far above allocator noise.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from typing import Any

from soma_bench.clients import Endpoints, Spec, build
from soma_bench.measure import batch, progress, rss_kb

INFLIGHT = 32
GROWTH_LIMIT_KB = 4096  # what allocator arenas and caches may still move after warm-up


async def long_run(endpoints: Endpoints, calls: int) -> dict[str, Any]:
    assert endpoints.sidecar_pid is not None
    tenth = max(1, calls // 10)
    samples: list[tuple[int, int | None]] = []
    async with AsyncExitStack() as stack:
        spec = Spec(name="long", kind="async_client", baseline=None, inflight=INFLIGHT)
        case = await build(spec, endpoints, stack)
        began = time.monotonic()
        await batch(case.call, tenth, INFLIGHT)  # warm-up
        samples.append((tenth, rss_kb(endpoints.sidecar_pid)))
        done = tenth
        while done < calls:
            step = min(tenth, calls - done)
            await batch(case.call, step, INFLIGHT)
            done += step
            samples.append((done, rss_kb(endpoints.sidecar_pid)))
            progress(f"  long: {done:,}/{calls:,} calls, sidecar RSS {samples[-1][1]} KiB")
        seconds = time.monotonic() - began
    readings = [kb for _, kb in samples if kb is not None]
    growth = readings[-1] - readings[0]
    return {
        "calls": calls,
        "inflight": INFLIGHT,
        "seconds": round(seconds, 1),
        "rss_kb_samples": samples,
        "rss_growth_kb": growth,
        "growth_limit_kb": GROWTH_LIMIT_KB,
        "met": growth <= GROWTH_LIMIT_KB,
    }
