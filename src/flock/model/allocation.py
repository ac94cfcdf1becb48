"""One attachment's addresses, as IPAM records them and the store persists them.

CNI keys an attachment by (container id, interface name). The pod's names, the
host-side veth and the netns path are kept beside it so that DEL, GC, status
and the agent's start-up re-sync can act without asking the datastore.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from flock.model import IPAddress as IPAddress


@dataclass(frozen=True, slots=True, order=True)
class AttachmentKey:
    container_id: str
    ifname: str


@dataclass(frozen=True, slots=True)
class Allocation:
    key: AttachmentKey
    namespace: str
    pod: str
    pod_uid: str = ""
    netns: str = ""
    host_ifname: str = ""
    v6: ipaddress.IPv6Address | None = None
    v4: ipaddress.IPv4Address | None = None
    # True when the primary came from the `addresses` annotation (not drawn from the pool).
    v6_supplied: bool = False
    v4_supplied: bool = False
    extra_addresses: tuple[IPAddress, ...] = ()
    anycast: tuple[IPAddress, ...] = ()

    @property
    def primaries(self) -> tuple[IPAddress, ...]:
        return tuple(a for a in (self.v6, self.v4) if a is not None)

    @property
    def all_addresses(self) -> tuple[IPAddress, ...]:
        """Every address bound on the pod's eth0 (primaries first)."""
        return self.primaries + self.extra_addresses
