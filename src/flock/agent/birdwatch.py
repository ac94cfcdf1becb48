"""Watching BIRD: health for `/healthz`, session gauges, and a full resync when BIRD is back.

BIRD runs beside the agent (a sidecar); when it restarts it has lost the export
state the agent gave it, so the first answer after an outage asks the
reconciler for a full pass. Runs as a named background task; `checks` bounds
it for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from flock.agent.metrics import AgentMetrics, Health

log = logging.getLogger("flock.agent")


async def watch_bird(
    bird: Any,
    *,
    health: Health,
    metrics: AgentMetrics,
    on_back: Callable[[], None],
    interval: float = 1.0,
    checks: int | None = None,
) -> None:
    was_up: bool | None = None
    n = 0
    while checks is None or n < checks:
        n += 1
        try:
            up = bool(await bird.check())
        except Exception as e:
            log.warning("BIRD check failed", extra={"error": str(e)})
            up = False
        health.bird_up = up
        metrics.bird_up.set(1 if up else 0)
        if up != was_up:
            log.info("BIRD is %s", "up" if up else "DOWN")
            if up and was_up is False:
                on_back()
            was_up = up
        if up:
            with contextlib.suppress(Exception):
                for peer, st in (await bird.sessions()).items():
                    metrics.bgp_session_up.labels(peer=str(peer)).set(1 if st.established else 0)
        await asyncio.sleep(interval)
