"""The CNI verbs as the agent executes them: ADD, DEL, CHECK, GC, STATUS.

The plugin forwards each runtime call over the unix socket (see
docs/architecture.md); this module turns it into allocations, kernel state,
BGP exports and policy, and back into a CNI 1.1.0 result or error.

ADD is a short dispatch: a repeated ADD (the attachment exists) puts back what
is missing and answers the same result; a fresh ADD is one straight sequence,
each step that changes the world pushing its undo on one `AsyncExitStack`
(one rollback path, so a failed ADD leaves no address held, no policy entry
and no half-made veth):

  resolve the pod (read through the datastore: no stale annotations) and the
  NodeConfig -> parse annotations -> admit (allocate; the attachment table in
  `flock.agent.attachments` holds it) -> persist (handed to the store thread;
  awaited before the result) -> when policy is in force, a reconcile pass that
  puts the pod's policy in place (verdict-map entries under its veth's name,
  which nftables accepts before the veth exists, and its addresses in peer
  sets) -> build the veth and host routes (in the kernel pool) -> wired ->
  reconcile again if the pod has anycast or exported addresses (those routes
  need the veth; anycast only if Ready) -> result. So the pod's address is
  never routed while its policy is not in nftables (SPEC §6).

DEL is idempotent: an unknown container, a missing netns or an already-deleted
veth is success. It withdraws first (the pod's routes leave BGP before its veth
goes away), then tears down (both undone if the teardown fails), then removes
the pod's policy, then releases and persists. GC releases every attachment the
runtime no longer lists and no verb is working on, and removes veths of ours
that no attachment knows (listing the kernel first).

All allocation state lives in the attachment table; this module moves
attachments through its states and never keeps a second copy.

Operations on one container are serialised by a per-container lock (every verb,
CHECK included, reads the table under it); different containers run
concurrently. All kernel work runs in a thread pool, never on the event loop
thread, so the loop keeps serving and no thread of it ever enters a pod's
namespace.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from flock.agent.attachments import Attachment, State
from flock.agent.datastore.base import Datastore, NodeConfigUnavailable, PodEvent
from flock.agent.reconcile import Outcome, Reconciler
from flock.apply.datapath import (
    DatapathError,
    HostVeth,
    PodNetResult,
    PodNetSpec,
    PodRoute,
    host_veth_name,
)
from flock.apply.store import AllocationStore
from flock.compile.annotations import AnnotationError, parse_annotations
from flock.compile.ipam import Ipam, IpamError
from flock.model.allocation import Allocation, AttachmentKey
from flock.model.cni import (
    ERR_ANNOTATION,
    ERR_CHECK,
    ERR_DATAPATH,
    ERR_INVALID_ENV,
    ERR_IPAM,
    ERR_NOT_AVAILABLE,
    ERR_TRY_AGAIN,
    ERR_UNKNOWN_CONTAINER,
    CniError,
    CniRequest,
)
from flock.model.pod import Pod
from flock.model.request import PodIdentity, PodRequest

# flock's codes are re-exported: they are what these verbs answer.
__all__ = [
    "ERR_ANNOTATION",
    "ERR_CHECK",
    "ERR_DATAPATH",
    "ERR_IPAM",
    "CniService",
    "Datapath",
    "Metrics",
    "cni_result",
    "prev_result_problems",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a failed ADD waits for the pass that takes its policy out again.
UNDO_SYNC_TIMEOUT = 10.0


async def _settle(fut: asyncio.Future[None]) -> None:
    """Await a store write whose outcome an undo step supersedes (never left unretrieved)."""
    if not fut.cancelled():
        with contextlib.suppress(Exception):
            await fut


CNI_VERSION = "1.1.0"


class Datapath(Protocol):
    """The kernel side of pods, as `flock.apply.datapath.Datapath` provides it.

    Blocking calls; the service runs them in a thread pool. A Protocol so that
    unit tests can replace the kernel.
    """

    def setup_pod(self, spec: PodNetSpec) -> PodNetResult: ...

    def teardown_pod(
        self, *, container_id: str, ifname: str = "eth0", host_ifname: str = ""
    ) -> bool: ...

    def check_pod(self, spec: PodNetSpec) -> list[str]: ...

    def list_host_veths(self) -> list[HostVeth]: ...

    def list_pod_routes(self) -> list[PodRoute]: ...

    def delete_pod_route(self, route: PodRoute) -> None: ...


class Metrics(Protocol):
    def observe_op(self, verb: str, result: str, seconds: float) -> None: ...


class _KeyedLocks:
    """One asyncio lock per container id, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, n = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, n + 1)
        try:
            async with lock:
                yield
        finally:
            lock, n = self._locks[key]
            if n <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, n - 1)

    def busy(self, key: str) -> bool:
        """Whether a verb holds or waits for `key`'s lock."""
        return key in self._locks


