"""Typed objects shared by every part of flock: they hold data, they do no I/O.

The address type aliases live here, once, so every layer (models, compilers,
kernel code, agent, lab) names the same union.
"""

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
