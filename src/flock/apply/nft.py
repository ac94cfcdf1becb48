"""Put the compiled NetworkPolicy ruleset into the kernel, atomically, and keep it there.

Two ways to talk to nftables, same contract (one script = one atomic transaction):
`NftCli` runs `nft -f -` (optionally inside a named netns, for tests and the lab);
`NftLib` calls libnftables in-process through ctypes, which saves the fork/exec of
every transaction (the venv cannot import Debian's python3-nftables, which is the
same ctypes wrapper). Only table `inet flock` is ever named: other tables are never
read, flushed or deleted.

`PolicyEngine.sync(inputs)` (the whole view) or `.update(changes)` (only what
changed) feeds the incremental compiler and applies the delta it hands out as one
transaction; on the first call, or if an incremental transaction is refused
(someone changed our table behind our back), it replaces the whole table in one
transaction. A sync that fails leaves the kernel as it was
(nft transactions are all-or-nothing) and raises, so a caller such as CNI ADD
never proceeds without the rules in place.
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from flock.compile.policy import (
    FAMILY,
    TABLE,
    Delta,
    PolicyChanges,
    PolicyCompiler,
    PolicyInputs,
    Ruleset,
    render_delta,
    render_full,
)
from flock.model.policy import RejectedPolicy

log = logging.getLogger(__name__)


# Parsing a full-table script leaves tens of MB of freed heap in the process
# (10k pods: ~55 MB); malloc_trim returns it. Small incremental scripts skip it.
TRIM_AFTER = 64 * 1024


class NftError(RuntimeError):
    """nft refused a transaction; nothing of it was applied."""


class Nft(Protocol):
    def run(self, script: str) -> str: ...


class NftCli:
    """`nft -f -`, in the current namespace or inside named netns `netns`."""

    def __init__(self, *, netns: str | None = None, binary: str = "nft") -> None:
        self.netns = netns
        self.binary = binary

    def _cmd(self, *args: str) -> list[str]:
        base = [self.binary, *args]
        return ["ip", "netns", "exec", self.netns, *base] if self.netns else base

    def run(self, script: str) -> str:
        proc = subprocess.run(
            self._cmd("-f", "-"), input=script, capture_output=True, text=True, timeout=60
        )
        if proc.returncode != 0:
            raise NftError(proc.stderr.strip() or f"nft exited {proc.returncode}")
        return proc.stdout


class NftLib:
    """libnftables through ctypes, in the calling thread's network namespace."""

    def __init__(self, soname: str = "libnftables.so.1") -> None:
        lib = ctypes.CDLL(soname)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        self._lib = lib
        self._trim: Any = None
        try:  # glibc: give the parser's freed heap back after big transactions
            libc = ctypes.CDLL("libc.so.6")
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            self._trim = libc.malloc_trim
        except (OSError, AttributeError):
            pass
        self._lock = threading.Lock()
        self._ctx = lib.nft_ctx_new(0)
        if not self._ctx:
            raise NftError("nft_ctx_new failed")
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)

    def run(self, script: str) -> str:
        with self._lock:
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
            out = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
            err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
            if self._trim is not None and len(script) > TRIM_AFTER:
                self._trim(0)
        if rc != 0:
            raise NftError(err.decode(errors="replace").strip() or f"libnftables returned {rc}")
        return out.decode(errors="replace")

    def close(self) -> None:
        with self._lock:
            if self._ctx:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None


def default_nft(netns: str | None = None) -> Nft:
    """In-process libnftables for the agent's own namespace (no fork per transaction:
    incremental updates take a few ms); `nft -f -` inside `netns` otherwise, or when
    libnftables cannot be loaded."""
    if netns is None:
        try:
            return NftLib()
        except (OSError, NftError) as exc:
            log.warning("libnftables unavailable (%s); using the nft binary", exc)
    return NftCli(netns=netns)


def table_text(nft: Nft) -> str | None:
    """Our table in nft's text syntax; None if absent."""
    try:
        return nft.run(f"list table {FAMILY} {TABLE}")
    except NftError as exc:
        if "No such file" in str(exc) or "does not exist" in str(exc):
            return None
        raise


def delete_table(nft: Nft) -> None:
    """Remove table inet flock if present (and nothing else)."""
    nft.run(f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n")


@dataclass(slots=True)
class PolicyStatus:
    """What `flock status` and the metrics show about NetworkPolicy on this node."""

    syncs: int = 0
    full_syncs: int = 0
    last_sync: float | None = None  # unix time of the last successful sync
    last_duration_s: float | None = None
    last_compile_s: float | None = None
    last_apply_s: float | None = None
    last_error: str | None = None
    # "ns/name" -> why it did not parse; "ns/name" -> directions it isolates meanwhile
    rejected_policies: dict[str, str] = field(default_factory=dict)
    fail_closed: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "syncs": self.syncs,
            "full_syncs": self.full_syncs,
            "last_sync": self.last_sync,
            "last_duration_s": self.last_duration_s,
            "last_compile_s": self.last_compile_s,
            "last_apply_s": self.last_apply_s,
            "last_error": self.last_error,
            "rejected_policies": dict(self.rejected_policies),
            "fail_closed": {k: list(v) for k, v in self.fail_closed.items()},
            **self.counts,
        }


class PolicyResyncNeeded(RuntimeError):
    """`update` cannot proceed: the engine lost its view (a compile failed half-way)
    and needs the whole view again through `sync`."""


