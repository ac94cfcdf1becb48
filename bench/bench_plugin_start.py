#!/usr/bin/env python3
"""How long the flock CNI plugin takes from exec to result, for each way of running it.

The plugin is on every pod's ADD and DEL path, so its start-up is part of the
pod-start latency the runtime sees. This prints p50/p99 (ms) of exec -> exit
for VERSION (answered by the plugin alone) and for an ADD forwarded to a
trivial agent (flock.agent.rpc.serve with a handler that returns a fixed
result at once), for:

  floor/true          /bin/true: the cost of fork+exec+wait alone
  floor/python        /usr/bin/python3 -I -S -c pass: the interpreter alone
  source              /usr/bin/python3 -I -S src/flock/cni/plugin.py (compiles it every run)
  installed-python    `flock install-cni --python /usr/bin/python3` (stub + cached .pyc)
  bundle              `flock install-cni --bundle` of packaging/build_plugin_bundle.py
                      (static launcher -> bundled ld.so + python3 + plugin.pyc)
  pyinstaller-onedir  with --pyinstaller PATH: the same plugin frozen by PyInstaller
                      (the alternative to our bundle; not a dependency of flock)

Runs are interleaved round-robin across the ways so that machine noise hits
them alike; the CPU time (user+sys of the plugin process, from getrusage) is
printed beside the wall time because it does not grow when other work shares
the machine. Usage: bench/bench_plugin_start.py [-n 200] [--pyinstaller /path/to/pyinstaller]
"""

from __future__ import annotations

import argparse
import json
import os
import py_compile
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from flock.agent import rpc  # noqa: E402
from flock.cni import install  # noqa: E402
from flock.model.cni import CniRequest  # noqa: E402

PYTHON = "/usr/bin/python3"
RESULT = {
    "interfaces": [
        {"name": "flk0123456789a", "mac": "ee:ee:ee:ee:ee:ee"},
        {"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/run/netns/x"},
    ],
    "ips": [
        {"address": "2001:db8:f001::5/128", "gateway": "fe80::1", "interface": 1},
        {"address": "192.0.2.5/32", "gateway": "169.254.1.1", "interface": 1},
    ],
    "routes": [{"dst": "::/0", "gw": "fe80::1"}, {"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
}


async def handler(req: CniRequest) -> dict[str, Any]:
    return RESULT


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=200, help="runs per way and verb")
    ap.add_argument("--pyinstaller", help="a pyinstaller executable: also time its onedir build")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also time another plugin source (e.g. a JSON codec variant), compiled to .pyc"
        " and run as `python -I -S file.pyc`, beside the repo's plugin compiled the same way",
    )
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="fp-bench-") as tmpdir:
        tmp = Path(tmpdir)
        ways: dict[str, list[str]] = {
            "floor/true": ["/bin/true"],
            "floor/python": [PYTHON, "-I", "-S", "-c", "pass"],
            "source": [PYTHON, "-I", "-S", str(REPO / "src/flock/cni/plugin.py")],
        }
        install.install(bin_dir=tmp / "py/bin", conf_dir=tmp / "py/net.d", python=PYTHON)
        ways["installed-python"] = [str(tmp / "py/bin/flock")]
        if args.variant:
            sources = [("pyc/repo", str(REPO / "src/flock/cni/plugin.py"))]
            sources += [tuple(v.split("=", 1)) for v in args.variant]  # type: ignore[misc]
            for name, src in sources:
                pyc = tmp / f"{name.replace('/', '_')}.pyc"
                py_compile.compile(src, cfile=str(pyc), doraise=True)
                ways[name if name.startswith("pyc/") else f"pyc/{name}"] = [
                    PYTHON, "-I", "-S", str(pyc)
                ]  # fmt: skip
        if shutil.which("cc") and shutil.which("ldd"):
            subprocess.run(
                [PYTHON, str(REPO / "packaging/build_plugin_bundle.py"), "--out", tmp / "b"],
                check=True,
                capture_output=True,
            )
            install.install(bin_dir=tmp / "bun/bin", conf_dir=tmp / "bun/net.d", bundle=tmp / "b")
            ways["bundle"] = [str(tmp / "bun/bin/flock")]
            size = sum(p.stat().st_size for p in (tmp / "b").rglob("*") if p.is_file())
            print(f"bundle size: {size / 1e6:.1f} MB")
        else:
            print("bundle: skipped (needs cc and ldd)")

        if args.pyinstaller:
            work = tmp / "pyi"
            work.mkdir()
            shutil.copy(REPO / "src/flock/cni/plugin.py", work / "flock_plugin.py")
            subprocess.run(
                [
                    args.pyinstaller,
                    *("--onedir", "--name", "flock", "--noconfirm", "--log-level", "WARN"),
                    *("--distpath", str(work / "dist"), "--workpath", str(work / "build")),
                    str(work / "flock_plugin.py"),
                ],
                check=True,
                capture_output=True,
                cwd=work,
            )
            ways["pyinstaller-onedir"] = [str(work / "dist/flock/flock")]

        sock = tmp / "agent.sock"
        conf = {"cniVersion": "1.1.0", "name": "flock", "type": "flock", "agentSocket": str(sock)}
        verbs = {
            "VERSION": ({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "1.1.0"}'),
            "ADD": (
                {
                    "CNI_COMMAND": "ADD",
                    "CNI_CONTAINERID": "bench",
                    "CNI_NETNS": "/run/netns/bench",
                    "CNI_IFNAME": "eth0",
                    "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=bench",
                    "CNI_PATH": "/opt/cni/bin",
                },
                json.dumps(conf).encode(),
            ),
        }
        times: dict[tuple[str, str], list[float]] = {(w, v): [] for w in ways for v in verbs}
        cpu: dict[tuple[str, str], list[float]] = {(w, v): [] for w in ways for v in verbs}
        with rpc.serving_in_thread(sock, handler):
            for _ in range(args.n):
                for verb, (env, stdin) in verbs.items():
                    for way, argv in ways.items():
                        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                        t0 = time.perf_counter()
                        p = subprocess.run(argv, input=stdin, env=env, capture_output=True)
                        dt = (time.perf_counter() - t0) * 1000
                        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                        if not way.startswith("floor") and p.returncode != 0:
                            raise SystemExit(f"{way} {verb} failed: {p.stdout!r} {p.stderr!r}")
                        times[(way, verb)].append(dt)
                        used = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
                        cpu[(way, verb)].append(used * 1000)

    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"plugin exec -> exit, ms, n={args.n} each; {os.cpu_count()} CPUs, load avg {load}")
    print("wall: exec to exit; cpu: the plugin process's user+sys time (robust to load)")
    print(
        f"{'way':<18} {'VERSION p50':>12} {'p99':>7} {'cpu p50':>8}"
        f" {'ADD p50':>9} {'p99':>7} {'cpu p50':>8}"
    )
    for way in ways:
        v, a = times[(way, "VERSION")], times[(way, "ADD")]
        vc, ac = cpu[(way, "VERSION")], cpu[(way, "ADD")]
        print(
            f"{way:<18} {statistics.median(v):>12.2f} {pct(v, 0.99):>7.2f}"
            f" {statistics.median(vc):>8.2f}"
            f" {statistics.median(a):>9.2f} {pct(a, 0.99):>7.2f} {statistics.median(ac):>8.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
