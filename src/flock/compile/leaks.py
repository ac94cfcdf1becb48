"""Which allocations have leaked: the pure decision of the leak reconciler.

containerd 2.4 never sends CNI GC or CHECK, and a DEL can be lost (node crash
between the runtime's bookkeeping and ours, a runtime that gave up). flock
therefore finds leaks itself. An allocation has leaked when, together:

- its pod incarnation is gone from the API: no pod of that namespace/name, or
  one with a different uid (a pod recreated under the same name is a different
  pod; its ADD makes its own allocation);
- that has been so for at least `grace` seconds, counted from the first pass
  that saw it missing (a watch that lags, a DEL that is on its way);
- its network namespace no longer exists (while it does, the runtime still owns
  the sandbox and will send DEL).

An allocation whose pod exists with the same uid is never released, whatever
else holds; nor one without a recorded uid whose namespace/name exists (it
cannot be told apart). The caller confirms each verdict with a GET before
acting (the cache may lag), and runs this only on a synced view.

The state between passes (since when each allocation has been missing) is an
input and an output, so the function stays pure and replayable in tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from flock.model.allocation import Allocation, AttachmentKey

PodKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class LeakDecision:
    release: tuple[Allocation, ...] = ()
    # AttachmentKey -> when its pod was first seen missing (only allocations still held).
    missing_since: Mapping[AttachmentKey, float] = field(default_factory=dict)


def pod_alive(alloc: Allocation, live_pods: Mapping[PodKey, str]) -> bool:
    """Is the allocation's pod incarnation in the view? `live_pods` maps (ns, name) -> uid."""
    uid = live_pods.get((alloc.namespace, alloc.pod))
    if uid is None:
        return False
    return not alloc.pod_uid or not uid or uid == alloc.pod_uid


def leaked(
    allocations: Iterable[Allocation],
    live_pods: Mapping[PodKey, str],
    netns_exists: Callable[[str], bool],
    now: float,
    grace: float,
    missing_since: Mapping[AttachmentKey, float] | None = None,
) -> LeakDecision:
    """The allocations to release now, and the missing-since state for the next pass."""
    before = missing_since or {}
    state: dict[AttachmentKey, float] = {}
    release: list[Allocation] = []
    for alloc in allocations:
        if pod_alive(alloc, live_pods):
            continue
        since = before.get(alloc.key, now)
        state[alloc.key] = since
        if now - since < grace:
            continue
        if alloc.netns and netns_exists(alloc.netns):
            continue
        release.append(alloc)
    return LeakDecision(release=tuple(release), missing_since=state)
