"""The lab: a real BGP network with flock in network namespaces on one machine."""
