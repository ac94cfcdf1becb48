"""IPAM and allocation-store figures at 100,000 live allocations (prints, asserts nothing).

Measures, for an IPv6 /64 and an IPv4 /16 (100,000 > 65,534, so the v4 case uses
two /16s and fills the first one completely before spilling into the second):

* time to fill to N live allocations, then allocate+release throughput at that size;
* memory held by the Ipam (tracemalloc) at N live allocations;
* the cost of one durable change at that size: a journal append (what the agent
  does per ADD/DEL) versus a full snapshot rewrite, in the state directory given
  (default: a temp dir under /var/tmp, i.e. on a real disk, not tmpfs).

Usage: .venv/bin/python bench/bench_ipam.py [--n 100000] [--dir /var/tmp] [--ops 20000]
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import os
import random
import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from flock.apply.store import AllocationStore
from flock.compile.ipam import Ipam
from flock.model.allocation import AttachmentKey
from flock.model.request import FamilyRequest, IPNetwork, PodRequest


def request(v6: tuple[IPNetwork, ...], v4: tuple[IPNetwork, ...]) -> PodRequest:
    return PodRequest(
        v6=FamilyRequest(want=bool(v6), ranges=v6), v4=FamilyRequest(want=bool(v4), ranges=v4)
    )


def key(i: int) -> AttachmentKey:
    return AttachmentKey(container_id=f"{i:064x}", ifname="eth0")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fill(req: PodRequest, n: int, rng: random.Random) -> tuple[Ipam, float, int]:
    """Fill to n; return the Ipam, the fill time and the RSS growth it caused."""
    gc.collect()
    before = rss()
    t0 = time.perf_counter()
    ipam = Ipam()
    for i in range(n):
        ipam.allocate(
            key(i), req, namespace="bench", pod=f"pod-{i}", host_ifname=f"fl{i:x}", rng=rng
        )
    dt = time.perf_counter() - t0
    gc.collect()
    return ipam, dt, rss() - before


def churn(ipam: Ipam, req: PodRequest, n: int, ops: int, rng: random.Random) -> float:
    """Release a random live attachment and allocate a new one, `ops` times; return ops/s."""
    live = [a.key for a in ipam.all()]
    nxt = n
    t0 = time.perf_counter()
    for _ in range(ops):
        j = rng.randrange(len(live))
        ipam.release(live[j])
        k = key(nxt)
        nxt += 1
        ipam.allocate(k, req, namespace="bench", pod="p", rng=rng)
        live[j] = k
    return ops / (time.perf_counter() - t0)


def store_costs(ipam: Ipam, state_dir: Path, writes: int) -> dict[str, float]:
    d = Path(tempfile.mkdtemp(prefix="fc-bench-", dir=state_dir))
    try:
        store = AllocationStore(d, compact_every=10**9)
        store.load()
        t0 = time.perf_counter()
        store.save(ipam.all())
        snapshot = time.perf_counter() - t0
        size = (d / "allocations.json").stat().st_size
        allocs = ipam.all()
        lat = []
        for i in range(writes):
            a = allocs[i // 2]  # release one, then record it again: same final state
            t = time.perf_counter()
            if i % 2:
                store.record_put(a)
            else:
                store.record_delete(a.key)
            lat.append(time.perf_counter() - t)
        t0 = time.perf_counter()
        store.compact()
        compact = time.perf_counter() - t0
        store.close()
        t0 = time.perf_counter()
        loaded = AllocationStore(d).load()
        load = time.perf_counter() - t0
        assert len(loaded) == len(allocs)
        lat.sort()
        return {
            "snapshot_s": snapshot,
            "snapshot_mb": size / 1e6,
            "append_p50_ms": statistics.median(lat) * 1e3,
            "append_p99_ms": lat[int(len(lat) * 0.99) - 1] * 1e3,
            "compact_s": compact,
            "load_s": load,
        }
    finally:
        shutil.rmtree(d, ignore_errors=True)


def bare_fdatasync_ms(state_dir: Path, n: int = 200) -> float:
    """p50 of appending 300 bytes + fdatasync in state_dir: the disk's floor."""
    d = Path(tempfile.mkdtemp(prefix="fc-bench-", dir=state_dir))
    try:
        fd = os.open(d / "floor", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            os.write(fd, b"x" * 299 + b"\n")
            os.fdatasync(fd)
            lat.append(time.perf_counter() - t)
        os.close(fd)
        return statistics.median(lat) * 1e3
    finally:
        shutil.rmtree(d, ignore_errors=True)


def in_child(fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Run fn in a forked child, so each case's RSS growth is measured from a clean heap."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            os.write(w, json.dumps(fn()).encode())
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("benchmark child failed")
    result: dict[str, float] = json.loads(data)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--ops", type=int, default=20_000)
    ap.add_argument("--writes", type=int, default=400)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args()
    v6 = (ipaddress.IPv6Network("2001:db8:f001::/64"),)
    v4 = (ipaddress.IPv4Network("10.1.0.0/16"), ipaddress.IPv4Network("10.2.0.0/16"))
    one16 = (ipaddress.IPv4Network("10.1.0.0/16"),)
    cases: dict[str, tuple[PodRequest, int]] = {
        "IPv6 /64": (request(v6, ()), args.n),
        "IPv4 two /16s": (request((), v4), args.n),
        "IPv4 /16 full": (request((), one16), min(args.n, 65534)),
        "dual-stack": (request(v6, v4), args.n),
    }

    def run(req: PodRequest, n: int, with_store: bool) -> dict[str, float]:
        rng = random.Random(1)
        ipam, dt, mem = fill(req, n, rng)
        out = {"fill": n / dt, "mem": float(mem), "n": float(n)}
        out["churn"] = churn(ipam, req, n, args.ops, rng)
        if with_store:
            out.update(store_costs(ipam, args.dir, args.writes))
        return out

    print(f"N = {args.n:,} live allocations; churn = {args.ops:,} release+allocate pairs at N")
    head = f"{'case':<16} {'live':>8} {'fill/s':>10} {'churn pairs/s':>14}"
    print(f"{head} {'RSS growth':>11} {'per alloc':>10}")
    c: dict[str, float] = {}
    for name, (req, n) in cases.items():
        res = in_child(lambda req=req, n=n, name=name: run(req, n, name == "dual-stack"))  # type: ignore[misc]
        row = f"{name:<16} {int(res['n']):>8,} {res['fill']:>10,.0f} {res['churn']:>14,.0f}"
        print(f"{row} {res['mem'] / 1e6:>9.1f}MB {res['mem'] / res['n']:>8.0f} B")
        c = res
    floor = bare_fdatasync_ms(args.dir)
    print(f"\nstore in {args.dir} with {args.n:,} dual-stack allocations:")
    snap = f"{c['snapshot_s'] * 1e3:8.1f} ms ({c['snapshot_mb']:.1f} MB)"
    print(f"  full snapshot write (temp+fsync+rename+fsync dir): {snap}")
    print(f"  journal append + fdatasync (one ADD/DEL), p50:     {c['append_p50_ms']:8.2f} ms")
    print(f"  journal append + fdatasync (one ADD/DEL), p99:     {c['append_p99_ms']:8.2f} ms")
    print(f"  bare 300-byte append + fdatasync (disk floor), p50:{floor:8.2f} ms")
    print(f"  compaction (snapshot + journal reset):             {c['compact_s'] * 1e3:8.1f} ms")
    print(f"  load at start-up (snapshot + journal replay):      {c['load_s'] * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
