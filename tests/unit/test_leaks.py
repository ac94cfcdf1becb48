"""The leak decision, replayed over random histories of pods, netns and time.

The property that matters most: an allocation whose pod exists with the same
uid is never released, under any churn. The rest: nothing before the grace
period, nothing while its netns exists, and a pod recreated with a new uid does
not protect the old incarnation's allocation.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from flock.compile.leaks import LeakDecision, leaked, pod_alive
from flock.model.allocation import Allocation, AttachmentKey

NAMES = ("a", "b", "c")
UIDS = ("u1", "u2", "u3")


def alloc(i: int, name: str, uid: str, netns: str = "") -> Allocation:
    return Allocation(
        key=AttachmentKey(f"cid{i}", "eth0"),
        namespace="ns",
        pod=name,
        pod_uid=uid,
        netns=netns or f"/run/netns/cni-{i}",
    )


allocations = st.lists(
    st.builds(
        alloc,
        st.integers(0, 20),
        st.sampled_from(NAMES),
        st.sampled_from(("", *UIDS)),
    ),
    max_size=8,
    unique_by=lambda a: a.key,
)
views = st.dictionaries(
    st.tuples(st.just("ns"), st.sampled_from(NAMES)), st.sampled_from(UIDS), max_size=3
)
netns_sets = st.frozensets(st.sampled_from([f"/run/netns/cni-{i}" for i in range(21)]))
# One reconcile pass: (seconds since the last pass, live pods, existing netns).
passes = st.lists(
    st.tuples(st.floats(0, 100, allow_nan=False), views, netns_sets), min_size=1, max_size=12
)


@given(allocs=allocations, history=passes, grace=st.floats(0, 120, allow_nan=False))
def test_replayed_history_never_releases_a_live_pod_or_early(
    allocs: list[Allocation],
    history: list[tuple[float, dict[tuple[str, str], str], frozenset[str]]],
    grace: float,
) -> None:
    now = 1000.0
    state: LeakDecision = LeakDecision()
    held = list(allocs)
    missing_from: dict[AttachmentKey, float] = {}
    for dt, live, netns in history:
        now += dt
        for a in held:  # the test's own record of since when each pod has been gone
            if pod_alive(a, live):
                missing_from.pop(a.key, None)
            else:
                missing_from.setdefault(a.key, now)
        state = leaked(held, live, netns.__contains__, now, grace, state.missing_since)
        for a in state.release:
            uid = live.get((a.namespace, a.pod))
            assert uid is None or (a.pod_uid and uid != a.pod_uid), f"released live pod {a}"
            assert a.netns not in netns, f"released {a} while its netns exists"
            assert now - missing_from[a.key] >= grace, f"released {a} before the grace period"
        assert set(state.missing_since) <= {a.key for a in held}
        released = {a.key for a in state.release}
        held = [a for a in held if a.key not in released]
        for key in released:
            missing_from.pop(key, None)


def test_recreated_pod_with_a_new_uid_does_not_protect_the_old_allocation() -> None:
    old = alloc(1, "a", "u1")
    first = leaked([old], {("ns", "a"): "u2"}, lambda _: False, 0.0, 30.0)
    assert first.release == () and first.missing_since == {old.key: 0.0}
    later = leaked([old], {("ns", "a"): "u2"}, lambda _: False, 30.0, 30.0, first.missing_since)
    assert later.release == (old,)


def test_pod_back_in_the_view_resets_the_clock() -> None:
    a = alloc(1, "a", "u1")
    s1 = leaked([a], {}, lambda _: False, 0.0, 30.0)
    s2 = leaked([a], {("ns", "a"): "u1"}, lambda _: False, 20.0, 30.0, s1.missing_since)
    assert s2.missing_since == {}
    s3 = leaked([a], {}, lambda _: False, 40.0, 30.0, s2.missing_since)
    assert s3.release == () and s3.missing_since == {a.key: 40.0}


def test_netns_still_there_blocks_release_and_without_uid_a_same_name_pod_protects() -> None:
    a = alloc(1, "a", "u1")
    assert leaked([a], {}, lambda _: True, 100.0, 0.0).release == ()
    assert leaked([a], {}, lambda _: False, 100.0, 0.0).release == (a,)
    anon = alloc(2, "b", "")
    assert leaked([anon], {("ns", "b"): "u9"}, lambda _: False, 100.0, 0.0).release == ()
