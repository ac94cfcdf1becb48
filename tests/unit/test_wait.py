"""The polling helper: returns what it saw, says what it waited for, never gives up early.

Time is not mocked: the probes count calls and flip on a call number, so no
test here depends on how fast the machine is, only on the helper's order of
"probe, then check the deadline".
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from flock.testbed.wait import WaitTimeout, wait_until, wait_until_async


def test_returns_the_value_that_satisfied_the_condition() -> None:
    calls = itertools.count(1)
    got = wait_until(lambda: next(calls), until=lambda n: n >= 3, timeout=60, what="3", interval=0)
    assert got == 3


def test_truthiness_is_the_default_condition() -> None:
    values = iter([[], [], ["x"]])
    assert wait_until(lambda: next(values), timeout=60, what="a list", interval=0) == ["x"]


def test_timeout_names_what_was_awaited_and_the_last_value_seen() -> None:
    calls = itertools.count(1)
    with pytest.raises(WaitTimeout) as info:
        wait_until(lambda: {"n": next(calls)}, until=lambda _: False, timeout=0, what="nothing")
    msg = str(info.value)
    assert msg.startswith("waited ") and "s for nothing; last seen: {'n': " in msg
    assert info.value.what == "nothing" and info.value.last == {"n": 1}
    assert isinstance(info.value, TimeoutError)


def test_probes_once_more_after_the_deadline() -> None:
    """A waiter descheduled past its deadline still looks once before failing."""
    calls = itertools.count(1)
    # timeout=0: the deadline has passed before the first probe; that probe still counts.
    assert wait_until(lambda: next(calls), until=lambda n: n == 1, timeout=0, what="one") == 1


def test_ignored_exceptions_are_not_yet_and_reported_as_last_seen() -> None:
    def refused() -> int:
        raise ConnectionRefusedError("not listening yet")

    with pytest.raises(WaitTimeout, match="ConnectionRefusedError"):
        wait_until(refused, timeout=0, what="a listener", ignore=(OSError,))
    attempts = iter([ConnectionRefusedError(), ConnectionRefusedError(), 7])

    def starting() -> object:
        v = next(attempts)
        if isinstance(v, Exception):
            raise v
        return v

    assert wait_until(starting, timeout=60, what="a listener", ignore=(OSError,), interval=0) == 7


def test_other_exceptions_propagate_at_once() -> None:
    calls = itertools.count(1)

    def broken() -> int:
        next(calls)
        raise KeyError("bug")

    with pytest.raises(KeyError):
        wait_until(broken, timeout=60, what="x", ignore=(OSError,))
    assert next(calls) == 2  # called once, not retried


def test_async_variant_awaits_coroutine_probes_and_lets_other_tasks_run() -> None:
    async def main() -> None:
        box: list[int] = []

        async def producer() -> None:
            for i in range(3):
                await asyncio.sleep(0)
                box.append(i)

        task = asyncio.create_task(producer())

        async def probe() -> int:
            return len(box)

        got = await wait_until_async(probe, until=lambda n: n == 3, timeout=60, what="3 items")
        assert got == 3
        await task
        assert await wait_until_async(lambda: box, timeout=60, what="items") == [0, 1, 2]
        with pytest.raises(WaitTimeout, match=r"for never; last seen: \[0, 1, 2\]"):
            await wait_until_async(lambda: box, until=lambda _: False, timeout=0, what="never")

    asyncio.run(main())