class CniService:
    """Executes CNI verbs against IPAM, the store, the datapath and the reconciler."""

    def __init__(
        self,
        *,
        datastore: Datastore,
        ipam: Ipam,
        store: AllocationStore,
        datapath: Datapath,
        reconciler: Reconciler,
        metrics: Metrics | None = None,
        pod_wait: float = 5.0,
        workers: int = 16,
    ) -> None:
        self.datastore = datastore
        self.store = store
        self.datapath = datapath
        self.reconciler = reconciler
        # The attachment table (the one owner of allocation state), the reconciler's.
        self.table = reconciler.adopt(ipam)
        self.metrics = metrics
        self.pod_wait = pod_wait
        self._locks = _KeyedLocks()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kernel")
        # The store is not thread-safe and every write fsyncs: one writer thread.
        self._store_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._pending: collections.deque[
            tuple[AttachmentKey, Allocation | None, asyncio.Future[None]]
        ] = collections.deque()
        self._writing = False  # a batch is with the store thread
        self.ready = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- plumbing -------------------------------------------------------------

    @property
    def ipam(self) -> Ipam:
        """The allocator behind the attachment table (read it; change it through the table)."""
        return self.table.ipam

    @property
    def inflight(self) -> int:
        """CNI verbs being executed right now."""
        return self._inflight

    def allocations(self) -> list[Allocation]:
        """Every allocation held, whatever its attachment's state."""
        return self.table.allocations()

    async def run_kernel(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run a blocking kernel call in the thread pool (reconcile appliers use it too)."""
        return await self._kernel(fn, *args, **kw)

    async def _kernel(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kw))

    async def _commit(self, key: AttachmentKey, alloc: Allocation | None) -> None:
        """Durably record one change; returns once it is on disk."""
        await self._start_commit(key, alloc)

    def _start_commit(self, key: AttachmentKey, alloc: Allocation | None) -> asyncio.Future[None]:
        """Queue one change for the store thread; the future resolves once it is on disk.

        Group commit: changes queue up while the store thread is writing; the next
        write takes every queued change (up to the first that touches a key
        already in the batch, so that each key's changes stay in order) and
        records them with one `store.record` call (one fdatasync). When the store
        thread is idle the write is handed to it right here, before the caller's
        next await, so an ADD's kernel work overlaps it from its first moment.
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((key, alloc, fut))
        if not self._writing:
            self._write_next_batch()
        return fut

    def _write_next_batch(self) -> None:
        batch: list[tuple[AttachmentKey, Allocation | None, asyncio.Future[None]]] = []
        keys: set[AttachmentKey] = set()
        while self._pending and self._pending[0][0] not in keys:
            item = self._pending.popleft()
            keys.add(item[0])
            batch.append(item)
        if not batch:
            self._writing = False
            return
        self._writing = True
        loop = asyncio.get_running_loop()
        puts = [a for _, a, _ in batch if a is not None]
        dels = [k for k, a, _ in batch if a is None]
        try:
            job = self._store_pool.submit(self.store.record, put=puts, delete=dels)
        except RuntimeError as e:  # the pool is shut down (agent stopping)
            self._batch_done(batch, e)
            return

        def written(f: Future[None]) -> None:  # in the store thread
            err = f.exception()
            with contextlib.suppress(RuntimeError):  # the loop is closed (agent stopped)
                loop.call_soon_threadsafe(self._batch_done, batch, err)

        job.add_done_callback(written)

    def _batch_done(
        self,
        batch: list[tuple[AttachmentKey, Allocation | None, asyncio.Future[None]]],
        err: BaseException | None,
    ) -> None:
        for _, _, f in batch:
            if f.done():
                continue
            if err is None:
                f.set_result(None)
            else:
                f.set_exception(err)
        self._write_next_batch()

    def close(self, *, wait: bool = True) -> None:
        """Stop the thread pools. `wait=False` (shutdown after the drain time ran out)
        leaves a kernel call that is stuck where it is instead of waiting for it."""
        self._pool.shutdown(wait=wait, cancel_futures=True)
        self._store_pool.shutdown(wait=True)

    async def handle(self, req: CniRequest) -> dict[str, Any]:
        """The RPC handler (`flock.agent.rpc.serve`): the result body, or raises CniError."""
        start = time.perf_counter()
        result = "error"
        self._inflight += 1
        self._idle.clear()
        try:
            body = await self._dispatch(req)
            result = "ok"
            return body
        except CniError as e:
            if req.command == "ADD" and req.pod_name and e.code not in (ERR_TRY_AGAIN,):
                await self._event(req, e)
            log.warning(
                "CNI %s failed: %s",
                req.command,
                e.msg,
                extra={
                    "verb": req.command,
                    "code": e.code,
                    "container": req.container_id[:12],
                    "pod": f"{req.pod_namespace}/{req.pod_name}",
                    "cni_details": e.details,
                },
            )
            raise
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()
            if self.metrics is not None:
                self.metrics.observe_op(req.command, result, time.perf_counter() - start)

    async def _event(self, req: CniRequest, err: CniError) -> None:
        try:
            await self.datastore.record_event(
                PodEvent(
                    namespace=req.pod_namespace,
                    name=req.pod_name,
                    uid=req.pod_uid,
                    reason="FlockAddRejected",
                    message=f"{err.msg} (CNI error {err.code})",
                )
            )
        except Exception:
            log.exception("could not record the pod event")

    async def drain(self, timeout: float) -> bool:
        """Wait for in-flight verbs to finish (shutdown); False if some did not in time."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _dispatch(self, req: CniRequest) -> dict[str, Any]:
        if req.command == "ADD":
            return await self.add(req)
        if req.command == "DEL":
            await self.delete(req)
        elif req.command == "CHECK":
            await self.check(req)
        elif req.command == "GC":
            await self.gc(req)
        elif req.command == "STATUS":
            await self.status()
        else:
            raise CniError(ERR_INVALID_ENV, f"unknown command {req.command!r}")
        return {}

    # ---- ADD ------------------------------------------------------------------

    async def _resolve_pod(self, req: CniRequest) -> Pod:
        ns, name, uid = req.pod_namespace, req.pod_name, req.pod_uid
        if not ns or not name:
            raise CniError(
                ERR_INVALID_ENV,
                "CNI_ARGS must carry K8S_POD_NAMESPACE and K8S_POD_NAME",
                f"got {dict(req.args)!r}",
            )
        deadline = time.monotonic() + self.pod_wait
        while True:
            pod = await self.datastore.get_pod(ns, name)
            stale = pod is not None and uid and pod.uid and pod.uid != uid
            if pod is not None and not stale:
                return pod
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        if pod is None:
            raise CniError(
                ERR_TRY_AGAIN,
                f"pod {ns}/{name} is not in the datastore (yet)",
                f"waited {self.pod_wait:g}s for it",
            )
        raise CniError(
            ERR_TRY_AGAIN,
            f"pod {ns}/{name} in the datastore has uid {pod.uid}, the runtime says {uid}",
            f"waited {self.pod_wait:g}s for the datastore to catch up",
        )

    async def add(self, req: CniRequest) -> dict[str, Any]:
        """ADD: a repeated ADD answers what the attachment has; else a fresh one."""
        if not req.container_id or not req.netns:
            raise CniError(ERR_INVALID_ENV, "ADD needs CNI_CONTAINERID and CNI_NETNS")
        if not self.ready:
            raise CniError(ERR_TRY_AGAIN, "flock agent is still starting (state not loaded)")
        async with self._locks.hold(req.container_id):
            existing = self.table.get(req.key)
            if existing is not None:
                return await self._re_add(existing, req)
            return await self._fresh_add(req)

    async def _re_add(self, entry: Attachment, req: CniRequest) -> dict[str, Any]:
        """A repeated ADD (CNI: idempotent for the same container and ifname, e.g. a
        runtime retrying after a lost reply): put back only what is missing
        (setup_pod repairs an intact veth pair in place, so the pod keeps its
        interface and traffic) and answer the same result."""
        alloc = entry.alloc
        if entry.state is not State.WIRED and self.reconciler.policy_active():
            # Not live here (its DEL failed half-way): policy before the veth, as for
            # a new pod. The entry is still policed (withdrawing).
            self._policy_in_place(alloc, await self._sync())
        links = await self._build(alloc, req)
        self.table.wire(alloc.key)
        if self.reconciler.affects(alloc):
            await self._sync()
        else:
            self.reconciler.mark_dirty()
        return cni_result(links)

    async def _fresh_add(self, req: CniRequest) -> dict[str, Any]:
        """resolve -> admit -> persist (in the background) -> policy -> veth -> wired ->
        routes and exports -> result. Each step that changes the world pushes its undo;
        success pops them all (one rollback path)."""
        t0 = time.perf_counter()
        pod = await self._resolve_pod(req)
        request = await self._parse(pod)
        async with contextlib.AsyncExitStack() as undo:
            alloc = self._admit(req, pod, request)
            policed = self.reconciler.policy_active()
            undo.push_async_callback(self._unadmit, alloc, policed)
            # Durable first: the store thread writes while policy and kernel work run.
            persist = self._start_commit(alloc.key, alloc)
            undo.push_async_callback(_settle, persist)
            t1 = time.perf_counter()
            if policed:
                # The pod's policy (verdict-map entries under its veth's name, its
                # addresses in peer sets) goes into nftables before its veth and host
                # routes exist: no moment in which it is routed unprotected.
                self._policy_in_place(alloc, await self._sync())
            t2 = time.perf_counter()
            links = await self._build(alloc, req)
            undo.push_async_callback(self._teardown_quietly, alloc.key, alloc.host_ifname)
            await persist
            t3 = time.perf_counter()
            self.table.wire(alloc.key)
            if self.reconciler.affects_routes(alloc) or (
                not policed and self.reconciler.policy_active()
            ):
                # Anycast routes and exports need the veth: they come after it (and a
                # policy that appeared since the check above, now).
                self._policy_in_place(alloc, await self._sync())
            else:  # nothing to route, export or protect now; the next pass catches up
                self.reconciler.mark_dirty()
            undo.pop_all()
        self._log_add(req, pod, alloc, (t0, t1, t2, t3))
        return cni_result(links)

    async def _parse(self, pod: Pod) -> PodRequest:
        try:
            node = await self.datastore.get_node_config()
        except NodeConfigUnavailable as e:
            raise CniError(ERR_TRY_AGAIN, f"no usable NodeConfig: {e}") from None
        try:
            return parse_annotations(pod.annotations, node=node, namespace=pod.namespace)
        except AnnotationError as e:
            raise CniError(
                ERR_ANNOTATION, f"pod {pod.namespace}/{pod.name}: {e}", e.key or ""
            ) from None

    def _admit(self, req: CniRequest, pod: Pod, request: PodRequest) -> Allocation:
        identity = PodIdentity(
            namespace=pod.namespace, pod=pod.name, image=pod.images[0] if pod.images else ""
        )
        try:
            return self.table.admit(
                req.key,
                request,
                namespace=pod.namespace,
                pod=pod.name,
                pod_uid=pod.uid or req.pod_uid,
                identity=identity,
                netns=req.netns,
                host_ifname=host_veth_name(req.container_id, req.ifname),
            )
        except IpamError as e:
            raise CniError(ERR_IPAM, f"pod {pod.namespace}/{pod.name}: {e}") from None

    async def _unadmit(self, alloc: Allocation, policed: bool) -> None:
        """Undo of `_admit` (a failed ADD): its policy entries go (awaited when a pass
        may have put them in place, so they are gone when the error reaches the
        runtime), then its addresses are released and the release persisted."""
        self.table.unprotect(alloc.key)
        if policed and self.reconciler.outcome.policy_ok:
            outcome = await self._sync(UNDO_SYNC_TIMEOUT)
            if not outcome.ok:
                log.warning("rollback: removing the policy of %s: %s", alloc.key, outcome.error)
        else:
            self.reconciler.mark_dirty()
        self.table.forget(alloc.key)
        try:
            await self._commit(alloc.key, None)
        except Exception:
            log.exception("rollback: could not persist the release of %s", alloc.key)

    def _log_add(
        self, req: CniRequest, pod: Pod, alloc: Allocation, marks: tuple[float, ...]
    ) -> None:
        """Logged after the reply is on its way (the RPC server writes it in this same
        loop step): formatting a structured record is not the pod's wait."""
        t0, t1, t2, t3 = marks
        t4 = time.perf_counter()
        asyncio.get_running_loop().call_soon(
            functools.partial(
                log.info,
                "ADD",
                extra={
                    "pod": f"{pod.namespace}/{pod.name}",
                    "container": req.container_id[:12],
                    "v6": str(alloc.v6) if alloc.v6 else None,
                    "v4": str(alloc.v4) if alloc.v4 else None,
                    "anycast": [str(a) for a in alloc.anycast],
                    "ready": pod.ready,
                    # Where this ADD's time went (ms): resolve+parse+allocate, policy
                    # before the veth, persist and kernel side by side, reconcile after
                    # the veth (anycast, exports).
                    "ms": {
                        "resolve": round((t1 - t0) * 1000, 2),
                        "policy": round((t2 - t1) * 1000, 2),
                        "persist+kernel": round((t3 - t2) * 1000, 2),
                        "reconcile": round((t4 - t3) * 1000, 2),
                    },
                },
            )
        )

    async def _sync(self, timeout: float | None = None) -> Outcome:
        try:
            return await self.reconciler.sync(timeout)
        except TimeoutError:
            return Outcome(ok=False, policy_ok=False, error=f"no reconcile pass in {timeout}s")

    @staticmethod
    def _policy_in_place(alloc: Allocation, outcome: Outcome) -> None:
        if not outcome.policy_ok:
            raise CniError(
                ERR_DATAPATH,
                f"pod {alloc.namespace}/{alloc.pod}: network policy could not be "
                "put in place, refusing to start the pod unprotected",
                outcome.error,
            )

    def _build_now(self, alloc: Allocation, req: CniRequest) -> PodNetResult:
        """Veth, addresses, routes (blocking); on failure nothing of it is left."""
        try:
            spec = PodNetSpec.from_allocation(replace(alloc, netns=req.netns))
            return self.datapath.setup_pod(spec)
        except (DatapathError, ValueError, OSError) as e:
            # setup_pod leaves nothing behind on failure; removing by our own
            # deterministic name once more costs little and covers a crash in between.
            try:
                self.datapath.teardown_pod(
                    container_id=req.container_id, ifname=req.ifname, host_ifname=alloc.host_ifname
                )
            except Exception:
                log.exception("rollback: tearing down %s failed", alloc.host_ifname)
            raise CniError(ERR_DATAPATH, f"setting up the pod network failed: {e}") from e

    async def _build(self, alloc: Allocation, req: CniRequest) -> PodNetResult:
        """`_build_now` in the kernel pool (never on the loop thread: it enters the
        pod's namespace, and other verbs keep being served meanwhile)."""
        return await self._kernel(self._build_now, alloc, req)

    async def _teardown_quietly(self, key: AttachmentKey, name: str) -> None:
        try:
            await self._teardown(key, name)
        except Exception:
            log.exception("rollback: tearing down %s failed", name)

    async def _teardown(self, key: AttachmentKey, name: str) -> None:
        try:
            await self._kernel(
                self.datapath.teardown_pod,
                container_id=key.container_id,
                ifname=key.ifname,
                host_ifname=name,
            )
        except DatapathError as e:
            raise CniError(ERR_DATAPATH, f"removing the pod network failed: {e}") from e

    # ---- DEL ------------------------------------------------------------------

    async def delete(self, req: CniRequest) -> None:
        if not req.container_id:
            raise CniError(ERR_INVALID_ENV, "DEL needs CNI_CONTAINERID")
        await self._delete_key(req.key)

    async def _delete_key(self, key: AttachmentKey, *, only: Allocation | None = None) -> bool:
        """DEL of one attachment; False when `only` is given and the attachment is no
        longer that allocation (GC: a new ADD took the key meanwhile)."""
        async with self._locks.hold(key.container_id):
            entry = self.table.get(key)
            if only is not None and (entry is None or entry.alloc is not only):
                return False
            if entry is None:  # unknown: remove a veth by its name, if any (idempotent)
                await self._teardown(key, host_veth_name(key.container_id, key.ifname))
                return True
            await self._unwire(entry)
            alloc = entry.alloc
            # Then its policy goes (before the address can be handed out again).
            self.table.unprotect(key)
            if self.reconciler.policy_active():
                await self._sync()
            else:
                self.reconciler.mark_dirty()
            self.table.forget(key)
            await self._commit(key, None)
            log.info(
                "DEL",
                extra={"pod": f"{alloc.namespace}/{alloc.pod}", "container": key.container_id[:12]},
            )
            return True

    async def _unwire(self, entry: Attachment) -> None:
        """Withdraw (anycast, exports) before the veth goes away, then remove the veth;
        the policy stays meanwhile. On failure the attachment is wired again."""
        alloc = entry.alloc
        async with contextlib.AsyncExitStack() as undo:
            self.table.withdraw(alloc.key)
            undo.callback(self._rewire, alloc.key)
            if self.reconciler.affects_routes(alloc):
                await self._sync()
            await self._teardown(alloc.key, alloc.host_ifname)
            undo.pop_all()

    def _rewire(self, key: AttachmentKey) -> None:
        self.table.wire(key)  # still there: keep routing it
        self.reconciler.mark_dirty()

    # ---- CHECK ----------------------------------------------------------------

    async def check(self, req: CniRequest) -> None:
        async with self._locks.hold(req.container_id):
            entry = self.table.get(req.key)
            if entry is None:
                raise CniError(
                    ERR_UNKNOWN_CONTAINER,
                    f"container {req.container_id} interface {req.ifname} has no flock allocation",
                )
            alloc = entry.alloc
            spec = PodNetSpec.from_allocation(replace(alloc, netns=req.netns or alloc.netns))
            problems = await self._kernel(self.datapath.check_pod, spec)
        problems += prev_result_problems(req.prev_result, alloc)
        if problems:
            raise CniError(
                ERR_CHECK,
                f"pod {alloc.namespace}/{alloc.pod}: {problems[0]}",
                "; ".join(problems),
            )

    # ---- GC -------------------------------------------------------------------

    async def gc(self, req: CniRequest) -> list[Allocation]:
        """Release every attachment the runtime no longer lists, except those a verb is
        working on (the runtime's list may predate an ADD in flight); then remove
        veths and host routes of ours that no attachment accounts for."""
        live = set(req.valid_attachments)
        released: list[Allocation] = []
        for entry in self.table:
            if entry.key in live or self._locks.busy(entry.key.container_id):
                continue
            try:
                if await self._delete_key(entry.key, only=entry.alloc):
                    released.append(entry.alloc)
            except CniError as e:
                log.warning("GC: could not release %s: %s", entry.key, e.msg)
        # The kernel's listing first, then what is known: an ADD that completes in
        # between is known by then (it is admitted before its veth exists).
        veths = await self._kernel(self.datapath.list_host_veths)
        known = {a.host_ifname for a in self.table.allocations()}
        known |= {host_veth_name(k.container_id, k.ifname) for k in live}
        for veth in veths:
            if veth.name not in known:
                log.info("GC: removing leftover veth", extra={"ifname": veth.name})
                await self._teardown(AttachmentKey("gc", "eth0"), veth.name)
        # Host routes of ours that no allocation accounts for (e.g. left by a crash
        # between a veth's reuse and its routes' removal); the same order.
        routes = await self._kernel(self.datapath.list_pod_routes)
        expected = {(ip, a.host_ifname) for a in self.table.allocations() for ip in a.all_addresses}
        for r in routes:
            if (r.dst, r.ifname) not in expected:
                log.info("GC: removing leftover host route", extra={"dst": str(r.dst)})
                await self._kernel(self.datapath.delete_pod_route, r)
        if released:
            log.info("GC released %d attachments", len(released))
        await self._sync()
        return released

    # ---- STATUS ---------------------------------------------------------------

    async def status(self) -> None:
        if not self.ready or not self.datastore.synced:
            raise CniError(ERR_NOT_AVAILABLE, "flock agent is starting: state not loaded yet")
        try:
            await self.datastore.get_node_config()
        except NodeConfigUnavailable as e:
            raise CniError(ERR_NOT_AVAILABLE, f"flock agent cannot serve ADD: {e}") from None


def prev_result_problems(prev: Mapping[str, Any] | None, alloc: Allocation) -> list[str]:
    """Differences between the result the runtime kept from ADD and what the agent holds."""
    if not prev or not isinstance(prev.get("ips"), list):
        return []
    listed: set[str] = set()
    for entry in prev["ips"]:
        addr = entry.get("address") if isinstance(entry, Mapping) else None
        if isinstance(addr, str):
            try:
                listed.add(str(ipaddress.ip_address(addr.split("/", 1)[0])))
            except ValueError:
                listed.add(addr)
    held = {str(ip) for ip in alloc.all_addresses}
    out = []
    if listed - held:
        out.append(f"prevResult lists {', '.join(sorted(listed - held))}, not held by this pod")
    if held - listed:
        out.append(f"the pod holds {', '.join(sorted(held - listed))}, missing from prevResult")
    return out


def cni_result(links: PodNetResult) -> dict[str, Any]:
    """The CNI 1.1.0 result body (the plugin stamps cniVersion and converts)."""
    return {"cniVersion": CNI_VERSION, **links.to_cni(), "dns": {}}