class PolicyEngine:
    """Keeps table inet flock equal to the policy compiled from the inputs.

    Two ways in, same result: `sync(inputs)` takes the whole view (diffed against
    the previous one by object identity); `update(changes)` takes only what changed
    (O(change): the agent's path when its datastore says which objects changed).
    Both are thread-safe and synchronous: when they return, the kernel enforces
    the new state; when they raise, the kernel still enforces the previous one, and
    the next call replaces the whole table.
    """

    def __init__(self, nft: Nft) -> None:
        self.nft = nft
        self._lock = threading.Lock()  # one sync at a time
        self._status_lock = threading.Lock()  # status() never waits for a sync
        self._compiler = PolicyCompiler()
        self._in_kernel = False  # the kernel holds what the compiler last handed out
        # The compiler lacks the whole view (none given yet, or reset after a failed
        # compile): only sync() can go on, update() would compile a partial cluster.
        self._lost_view = True
        self._status = PolicyStatus()
        self._rejected: dict[tuple[str, str], RejectedPolicy] = {}

    @property
    def applied(self) -> Ruleset | None:
        """The ruleset in the kernel (as far as this engine knows), built on demand."""
        with self._lock:
            return self._compiler.ruleset() if self._in_kernel else None

    def rejected(self) -> dict[tuple[str, str], RejectedPolicy]:
        """Policies that did not parse and are enforced fail-closed: (namespace, name)
        -> the stand-in, with `reason` and `policy_types` (what an Event on the
        policy should say)."""
        with self._status_lock:
            return dict(self._rejected)

    def sync(self, inputs: PolicyInputs, *, full: bool = False) -> None:
        """Make the kernel enforce `inputs` (the whole view)."""
        with self._lock:
            self._run(lambda c: c.load(inputs), full=full, whole_view=True)

    def update(self, changes: PolicyChanges, *, full: bool = False) -> None:
        """Make the kernel enforce the previous view plus `changes`. Raises
        `PolicyResyncNeeded` before the first `sync` and after a failed compile."""
        with self._lock:
            if self._lost_view:
                raise PolicyResyncNeeded("policy engine needs the whole view (sync)")
            self._run(lambda c: c.apply(changes), full=full)

    def _run(
        self, change: Callable[[PolicyCompiler], None], *, full: bool, whole_view: bool = False
    ) -> None:
        t0 = time.perf_counter()
        try:
            change(self._compiler)
            delta = self._compiler.take_delta()
            if whole_view:
                self._lost_view = False
        except Exception as exc:
            self._compiler = PolicyCompiler()  # its state may be half-updated
            self._in_kernel = False
            self._lost_view = True
            self._fail(f"compile: {exc}")
            log.exception("policy compile failed; kernel keeps the previous ruleset")
            raise
        t1 = time.perf_counter()
        try:
            full_done = self._apply(delta, full=full)
        except Exception as exc:  # NftError, or nft not runnable / timed out
            self._fail(f"apply: {exc}")
            log.error("policy apply failed; kernel keeps the previous ruleset: %s", exc)
            raise
        t2 = time.perf_counter()
        self._report(t0, t1, t2, full_done)

    def _report(self, t0: float, t1: float, t2: float, full_done: bool) -> None:
        rejected = self._compiler.rejected()
        if rejected != self._rejected:
            for key, pol in sorted(rejected.items()):
                if self._rejected.get(key) != pol:
                    log.warning(
                        "NetworkPolicy %s/%s rejected; the pods it may select are isolated "
                        "for %s until it is fixed: %s",
                        *key,
                        "+".join(sorted(pol.policy_types)),
                        pol.reason,
                    )
        counts = self._compiler.summary()
        with self._status_lock:
            st = self._status
            self._rejected = rejected
            st.rejected_policies = {
                f"{ns}/{n}": p.reason for (ns, n), p in sorted(rejected.items())
            }
            st.fail_closed = {
                f"{ns}/{n}": sorted(p.policy_types) for (ns, n), p in sorted(rejected.items())
            }
            st.syncs += 1
            st.full_syncs += full_done
            st.last_sync = time.time()
            st.last_compile_s = t1 - t0
            st.last_apply_s = t2 - t1
            st.last_duration_s = t2 - t0
            st.last_error = None
            st.counts = counts

    def _fail(self, msg: str) -> None:
        with self._status_lock:
            self._status.last_error = msg

    def _apply(self, delta: Delta, *, full: bool) -> bool:
        """Put the compiler's state in the kernel; True if that took a full table
        replace. The delta is the change from what the kernel holds, as long as
        every earlier one went in; otherwise (first call, a refused transaction)
        the whole table is replaced."""
        if self._in_kernel and not full:
            script = render_delta(delta)
            if not script:
                return False
            try:
                self.nft.run(script)
                return False
            except NftError as exc:
                log.warning("incremental policy update refused (%s); replacing the table", exc)
        self._in_kernel = False
        self.nft.run(render_full(self._compiler.ruleset()))
        self._in_kernel = True
        return True

    def remove(self) -> None:
        """Delete our table (agent uninstall); nothing else is touched."""
        with self._lock:
            delete_table(self.nft)
            self._in_kernel = False

    def status(self) -> dict[str, Any]:
        with self._status_lock:
            return self._status.as_dict()
