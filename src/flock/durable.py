"""Durable-write primitives shared by everything that must survive a crash mid-write.

The allocation store, the CNI installer and the BIRD config writer all publish
files by temp file + fsync + rename + fsync of the directory; the two small steps
they have in common live here, once. Stdlib only, so `flock install-cni` stays light.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync the directory `path`, so a rename (or create/unlink) in it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (os.write may write less than it was given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
