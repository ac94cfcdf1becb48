"""Start-up re-sync and background tasks, without a kernel: one object's failure is logged,
counted and shown, and never stops the agent (the integration twin is
tests/integration/test_agent_lifecycle.py)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from pathlib import Path
from typing import Any

import pytest

from flock.agent.startup import resync_kernel, spawn
from flock.apply.datapath import DatapathError, HostVeth, PodNetResult, PodNetSpec, PodRoute
from flock.model.allocation import Allocation, AttachmentKey


class BrokenDatapath:
    """Every pod needs repair; `bad` pods cannot be repaired; stray objects cannot go."""

    def __init__(self, bad: set[str]) -> None:
        self.bad = bad
        self.repaired: list[str] = []

    def check_pod(self, spec: PodNetSpec) -> list[str]:
        return ["host veth is missing"]

    def setup_pod(self, spec: PodNetSpec) -> PodNetResult:
        if spec.container_id in self.bad:
            raise DatapathError("eth0 already exists in the pod and flock did not create it")
        self.repaired.append(spec.container_id)
        return None  # type: ignore[return-value]

    def teardown_pod(
        self, *, container_id: str, ifname: str = "eth0", host_ifname: str = ""
    ) -> bool:
        raise DatapathError(f"cannot delete {host_ifname}")

    def list_host_veths(self) -> list[HostVeth]:
        return [HostVeth(name="flkstray0000000", index=9, mac="", up=True)]

    def list_pod_routes(self) -> list[PodRoute]:
        raise OSError("netlink dump interrupted")

    def delete_pod_route(self, route: PodRoute) -> None:
        raise AssertionError("nothing was listed")


def alloc(cid: str, netns: Path) -> Allocation:
    return Allocation(
        key=AttachmentKey(cid, "eth0"),
        namespace="default",
        pod=cid,
        netns=str(netns),
        host_ifname=f"flk{cid:0>11}",
        v4=ipaddress.IPv4Address("10.1.0.1"),
    )


def test_one_pod_that_cannot_be_repaired_is_counted_and_the_rest_goes_on(tmp_path: Path) -> None:
    ns = tmp_path / "netns"
    ns.touch()
    dp = BrokenDatapath(bad={"bad"})
    allocs = [alloc("a", ns), alloc("bad", ns), alloc("c", ns), alloc("gone", tmp_path / "x")]
    report = resync_kernel(dp, allocs)
    assert dp.repaired == ["a", "c"]
    assert report.counts() == {
        "repaired": 2,
        "veths_removed": 0,
        "routes_removed": 0,
        "netns_gone": 1,
        "failed": 3,
    }
    steps = [(f["step"], f.get("pod") or f.get("ifname", "")) for f in report.failures]
    assert steps == [
        ("repair", "default/bad"),
        ("removing a leftover veth", "flkstray0000000"),
        ("listing host routes", ""),
    ]
    assert "flock did not create it" in report.to_status()["failures"][0]["error"]


def test_a_crashed_background_task_is_logged_with_its_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async def crash() -> None:
            raise RuntimeError("inotify went away")

        async def forever() -> None:
            await asyncio.Event().wait()

        tasks: list[asyncio.Task[Any]] = []
        spawn(crash(), name="datastore-events", tasks=tasks)
        spawn(forever(), name="reconcile", tasks=tasks)
        await asyncio.wait([tasks[0]])
        await asyncio.sleep(0)  # done callbacks run in the next loop step
        tasks[1].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    with caplog.at_level(logging.WARNING, logger="flock.agent"):
        asyncio.run(main())
    crashed = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert len(crashed) == 1 and "datastore-events" in crashed[0].getMessage()
    assert crashed[0].exc_info and "inotify went away" in str(crashed[0].exc_info[1])
    assert not [r for r in caplog.records if "reconcile" in r.getMessage()]  # cancelled: quiet
