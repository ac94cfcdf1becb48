"""The veth reaper's scheduling against pod setups, with a fake netlink socket (no root).

The reaper pauses between link groups until pod setups in progress finish (bounded by
20 x its pause). A setup that needs a reap (its names clash with a retired veth) waits
for the round in progress; it must not count itself as in progress meanwhile, or the
round waits for the setup while the setup waits for the round (issue 13 item 6).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from flock.apply.reaper import RETIRED_GROUP, VethReaper
from flock.apply.rtnl import Request

WAIT = 10.0


class FakeSocket:
    """Records group deletions; the first can be held at a gate."""

    def __init__(self) -> None:
        self.deleted: list[int] = []
        self.first_call = threading.Event()
        self.release_first = threading.Event()
        self.release_first.set()

    def call(self, req: Request, *, ignore: tuple[int, ...] = ()) -> Any:
        self.first_call.set()
        if not self.release_first.wait(WAIT):
            raise TimeoutError("gate never opened")
        self.deleted.append(int(req.what.rsplit(" ", 1)[1].rstrip(")")))
        return None

    def close(self) -> None:
        pass


def test_retired_veths_are_deleted_by_group_in_the_background() -> None:
    sock = FakeSocket()
    reaper = VethReaper(lambda: sock, delay=0.0, pause=0.0)
    slots = {reaper.take_slot() for _ in range(40)}  # 16 per group: 3 groups
    assert slots == {0, 1, 2}
    reaper.retired(*slots)
    reaper.schedule(sock)
    deadline = time.monotonic() + WAIT
    while sorted(sock.deleted) != [0, 1, 2] and time.monotonic() < deadline:
        time.sleep(0.001)
    assert sorted(sock.deleted) == [0, 1, 2]
    assert not reaper.pending
    reaper.close(sock)
    assert RETIRED_GROUP & 0xFF == 0


def test_a_setup_waiting_for_the_reap_lock_does_not_hold_up_the_round() -> None:
    """The round holds its lock and pauses between groups for setups in progress (up
    to 20 x 0.5 s here); a setup that waits for that lock must not count."""
    pause = 0.5
    sock = FakeSocket()
    sock.release_first.clear()
    reaper = VethReaper(lambda: sock, delay=0.0, pause=pause)
    reaper.retired(1, 2)  # two groups: the round pauses for setups before the second
    reaper.schedule(sock)
    assert sock.first_call.wait(WAIT), "the reaper's round did not start"
    # The round holds its lock, stopped in its first group's delete. Now a pod setup
    # starts and finds it needs a reap (a name clash with a retired veth).
    setup_at_reap = threading.Event()
    done = threading.Event()

    def setup() -> None:
        with reaper.setup():
            setup_at_reap.set()
            reaper.reap_now(sock)
        done.set()

    t = threading.Thread(target=setup)
    t.start()
    assert setup_at_reap.wait(WAIT)
    start = time.monotonic()
    sock.release_first.set()  # the round goes on: a pause, then its quiet check
    assert done.wait(WAIT), "the setup never got the reap lock"
    took = time.monotonic() - start
    t.join()
    reaper.close(sock)
    # One pause between the groups, not the 20 x pause the quiet check allows a setup.
    assert took < 10 * pause, f"setup waited {took:.2f}s for a round that waited for it"
    assert sorted(sock.deleted) == [1, 2]
