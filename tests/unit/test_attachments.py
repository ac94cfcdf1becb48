"""The attachment table: the one owner of allocation state, with the views derived from it.

Sequences of lifecycle calls (admit, wire, withdraw, unprotect, forget) replayed
against a model: whatever the order, IPAM holds exactly the table's allocations,
the routing index exactly the wired ones, and the policy covers exactly the
admitted, wired and withdrawing ones.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from flock.agent.attachments import Attachments, State
from flock.agent.reconcile import AllocationIndex
from flock.compile.annotations import parse_annotations
from flock.compile.ipam import Ipam
from flock.model.allocation import AttachmentKey
from flock.model.nodeconfig import NodeConfig
from flock.model.request import PodIdentity

NODE = NodeConfig.from_object(
    {
        "apiVersion": "flock.fritzlab.net/v1alpha1",
        "kind": "NodeConfig",
        "metadata": {"name": "n1"},
        "spec": {"cidr6": ["2001:db8:f001::/64"], "cidr4": ["10.1.0.0/24"]},
    }
)

# Allowed moves per state (a verb only makes these; anything else is a bug in the verb).
MOVES = {
    None: ["admit"],
    State.ADMITTED: ["wire", "unprotect", "forget"],
    State.WIRED: ["withdraw"],
    State.WITHDRAWING: ["wire", "unprotect"],
    State.RELEASING: ["forget"],
}


def admit(table: Attachments, n: int) -> None:
    request = parse_annotations({}, node=NODE, namespace="default")
    table.admit(
        AttachmentKey(f"c{n}", "eth0"),
        request,
        namespace="default",
        pod=f"p{n}",
        pod_uid=f"u{n}",
        identity=PodIdentity(namespace="default", pod=f"p{n}"),
        netns=f"/run/netns/p{n}",
        host_ifname=f"flk{n:011d}",
    )


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 4)), max_size=60))
def test_the_views_always_follow_the_table(steps: list[tuple[int, int]]) -> None:
    table = Attachments(Ipam(), AllocationIndex())
    for n, choice in steps:
        key = AttachmentKey(f"c{n}", "eth0")
        entry = table.get(key)
        moves = MOVES[entry.state if entry else None]
        move = moves[choice % len(moves)]
        if move == "admit":
            admit(table, n)
        else:
            getattr(table, move)(key)
        allocs = {a.key: a for a in table.allocations()}
        assert {a.key: a for a in table.ipam.all()} == allocs
        wired = {e.key for e in table if e.state is State.WIRED}
        assert {a.key for a in table.index.all()} == wired
        policed = {e.key for e in table if e.state is not State.RELEASING}
        assert {a.key for a in table.policy_allocations()} == policed
        assert sum(table.counts().values()) == len(table)
        # An address is never held twice.
        ips = [ip for a in allocs.values() for ip in a.all_addresses]
        assert len(ips) == len(set(ips))


def test_loaded_allocations_start_wired_and_forget_releases_the_address() -> None:
    first = Attachments(Ipam(), AllocationIndex())
    admit(first, 1)
    admit(first, 2)
    loaded = Attachments(Ipam(first.allocations()), AllocationIndex())
    assert loaded.counts()["wired"] == 2 and len(loaded.index.all()) == 2
    gone = loaded.forget(AttachmentKey("c1", "eth0"))
    assert gone is not None and loaded.forget(AttachmentKey("c1", "eth0")) is None
    admit(loaded, 3)  # takes the address c1 held (IPv4: lowest free)
    got = loaded.get(AttachmentKey("c3", "eth0"))
    assert got is not None and got.alloc.v4 == gone.v4 and got.state is State.ADMITTED
