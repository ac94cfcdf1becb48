"""Named network namespaces and veth pairs, created and removed by name.

Uses iproute2's `ip netns` so that the namespaces appear under /run/netns/
where the CNI runtime convention (and `ip netns exec`) expects them.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

NETNS_DIR = Path("/run/netns")


def unique_name(prefix: str, length: int = 6) -> str:
    """A short unique name; Linux interface names cap at 15 characters."""
    return f"{prefix}{secrets.token_hex(length // 2)}"


def run(
    args: Sequence[str], *, netns: str | None = None, check: bool = True, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run a command, inside `netns` when given; output captured as text."""
    cmd = ["ip", "netns", "exec", netns, *args] if netns else list(args)
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)


def path(name: str) -> str:
    return str(NETNS_DIR / name)


def create(name: str, *, forwarding: bool = False) -> str:
    """Create namespace `name` with `lo` up; returns its path."""
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "link", "set", "lo", "up"], netns=name)
        if forwarding:
            sysctl(name, "net.ipv4.ip_forward", "1")
            sysctl(name, "net.ipv6.conf.all.forwarding", "1")
    except BaseException:
        delete(name)
        raise
    return path(name)


def delete(name: str) -> None:
    """Remove namespace `name` if it exists (its veths go with it)."""
    if (NETNS_DIR / name).exists():
        run(["ip", "netns", "del", name], check=False)


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def list_names(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))


def sysctl(netns: str, key: str, value: str) -> None:
    """Set a sysctl inside `netns` (never in the root namespace)."""
    run(["sysctl", "-q", "-w", f"{key}={value}"], netns=netns)


def veth(a_ns: str, a_if: str, b_ns: str, b_if: str) -> None:
    """A veth pair with one end in each namespace, both up."""
    run(["ip", "link", "add", a_if, "netns", a_ns, "type", "veth", "peer", b_if, "netns", b_ns])
    run(["ip", "link", "set", a_if, "up"], netns=a_ns)
    run(["ip", "link", "set", b_if, "up"], netns=b_ns)


def add_address(netns: str, ifname: str, cidr: str) -> None:
    """Add an address; IPv6 with `nodad` so it is usable at once."""
    extra = ["nodad"] if ":" in cidr else []
    run(["ip", "addr", "add", cidr, "dev", ifname, *extra], netns=netns)


@contextmanager
def namespaces(*names: str, forwarding: bool = False) -> Iterator[list[str]]:
    """Create namespaces for the duration of a block; always removed afterwards."""
    made: list[str] = []
    try:
        for n in names:
            create(n, forwarding=forwarding)
            made.append(n)
        yield [path(n) for n in made]
    finally:
        for n in reversed(made):
            delete(n)
