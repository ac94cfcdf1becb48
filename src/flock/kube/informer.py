"""One informer: a local cache of one API collection, kept exact by list + watch.

The semantics every consumer relies on, written once:

- **Initial list**, paginated (`limit`, `continue`) so a 10,000-pod cluster is
  never one 40 MB response held in memory; the list's resourceVersion is where
  the watch starts. `synced` is set once the first list is applied.
- **Watch** from that resourceVersion with `allowWatchBookmarks`, so a quiet
  collection still advances our resourceVersion and a reconnect rarely lands on
  a compacted revision. The server ends each watch after a randomised
  5-10 minutes (client-go's spread, so a fleet of agents does not reconnect in
  step); we re-watch from the last resourceVersion seen.
- **A broken stream** (connection reset, API server restart) is resumed from the
  last resourceVersion seen, after a jittered backoff: the API server replays
  everything after it, so nothing is lost and nothing is relisted needlessly.
- **410 Gone** (our resourceVersion was compacted away, from the watch request
  or as an ERROR event in the stream; or an expired `continue` token) means
  changes may have been missed: relist, and deliver only the difference
  against the cache (ADDED / MODIFIED / DELETED per object), never a
  "delete everything, add everything" that would withdraw every anycast route.
- **Backoff** during an outage: exponential with jitter (half fixed, half
  random), 0.2 s doubling to 30 s, reset by the first success.
- **Order**: changes are delivered synchronously, in stream order, from one
  task. Per object the resourceVersion only grows: an event not newer than the
  cached one (a replay after a reconnect) is dropped, so nothing is applied
  twice or backwards. resourceVersions are compared as integers when both are
  (etcd revisions, as every kube-apiserver serves them), else any change counts.
- **Quiet**: a MODIFIED whose converted value equals the cached one (a kubelet
  status update of a field flock does not keep) updates the resourceVersion and
  keeps the cached object, identity included, and is not delivered: consumers
  cache by identity and wake only for changes they can see.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from flock.kube.client import ApiError, Gone
from flock.kube.records import Item, WatchEvent

log = logging.getLogger(__name__)

V = TypeVar("V")
V_co = TypeVar("V_co", covariant=True)

Key = tuple[str, str]

ADDED, MODIFIED, DELETED = "ADDED", "MODIFIED", "DELETED"


class Source(Protocol[V]):
    """A collection to list and watch (HTTP in production, a fake in unit tests)."""

    async def list(
        self,
        *,
        limit: int,
        continue_: str,
        cached: Mapping[Key, Item[V]] | None = None,
    ) -> tuple[list[Item[V]], str, str]:
        """One page: (items, resourceVersion of the list, continue token or "").

        An object `cached` holds at the same resourceVersion may be returned as
        that cached item (saves converting it again).
        """
        ...

    def watch(self, *, resource_version: str, timeout: int) -> AsyncIterator[WatchEvent[V]]:
        """Events after `resource_version`; raises Gone if it is compacted."""
        ...


@dataclass(frozen=True, slots=True)
class Change(Generic[V]):
    """One delivered change. ADDED has only `new`, DELETED only `old`."""

    type: str
    key: Key
    old: Item[V] | None
    new: Item[V] | None


class Backoff:
    """Exponential backoff with jitter: the n-th delay is in [d/2, d], d = base * 2**(n-1)."""

    def __init__(
        self, *, base: float = 0.2, cap: float = 30.0, rng: Callable[[], float] = random.random
    ) -> None:
        self.base = base
        self.cap = cap
        self._rng = rng
        self.attempt = 0

    def next(self) -> float:
        self.attempt += 1
        d: float = min(self.cap, self.base * 2.0 ** (self.attempt - 1))
        return d / 2 + self._rng() * d / 2

    def reset(self) -> None:
        self.attempt = 0


@dataclass(slots=True)
class InformerStats:
    lists: int = 0  # completed lists, the first included
    list_pages: int = 0
    last_list_items: int = 0
    last_list_changes: int = 0
    last_list_seconds: float = 0.0
    watches: int = 0
    events: int = 0  # watch events applied (delivered or quiet)
    delivered: int = 0  # changes handed to on_change
    quiet: int = 0  # MODIFIED with nothing flock keeps changed
    stale: int = 0  # replays not newer than the cache, dropped
    bookmarks: int = 0
    gone: int = 0
    errors: int = 0
    last_error: str = ""


def newer(a: str, b: str) -> bool:
    """Is resourceVersion `a` later than `b`?"""
    if a.isdigit() and b.isdigit():
        return int(a) > int(b)
    return a != b


class Informer(Generic[V]):
    """Keeps `items` equal to the collection; calls `on_change` for every difference."""

    def __init__(
        self,
        source: Source[V],
        *,
        name: str,
        on_change: Callable[[Change[V]], None],
        on_synced: Callable[[], None] | None = None,
        page_size: int = 500,
        backoff: Backoff | None = None,
        watch_timeout: tuple[int, int] = (300, 600),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.source = source
        self.name = name
        self._on_change = on_change
        self._on_synced = on_synced
        self.page_size = page_size
        self.backoff = backoff or Backoff()
        self.watch_timeout = watch_timeout
        self._sleep = sleep
        self._items: dict[Key, Item[V]] = {}
        self.resource_version = ""
        self.stats = InformerStats()
        self._synced = asyncio.Event()

    # -- reading ----------------------------------------------------------------

    @property
    def items(self) -> Mapping[Key, Item[V]]:
        return self._items

    def get(self, namespace: str, name: str) -> Item[V] | None:
        return self._items.get((namespace, name))

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        await self._synced.wait()

    # -- running ----------------------------------------------------------------

    async def run(self) -> None:
        """List, then watch forever; returns only by cancellation."""
        need_list = True
        while True:
            try:
                if need_list:
                    await self._relist()
                    need_list = False
                    self.backoff.reset()
                if not await self._watch_once():
                    # Ended at once with nothing delivered: do not spin on a server that
                    # closes every watch; treat it like an error.
                    await self._sleep(self.backoff.next())
            except asyncio.CancelledError:
                raise
            except Gone as e:
                self.stats.gone += 1
                self.stats.last_error = str(e)
                log.info(
                    "watch resourceVersion compacted; relisting",
                    extra={"informer": self.name, "resource_version": self.resource_version},
                )
                if need_list:  # the list itself said Gone (repeatedly): back off
                    await self._sleep(self.backoff.next())
                need_list = True
            except Exception as e:
                self.stats.errors += 1
                self.stats.last_error = f"{type(e).__name__}: {e}"
                delay = self.backoff.next()
                log.warning(
                    "list/watch failed; retrying",
                    extra={
                        "informer": self.name,
                        "reason": self.stats.last_error,
                        "retry_in": round(delay, 3),
                        "attempt": self.backoff.attempt,
                    },
                )
                await self._sleep(delay)

    async def _relist(self) -> None:
        start = time.monotonic()
        fresh: dict[Key, Item[V]] = {}
        cont = ""
        rv = ""
        restarts = 0
        while True:
            try:
                items, page_rv, cont = await self.source.list(
                    limit=self.page_size, continue_=cont, cached=self._items
                )
            except Gone:
                if not cont or restarts >= 2:
                    raise
                # The continue token expired mid-list: start the list again.
                restarts += 1
                fresh.clear()
                cont = rv = ""
                continue
            self.stats.list_pages += 1
            rv = rv or page_rv
            for it in items:
                fresh[it.key] = it
            if not cont:
                break
        changes = self._diff(fresh)
        self._items = fresh
        self.resource_version = rv
        st = self.stats
        st.lists += 1
        st.last_list_items = len(fresh)
        st.last_list_changes = len(changes)
        st.last_list_seconds = time.monotonic() - start
        for ch in changes:
            self._deliver(ch)
        if not self._synced.is_set():
            self._synced.set()
            if self._on_synced is not None:
                self._on_synced()
        log.info(
            "listed",
            extra={
                "informer": self.name,
                "items": len(fresh),
                "changes": len(changes),
                "resource_version": rv,
                "seconds": round(st.last_list_seconds, 3),
            },
        )

    def _diff(self, fresh: dict[Key, Item[V]]) -> list[Change[V]]:
        """What changed between the cache and a full list; `fresh` keeps unchanged values."""
        out: list[Change[V]] = []
        old_items = self._items
        for key, old in old_items.items():
            if key not in fresh:
                out.append(Change(DELETED, key, old, None))
        for key, new in fresh.items():
            prev = old_items.get(key)
            if prev is None:
                out.append(Change(ADDED, key, None, new))
            elif prev.uid != new.uid:
                out.append(Change(DELETED, key, prev, None))
                out.append(Change(ADDED, key, None, new))
            elif prev.resource_version == new.resource_version or prev.value == new.value:
                fresh[key] = _with_value(new, prev.value)
            else:
                out.append(Change(MODIFIED, key, prev, new))
        return out

    async def _watch_once(self) -> bool:
        """One watch request; True if it delivered anything or ran its course."""
        lo, hi = self.watch_timeout
        timeout = random.randint(lo, hi)
        started = time.monotonic()
        self.stats.watches += 1
        progressed = False
        async for ev in self.source.watch(resource_version=self.resource_version, timeout=timeout):
            if ev.type == "ERROR":
                st = ev.status
                code = st.code if st is not None else 0
                msg = st.message if st is not None else ""
                if code == 410:
                    raise Gone(410, st.reason if st else "Expired", msg)
                raise ApiError(code, st.reason if st else "", msg)
            if not progressed:
                progressed = True
                self.backoff.reset()
            if ev.type == "BOOKMARK":
                self.stats.bookmarks += 1
                if ev.resource_version:
                    self.resource_version = ev.resource_version
                continue
            if ev.item is None or ev.type not in (ADDED, MODIFIED, DELETED):
                continue
            self._apply(ev.type, ev.item)
        return progressed or time.monotonic() - started >= 1.0

    def _apply(self, type_: str, item: Item[V]) -> None:
        st = self.stats
        key = item.key
        old = self._items.get(key)
        st.events += 1
        if old is not None and not newer(item.resource_version, old.resource_version):
            st.stale += 1
            return
        if newer(item.resource_version, self.resource_version) or not self.resource_version:
            self.resource_version = item.resource_version
        if type_ == DELETED:
            if old is None or old.uid != item.uid:
                st.stale += 1  # already gone (a relist saw it), or an older incarnation
                return
            del self._items[key]
            self._deliver(Change(DELETED, key, old, None))
            return
        if old is None:
            self._items[key] = item
            self._deliver(Change(ADDED, key, None, item))
        elif old.uid != item.uid:
            # A new incarnation under the same name; the old one is gone.
            self._items[key] = item
            self._deliver(Change(DELETED, key, old, None))
            self._deliver(Change(ADDED, key, None, item))
        elif old.value == item.value:
            self._items[key] = _with_value(item, old.value)
            st.quiet += 1
        else:
            self._items[key] = item
            self._deliver(Change(MODIFIED, key, old, item))

    def _deliver(self, change: Change[V]) -> None:
        self.stats.delivered += 1
        try:
            self._on_change(change)
        except Exception:
            log.exception(
                "informer consumer failed",
                extra={"informer": self.name, "key": "/".join(change.key)},
            )


def _with_value(item: Item[V], value: V) -> Item[V]:
    if item.value is value:
        return item
    return Item(item.namespace, item.name, item.uid, item.resource_version, value)
