"""What the agent needs from the cluster, independent of where it comes from.

The agent runs against two sources: a directory of Kubernetes-shaped manifests
(standalone mode, the lab, the tests) and the Kubernetes API (production). Both
implement `Datastore`, so the CNI service and the reconcile loop are written
once, against typed objects (`NodeConfig`, `Pod`, `Namespace`) and one kind of
change event.

The contract, as the reconcile loop and the CNI verbs rely on it:

- `snapshot()` is the datastore's full current view. Objects in it are frozen.
- `subscribe()` hands out a queue that receives one `Event` per object change.
  Events only say *what* changed; consumers re-read the snapshot (felix-style:
  events mark things dirty, the loop computes from the whole view).
- `synced` becomes true once the first full view has been delivered. Nothing
  that removes kernel state may run before that (a half-loaded view would look
  like pods had vanished).
- `get_pod` / `get_node_config` read *through* any pending watch delivery: a
  container runtime can call ADD before the watch has delivered the pod, and
  the ADD must never fail or use stale annotations because of that race.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from flock.model.nodeconfig import NodeConfig
from flock.model.pod import Namespace, Pod

PodKey = tuple[str, str]  # (namespace, name)


class Kind(enum.StrEnum):
    NODE_CONFIG = "NodeConfig"
    POD = "Pod"
    NAMESPACE = "Namespace"
    NETWORK_POLICY = "NetworkPolicy"
    SECRET = "Secret"


class EventType(enum.StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"
    # The whole view may have changed (first sync, relist, watch overflow).
    RESYNC = "RESYNC"


@dataclass(frozen=True, slots=True)
class Event:
    kind: Kind | None
    type: EventType
    namespace: str = ""
    name: str = ""


class NodeConfigUnavailable(LookupError):
    """There is no usable NodeConfig for this node; the message says why."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The datastore's view at one moment. Treat every mapping as read-only."""

    node_name: str
    node_config: NodeConfig | None = None
    # Why node_config is None (missing, or present but invalid), for errors and status.
    node_config_error: str = ""
    pods: Mapping[PodKey, Pod] = field(default_factory=dict)
    namespaces: Mapping[str, Namespace] = field(default_factory=dict)
    # Raw NetworkPolicy objects (dict shape), keyed (namespace, name); the policy
    # compiler parses them.
    network_policies: Mapping[PodKey, Mapping[str, Any]] = field(default_factory=dict)
    synced: bool = False

    def pod(self, namespace: str, name: str) -> Pod | None:
        return self.pods.get((namespace, name))

    def require_node_config(self) -> NodeConfig:
        if self.node_config is None:
            raise NodeConfigUnavailable(
                self.node_config_error or f"no NodeConfig named {self.node_name!r}"
            )
        return self.node_config


@runtime_checkable
class Datastore(Protocol):
    """One source of cluster state for one node's agent."""

    @property
    def node_name(self) -> str: ...

    @property
    def synced(self) -> bool:
        """True once the first full view has been delivered."""
        ...

    async def start(self) -> None:
        """Begin loading and watching; returns without waiting for the first view."""
        ...

    async def close(self) -> None: ...

    async def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait for the first full view; False if `timeout` passed first."""
        ...

    def snapshot(self) -> Snapshot: ...

    def subscribe(self) -> asyncio.Queue[Event]:
        """A new queue receiving every subsequent change event."""
        ...

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None: ...

    async def get_pod(self, namespace: str, name: str) -> Pod | None:
        """The pod as the source has it now, reading through pending watch events."""
        ...

    async def get_node_config(self) -> NodeConfig:
        """This node's NodeConfig, read through pending events; raises NodeConfigUnavailable."""
        ...

    async def get_secret(self, namespace: str, name: str, key: str) -> str | None:
        """One key of a Secret (decoded), e.g. a BGP session password."""
        ...

    async def record_event(self, event: PodEvent) -> None:
        """Tell the pod's owner what happened (Kubernetes: an Event on the pod).

        Best effort: never raises; a CNI verb must not fail because of it.
        """
        ...


@dataclass(frozen=True, slots=True)
class PodEvent:
    """What a Kubernetes Event on a pod carries, e.g. a rejected ADD.

    `kind`/`api_version` name another object the Event is about (a NetworkPolicy
    flock cannot compile); the default is the pod.
    """

    namespace: str
    name: str
    reason: str  # CamelCase, e.g. "FlockAddRejected"
    message: str
    uid: str = ""
    warning: bool = True
    kind: str = "Pod"
    api_version: str = "v1"
