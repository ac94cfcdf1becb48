"""Typed objects shared by every part of flock: they hold data, they do no I/O."""
