"""The one owner of allocation state: which attachment holds which addresses, and how far
its network has come.

Before this table the same facts lived in four structures (IPAM, the
reconciler's index, its policy-only holds, the store) that the CNI verbs kept
in step by hand at a dozen sites; the races issue 13 found were exactly where
two of them disagreed. Now every attachment has one entry in one state, the
verbs move it with a few lifecycle calls, and the other views are derived here:

    admit -> ADMITTED -wire-> WIRED -withdraw-> WITHDRAWING -unprotect-> RELEASING -forget-> gone
    (a failed ADD forgets an ADMITTED entry; a DEL that fails half-way, or a
    repeated ADD, wires a WITHDRAWING one again)

- ADMITTED: addresses allocated (IPAM holds them), the pod's policy counts (it
  goes into nftables before the veth exists, SPEC §6), nothing routed yet.
- WIRED: veth and host routes built; in the reconciler's index (anycast routes,
  BGP exports) and in the policy.
- WITHDRAWING: a DEL has begun: out of the index (withdrawn before its veth
  goes) but its policy stays until the veth is gone.
- RELEASING: the veth is gone, the policy is being removed; the addresses are
  still held, so they are not handed out while nftables still names them.
- gone: `forget` released the addresses (IPAM) and dropped the entry.

The store (durable record) is written by the CNI service beside these calls;
`Ipam` stays the pure allocator, owned and driven only from here. Everything
runs on the agent's event loop: no locks.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flock.agent.reconcile import AllocationIndex
from flock.compile.ipam import Ipam
from flock.model.allocation import Allocation, AttachmentKey
from flock.model.request import PodIdentity, PodRequest


class State(enum.Enum):
    ADMITTED = "admitted"
    WIRED = "wired"
    WITHDRAWING = "withdrawing"
    RELEASING = "releasing"


# States whose allocation the policy covers (verdict-map entries, peer sets).
_POLICED = frozenset({State.ADMITTED, State.WIRED, State.WITHDRAWING})


@dataclass(slots=True)
class Attachment:
    alloc: Allocation
    state: State

    @property
    def key(self) -> AttachmentKey:
        return self.alloc.key


class Attachments:
    """Attachment key -> (allocation, state); IPAM and the routing index follow from it.

    `index` is the reconciler's `AllocationIndex`: exactly the WIRED entries.
    Allocations loaded from the store at start are WIRED (the start-up re-sync
    repairs their network before the agent serves).
    """

    def __init__(self, ipam: Ipam, index: AllocationIndex) -> None:
        self.ipam = ipam
        self.index = index
        self._entries: dict[AttachmentKey, Attachment] = {}
        for alloc in ipam.all():
            self._entries[alloc.key] = Attachment(alloc, State.WIRED)
            if alloc.key not in index:
                index.put(alloc)
        self.version = 0  # bumped on every change (the policy view's cache key)
        self._policed: list[Allocation] | None = None

    # ---- reading --------------------------------------------------------------------

    def get(self, key: AttachmentKey) -> Attachment | None:
        return self._entries.get(key)

    def __contains__(self, key: AttachmentKey) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[Attachment]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def allocations(self) -> list[Allocation]:
        """Every allocation held, whatever its state (status, metrics, GC, re-sync)."""
        return [e.alloc for e in self._entries.values()]

    def policy_allocations(self) -> list[Allocation]:
        """What the policy applier is given: every entry the policy covers."""
        if self._policed is None:
            self._policed = [e.alloc for e in self._entries.values() if e.state in _POLICED]
        return self._policed

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in State}
        for e in self._entries.values():
            out[e.state.value] += 1
        return out

    # ---- lifecycle ------------------------------------------------------------------

    def admit(
        self,
        key: AttachmentKey,
        request: PodRequest,
        *,
        namespace: str,
        pod: str,
        pod_uid: str,
        identity: PodIdentity,
        netns: str,
        host_ifname: str,
    ) -> Allocation:
        """Allocate the attachment's addresses (raises `IpamError`); state ADMITTED."""
        if key in self._entries:
            raise ValueError(f"attachment {key} is already admitted")
        alloc = self.ipam.allocate(
            key,
            request,
            namespace=namespace,
            pod=pod,
            pod_uid=pod_uid,
            identity=identity,
            netns=netns,
            host_ifname=host_ifname,
        )
        self._set(alloc, State.ADMITTED)
        return alloc

    def wire(self, key: AttachmentKey) -> Allocation:
        """Its network is built: routed, exported and policed (also undoes `withdraw`)."""
        alloc = self._entry(key).alloc
        self._set(alloc, State.WIRED)
        self.index.put(alloc)
        return alloc

    def withdraw(self, key: AttachmentKey) -> Allocation:
        """A DEL begins: out of the routing index, still policed until its veth is gone."""
        alloc = self._entry(key).alloc
        self.index.remove(key)
        self._set(alloc, State.WITHDRAWING)
        return alloc

    def unprotect(self, key: AttachmentKey) -> None:
        """Its veth is gone (or was never built): its policy may go; addresses still held."""
        alloc = self._entry(key).alloc
        self.index.remove(key)
        self._set(alloc, State.RELEASING)

    def forget(self, key: AttachmentKey) -> Allocation | None:
        """Release its addresses and drop the entry (idempotent)."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.index.remove(key)
        self.ipam.release(key)
        self._changed()
        return entry.alloc

    # ---- internals ------------------------------------------------------------------

    def _entry(self, key: AttachmentKey) -> Attachment:
        entry = self._entries.get(key)
        if entry is None:
            raise KeyError(f"no attachment {key}")
        return entry

    def _set(self, alloc: Allocation, state: State) -> None:
        entry = self._entries.get(alloc.key)
        if entry is None:
            self._entries[alloc.key] = Attachment(alloc, state)
        else:
            entry.alloc, entry.state = alloc, state
        self._changed()

    def _changed(self) -> None:
        self.version += 1
        self._policed = None

    def to_status(self) -> dict[str, Any]:
        return {"states": self.counts()}
