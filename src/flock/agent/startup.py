"""Start-up re-sync: make the kernel agree with the allocation store before serving.

Runs once, after the datastore's first full view (nothing is removed before
that) and before the plugin's socket opens. Each attachment is handled on its
own (kopf's habit): one pod whose network cannot be repaired is logged,
counted and listed in `flock status` and `/metrics`, and never stops the
agent; a crash loop of the whole node over one bad pod is worse than that pod
staying broken until its DEL.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from flock.agent.service import Datapath
from flock.apply.datapath import PodNetSpec
from flock.model.allocation import Allocation

log = logging.getLogger("flock.agent")


@dataclass
class ResyncReport:
    """What the start-up re-sync did; `failures` name the pod and the reason."""

    repaired: int = 0
    veths_removed: int = 0
    routes_removed: int = 0
    netns_gone: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "repaired": self.repaired,
            "veths_removed": self.veths_removed,
            "routes_removed": self.routes_removed,
            "netns_gone": self.netns_gone,
            "failed": len(self.failures),
        }

    def to_status(self) -> dict[str, Any]:
        return {**self.counts(), "failures": list(self.failures)}

    def _fail(self, what: str, err: BaseException, **ids: str) -> None:
        log.error("resync: %s failed: %s", what, err, extra=ids)
        self.failures.append({**ids, "step": what, "error": str(err)})


def resync_kernel(datapath: Datapath, allocations: Sequence[Allocation]) -> ResyncReport:
    """Make the kernel agree with the store (blocking; run before serving).

    Repairs attachments whose pod netns exists but whose network is incomplete
    (`setup_pod` fixes an intact veth pair in place and rebuilds only a broken one);
    removes our veths and pod host routes that no allocation accounts for. A
    failure of any one of these is recorded in the report, and the rest goes on.
    """
    report = ResyncReport()
    for a in allocations:
        if not a.netns or not os.path.exists(a.netns):
            report.netns_gone += 1  # the runtime's DEL or GC will release it
            continue
        pod = f"{a.namespace}/{a.pod}"
        try:
            spec = PodNetSpec.from_allocation(a)
            problems = datapath.check_pod(spec)
            if problems:
                log.info("resync: repairing pod network", extra={"pod": pod, "problems": problems})
                datapath.setup_pod(spec)
                report.repaired += 1
        except Exception as e:
            report._fail("repair", e, pod=pod, container=a.key.container_id)
    known = {a.host_ifname for a in allocations}
    try:
        veths = datapath.list_host_veths()
    except Exception as e:
        report._fail("listing veths", e)
        veths = []
    for veth in veths:
        if veth.name in known:
            continue
        log.info("resync: removing veth no allocation knows", extra={"ifname": veth.name})
        try:
            datapath.teardown_pod(container_id="resync", host_ifname=veth.name)
            report.veths_removed += 1
        except Exception as e:
            report._fail("removing a leftover veth", e, ifname=veth.name)
    expected = {(ip, a.host_ifname) for a in allocations for ip in a.all_addresses}
    try:
        routes = datapath.list_pod_routes()
    except Exception as e:
        report._fail("listing host routes", e)
        routes = []
    for r in routes:
        if (r.dst, r.ifname) in expected:
            continue
        log.info("resync: removing stale host route", extra={"dst": str(r.dst)})
        try:
            datapath.delete_pod_route(r)
            report.routes_removed += 1
        except Exception as e:
            report._fail("removing a stale host route", e, dst=str(r.dst))
    return report


def spawn(
    coro: Coroutine[Any, Any, Any], *, name: str, tasks: list[asyncio.Task[Any]]
) -> asyncio.Task[Any]:
    """Start a named background task whose crash is logged, never silently lost."""
    task = asyncio.create_task(coro, name=name)
    task.add_done_callback(_log_crash)
    tasks.append(task)
    return task


def _log_crash(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    err = task.exception()
    if err is not None:
        log.error(
            "background task %s crashed",
            task.get_name(),
            exc_info=(type(err), err, err.__traceback__),
            extra={"task": task.get_name()},
        )
    else:
        log.warning("background task %s ended", task.get_name(), extra={"task": task.get_name()})
