"""The NodeConfig `status` subresource: what the agent on a node is doing, for kubectl.

`kubectl get nodeconfigs` shows ASN, BGP sessions up/total, pods and age from
it (printer columns in the CRD); `kubectl describe` shows the conditions and
each peer's session state. The agent hands a `NodeStatusReport` (plain values)
to `NodeStatusWriter.write`, which builds the status (pure, `status_body`) and
merge-patches the status subresource with `fieldValidation=Strict` only when
something changed, so an idle agent writes nothing. A condition keeps its
lastTransitionTime while its status stays the same, as Kubernetes conditions do.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flock.kube.client import ApiError, KubeClient
from flock.model.nodeconfig import API_VERSION

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PeerState:
    address: str
    asn: int
    state: str  # BIRD's protocol state, e.g. "Established", "Active", "Connect"
    info: str = ""  # the last error or a short detail


@dataclass(frozen=True, slots=True)
class NodeStatusReport:
    ready: bool
    reason: str  # CamelCase, e.g. "AgentReady", "NodeConfigInvalid"
    message: str
    agent_version: str
    peers: Sequence[PeerState] = ()
    allocations: Mapping[str, int] = field(default_factory=dict)  # "ipv6"/"ipv4" -> count
    pods: int = 0
    exported_anycast: int = 0
    observed_generation: int = 0


def _time(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(
    type_: str,
    ok: bool,
    reason: str,
    message: str,
    generation: int,
    previous: Mapping[str, Any] | None,
    now: float,
) -> dict[str, Any]:
    status = "True" if ok else "False"
    since = _time(now)
    if previous is not None and previous.get("status") == status:
        since = str(previous.get("lastTransitionTime") or since)
    out: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message[:32768],
        "lastTransitionTime": since,
    }
    if generation:
        out["observedGeneration"] = generation
    return out


def status_body(
    report: NodeStatusReport, previous: Mapping[str, Any] | None, now: float
) -> dict[str, Any]:
    """The status for `report`; `previous` (the last one written) keeps transition times."""
    old_conds = {c.get("type"): c for c in (previous or {}).get("conditions") or []}
    up = sum(1 for p in report.peers if p.state == "Established")
    total = len(report.peers)
    if total == 0:
        bgp_ok, bgp_reason, bgp_msg = True, "NoPeers", "no BGP peers configured"
    elif up == total:
        bgp_ok, bgp_reason, bgp_msg = True, "AllEstablished", f"{up}/{total} sessions established"
    else:
        down = ", ".join(f"{p.address} {p.state}" for p in report.peers if p.state != "Established")
        bgp_ok, bgp_reason, bgp_msg = False, "SessionsDown", f"{up}/{total} established; {down}"
    gen = report.observed_generation
    body: dict[str, Any] = {
        "agentVersion": report.agent_version,
        "conditions": [
            _condition(
                "Ready",
                report.ready,
                report.reason,
                report.message,
                gen,
                old_conds.get("Ready"),
                now,
            ),
            _condition(
                "BGPSessionsEstablished",
                bgp_ok,
                bgp_reason,
                bgp_msg,
                gen,
                old_conds.get("BGPSessionsEstablished"),
                now,
            ),
        ],
        "bgp": {
            "sessions": f"{up}/{total}",
            "sessionsUp": up,
            "sessionsTotal": total,
            "peers": [
                {
                    "address": p.address,
                    "asn": p.asn,
                    "state": p.state,
                    **({"info": p.info} if p.info else {}),
                }
                for p in report.peers
            ],
        },
        "allocations": {k: int(v) for k, v in sorted(report.allocations.items())},
        "pods": report.pods,
        "exportedAnycast": report.exported_anycast,
    }
    if gen:
        body["observedGeneration"] = gen
    return body


class NodeStatusWriter:
    """Writes one node's NodeConfig status; skips writes that would change nothing."""

    def __init__(
        self, client: KubeClient, node_name: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.client = client
        self.node_name = node_name
        self._clock = clock
        self._last: dict[str, Any] | None = None
        self.writes = 0
        self.last_error = ""

    @property
    def path(self) -> str:
        return f"/apis/{API_VERSION}/nodeconfigs/{self.node_name}/status"

    async def write(self, report: NodeStatusReport) -> bool:
        """True if the status was written (or already current); never raises."""
        body = status_body(report, self._last, self._clock())
        if body == self._last:
            return True
        try:
            await self.client.request(
                "PATCH",
                self.path,
                params={"fieldValidation": "Strict"},
                body={"status": body},
                content_type="application/merge-patch+json",
            )
        except ApiError as e:
            self.last_error = str(e)
            if e.status != 404:  # no NodeConfig for this node: nothing to report on
                log.warning(
                    "could not write NodeConfig status",
                    extra={"node": self.node_name, "reason": str(e)},
                )
            return False
        self._last = body
        self.writes += 1
        self.last_error = ""
        return True

    def forget(self) -> None:
        """The NodeConfig was recreated: write the next status whatever the last was."""
        self._last = None
