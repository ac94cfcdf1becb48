"""How long the lab's verbs take: `up`, `test`, a readiness flip seen at the router, `down`.

Runs whole cycles of the default topology (FRR router, three nodes with agent
and BIRD, eight pods) under a lab name of its own, and prints per-phase times.
The readiness figure is measured from the manifest write to the moment FRR's
bgpd no longer selects the replica's node, polling bgpd over vtysh; each poll
costs a few milliseconds, so this is an upper bound that includes FRR's own
delay before it changes its table (see bench_withdraw.py for the precise
on-the-wire figure).

Run as root:  .venv/bin/python bench/bench_lab.py [--cycles 3] [--flips 10]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time

from flock.lab import build, checks, core, pods, routes
from flock.lab.topology import default_topology


def _ms(xs: list[float]) -> str:
    xs = sorted(xs)
    p50 = statistics.median(xs) * 1000
    worst = xs[-1] * 1000
    return f"p50 {p50:7.0f} ms   max {worst:7.0f} ms   (n={len(xs)})"


def _flip(name: str, pod: str, prefix: str, ready: bool, want: set[str]) -> float:
    lab = core.Lab.open(name)
    t0 = time.monotonic()
    pods.ready(name, pod, ready)
    while routes.learned(lab).get(prefix, set()) != want:
        if time.monotonic() - t0 > 30:
            raise TimeoutError(f"{prefix} never reached {want}")
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--flips", type=int, default=10)
    a = ap.parse_args()
    phases: dict[str, list[float]] = {
        "up": [],
        "test": [],
        "withdraw": [],
        "restore": [],
        "down": [],
    }
    for _ in range(a.cycles):
        name = "flbench" + secrets.token_hex(2)
        topo = default_topology().model_copy(update={"name": name})
        try:
            t0 = time.monotonic()
            build.up(topo, standalone=True)
            phases["up"].append(time.monotonic() - t0)
            t0 = time.monotonic()
            results = checks.run_checks(name)
            phases["test"].append(time.monotonic() - t0)
            failed = [r.name for r in results if not r.ok]
            if failed:
                print(f"  checks failed in {name}: {failed}")
            prefix = "fd00:f10c:a::53/128"
            for _ in range(a.flips):
                phases["withdraw"].append(_flip(name, "dns-1", prefix, False, {"node2", "node3"}))
                phases["restore"].append(
                    _flip(name, "dns-1", prefix, True, {"node1", "node2", "node3"})
                )
        finally:
            t0 = time.monotonic()
            build.down(name)
            phases["down"].append(time.monotonic() - t0)
    print(f"flock lab, default topology (3 nodes, 8 pods), {a.cycles} cycles:")
    for phase, xs in phases.items():
        print(f"  {phase:<9} {_ms(xs)}")


if __name__ == "__main__":
    main()
