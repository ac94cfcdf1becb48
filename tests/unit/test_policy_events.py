"""Events for NetworkPolicies flock cannot enforce: once per policy and reason."""

from __future__ import annotations

from flock.agent.policy_events import REASON, RejectedPolicyEvents
from flock.model.policy import RejectedPolicy


def _rejected(name: str, reason: str) -> RejectedPolicy:
    return RejectedPolicy(namespace="app", name=name, reason=reason, uid=f"uid-{name}")


def test_new_rejection_is_reported_once_on_the_policy() -> None:
    ev = RejectedPolicyEvents()
    bad = _rejected("np1", "ipBlock '010.0.0.0/8' is not a CIDR")
    first = ev.observe({bad.key: bad})
    assert len(first) == 1
    e = first[0]
    assert (e.kind, e.api_version, e.namespace, e.name, e.uid) == (
        "NetworkPolicy",
        "networking.k8s.io/v1",
        "app",
        "np1",
        "uid-np1",
    )
    assert e.reason == REASON and e.warning
    assert "010.0.0.0/8" in e.message and "isolated" in e.message
    assert ev.observe({bad.key: bad}) == []


def test_a_new_reason_and_a_relapse_are_reported_again() -> None:
    ev = RejectedPolicyEvents()
    a = _rejected("np1", "reason A")
    ev.observe({a.key: a})
    b = _rejected("np1", "reason B")
    assert [e.message for e in ev.observe({b.key: b})] == [b.message]
    assert ev.observe({}) == []  # fixed
    assert len(ev.observe({b.key: b})) == 1  # broken again


def test_only_the_new_one_of_several() -> None:
    ev = RejectedPolicyEvents()
    a, b = _rejected("a", "x"), _rejected("b", "y")
    ev.observe({a.key: a})
    assert [e.name for e in ev.observe({a.key: a, b.key: b})] == ["b"]
