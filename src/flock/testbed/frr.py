"""Run FRR (zebra, bgpd, bfdd) as an upstream router inside a network namespace.

Tests, benchmarks and the lab need a real BGP router to peer with: this starts
the Debian `frr` daemons with every file (config, pid files, vty and zserv
sockets, logs) in a private directory, never /etc/frr or /run/frr, queries
them with `vtysh --vty_socket DIR ... json`, and stops them by PID.

zebra is what installs bgpd's best paths (ECMP included) into the namespace's
kernel, so traffic can flow through the router; bfdd needs it too. Without
zebra, bgpd runs with `--no_zebra` and only its own table changes.

`router_config` renders a small but general router config: one eBGP
neighbour per entry, per-neighbour family, optional BFD profile, TCP MD5
password and timers, and `maximum-paths` with `as-path multipath-relax` so
replicas on nodes with different ASNs form one ECMP route.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flock.testbed.wait import wait_until

FRR_LIB = Path("/usr/lib/frr")
VTYSH = "vtysh"
DAEMONS = ("zebra", "bgpd", "bfdd")


@dataclass(frozen=True)
class Neighbor:
    """One BGP neighbour of the router (a node's session endpoint)."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    asn: int
    bfd: bool = False
    password: str | None = None
    keepalive: int | None = None
    hold: int | None = None
    # An IPv6 neighbour that also carries IPv4 with IPv6 next hops (RFC 8950).
    ipv4_over_ipv6: bool = False


@dataclass(frozen=True)
class BfdProfile:
    name: str = "flock"
    multiplier: int = 3
    rx_ms: int = 100
    tx_ms: int = 100


def router_config(
    *,
    asn: int,
    router_id: ipaddress.IPv4Address,
    neighbors: Sequence[Neighbor],
    maximum_paths: int = 16,
    bfd_profile: BfdProfile = BfdProfile(),
    hostname: str = "router",
    log_file: Path | None = None,
    extra: Sequence[str] = (),
) -> str:
    """frr.conf text for an upstream router (all daemons read the same file)."""
    lines = ["frr defaults datacenter", f"hostname {hostname}"]
    if log_file is not None:
        lines.append(f"log file {log_file}")
    lines += [
        "!",
        f"router bgp {int(asn)}",
        f" bgp router-id {router_id}",
        " no bgp ebgp-requires-policy",
        " no bgp default ipv4-unicast",
        " bgp bestpath as-path multipath-relax",
    ]
    for n in neighbors:
        lines.append(f" neighbor {n.address} remote-as {int(n.asn)}")
        if n.bfd:
            lines.append(f" neighbor {n.address} bfd profile {bfd_profile.name}")
        if n.password is not None:
            if any(c.isspace() for c in n.password):
                raise ValueError("FRR passwords cannot contain whitespace")
            lines.append(f" neighbor {n.address} password {n.password}")
        if n.keepalive is not None and n.hold is not None:
            lines.append(f" neighbor {n.address} timers {int(n.keepalive)} {int(n.hold)}")
        if n.ipv4_over_ipv6:
            lines.append(f" neighbor {n.address} capability extended-nexthop")
    for version, afi in ((6, "ipv6"), (4, "ipv4")):
        lines.append(f" address-family {afi} unicast")
        lines += [
            f"  neighbor {n.address} activate"
            for n in neighbors
            if n.address.version == version or (version == 4 and n.ipv4_over_ipv6)
        ]
        lines += [f"  maximum-paths {int(maximum_paths)}", " exit-address-family"]
    lines.append("!")
    if any(n.bfd for n in neighbors):
        b = bfd_profile
        lines += [
            "bfd",
            f" profile {b.name}",
            f"  detect-multiplier {int(b.multiplier)}",
            f"  receive-interval {int(b.rx_ms)}",
            f"  transmit-interval {int(b.tx_ms)}",
            " !",
            "!",
        ]
    lines += list(extra)
    return "\n".join(lines) + "\n"


@dataclass
class FrrRouter:
    """FRR daemons in `netns`, every file under `workdir`."""

    netns: str
    workdir: Path
    daemons: tuple[str, ...] = DAEMONS
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    @property
    def config_path(self) -> Path:
        return self.workdir / "frr.conf"

    def _argv(self, daemon: str) -> list[str]:
        d = self.workdir
        argv = [
            str(FRR_LIB / daemon),
            "-f", str(self.config_path),
            "-i", str(d / f"{daemon}.pid"),
            "--vty_socket", str(d),
            "-P", "0",
            "--log", f"file:{d / daemon}.log",
        ]  # fmt: skip
        if "zebra" in self.daemons:
            argv += ["-z", str(d / "zserv.api")]
        elif daemon == "bgpd":
            argv.append("--no_zebra")
        if daemon == "bfdd":
            argv += ["--bfdctl", str(d / "bfdd.sock")]
        return argv

    def start(self, config: str, *, wait: float = 60.0) -> None:
        """Write the config and start the daemons (zebra first); waits for their vty sockets."""
        if "bfdd" in self.daemons and "zebra" not in self.daemons:
            raise ValueError("bfdd needs zebra")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(config)
        # The daemons drop to the `frr` user: the directory must be theirs.
        frr = pwd.getpwnam("frr")
        for p in (self.workdir, self.config_path):
            os.chown(p, frr.pw_uid, frr.pw_gid)
        try:
            order = sorted(self.daemons, key=lambda d: d != "zebra")
            for daemon in order:
                with (self.workdir / f"{daemon}.out").open("ab") as out:
                    self.procs[daemon] = subprocess.Popen(
                        ["ip", "netns", "exec", self.netns, *self._argv(daemon)],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                ready = self.workdir / ("zserv.api" if daemon == "zebra" else f"{daemon}.vty")
                self._wait_for_file(daemon, ready, wait)
        except BaseException:
            self.stop()
            raise

    def _wait_for_file(self, daemon: str, path: Path, wait: float) -> None:
        proc = self.procs[daemon]

        def created() -> bool:
            if proc.poll() is not None:
                log = (self.workdir / f"{daemon}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{daemon} in {self.netns} exited {proc.returncode}: {log}")
            return path.exists()

        wait_until(
            created, timeout=wait, what=f"{daemon} in {self.netns} to create {path}", interval=0.02
        )

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM every daemon we started (by PID), SIGKILL stragglers; idempotent."""
        for daemon in sorted(self.procs, key=lambda d: d == "zebra"):
            proc = self.procs[daemon]
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)
        self.procs.clear()

    def pid(self, daemon: str) -> int:
        return self.procs[daemon].pid

    def vtysh(self, *commands: str, daemon: str | None = None) -> str:
        argv = [VTYSH, "--vty_socket", str(self.workdir)]
        if daemon:
            argv += ["-d", daemon]
        for c in commands:
            argv += ["-c", c]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise RuntimeError(f"vtysh {commands}: {res.returncode} {res.stderr}{res.stdout}")
        return res.stdout

    def vtysh_json(self, command: str, *, daemon: str | None = None) -> Any:
        return json.loads(self.vtysh(command, daemon=daemon) or "null")

    def neighbor_states(self) -> dict[str, str]:
        """Neighbour address -> BGP state ("Established", "Active", ...)."""
        data = self.vtysh_json("show bgp neighbors json", daemon="bgpd") or {}
        return {
            addr: info.get("bgpState", "")
            for addr, info in data.items()
            if isinstance(info, dict) and "bgpState" in info
        }

    def bgp_routes(self, version: int) -> dict[str, set[str]]:
        """Prefix -> the peers whose path is selected (best or multipath) in bgpd's table."""
        afi = "ipv6" if version == 6 else "ipv4"
        data = self.vtysh_json(f"show bgp {afi} unicast json", daemon="bgpd") or {}
        out: dict[str, set[str]] = {}
        for prefix, paths in (data.get("routes") or {}).items():
            chosen = {
                p.get("peerId", "")
                for p in paths
                if p.get("valid") and (p.get("bestpath") or p.get("multipath"))
            }
            if chosen:
                out[prefix] = chosen
        return out

    def fib_nexthops(self, prefix: str) -> set[tuple[str, str]]:
        """(gateway, interface) of each next hop zebra installed for `prefix` (empty: no route).

        IPv6 gateways are usually the neighbour's link-local address; the
        interface says which neighbour it is.
        """
        version = ipaddress.ip_network(prefix).version
        cmd = f"show {'ipv6' if version == 6 else 'ip'} route {prefix} json"
        data = self.vtysh_json(cmd, daemon="zebra") or {}
        hops: set[tuple[str, str]] = set()
        for entry in data.get(prefix, []):
            if not entry.get("installed") and not entry.get("selected"):
                continue
            for nh in entry.get("nexthops", []):
                if nh.get("active") and nh.get("ip"):
                    hops.add((nh["ip"], nh.get("interfaceName", "")))
        return hops

    def bfd_peers(self) -> dict[str, str]:
        data = self.vtysh_json("show bfd peers json", daemon="bfdd") or []
        return {p.get("peer", ""): p.get("status", "") for p in data}
