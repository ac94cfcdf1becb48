"""What a running lab has created, recorded as it is created, so `down` can undo it.

Each lab owns one run directory, `/run/flock-lab/<name>/`, holding `state.json`
and every file the lab writes (manifests, agent state, BIRD and FRR configs,
logs). `state.json` is rewritten atomically after every namespace, process or
directory the lab creates, *before* the next step runs: if `up` crashes half
way, `down` still finds everything. And because every namespace is named
`fl-<lab>-...`, `down` also works with the state file gone: it finds the lab's
namespaces by name and the processes by the namespace they run in.

The run directory doubles as the "is this lab up?" lock: `up` creates it with
`mkdir`, which fails if it exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

RUN_ROOT = Path(os.environ.get("FLOCK_LAB_RUN_ROOT", "/run/flock-lab"))
NETNS_DIR = Path("/run/netns")
STATE_FILE = "state.json"

ResourceKind = Literal["netns", "process", "dir"]


def netns_prefix(lab: str) -> str:
    """Every namespace of lab `lab` starts with this (lab names contain no dash)."""
    return f"fl-{lab}-"


def run_dir(lab: str) -> Path:
    return RUN_ROOT / lab


class LabExistsError(RuntimeError):
    """`up` on a lab that is already up (or was left over by a crash)."""


class LabNotFoundError(RuntimeError):
    """A verb that needs a running lab, and there is none of that name."""


@dataclass
class Resource:
    kind: ResourceKind
    # netns: its name; process: its PID (as text); dir: its path.
    ident: str
    role: str = ""
    # For processes: /proc/PID/stat start time, so a reused PID is never killed.
    start_time: int = 0


@dataclass
class PodRecord:
    """One pod the lab created: where it lives and what its CNI ADD returned."""

    namespace: str
    name: str
    node: str
    netns: str
    container_id: str
    uid: str = ""  # the Pod object's metadata.uid
    ifname: str = "eth0"
    addresses: list[str] = field(default_factory=list)


@dataclass
class LabState:
    name: str
    dir: Path
    topology: dict[str, Any] = field(default_factory=dict)
    resources: list[Resource] = field(default_factory=list)
    pods: dict[str, PodRecord] = field(default_factory=dict)
    phase: str = "creating"
    created_at: float = field(default_factory=time.time)
    # Where pods and NodeConfigs live (see flock.lab.datastore.open_datastore).
    datastore: str = "manifests"

    # -- persistence -------------------------------------------------------------------

    @classmethod
    def create(cls, name: str) -> LabState:
        """Claim the lab's run directory; `LabExistsError` if the lab is already up."""
        RUN_ROOT.mkdir(parents=True, exist_ok=True)
        d = run_dir(name)
        try:
            # Traversable: FRR drops to the `frr` user and needs its own subdirectory.
            d.mkdir(mode=0o755)
        except FileExistsError:
            raise LabExistsError(
                f"lab {name!r} is already up (or left over from a crash): its run directory "
                f"{d} exists. Run `flock lab down --name {name}` first."
            ) from None
        state = cls(name=name, dir=d)
        state.resources.append(Resource("dir", str(d), role="run dir"))
        state.save()
        return state

    @classmethod
    def load(cls, name: str) -> LabState:
        path = run_dir(name) / STATE_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabNotFoundError(
                f"lab {name!r} is not up (no {path}); start it with `flock lab up`"
            ) from None
        return cls(
            name=raw["name"],
            dir=Path(raw["dir"]),
            topology=raw.get("topology", {}),
            resources=[Resource(**r) for r in raw.get("resources", [])],
            pods={k: PodRecord(**v) for k, v in raw.get("pods", {}).items()},
            phase=raw.get("phase", "unknown"),
            created_at=raw.get("created_at", 0.0),
            datastore=raw.get("datastore", "manifests"),
        )

    def save(self) -> None:
        """Atomic and durable: a crash leaves the previous or the new file, never half."""
        data = {
            "name": self.name,
            "dir": str(self.dir),
            "topology": self.topology,
            "resources": [asdict(r) for r in self.resources],
            "pods": {k: asdict(v) for k, v in self.pods.items()},
            "phase": self.phase,
            "created_at": self.created_at,
            "datastore": self.datastore,
        }
        path = self.dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # -- recording ---------------------------------------------------------------------

    def add_netns(self, name: str, role: str = "") -> None:
        self.resources.append(Resource("netns", name, role=role))
        self.save()

    def add_process(self, pid: int, role: str = "") -> None:
        self.resources.append(Resource("process", str(pid), role=role, start_time=_start_time(pid)))
        self.save()

    def add_dir(self, path: str | Path, role: str = "") -> None:
        self.resources.append(Resource("dir", str(path), role=role))
        self.save()

    def processes(self) -> list[Resource]:
        return [r for r in self.resources if r.kind == "process"]


def running_labs() -> list[str]:
    if not RUN_ROOT.is_dir():
        return []
    return sorted(p.name for p in RUN_ROOT.iterdir() if p.is_dir())


# ---------------------------------------------------------------------------------------
# Processes: found by PID (state) or by the namespace they run in (after a crash)


def _start_time(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    # Field 22, counted after the parenthesised command name (which may hold spaces).
    return int(stat.rsplit(")", 1)[1].split()[19])


def alive(pid: int, start_time: int = 0) -> bool:
    st = _start_time(pid)
    if st == 0:
        return False
    if _is_zombie(pid):
        return False
    return start_time in (0, st)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def stop_processes(procs: list[tuple[int, int]], *, timeout: float = 5.0) -> list[int]:
    """SIGTERM each (pid, start_time) that is still that process, then SIGKILL stragglers.

    Returns the PIDs that were signalled.
    """
    live = [(pid, st) for pid, st in procs if alive(pid, st)]
    for pid, _ in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p, s) for p, s in live):
        _reap()
        time.sleep(0.05)
    for pid, st in live:
        if alive(pid, st):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    _reap()
    return [pid for pid, _ in live]


def _reap() -> None:
    """Collect our own exited children so they do not linger as zombies."""
    with contextlib.suppress(ChildProcessError):
        while True:
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return


def pids_in_netns(names: list[str]) -> list[tuple[int, int]]:
    """(pid, start_time) of every process whose network namespace is one of `names`."""
    inodes = set()
    for n in names:
        with contextlib.suppress(OSError):
            inodes.add(os.stat(NETNS_DIR / n).st_ino)
    if not inodes:
        return []
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            ino = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            continue
        if ino in inodes:
            out.append((pid, _start_time(pid)))
    return out


def lab_netns(lab: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    prefix = netns_prefix(lab)
    return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))


@contextlib.contextmanager
def _ignore_missing() -> Iterator[None]:
    with contextlib.suppress(FileNotFoundError):
        yield


def remove_dir(path: str | Path) -> None:
    with _ignore_missing():
        shutil.rmtree(path)
