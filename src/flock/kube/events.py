"""Events on pods (events.k8s.io/v1), aggregated so a retrying kubelet cannot flood the API.

(The same path serves Events on other objects, e.g. a NetworkPolicy flock cannot
compile: `PodEvent.kind`.)

A rejected ADD is retried by the kubelet every few seconds for as long as the
pod exists; one Event per attempt would be thousands of objects a day per bad
pod. The events.k8s.io/v1 API has the answer built in, and this follows
client-go's recorder: the first occurrence of (pod uid, reason, note) is created
at once (the user sees it in `kubectl describe pod` immediately); repeats within
`window` (6 minutes, as client-go) only bump a local counter, and the Event's
`series` (count, lastObservedTime) is patched at most every `flush_interval`
seconds. A repeat after the window starts a new Event.

`record` never blocks and never raises: it puts the event on a bounded queue
for one worker task; a full queue drops (and counts) the event. Writes use
`fieldValidation=Strict`, so a field the server does not know is an error we
see in tests, not silently dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from flock.agent.datastore.base import PodEvent
from flock.kube.client import ApiError, KubeClient

log = logging.getLogger(__name__)

REPORTING_CONTROLLER = "flock.fritzlab.net/agent"
NOTE_MAX = 1024  # the API's limit for Event.note
STRICT = {"fieldValidation": "Strict"}


def micro_time(t: float) -> str:
    """metav1.MicroTime: RFC 3339 with microseconds, UTC."""
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(slots=True)
class _Series:
    name: str  # the Event object's name
    namespace: str
    first: float  # monotonic
    last: float  # monotonic, last occurrence
    last_wall: float
    count: int = 1
    flushed_count: int = 1
    flushed_at: float = 0.0  # monotonic


@dataclass(slots=True)
class RecorderStats:
    recorded: int = 0
    created: int = 0
    patched: int = 0
    aggregated: int = 0  # occurrences folded into a series
    dropped: int = 0
    errors: int = 0
    last_error: str = ""


_Key = tuple[str, str, str, str, str, str]  # (kind, namespace, name, uid, reason, note)


class EventRecorder:
    """Posts PodEvents as events.k8s.io/v1 Events, with series aggregation."""

    def __init__(
        self,
        client: KubeClient,
        *,
        component: str,
        host: str,
        window: float = 360.0,
        flush_interval: float = 30.0,
        max_queue: int = 256,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.instance = f"{component}-{host}"[:128]
        self.window = window
        self.flush_interval = flush_interval
        self._clock = clock
        self._wall = wall
        self._queue: asyncio.Queue[tuple[PodEvent, float, float]] = asyncio.Queue(max_queue)
        self._series: dict[_Key, _Series] = {}
        self._task: asyncio.Task[None] | None = None
        self.stats = RecorderStats()
        self._idle = asyncio.Event()
        self._idle.set()

    def record(self, event: PodEvent) -> None:
        """Queue one occurrence; never blocks, never raises."""
        self.stats.recorded += 1
        try:
            self._queue.put_nowait((event, self._clock(), self._wall()))
            self._idle.clear()
        except asyncio.QueueFull:
            self.stats.dropped += 1

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="event-recorder")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def drained(self) -> None:
        """Wait until every queued occurrence has been handled (tests, shutdown)."""
        await self._idle.wait()

    async def flush(self) -> None:
        """Patch every series with unreported occurrences now."""
        for key, s in list(self._series.items()):
            if s.count != s.flushed_count:
                await self._patch(key, s)

    async def _run(self) -> None:
        while True:
            due = self._next_flush()
            try:
                if due is None:
                    ev, mono, wall = await self._queue.get()
                else:
                    ev, mono, wall = await asyncio.wait_for(
                        self._queue.get(), max(0.0, due - self._clock())
                    )
            except TimeoutError:
                await self._flush_due()
                continue
            try:
                await self._handle(ev, mono, wall)
            except Exception as e:  # never lose the worker
                self.stats.errors += 1
                self.stats.last_error = f"{type(e).__name__}: {e}"
                log.exception("event recorder failed")
            await self._flush_due()
            if self._queue.empty():
                self._idle.set()

    def _next_flush(self) -> float | None:
        pending = [
            s.flushed_at + self.flush_interval
            for s in self._series.values()
            if s.count != s.flushed_count
        ]
        return min(pending) if pending else None

    async def _flush_due(self) -> None:
        now = self._clock()
        for key, s in list(self._series.items()):
            if s.count != s.flushed_count and now - s.flushed_at >= self.flush_interval:
                await self._patch(key, s)
            elif now - s.last > self.window:
                del self._series[key]

    async def _handle(self, ev: PodEvent, mono: float, wall: float) -> None:
        note = ev.message[:NOTE_MAX]
        key: _Key = (ev.kind, ev.namespace, ev.name, ev.uid, ev.reason, note)
        s = self._series.get(key)
        if s is not None and mono - s.last <= self.window:
            s.count += 1
            s.last, s.last_wall = mono, wall
            self.stats.aggregated += 1
            return
        name = f"{ev.name}.{secrets.token_hex(8)}"[:253]
        body = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": ev.namespace},
            "eventTime": micro_time(wall),
            "reportingController": REPORTING_CONTROLLER,
            "reportingInstance": self.instance,
            "action": "Add" if ev.kind == "Pod" else "Compile",
            "reason": ev.reason,
            "note": note,
            "type": "Warning" if ev.warning else "Normal",
            "regarding": {
                "apiVersion": ev.api_version,
                "kind": ev.kind,
                "namespace": ev.namespace,
                "name": ev.name,
                **({"uid": ev.uid} if ev.uid else {}),
            },
        }
        try:
            await self.client.request(
                "POST",
                f"/apis/events.k8s.io/v1/namespaces/{ev.namespace}/events",
                params=STRICT,
                body=body,
            )
        except ApiError as e:
            self._failed("create", ev, e)
            return
        self.stats.created += 1
        self._series[key] = _Series(
            name=name,
            namespace=ev.namespace,
            first=mono,
            last=mono,
            last_wall=wall,
            flushed_at=mono,
        )

    async def _patch(self, key: _Key, s: _Series) -> None:
        patch = {"series": {"count": s.count, "lastObservedTime": micro_time(s.last_wall)}}
        try:
            await self.client.request(
                "PATCH",
                f"/apis/events.k8s.io/v1/namespaces/{s.namespace}/events/{s.name}",
                params=STRICT,
                body=patch,
                content_type="application/merge-patch+json",
            )
        except ApiError as e:
            if e.status == 404:  # deleted (TTL, or by a user): the next occurrence starts anew
                self._series.pop(key, None)
                return
            self.stats.errors += 1
            self.stats.last_error = str(e)
            s.flushed_at = self._clock()  # retry at the next interval, not in a loop
            return
        self.stats.patched += 1
        s.flushed_count = s.count
        s.flushed_at = self._clock()

    def _failed(self, what: str, ev: PodEvent, e: ApiError) -> None:
        self.stats.errors += 1
        self.stats.last_error = str(e)
        log.warning(
            "could not %s event",
            what,
            extra={
                "pod": f"{ev.namespace}/{ev.name}",
                "event_reason": ev.reason,
                "reason": str(e),
                "event": json.dumps({"reason": ev.reason, "note": ev.message[:200]}),
            },
        )
