"""Kubernetes datastore: the `Datastore` protocol on informers against the API server.

What it watches, and why that much:

- this node's NodeConfig (field selector `metadata.name`): a change re-renders BGP.
  A NodeConfig that does not parse keeps the last good one in force (an operator's
  typo must not tear down every session) and its error is in the snapshot.
- Pods cluster-wide: this node's pods in full (annotations, images, uid, ports,
  Ready, deletionTimestamp), every other pod trimmed to what the NetworkPolicy
  compiler selects on (labels, addresses, named ports): ~1 KB each, so 10,000
  pods stay well inside the agent's memory budget. `cluster_pods=False` watches
  only this node's pods (`spec.nodeName`), for clusters without policies.
- Namespaces (labels, for namespaceSelector) and NetworkPolicies, cluster-wide.
- Secrets, kube-system only and only those asked for: the first `get_secret`
  of a name starts a watch on that one Secret (field selector), so a rotated
  BGP password emits an Event(Kind.SECRET) and BIRD is re-rendered. The agent's
  RBAC never needs secrets outside kube-system.

Changes reach subscribers synchronously from the informer task that read them
off the watch stream (a Ready flip or deletionTimestamp is on the queue within
the same loop iteration). Until every informer has completed its first list,
nothing is emitted and `synced` is false; then one RESYNC. After a relist
(410) only the difference is delivered.

ADD race: `get_pod` answers from the cache; a pod the watch has not delivered
yet is fetched with one GET (a pod whose GET said 404 is not asked again for
`MISS_TTL` seconds, as the CNI service polls).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from flock.agent.datastore.base import (
    Event,
    EventType,
    Kind,
    NodeConfigUnavailable,
    PodEvent,
    PodKey,
    Snapshot,
)
from flock.kube.client import ApiError, HttpSource, KubeClient
from flock.kube.events import EventRecorder
from flock.kube.informer import Change, Informer
from flock.kube.records import (
    Codec,
    ObjectRecord,
    namespace_codec,
    object_dict,
    pod_codec,
)
from flock.model.nodeconfig import API_VERSION, NodeConfig, NodeConfigError
from flock.model.pod import Namespace, Pod

log = logging.getLogger(__name__)

SECRET_NAMESPACE = "kube-system"
MISS_TTL = 0.25  # seconds a 404 from the pod GET fallback is remembered
SECRET_WAIT = 5.0  # seconds get_secret waits for a new Secret watch's first list

V = TypeVar("V")

# A NodeConfig as kept by its informer: parsed, or the reason it is not usable.
NodeConfigValue = tuple[NodeConfig | None, str]


def _parse_node_config(rec: ObjectRecord) -> NodeConfigValue:
    try:
        return NodeConfig.from_object(object_dict(rec)), ""
    except NodeConfigError as e:
        return None, str(e)


def _decode_secret(rec: ObjectRecord) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (rec.data or {}).items():
        try:
            out[k] = base64.b64decode(v, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            log.warning(
                "secret key is not base64 text; ignored",
                extra={"secret": f"{rec.metadata.namespace}/{rec.metadata.name}", "key": k},
            )
    for k, v in (rec.string_data or {}).items():
        out[k] = v
    return out


class KubeDatastore:
    """A `Datastore` backed by the Kubernetes API."""

    def __init__(
        self,
        client: KubeClient,
        *,
        node_name: str,
        cluster_pods: bool = True,
        page_size: int = 500,
        recorder: EventRecorder | None = None,
    ) -> None:
        self.client = client
        self._node_name = node_name
        self._page_size = page_size
        self._subscribers: list[asyncio.Queue[Event]] = []
        self._snap: Snapshot | None = None
        self._synced = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._pods: dict[PodKey, Pod] = {}
        self._namespaces: dict[str, Namespace] = {}
        self._policies: dict[PodKey, dict[str, Any]] = {}
        self._node_config: NodeConfig | None = None
        self._node_config_error = ""
        self._misses: dict[PodKey, float] = {}
        self._secret_informers: dict[str, Informer[dict[str, str]]] = {}
        self.recorder = recorder or EventRecorder(client, component="flock-agent", host=node_name)

        self._pod_source: HttpSource[Pod] = HttpSource(
            client,
            "/api/v1/pods",
            pod_codec(node_name),
            field_selector="" if cluster_pods else f"spec.nodeName={node_name}",
        )
        nc_codec: Codec[ObjectRecord, NodeConfigValue] = Codec(ObjectRecord, _parse_node_config)
        self._nc_source: HttpSource[NodeConfigValue] = HttpSource(
            client,
            f"/apis/{API_VERSION}/nodeconfigs",
            nc_codec,
            field_selector=f"metadata.name={node_name}",
        )
        self.node_configs = self._informer("nodeconfigs", self._nc_source, self._on_node_config)
        self.pods = self._informer("pods", self._pod_source, self._on_pod)
        self.namespaces = self._informer(
            "namespaces",
            HttpSource(client, "/api/v1/namespaces", namespace_codec()),
            self._on_namespace,
        )
        self.network_policies = self._informer(
            "networkpolicies",
            HttpSource(
                client,
                "/apis/networking.k8s.io/v1/networkpolicies",
                Codec(ObjectRecord, object_dict),
            ),
            self._on_policy,
        )
        self._main: list[Informer[Any]] = [
            self.node_configs,
            self.pods,
            self.namespaces,
            self.network_policies,
        ]

    def _informer(
        self, name: str, source: HttpSource[V], handler: Callable[[Change[V]], None]
    ) -> Informer[V]:
        return Informer(
            source,
            name=name,
            on_change=handler,
            on_synced=self._check_synced,
            page_size=self._page_size,
        )

    # -- Datastore protocol ---------------------------------------------------------

    @property
    def node_name(self) -> str:
        return self._node_name

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    async def start(self) -> None:
        for inf in self._main:
            self._tasks.append(asyncio.create_task(inf.run(), name=f"informer-{inf.name}"))
        self.recorder.start()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        await self.recorder.close()
        await self.client.close()

    async def wait_synced(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._synced.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def snapshot(self) -> Snapshot:
        if self._snap is None:
            self._snap = Snapshot(
                node_name=self._node_name,
                node_config=self._node_config,
                node_config_error=self._nc_error_text(),
                pods=self._pods.copy(),
                namespaces=self._namespaces.copy(),
                network_policies=self._policies.copy(),
                synced=self.synced,
            )
        return self._snap

    def subscribe(self) -> asyncio.Queue[Event]:
        q: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers.append(q)
        return q

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        if queue in self._subscribers:
            self._subscribers.remove(queue)

    async def get_pod(self, namespace: str, name: str) -> Pod | None:
        pod = self._pods.get((namespace, name))
        if pod is not None:
            return pod
        key = (namespace, name)
        now = time.monotonic()
        if now - self._misses.get(key, -MISS_TTL) < MISS_TTL:
            return None
        try:
            item = await self._pod_source.get(namespace, name)
        except ApiError as e:
            log.warning("pod GET failed", extra={"pod": f"{namespace}/{name}", "reason": str(e)})
            return None
        if item is None:
            self._misses[key] = now
            if len(self._misses) > 1024:
                self._misses = {k: t for k, t in self._misses.items() if now - t < MISS_TTL}
            return None
        self._misses.pop(key, None)
        # The watch may have delivered it while we waited: prefer the cache's copy.
        return self._pods.get(key) or item.value

    async def get_node_config(self) -> NodeConfig:
        if self._node_config is None and not self.node_configs.synced:
            try:
                item = await self._nc_source.get("", self._node_name)
            except ApiError as e:
                raise NodeConfigUnavailable(f"cannot read NodeConfig: {e}") from None
            if item is not None and item.value[0] is not None:
                return item.value[0]
            if item is not None:
                raise NodeConfigUnavailable(item.value[1])
        if self._node_config is None:
            raise NodeConfigUnavailable(self._nc_error_text())
        return self._node_config

    async def get_secret(self, namespace: str, name: str, key: str) -> str | None:
        if namespace != SECRET_NAMESPACE:
            log.warning(
                "secrets are read from kube-system only",
                extra={"secret": f"{namespace}/{name}"},
            )
            return None
        inf = self._secret_informers.get(name)
        if inf is None:
            inf = Informer(
                HttpSource(
                    self.client,
                    f"/api/v1/namespaces/{SECRET_NAMESPACE}/secrets",
                    Codec(ObjectRecord, _decode_secret),
                    field_selector=f"metadata.name={name}",
                ),
                name=f"secret-{name}",
                on_change=lambda ch: self._on_secret(name, ch),
            )
            self._secret_informers[name] = inf
            self._tasks.append(asyncio.create_task(inf.run(), name=f"informer-secret-{name}"))
        if not inf.synced:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(inf.wait_synced(), SECRET_WAIT)
        item = inf.get(SECRET_NAMESPACE, name)
        return None if item is None else item.value.get(key)

    async def record_event(self, event: PodEvent) -> None:
        self.recorder.record(event)

    # -- exists: the leak reconciler's question -------------------------------------

    async def pod_exists(self, namespace: str, name: str, uid: str) -> bool | None:
        """Does pod namespace/name with this uid exist in the API now?

        True/False from the cache, confirmed by a GET when the cache says no (it may
        lag); None if the API cannot be asked (an outage: the caller must not act).
        """
        pod = self._pods.get((namespace, name))
        if pod is not None and (not uid or pod.uid == uid):
            return True
        try:
            item = await self._pod_source.get(namespace, name)
        except ApiError:
            return None
        return item is not None and (not uid or item.uid == uid)

    # -- informer callbacks ---------------------------------------------------------

    def _check_synced(self) -> None:
        if not self._synced.is_set() and all(i.synced for i in self._main):
            self._synced.set()
            self._snap = None
            log.info(
                "kubernetes datastore synced",
                extra={
                    "pods": len(self._pods),
                    "namespaces": len(self._namespaces),
                    "network_policies": len(self._policies),
                    "node_config": self._node_config is not None,
                },
            )
            self._emit(Event(None, EventType.RESYNC))

    def _changed(self, kind: Kind, ch: Change[Any]) -> None:
        self._snap = None
        if self._synced.is_set():
            self._emit(Event(kind, EventType(ch.type), ch.key[0], ch.key[1]))

    def _on_pod(self, ch: Change[Pod]) -> None:
        if ch.new is None:
            self._pods.pop(ch.key, None)
        else:
            self._pods[ch.key] = ch.new.value
            self._misses.pop(ch.key, None)
        self._changed(Kind.POD, ch)

    def _on_namespace(self, ch: Change[Namespace]) -> None:
        if ch.new is None:
            self._namespaces.pop(ch.key[1], None)
        else:
            self._namespaces[ch.key[1]] = ch.new.value
        self._changed(Kind.NAMESPACE, ch)

    def _on_policy(self, ch: Change[dict[str, Any]]) -> None:
        if ch.new is None:
            self._policies.pop(ch.key, None)
        else:
            self._policies[ch.key] = ch.new.value
        self._changed(Kind.NETWORK_POLICY, ch)

    def _on_node_config(self, ch: Change[NodeConfigValue]) -> None:
        if ch.new is None:
            self._node_config, self._node_config_error = None, ""
        else:
            parsed, error = ch.new.value
            if parsed is not None:
                self._node_config, self._node_config_error = parsed, ""
            else:
                # Keep the last good one in force; say why the new one is not used.
                self._node_config_error = error
                log.warning(
                    "NodeConfig is invalid; keeping the last good one",
                    extra={"node": self._node_name, "reason": error},
                )
        self._changed(Kind.NODE_CONFIG, ch)

    def _on_secret(self, name: str, ch: Change[dict[str, str]]) -> None:
        # The first list answers the get_secret that started the watch: not a change.
        if self._secret_informers[name].synced:
            self._emit(Event(Kind.SECRET, EventType(ch.type), ch.key[0], ch.key[1]))

    def _nc_error_text(self) -> str:
        if self._node_config_error:
            return self._node_config_error
        if self._node_config is None:
            return f"no NodeConfig named {self._node_name!r} (apiVersion {API_VERSION})"
        return ""

    def _emit(self, event: Event) -> None:
        for q in self._subscribers:
            q.put_nowait(event)

    @property
    def informers(self) -> list[Informer[Any]]:
        return [*self._main, *self._secret_informers.values()]


__all__ = ["KubeDatastore"]
