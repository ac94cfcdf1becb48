"""The only code that touches the kernel (netlink, nftables), BIRD and files."""
