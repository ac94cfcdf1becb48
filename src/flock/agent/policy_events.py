"""Tell a NetworkPolicy's author that flock cannot enforce it, once per reason.

A policy the API server accepted but flock cannot compile fails closed (the
pods it may select are isolated in its directions): the author must learn why,
where they look, on the policy itself. This turns the policy engine's set of
rejected policies, seen after each reconcile pass, into Kubernetes Events
(reason `FlockPolicyRejected`) for the policies that are newly rejected or
rejected for a new reason. A policy fixed and broken again is reported again.
The Kubernetes datastore aggregates repeats on its side as well.
"""

from __future__ import annotations

from collections.abc import Mapping

from flock.agent.datastore.base import PodEvent
from flock.model.policy import RejectedPolicy

REASON = "FlockPolicyRejected"


class RejectedPolicyEvents:
    """Remembers what was reported; `observe` returns only what is new."""

    def __init__(self) -> None:
        self._reported: dict[tuple[str, str], str] = {}

    def observe(self, rejected: Mapping[tuple[str, str], RejectedPolicy]) -> list[PodEvent]:
        events = [
            PodEvent(
                namespace=pol.namespace,
                name=pol.name,
                reason=REASON,
                message=pol.message,
                uid=pol.uid,
                kind="NetworkPolicy",
                api_version="networking.k8s.io/v1",
            )
            for key, pol in sorted(rejected.items())
            if self._reported.get(key) != pol.reason
        ]
        self._reported = {key: pol.reason for key, pol in rejected.items()}
        return events
