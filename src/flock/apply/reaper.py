"""The veth reaper: deletes retired host veths in batches, on its own thread, off the DEL path.

Unregistering a veth waits for RCU (~30 ms here, whichever end is deleted), so
`Datapath.teardown_pod` only retires a veth (down, moved into a link group
`RETIRED_GROUP | slot`) and this reaper deletes each group with one
RTM_DELLINK: one RCU wait per group of up to `REAP_BATCH` veths. The unregister
holds RTNL, which every ADD needs (16 veths hold it ~4 ms, 64 ~19 ms), so
between two groups the reaper pauses and lets pod setups in progress finish
(`setup()` counts them), for at most `20 * pause` seconds.

Lock order and the inversion it avoids: a reaping round holds `_round_lock`
(a setup whose names clash with a retired veth must wait for the round that
took it, `reap_now`). A setup waiting for that lock, or running a round
itself, is not counted as in progress: otherwise the reaper would wait for the
setup to finish while the setup waits for the reaper's round (issue 13 item 6).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from flock.apply import rtnl
from flock.apply.rtnl import Request

log = logging.getLogger(__name__)

# Link groups of host veths that teardown has retired (down, routes gone) and the
# reaper has yet to delete: 0x666c6b00 ("flk") plus a batch slot 0-255. One
# RTM_DELLINK of a group unregisters all its links behind one RCU wait, so a
# batch costs about what one veth does (~20-30 ms, off the DEL path). Batches are
# capped at REAP_BATCH links because the unregister holds RTNL, which every ADD
# needs: measured here, 16 veths hold it ~4 ms, 64 veths ~19 ms.
RETIRED_GROUP = 0x666C6B00
RETIRED_MASK = 0xFFFFFF00
REAP_BATCH = 16
GONE = (errno.ENODEV, errno.ENOENT)


def is_retired(group: int) -> bool:
    return group & RETIRED_MASK == RETIRED_GROUP


class ReapSocket(Protocol):
    """What the reaper needs of an rtnetlink socket (`flock.apply.nlsock.RtnlSocket`)."""

    def call(self, req: Request, *, ignore: tuple[int, ...] = ()) -> Any: ...

    def close(self) -> None: ...


class VethReaper:
    """Batches of retired veths, and the thread that deletes them.

    `open_socket` makes the reaper thread's own netlink socket; `delay`: how long
    it gathers retired veths before a round; `pause`: its pause between two
    groups, so that ADDs waiting for RTNL get their turn.
    """

    def __init__(
        self, open_socket: Callable[[], ReapSocket], *, delay: float = 0.05, pause: float = 0.005
    ) -> None:
        self._open_socket = open_socket
        self.delay = delay
        self.pause = pause
        self._lock = threading.Lock()  # the fields below; never held across a syscall
        self._round_lock = threading.Lock()  # one reaping round at a time
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Retirement batches: the slot teardown fills now, how full it is, and the
        # slots holding retired veths (added once a retire has succeeded).
        self._slot = 0
        self._slot_fill = 0
        self._pending: set[int] = set()
        # Setups doing netlink work now (the reaper lets them finish before a group),
        # and per thread how deep it is in `setup()` (so `reap_now` can step out).
        self._setups = 0
        self._depth = threading.local()

    # ---- what teardown and setup call -------------------------------------------------

    def take_slot(self) -> int:
        """The slot (link group) the next retired veth goes into."""
        with self._lock:
            slot = self._slot
            self._slot_fill += 1
            if self._slot_fill >= REAP_BATCH:
                self._slot, self._slot_fill = (slot + 1) % 256, 0
            return slot

    def retired(self, *slots: int) -> None:
        """Veths were retired into `slots` (also ones found at start-up): reap them."""
        with self._lock:
            self._pending.update(slots)

    @property
    def pending(self) -> bool:
        with self._lock:
            return bool(self._pending)

    @contextlib.contextmanager
    def setup(self) -> Iterator[None]:
        """Count the calling thread as a pod setup in progress (it needs RTNL soon)."""
        self._enter(1)
        try:
            yield
        finally:
            self._enter(-1)

    def schedule(self, sock: ReapSocket) -> None:
        """Have the background thread reap soon (now, in this thread, once stopping)."""
        with self._lock:
            now = self._stopping
            if not now and self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="flock-veth-reaper", daemon=True
                )
                self._thread.start()
        if now:
            self.reap_now(sock)
        else:
            self._wanted.set()

    def reap_now(self, sock: ReapSocket, *, pause: float = 0.0) -> None:
        """Delete every retired veth now, on `sock` (waits for a round in progress).

        The calling thread stops counting as a setup while it waits and reaps: the
        round in progress may be waiting for setups to finish.
        """
        depth = getattr(self._depth, "n", 0)
        self._enter(-depth)
        try:
            with self._round_lock:
                self._round(sock, pause=pause)
        finally:
            self._enter(depth)

    def close(self, sock: ReapSocket) -> None:
        """Stop the thread after a last round; reap what was retired meanwhile."""
        with self._lock:
            self._stopping = True
            thread = self._thread
        self._stop.set()
        self._wanted.set()
        if thread is not None:
            thread.join()
        if self.pending:
            try:
                self.reap_now(sock)
            except Exception:
                log.exception("final reap of retired veths failed")

    # ---- the thread -------------------------------------------------------------------

    def _enter(self, n: int) -> None:
        if not n:
            return
        self._depth.n = getattr(self._depth, "n", 0) + n
        with self._lock:
            self._setups += n

    def _loop(self) -> None:
        sock = self._open_socket()
        try:
            while True:
                self._wanted.wait()
                self._stop.wait(self.delay)  # gather a batch; close() cuts it short
                self._wanted.clear()
                try:
                    with self._round_lock:
                        self._round(sock, pause=0.0 if self._stopping else self.pause)
                except Exception:
                    log.exception("reaping retired veths failed; will retry on the next teardown")
                if self._stopping:
                    return
        finally:
            sock.close()

    def _round(self, sock: ReapSocket, *, pause: float) -> None:
        with self._lock:
            slots = sorted(self._pending)
            self._pending.clear()
            if self._slot in slots:  # close the batch being filled
                self._slot, self._slot_fill = (self._slot + 1) % 256, 0
        try:
            for n, slot in enumerate(slots):
                if pause:
                    if n:
                        time.sleep(pause)
                    self._wait_for_quiet(limit=20 * pause)
                sock.call(
                    Request(
                        rtnl.RTM_DELLINK,
                        0,
                        rtnl.group_delete(RETIRED_GROUP | slot),
                        f"delete retired veths (batch {slot})",
                    ),
                    ignore=GONE,
                )
        except BaseException:
            with self._lock:
                self._pending.update(slots)
            raise

    def _wait_for_quiet(self, *, limit: float) -> None:
        """Let setups in progress finish (bounded by `limit` seconds) before taking RTNL."""
        deadline = time.monotonic() + limit
        while self._setups and time.monotonic() < deadline:
            time.sleep(0.0005)
