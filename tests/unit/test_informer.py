"""The informer against a fake API collection with etcd's semantics.

Each test drives the fake step by step and waits (with the one polling helper)
for the informer to reach the server's state; the consumer checks on every
delivered change that it is consistent with what it saw before (no duplicate,
no resourceVersion going backwards, no DELETED of something it does not have).
The state machine at the end interleaves writes with compactions, broken and
expired streams, outages and bookmarks, and requires that the consumer's view
always converges to the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from flock.kube.fake import FakeCollection
from flock.kube.informer import ADDED, DELETED, MODIFIED, Backoff, Change, Informer, newer
from flock.testbed.wait import wait_until_async

Key = tuple[str, str]


class Mirror:
    """A consumer that rebuilds the collection from the changes alone, checking each."""

    def __init__(self) -> None:
        self.view: dict[Key, tuple[str, str, str]] = {}  # key -> (uid, rv, value)
        self.seen: set[tuple[Key, str, str]] = set()  # (key, uid, rv) delivered as new
        self.log: list[Change[str]] = []

    def __call__(self, ch: Change[str]) -> None:
        self.log.append(ch)
        if ch.type == DELETED:
            assert ch.old is not None and ch.new is None
            have = self.view.pop(ch.key, None)
            assert have is not None, f"DELETED {ch.key} that the consumer does not have"
            assert have[0] == ch.old.uid
            return
        assert ch.new is not None
        new = ch.new
        mark = (ch.key, new.uid, new.resource_version)
        assert mark not in self.seen, f"{ch.type} {mark} delivered twice"
        self.seen.add(mark)
        have = self.view.get(ch.key)
        if ch.type == ADDED:
            assert have is None, f"ADDED {ch.key} that the consumer already has"
        else:
            assert ch.type == MODIFIED and have is not None and have[0] == new.uid
            assert newer(new.resource_version, have[1]), (
                f"{ch.key} went from {have[1]} back to {new.resource_version}"
            )
        self.view[ch.key] = (new.uid, new.resource_version, new.value)

    def values(self) -> dict[Key, tuple[str, str]]:
        return {k: (v[0], v[2]) for k, v in self.view.items()}


def server_values(api: FakeCollection[str]) -> dict[Key, tuple[str, str]]:
    return {k: (i.uid, i.value) for k, i in api.objects.items()}


class Harness:
    def __init__(self, api: FakeCollection[str], *, page_size: int = 3) -> None:
        self.api = api
        self.mirror = Mirror()
        self.sleeps: list[float] = []

        async def sleep(d: float) -> None:
            self.sleeps.append(d)
            await asyncio.sleep(0)

        self.informer: Informer[str] = Informer(
            api,
            name="test",
            on_change=self.mirror,
            page_size=page_size,
            backoff=Backoff(base=0.2, cap=30.0),
            sleep=sleep,
        )

    async def converged(self, what: str = "the informer to converge") -> None:
        await wait_until_async(
            lambda: (self.mirror.values(), self.api.objects.keys() == self.informer.items.keys()),
            until=lambda v: v[0] == server_values(self.api) and v[1],
            timeout=10,
            what=what,
        )


@contextlib.asynccontextmanager
async def running(h: Harness) -> AsyncIterator[Harness]:
    task = asyncio.create_task(h.informer.run(), name="informer")
    try:
        yield h
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(coro())


async def watching(h: Harness) -> None:
    await wait_until_async(lambda: h.api.open_streams, timeout=10, what="an open watch")


def test_initial_list_is_paginated_and_synced() -> None:
    async def main() -> None:
        api: FakeCollection[str] = FakeCollection()
        for i in range(10):
            api.create("ns", f"p{i}", f"v{i}")
        h = Harness(api, page_size=4)
        async with running(h):
            await h.informer.wait_synced()
            assert h.mirror.values() == server_values(api)
            assert api.counters.list_pages == 3  # 4 + 4 + 2
            assert h.informer.resource_version == str(api.rv)
            assert [c.type for c in h.mirror.log] == [ADDED] * 10

    run(main)


def test_watch_delivers_changes_in_order() -> None:
    async def main() -> None:
        api: FakeCollection[str] = FakeCollection()
        api.create("ns", "a", "1")
        h = Harness(api)
        async with running(h):
            await watching(h)
            api.modify("ns", "a", "2")
            api.create("ns", "b", "1")
            api.modify("ns", "a", "3")
            api.delete("ns", "b")
            await h.converged()
            assert [(c.type, c.key[1]) for c in h.mirror.log] == [
                (ADDED, "a"),
                (MODIFIED, "a"),
                (ADDED, "b"),
                (MODIFIED, "a"),
                (DELETED, "b"),
            ]
            assert api.counters.lists == 1
            assert h.informer.resource_version == str(api.rv), "resumes after the last event"

    run(main)


def test_quiet_modify_keeps_identity_and_is_not_delivered() -> None:
    async def main() -> None:
        api: FakeCollection[str] = FakeCollection()
        api.create("ns", "a", "same")
        h = Harness(api)
        async with running(h):
            await watching(h)
            before = h.informer.get("ns", "a")
            api.modify("ns", "a", "same")
            await wait_until_async(
                lambda: h.informer.stats.quiet, timeout=10, what="the quiet modify"
            )
            after = h.informer.get("ns", "a")
            assert before is not None and after is not None
            assert after.value is before.value
            assert after.resource_version == str(api.rv)
            assert len(h.mirror.log) == 1

    run(main)


def test_broken_stream_resumes_without_relist() -> None:
    async def main() -> None:
        api: FakeCollection[str] = FakeCollection()
        api.create("ns", "a", "1")
        h = Harness(api)
        async with running(h):
            await watching(h)
            api.break_streams()
            api.modify("ns", "a", "2")  # happens while the stream is down
            api.create("ns", "b", "1")
            await h.converged()
            assert api.counters.lists == 1, "a resumable watch must not relist"
            assert h.informer.stats.errors >= 1

    run(main)


@pytest.mark.parametrize("how", ["watch request", "in-stream"])
def test_gone_relists_and_delivers_only_the_difference(how: str) -> None:
    async def main() -> None:
        api: FakeCollection[str] = FakeCollection()
        for name in "abcd":
            api.create("ns", name, "1")
        h = Harness(api)
        async with running(h):
            await watching(h)
            if how == "in-stream":
                api.expire_streams()
            else:
                api.break_streams()
                api.fail_next = 1  # the resume fails once, then meets the compaction
            api.modify("ns", "a", "2")
            api.delete("ns", "b")
            api.create("ns", "e", "1")
            api.delete("ns", "c")
            api.create("ns", "c", "again")  # same name, new uid
            api.compact()
            h.mirror.log.clear()
            d_before = h.informer.get("ns", "d")
            await h.converged()
            assert api.counters.lists == 2
            assert h.informer.get("ns", "d") is d_before, "unchanged: the cached item is kept"
            got = sorted((c.type, c.key[1]) for c in h.mirror.log)
            assert got == sorted(
                [
                    (MODIFIED, "a"),
                    (DELETED, "b"),
                    (DELETED, "c"),
                    (ADDED, "c"),
                    (ADDED, "e"),
                ]
            ), "d did not change and must not be delivered"

    run(main)


def test_expired_continue_token_restarts_the_list() -> None:
    async def main() -> None:
        api: FakeCollection[str] = FakeCollection()
        for i in range(7):
            api.create("ns", f"p{i}", "1")
        h = Harness(api, page_size=3)
        real_list = api.list

        async def compacting_list(*, limit: int, continue_: str, **kw: Any) -> Any:
            out = await real_list(limit=limit, continue_=continue_, **kw)
            if api.counters.list_pages == 1:
                api.create("ns", "late", "1")
                api.compact()  # the token of page 1 is now too old
            return out

        api.list = compacting_list  # type: ignore[method-assign]
        async with running(h):
            await h.informer.wait_synced()
            await h.converged()
            assert api.counters.gone == 1
            assert ("ns", "late") in h.informer.items

    run(main)


def test_outage_backs_off_with_jitter_and_resets() -> None:
    async def main() -> None:
        api: FakeCollection[str] = FakeCollection()
        api.create("ns", "a", "1")
        api.fail_next = 12
        h = Harness(api)
        async with running(h):
            await h.informer.wait_synced()
            delays = list(h.sleeps)
            assert len(delays) == 12
            for n, d in enumerate(delays, start=1):
                full = min(30.0, 0.2 * 2 ** (n - 1))
                assert full / 2 <= d <= full, (n, d)
            assert delays[-1] >= 15.0, "capped at 30 s, never less than half of it"
            assert len(set(delays)) == len(delays), "jitter: no two fleets retry in step"
            assert h.informer.backoff.attempt == 0, "a successful list resets the backoff"
            await watching(h)
            api.break_streams()
            await wait_until_async(
                lambda: len(h.sleeps), until=lambda n: n >= 13, timeout=10, what="one more backoff"
            )
            assert h.sleeps[12] <= 0.2, "after success the backoff starts small again"
            await h.converged()

    run(main)


def test_bookmark_advances_resource_version() -> None:
    async def main() -> None:
        api: FakeCollection[str] = FakeCollection()
        api.create("ns", "a", "1")
        other: FakeCollection[str] = FakeCollection()
        h = Harness(api)
        async with running(h):
            await watching(h)
            # Writes elsewhere in etcd move the revision without touching this collection.
            api.rv += 50
            api.bookmark()
            await wait_until_async(
                lambda: h.informer.resource_version,
                until=lambda rv: rv == str(api.rv),
                timeout=10,
                what="the bookmark's resourceVersion",
            )
            api.compact()  # compaction up to the bookmark: the resume point is still valid
            api.break_streams()
            api.modify("ns", "a", "2")
            await h.converged()
            assert api.counters.lists == 1, "resuming from a bookmark needs no relist"
            del other

    run(main)


def test_consumer_failure_is_logged_not_fatal() -> None:
    async def main() -> None:
        api: FakeCollection[str] = FakeCollection()
        h = Harness(api)
        calls: list[str] = []

        def bad(ch: Change[str]) -> None:
            calls.append(ch.key[1])
            if ch.key[1] == "boom":
                raise RuntimeError("consumer bug")
            h.mirror(ch)

        h.informer._on_change = bad
        async with running(h):
            await watching(h)
            api.create("ns", "boom", "1")
            api.create("ns", "ok", "1")
            await wait_until_async(
                lambda: calls,
                until=lambda c: "ok" in c,
                timeout=10,
                what="the change after the failing one",
            )

    run(main)


NAMES = ["a", "b", "c", "d"]


class InformerMachine(RuleBasedStateMachine):
    """Writes interleaved with every failure the API can show; the view must converge."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.api: FakeCollection[str] = FakeCollection()
        self.h = Harness(self.api, page_size=2)
        self.task = self.loop.create_task(self.h.informer.run())
        self.n = 0

    def teardown(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(self.task)
        self.loop.close()

    def _value(self) -> str:
        self.n += 1
        return f"v{self.n}"

    @rule(name=st.sampled_from(NAMES))
    def create(self, name: str) -> None:
        if ("ns", name) not in self.api.objects:
            self.api.create("ns", name, self._value())

    @rule(name=st.sampled_from(NAMES), same=st.booleans())
    def modify(self, name: str, same: bool) -> None:
        obj = self.api.objects.get(("ns", name))
        if obj is not None:
            self.api.modify("ns", name, obj.value if same else self._value())

    @rule(name=st.sampled_from(NAMES))
    def delete(self, name: str) -> None:
        if ("ns", name) in self.api.objects:
            self.api.delete("ns", name)

    @rule(name=st.sampled_from(NAMES))
    def recreate(self, name: str) -> None:
        if ("ns", name) in self.api.objects:
            self.api.delete("ns", name)
            self.api.create("ns", name, self._value())

    @rule()
    def compact(self) -> None:
        self.api.compact()

    @rule()
    def break_streams(self) -> None:
        self.api.break_streams()

    @rule()
    def expire_streams(self) -> None:
        self.api.expire_streams()

    @rule(n=st.integers(min_value=1, max_value=3))
    def outage(self, n: int) -> None:
        self.api.fail_next = n

    @rule()
    def bookmark(self) -> None:
        self.api.bookmark()

    @rule(steps=st.integers(min_value=1, max_value=20))
    def let_it_run(self, steps: int) -> None:
        async def spin() -> None:
            for _ in range(steps):
                await asyncio.sleep(0)

        self.loop.run_until_complete(spin())

    @precondition(lambda self: True)
    @rule()
    def settle(self) -> None:
        self.loop.run_until_complete(self.h.converged("the view to converge after the steps"))

    @invariant()
    def consumer_matches_cache(self) -> None:
        # Whatever the informer has applied, it has told the consumer, exactly.
        cache = {k: (i.uid, i.value) for k, i in self.h.informer.items.items()}
        if self.h.informer.synced:
            assert self.h.mirror.values() == cache


TestInformerMachine = InformerMachine.TestCase
TestInformerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
