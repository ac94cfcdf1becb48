"""flock: a Kubernetes CNI for clusters whose nodes speak BGP.

Every pod gets real routable addresses (IPv6 first, IPv4 too), there are no
tunnels and no NAT, BIRD2 advertises each node's pod prefix, and anycast is a
pod feature that is advertised only while the pod is Ready.
"""

__version__ = "0.1.0"

ANNOTATION_PREFIX = "flock.fritzlab.net/"
CRD_GROUP = "flock.fritzlab.net"
CRD_VERSION = "v1alpha1"
