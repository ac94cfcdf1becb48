"""Wait until something holds: the one polling helper of the tests, benchmarks and lab.

A test that checks a condition once, right after starting whatever makes it
true, passes on an idle machine and fails on a loaded one; a test that sleeps a
guessed time first is slow when idle and still fails under load. Both were the
flakes of the test suite. The cure is one helper with clear semantics:

- `probe` is called repeatedly (every `interval` seconds) until `until(value)`
  holds, and the value that satisfied it is returned, so the caller can assert
  more on exactly what was seen;
- past `timeout` seconds it raises `WaitTimeout`, whose message names what was
  awaited and the last value seen, which is what one needs to read a failure
  from a CI log;
- the probe is always called once more after the deadline has passed, so a
  process that was descheduled for the whole timeout is not reported as a
  failure of the thing it waited for;
- exceptions of the `ignore` types raised by the probe count as "not yet" (a
  daemon that is still starting refuses connections) and are reported as the
  last value seen; every other exception propagates at once.

Timeouts are deadlines, not expectations: they say when to give up, so they
are generous (a 2-core CI machine under load is slow); a test never asserts
that something was fast by waiting for it.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

DEFAULT_INTERVAL = 0.05


class WaitTimeout(TimeoutError):
    """The awaited condition did not hold before the deadline."""

    def __init__(self, what: str, waited: float, last: object) -> None:
        super().__init__(f"waited {waited:.1f}s for {what}; last seen: {last!r}")
        self.what = what
        self.waited = waited
        self.last = last


def _holds(value: object) -> bool:
    return bool(value)


def wait_until(
    probe: Callable[[], T],
    *,
    timeout: float,
    what: str,
    until: Callable[[T], bool] = _holds,
    interval: float = DEFAULT_INTERVAL,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `probe` until `until(value)` holds (truthiness by default); return that value.

    Raises `WaitTimeout` ("waited Xs for <what>; last seen: <value>") once `timeout`
    seconds have passed and one more probe after the deadline still fails.
    """
    start = time.monotonic()
    deadline = start + timeout
    last: object = "(not probed)"
    while True:
        past = time.monotonic() >= deadline  # read before probing: one last look after it
        try:
            value = probe()
        except ignore as e:
            last = e
        else:
            if until(value):
                return value
            last = value
        if past:
            raise WaitTimeout(what, time.monotonic() - start, last)
        time.sleep(interval)


@overload
async def wait_until_async(
    probe: Callable[[], Awaitable[T]],
    *,
    timeout: float,
    what: str,
    until: Callable[[T], bool] = ...,
    interval: float = ...,
    ignore: tuple[type[BaseException], ...] = ...,
) -> T: ...


@overload
async def wait_until_async(
    probe: Callable[[], T],
    *,
    timeout: float,
    what: str,
    until: Callable[[T], bool] = ...,
    interval: float = ...,
    ignore: tuple[type[BaseException], ...] = ...,
) -> T: ...


async def wait_until_async(
    probe: Callable[[], Any],
    *,
    timeout: float,
    what: str,
    until: Callable[[Any], bool] = _holds,
    interval: float = DEFAULT_INTERVAL,
    ignore: tuple[type[BaseException], ...] = (),
) -> Any:
    """`wait_until` for an event loop: sleeps with `asyncio.sleep` between probes, so the
    tasks that make the condition true keep running; `probe` may be a coroutine function."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + timeout
    last: object = "(not probed)"
    while True:
        past = loop.time() >= deadline
        try:
            value = probe()
            if inspect.isawaitable(value):
                value = await value
        except ignore as e:
            last = e
        else:
            if until(value):
                return value
            last = value
        if past:
            raise WaitTimeout(what, loop.time() - start, last)
        await asyncio.sleep(interval)
