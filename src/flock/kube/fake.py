"""An in-memory API collection with etcd's semantics, for testing informers.

It models exactly what an informer must survive: a global, growing
resourceVersion; paginated lists whose continue token pins a snapshot and
expires at compaction; watches that replay everything after a resourceVersion
and answer 410 once it is compacted; bookmarks; streams that break mid-way or
end with an in-stream 410; and outages where every request fails. Tests drive
it step by step (no timers), so a hypothesis state machine can interleave
writes with failures deterministically.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from flock.kube.client import ApiError, Gone
from flock.kube.records import Item, StatusRecord, WatchEvent

V = TypeVar("V")

Key = tuple[str, str]


@dataclass(slots=True)
class _Stream(Generic[V]):
    broken: bool = False
    expired: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    pending: deque[WatchEvent[V]] = field(default_factory=deque)


@dataclass(slots=True)
class FakeCounters:
    lists: int = 0
    list_pages: int = 0
    watches: int = 0
    failed: int = 0
    gone: int = 0
    gets: int = 0
    timestamps: list[float] = field(default_factory=list)


class FakeCollection(Generic[V]):
    """One collection; implements the informer's `Source` protocol."""

    def __init__(self, *, start_rv: int = 1000) -> None:
        self.rv = start_rv
        self.objects: dict[Key, Item[V]] = {}
        self.log: list[tuple[int, str, Item[V]]] = []
        self.compacted = 0
        self.fail_next = 0  # this many list/watch requests fail (an outage)
        self.counters = FakeCounters()
        self._uids = 0
        self._snapshots: dict[str, tuple[int, list[Item[V]]]] = {}
        self._streams: list[_Stream[V]] = []

    # -- writes (what other clients of the API server do) -----------------------

    def _record(self, type_: str, item: Item[V]) -> None:
        self.log.append((self.rv, type_, item))
        for s in self._streams:
            s.pending.append(WatchEvent(type_, item, item.resource_version, None))
        self._wake()

    def _wake(self) -> None:
        # Works from inside or outside the loop (a state machine writes between runs).
        for s in self._streams:
            s.wake.set()

    def create(self, namespace: str, name: str, value: V) -> Item[V]:
        assert (namespace, name) not in self.objects
        self.rv += 1
        self._uids += 1
        item = Item(namespace, name, f"uid-{self._uids}", str(self.rv), value)
        self.objects[item.key] = item
        self._record("ADDED", item)
        return item

    def modify(self, namespace: str, name: str, value: V) -> Item[V]:
        old = self.objects[(namespace, name)]
        self.rv += 1
        item = Item(namespace, name, old.uid, str(self.rv), value)
        self.objects[item.key] = item
        self._record("MODIFIED", item)
        return item

    def delete(self, namespace: str, name: str) -> None:
        old = self.objects.pop((namespace, name))
        self.rv += 1
        self._record("DELETED", Item(namespace, name, old.uid, str(self.rv), old.value))

    # -- failures -----------------------------------------------------------------

    def compact(self) -> None:
        """Forget every event up to now (etcd compaction): older resourceVersions get 410."""
        self.compacted = self.rv
        self.log.clear()

    def break_streams(self) -> None:
        """Every open watch fails mid-stream (connection reset, API server restart)."""
        for s in self._streams:
            s.broken = True
        self._wake()

    def expire_streams(self) -> None:
        """Every open watch ends with an ERROR 410 event (the watch cache moved past it)."""
        for s in self._streams:
            s.expired = True
        self.compact()
        self._wake()

    def bookmark(self) -> None:
        for s in self._streams:
            s.pending.append(WatchEvent("BOOKMARK", None, str(self.rv), None))
        self._wake()

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def _maybe_fail(self) -> None:
        if self.fail_next > 0:
            self.fail_next -= 1
            self.counters.failed += 1
            raise ApiError(0, "ConnectionError", "connection refused (fake outage)")

    # -- Source -----------------------------------------------------------------

    async def get(self, namespace: str, name: str) -> Item[V] | None:
        """One object now (the GET a datastore falls back to)."""
        self._maybe_fail()
        self.counters.gets += 1
        return self.objects.get((namespace, name))

    async def list(
        self,
        *,
        limit: int,
        continue_: str,
        cached: Mapping[Key, Item[V]] | None = None,
    ) -> tuple[list[Item[V]], str, str]:
        self._maybe_fail()
        self.counters.list_pages += 1
        if continue_:
            snap = self._snapshots.get(continue_)
            if snap is None or snap[0] < self.compacted:
                self.counters.gone += 1
                raise Gone(410, "Expired", "continue token expired")
            rv, rest = snap
            del self._snapshots[continue_]
        else:
            self.counters.lists += 1
            rv, rest = self.rv, sorted(self.objects.values(), key=lambda i: i.key)
        page, rest = rest[:limit], rest[limit:]
        token = ""
        if rest:
            token = f"c{len(self._snapshots)}-{rv}-{len(rest)}"
            self._snapshots[token] = (rv, rest)
        return list(page), str(rv), token

    async def watch(self, *, resource_version: str, timeout: int) -> AsyncIterator[WatchEvent[V]]:
        self._maybe_fail()
        self.counters.watches += 1
        since = int(resource_version)
        if since < self.compacted:
            self.counters.gone += 1
            raise Gone(410, "Expired", f"too old resource version: {since} ({self.compacted})")
        # Replay from the log, then receive pushes (an open watch keeps its events
        # across a compaction, as etcd's watchers do).
        stream: _Stream[V] = _Stream()
        stream.pending.extend(
            WatchEvent(t, i, i.resource_version, None) for rv, t, i in self.log if rv > since
        )
        self._streams.append(stream)
        try:
            while True:
                if stream.broken:
                    raise ApiError(0, "ConnectionError", "stream reset (fake)")
                if stream.expired:
                    yield WatchEvent("ERROR", None, "", StatusRecord(410, "Expired", "expired"))
                    return
                if stream.pending:
                    yield stream.pending.popleft()
                    continue
                stream.wake.clear()
                await stream.wake.wait()
        finally:
            self._streams.remove(stream)
