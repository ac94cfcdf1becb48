"""Shared fixtures for root integration tests: a "node" namespace and pod namespaces.

A node is a network namespace with forwarding on and an uplink (a veth pair
kept inside the node) carrying a node address of each family and default
routes, so proxy-ARP and off-node routing behave as on a real node. Pods are
bare namespaces with `lo` up, the way a container runtime hands them to a CNI
plugin. Everything is created with a name prefix (override the `ns_prefix`
fixture in a test module to use your own) and removed afterwards, also when
the test fails.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from flock.testbed import netns

NODE_V6 = "2001:db8:ffff::1"
NODE_V4 = "198.51.100.1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: creates network namespaces")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@dataclass
class Node:
    """A node namespace: `name` for `ip netns exec`, `path` for netlink."""

    name: str
    path: str
    v6: str = NODE_V6
    v4: str = NODE_V4
    uplink: str = "uplink0"


@dataclass
class NamespaceFactory:
    prefix: str
    made: list[str] = field(default_factory=list)

    def __call__(self, tag: str = "p", *, forwarding: bool = False) -> str:
        name = netns.unique_name(f"{self.prefix}{tag}", 8)
        netns.create(name, forwarding=forwarding)
        self.made.append(name)
        return name

    def cleanup(self) -> None:
        for name in reversed(self.made):
            netns.delete(name)
        self.made.clear()


@pytest.fixture
def ns_prefix() -> str:
    """Prefix of every namespace these fixtures create; override per test module."""
    return "fd"


@pytest.fixture
def make_netns(ns_prefix: str) -> Iterator[NamespaceFactory]:
    """Factory: `make_netns("p")` creates a namespace and returns its name."""
    factory = NamespaceFactory(ns_prefix)
    try:
        yield factory
    finally:
        factory.cleanup()


def setup_node(name: str) -> Node:
    """Give namespace `name` a node's shape: forwarding, uplink, addresses, defaults."""
    node = Node(name=name, path=netns.path(name))
    netns.sysctl(name, "net.ipv4.ip_forward", "1")
    netns.sysctl(name, "net.ipv6.conf.all.forwarding", "1")
    # No dummy module on every kernel: a veth whose peer stays in the node serves as uplink.
    netns.veth(name, node.uplink, name, node.uplink + "p")
    netns.add_address(name, node.uplink, f"{node.v6}/64")
    netns.add_address(name, node.uplink, f"{node.v4}/24")
    netns.run(["ip", "-6", "route", "add", "default", "dev", node.uplink], netns=name)
    netns.run(["ip", "-4", "route", "add", "default", "dev", node.uplink], netns=name)
    return node


@pytest.fixture
def node(make_netns: NamespaceFactory) -> Node:
    """One node namespace (removed after the test)."""
    return setup_node(make_netns("n"))


@pytest.fixture
def pod_netns(make_netns: NamespaceFactory) -> Callable[[], str]:
    """Factory: `pod_netns()` creates a bare pod namespace and returns its path."""

    def make() -> str:
        return netns.path(make_netns("p"))

    return make
