"""What one pod asks for, after its annotations have been parsed and checked.

The annotation parser produces a `PodRequest`; IPAM and the datapath consume
it. Holding only parsed `ipaddress` values here is what guarantees that no
annotation text can reach a BIRD or nftables config unparsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flock.model import IPAddress as IPAddress
from flock.model import IPNetwork as IPNetwork

EmbedField = Literal["namespace", "pod", "image"]


@dataclass(frozen=True, slots=True)
class FamilyRequest:
    """One address family for one pod."""

    want: bool
    # Where IPAM may draw from: the pod's cidr6/cidr4 sub-ranges, else the node's ranges.
    ranges: tuple[IPNetwork, ...] = ()
    # First address of that family from the `addresses` annotation; replaces IPAM.
    primary: IPAddress | None = None


@dataclass(frozen=True, slots=True)
class PodIdentity:
    """Names that ip-algo may embed into an IPv6 address."""

    namespace: str
    pod: str
    image: str = ""


@dataclass(frozen=True, slots=True)
class PodRequest:
    v6: FamilyRequest
    v4: FamilyRequest
    embed: tuple[EmbedField, ...] = ()
    # `addresses` beyond the first of each family: layered on eth0.
    extra_addresses: tuple[IPAddress, ...] = ()
    anycast: tuple[IPAddress, ...] = ()

    def family(self, version: int) -> FamilyRequest:
        return self.v6 if version == 6 else self.v4
