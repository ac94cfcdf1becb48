"""The native CNI launcher (packaging/launcher.c) built from this checkout, for tests and benches.

Why here: the plugin tests, the agent tests and bench_cni run the launcher path the
way a node runs it (`flock install-cni --python PY --launcher L`), and they need the
binary of the source they test, not a stale one. scripts/setup builds it too; this
rebuilds it when launcher.c is newer (about 0.3 s), by rename so that concurrent
test processes never see a half-written file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import flock

SOURCE = Path(flock.__file__).resolve().parents[2] / "packaging" / "launcher.c"
BUILT = SOURCE.parents[1] / "build" / "launcher" / "flock"
CFLAGS = ("-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror")


def build(out: Path = BUILT, *, cc: str = "cc") -> Path:
    """Compile the launcher to `out` (static, warnings are errors); returns `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    subprocess.run([cc, *CFLAGS, "-o", str(tmp), str(SOURCE)], check=True, capture_output=True)
    os.replace(tmp, out)
    return out


def built_launcher() -> Path | None:
    """The launcher of this checkout, rebuilt if older than its source; None without a
    source tree or a C compiler."""
    if not SOURCE.is_file():
        return None
    if BUILT.is_file() and BUILT.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BUILT
    if shutil.which("cc") is None:
        return None
    return build()
