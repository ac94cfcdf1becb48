"""A real single-node Kubernetes cluster inside a network namespace: the e2e tier's node.

flock is a CNI; the only proof that a cluster can use it is a real kubelet and a
real containerd starting pods through it, with flock installed the way users
install it (its DaemonSet). This harness brings such a node up on the test
machine without touching the machine's own networking, runtime or kernel
settings (see ../shared/notes/real-node-on-this-machine.md for the facts it
rests on):

    with KubeNode() as node:                 # etcd, kube-apiserver, containerd, kubelet,
        node.use_reference_cni()             # controller-manager, scheduler, kube-proxy
        node.wait_node_ready()
        node.kubectl("apply", "-f", "-", input=manifest)

What it builds (all stopped by PID and removed by `stop()`, also after a failed
start):

- the node network namespace: `flock.testbed.kube.ApiServer` creates it (random
  name) and runs etcd and kube-apiserver in it; the node's "NIC" is a veth pair:
  with `router=True` its peer is in a router namespace running FRR
  (`flock.testbed.frr`), else both ends stay inside the node namespace (this
  kernel has no `dummy` module). kube-apiserver advertises the node's IPv4
  (`--endpoint-reconciler-type=lease`) so the `kubernetes` Service has an
  endpoint and in-cluster clients (flock's agent) reach it through kube-proxy;
- a private mount namespace (`unshare --mount=FILE --propagation private`) that
  containerd, its shims and runc, the CNI plugins, the kubelet and every
  container share (processes enter it with `nsenter --mount=FILE --net=NETNS`).
  Inside it: a tmpfs on /run (pod netns files, /run/flock; wiped by `reboot()`
  as a real reboot wipes it), overlays on /etc, /opt, /var/lib and /var/log whose
  upper layers live in the node's dir (so the DaemonSet's hostPath volumes and
  every hard-coded host path land there and never on the machine), and bind
  mounts of the node's own dirs over /opt/cni/bin, /etc/cni/net.d,
  /var/lib/kubelet/device-plugins, /var/log/containers, /var/lib/cni/results
  and over the three sysctl files the kubelet would otherwise write
  (vm/overcommit_memory=1, kernel/panic=10, kernel/panic_on_oops=1);
- cgroup v1 hierarchies: `/<name>` in each, cpuset copied from the parent; the
  kubelet's `cgroupRoot`, and `/<name>/daemons` (pids, cpuacct) holds every daemon
  started here (so the shims and pod processes can be found, and killed by PID, at
  the end, and the node's CPU time is accounted: `cpu_seconds()`);
- containerd with its own root, state, socket, shim `socket_dir` and runc `Root`,
  `restrict_oom_score_adj = true` (root lacks CAP_SYS_RESOURCE), the sandbox
  image pinned, CNI from /opt/cni/bin and /etc/cni/net.d (the bind mounts);
- kubelet (cgroupfs, failCgroupV1 false, no swap check, oomScoreAdj 0, eviction
  thresholds near zero, resolvConf ""), kube-controller-manager (per-controller
  service-account credentials, `--flex-volume-plugin-dir` under the node's dir),
  kube-scheduler, kube-proxy in nftables mode (its conntrack sysctls left alone);
- images without a registry: the archives of `scripts/build-images` imported
  with `ctr -n k8s.io images import --local`.

`timings` records how long each phase took (`node_up` is the whole start).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flock.testbed import netns
from flock.testbed.frr import FrrRouter, Neighbor, router_config
from flock.testbed.kube import ApiServer, ApiServerError, User, node_user
from flock.testbed.tools import tool_path
from flock.testbed.wait import wait_until

CGROUP_FS = Path("/sys/fs/cgroup")
IMAGES_CACHE = Path(os.environ.get("FLOCK_IMAGES_CACHE") or "/var/cache/flock/images")
REFERENCE_CNI_DIR = Path("/usr/lib/cni")
RUNC = "/usr/bin/runc"

# The node's uplink: constant addresses are fine, every node has its own namespaces.
NODE_IP4, ROUTER_IP4, UPLINK_PREFIX4 = "192.168.77.2", "192.168.77.1", 24
NODE_IP6, ROUTER_IP6, UPLINK_PREFIX6 = "fd00:77::2", "fd00:77::1", 64
ROUTER_ASN = 64512
NODE_ASN = 64601

PAUSE_IMAGE = "ghcr.io/fritzlab/flock-pause:1"
TEST_IMAGE = "ghcr.io/fritzlab/flock-test:1"

# Reference plugins' pod ranges (ptp + host-local), both families.
REFERENCE_RANGES = ("10.244.0.0/24", "fd00:244::/64")

# flock on the node: deploy/install.yaml and the node's NodeConfig.
REPO_ROOT = Path(__file__).resolve().parents[3]
INSTALL_YAML = REPO_ROOT / "deploy" / "install.yaml"
AGENT_LABEL = "flock.fritzlab.net/agent"
FLOCK_POD_CIDR6, FLOCK_POD_CIDR4 = "fd00:e2e:1::/64", "10.245.0.0/24"
ANYCAST_CIDR6, ANYCAST_CIDR4 = "fd00:e2e:a::/64", "10.246.0.0/24"

# The three kernel sysctls the kubelet checks (protectKernelDefaults) or else
# writes; bind-mounted files with these values stand in for them.
KUBELET_SYSCTLS = {
    "vm/overcommit_memory": "1",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
}
# Paths the kubelet or containerd's CNI library use whatever their flags say.
HARD_CODED_DIRS = {
    "device-plugins": "/var/lib/kubelet/device-plugins",
    "container-logs": "/var/log/containers",
    "cni-results": "/var/lib/cni/results",
    "cni/bin": "/opt/cni/bin",
    "cni/net.d": "/etc/cni/net.d",
}
OVERLAID = ("/etc", "/opt", "/var/lib", "/var/log")
DAEMON_HIERARCHIES = ("pids", "cpuacct")


class KubeNodeError(RuntimeError):
    """The node failed to come up or a command against it failed; says which, with logs."""


@dataclass(frozen=True)
class Image:
    """One image archive of scripts/build-images (its index.json entry)."""

    name: str
    ref: str
    path: Path


def built_images(cache: Path = IMAGES_CACHE) -> dict[str, Image]:
    """The images scripts/build-images has built, by name ("flock", "pause", "test")."""
    index = cache / "index.json"
    if not index.exists():
        return {}
    data = json.loads(index.read_text())
    return {
        name: Image(name, entry["ref"], Path(entry["path"]))
        for name, entry in data.items()
        if Path(entry["path"]).exists()
    }


def flock_nodeconfig(node_name: str) -> dict[str, Any]:
    """The e2e node's NodeConfig: pod prefixes of both families, a BGP peering with the
    router per family, an anycast allow-list."""
    return {
        "apiVersion": "flock.fritzlab.net/v1alpha1",
        "kind": "NodeConfig",
        "metadata": {"name": node_name},
        "spec": {
            "cidr6": [FLOCK_POD_CIDR6],
            "cidr4": [FLOCK_POD_CIDR4],
            "bgp": {
                "asn": NODE_ASN,
                "peers": [
                    {"address": ROUTER_IP6, "asn": ROUTER_ASN},
                    {"address": ROUTER_IP4, "asn": ROUTER_ASN},
                ],
            },
            "allowedAddresses": [
                {"cidr": ANYCAST_CIDR6, "use": ["anycast"]},
                {"cidr": ANYCAST_CIDR4, "use": ["anycast"]},
            ],
        },
    }


def flock_on_kubernetes_missing(install_yaml: Path = INSTALL_YAML) -> str | None:
    """What is still missing for flock to run as a DaemonSet on the API (None: nothing)."""
    if not install_yaml.exists():
        return f"{install_yaml} is not rendered yet (scripts/render-install)"
    if not re.search(r"^kind: DaemonSet", install_yaml.read_text(), re.M):
        return f"{install_yaml} has no DaemonSet"
    flock = Path(sys.executable).parent / "flock"
    helptext = subprocess.run(
        [str(flock), "agent", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    if "--kubernetes" not in helptext:
        return (
            "flock's agent has no Kubernetes datastore yet (`flock agent --kubernetes`, "
            "issue 10 item 1): the DaemonSet's agent cannot start"
        )
    if "flock" not in built_images():
        return "the flock image is not built: run ./scripts/build-images"
    return None


def _terminate(proc: subprocess.Popen[bytes], grace: float = 10) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)


class KubeNode:
    """etcd, kube-apiserver, containerd, kubelet, controller-manager, scheduler and
    kube-proxy of one node, in a node network namespace and a private mount namespace."""

    def __init__(
        self,
        *,
        prefix: str = "fkn",
        router: bool = False,
        kube_proxy: bool = True,
        images: Sequence[str] = ("pause", "test"),
        containerd_log_level: str = "info",
        ready_timeout: float = 120,
        progress: Callable[[str], None] = lambda _msg: None,
    ) -> None:
        self.name = netns.unique_name(prefix, 8)
        self.with_router = router
        self.with_kube_proxy = kube_proxy
        self.image_names = tuple(images)
        self.containerd_log_level = containerd_log_level
        self.ready_timeout = ready_timeout
        self.progress = progress
        self.users = {
            "node": node_user(self.name),
            "controller-manager": User("system:kube-controller-manager"),
            "scheduler": User("system:kube-scheduler"),
            "proxy": User("system:kube-proxy"),
        }
        self.api = ApiServer(
            prefix=prefix,
            users=self.users.values(),
            extra_sans=(NODE_IP4, NODE_IP6),
            advertise_address=NODE_IP4,
            service_account_admission=True,
            # An endpoint for the `kubernetes` Service: in-cluster clients reach the
            # server at the node's address through kube-proxy (later flags win).
            extra_args=("--endpoint-reconciler-type=lease",),
        )
        self.dir = Path()
        self.router_ns = netns.unique_name(f"{prefix}r", 8) if router else ""
        self.frr: FrrRouter | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.timings: dict[str, float] = {}
        self._mnt_made = False
        self._cgroups_made = False
        self._router_made = False
        self._images: dict[str, Image] = {}

    # ---- paths ---------------------------------------------------------------------------

    @property
    def netns(self) -> str:
        """The node network namespace (etcd, kube-apiserver and every node daemon run there)."""
        return self.api.netns

    @property
    def netns_path(self) -> str:
        return self.api.netns_path

    @property
    def mnt_path(self) -> Path:
        """The file holding the node's private mount namespace."""
        return self.dir / "ns" / "mnt"

    @property
    def cni_bin_dir(self) -> Path:
        """Seen as /opt/cni/bin inside the node."""
        return self.dir / "cni" / "bin"

    @property
    def cni_conf_dir(self) -> Path:
        """Seen as /etc/cni/net.d inside the node."""
        return self.dir / "cni" / "net.d"

    @property
    def containerd_socket(self) -> Path:
        return self.dir / "containerd" / "containerd.sock"

    @property
    def containerd_log(self) -> Path:
        return self.dir / "logs" / "containerd.log"

    def log_path(self, daemon: str) -> Path:
        return self.dir / "logs" / f"{daemon}.log"

    # ---- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> KubeNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Bring everything up; the node is registered (Ready once a CNI config is in place)."""
        t0 = time.monotonic()
        try:
            for tool in ("containerd", "containerd-shim-runc-v2", "ctr", "kubelet"):
                tool_path(tool)
            if not os.access(RUNC, os.X_OK):
                raise KubeNodeError(f"{RUNC} is missing: run ./scripts/setup (installs runc)")
            self._images = built_images()
            lacking = [n for n in self.image_names if n not in self._images]
            if lacking:
                raise KubeNodeError(
                    f"images {lacking} are not built (looked in {IMAGES_CACHE}): "
                    "run ./scripts/build-images"
                )
            self._phase("apiserver", self.api.start)
            # Short: the shim socket dir must fit a unix socket path (38 characters).
            self.dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir="/tmp"))
            self.dir.chmod(0o755)  # FRR's daemons run as user frr and need to traverse it
            self._phase("network", self._make_network)
            self._phase("mounts", self._make_mount_ns)
            self._phase("cgroups", self._make_cgroups)
            self._phase("containerd", self._start_containerd)
            self._phase("images", self._import_images)
            self._write_kube_configs()
            self._phase("controllers", self._start_controllers)
            self._phase("kubelet", self._start_kubelet)
            self._phase("node registered", self._wait_registered)
            self._phase("default serviceaccount", self._wait_default_sa)
        except BaseException:
            self.stop()
            raise
        self.timings["node_up"] = time.monotonic() - t0

    def stop(self) -> None:
        """Stop every process (by PID), remove mounts, cgroups, namespaces and dirs."""
        for name in ("kubelet", "kube-proxy", "kube-scheduler", "kube-controller-manager"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                _terminate(proc)
        proc = self.procs.pop("containerd", None)
        if proc is not None:
            _terminate(proc)
        self._kill_cgroup_processes()
        for proc in self.procs.values():
            _terminate(proc)
        self.procs.clear()
        if self._mnt_made:
            self._drop_mount_ns()
        if self._cgroups_made:
            self._remove_cgroups()
        if self.frr is not None:
            with contextlib.suppress(Exception):
                self.frr.stop()
            self.frr = None
        if self._router_made:
            netns.delete(self.router_ns)
            self._router_made = False
        self.api.stop()
        if self.dir != Path() and self.dir.is_dir() and not os.environ.get("FLOCK_E2E_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)

    def _phase(self, name: str, fn: Callable[[], object]) -> None:
        self.progress(f"kubenode {self.name}: {name} ...")
        t = time.monotonic()
        fn()
        self.timings[name] = time.monotonic() - t

    # ---- network -------------------------------------------------------------------------

    def _make_network(self) -> None:
        ns = self.netns
        for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
            netns.sysctl(ns, key, "1")
        netns.sysctl(ns, "net.ipv6.conf.all.accept_dad", "0")
        netns.sysctl(ns, "net.ipv6.conf.default.accept_dad", "0")
        if self.with_router:
            netns.create(self.router_ns, forwarding=True)
            self._router_made = True
            netns.sysctl(self.router_ns, "net.ipv6.conf.all.accept_dad", "0")
            netns.sysctl(self.router_ns, "net.ipv6.conf.default.accept_dad", "0")
            netns.veth(ns, "eth0", self.router_ns, "node0")
            netns.add_address(self.router_ns, "node0", f"{ROUTER_IP4}/{UPLINK_PREFIX4}")
            netns.add_address(self.router_ns, "node0", f"{ROUTER_IP6}/{UPLINK_PREFIX6}")
        else:
            # Both ends inside: a NIC with nothing behind it (no dummy module here).
            netns.veth(ns, "eth0", ns, "eth0peer")
        netns.add_address(ns, "eth0", f"{NODE_IP4}/{UPLINK_PREFIX4}")
        netns.add_address(ns, "eth0", f"{NODE_IP6}/{UPLINK_PREFIX6}")
        netns.run(["ip", "route", "add", "default", "via", ROUTER_IP4], netns=ns)
        netns.run(["ip", "-6", "route", "add", "default", "via", ROUTER_IP6], netns=ns)

    def start_router(self, *, node_asn: int = NODE_ASN, router_asn: int = ROUTER_ASN) -> FrrRouter:
        """Start FRR in the router namespace, peering with the node's uplink addresses."""
        if not self.with_router:
            raise KubeNodeError("the node was created without a router (router=True)")
        frr = FrrRouter(self.router_ns, self.dir / "frr")
        neighbors = [
            Neighbor(address=ipaddress.ip_address(NODE_IP6), asn=node_asn),
            Neighbor(address=ipaddress.ip_address(NODE_IP4), asn=node_asn),
        ]
        frr.start(
            router_config(
                asn=router_asn,
                router_id=ipaddress.IPv4Address(ROUTER_IP4),
                neighbors=neighbors,
                hostname="router",
            )
        )
        self.frr = frr
        return frr

    # ---- mount namespace -----------------------------------------------------------------

    def _make_mount_ns(self) -> None:
        d = self.dir
        for sub in ("logs", "containerd", "kubelet", "frr", "sysctl", "ovl", "pod-logs", "flex"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        for sub in HARD_CODED_DIRS:
            (d / sub).mkdir(parents=True, exist_ok=True)
        for key, value in KUBELET_SYSCTLS.items():
            (d / "sysctl" / key.replace("/", ".")).write_text(value + "\n")
        self._new_mount_ns()

    def _new_mount_ns(self) -> None:
        """A fresh private mount namespace bound to `mnt_path`, with the node's mounts."""
        # `unshare --mount=FILE` binds the namespace to FILE, which must sit on a mount
        # that is not shared: a private bind mount of its own dir.
        nsdir = self.dir / "ns"
        nsdir.mkdir(exist_ok=True)
        subprocess.run(["mount", "--bind", str(nsdir), str(nsdir)], check=True)
        self._mnt_made = True
        subprocess.run(["mount", "--make-private", str(nsdir)], check=True)
        self.mnt_path.touch()
        subprocess.run(
            ["unshare", f"--mount={self.mnt_path}", "--propagation", "private", "true"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        self._setup_mounts()

    def _setup_mounts(self) -> None:
        d = self.dir
        lines = [
            "set -e",
            # The copied mounts under /run go first: the machine's /run/netns/* (other
            # namespaces: a copy would keep them alive after their owners delete them),
            # and /run/netns itself, which containerd would take for the mount of
            # /var/run/netns (it reads mountinfo, shadowed or not) and refuse as private.
            "awk '$5 ~ \"^/run/\" {print $5}' /proc/self/mountinfo | sort -r |"
            ' while read -r m; do umount -l "$m" || true; done',
            # Volatile like a real /run: pod netns files, /run/flock, anything that
            # defaults to /run/containerd. Shared, so that HostToContainer volumes
            # of /var/run/netns (flock's agent) see the netns mounts made later.
            "mount -t tmpfs -o mode=0755 flock-run /run",
            "mount --make-rshared /run",
        ]
        for top in OVERLAID:
            key = top.strip("/").replace("/", "-")
            upper, work = d / "ovl" / key / "upper", d / "ovl" / key / "work"
            upper.mkdir(parents=True, exist_ok=True)
            work.mkdir(parents=True, exist_ok=True)
            lines.append(
                f"mount -t overlay flock-{key} -o lowerdir={top},upperdir={upper},"
                f"workdir={work} {top}"
            )
        for sub, target in HARD_CODED_DIRS.items():
            lines += [f"mkdir -p {target}", f"mount --bind {d / sub} {target}"]
        for key in KUBELET_SYSCTLS:
            lines.append(f"mount --bind {d / 'sysctl' / key.replace('/', '.')} /proc/sys/{key}")
        self.node_exec(["sh", "-c", "\n".join(lines)], net=False)

    def _drop_mount_ns(self) -> None:
        nsdir = self.dir / "ns"
        subprocess.run(["umount", str(self.mnt_path)], check=False, capture_output=True)
        subprocess.run(["umount", str(nsdir)], check=False, capture_output=True)
        self._mnt_made = False

    def node_exec(
        self,
        argv: Sequence[str],
        *,
        net: bool = True,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the node's mount (and network) namespace."""
        cmd = self._enter(net=net) + list(argv)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise KubeNodeError(
                f"{shlex.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}"
            )
        return proc

    def _enter(self, *, net: bool = True) -> list[str]:
        argv = ["nsenter", f"--mount={self.mnt_path}"]
        if net:
            argv.append(f"--net={self.netns_path}")
        return argv

    # ---- cgroups -------------------------------------------------------------------------

    def _hierarchies(self) -> list[Path]:
        """Every cgroup v1 hierarchy (and the v2 one of a hybrid host)."""
        return sorted(p for p in CGROUP_FS.iterdir() if p.is_dir() and not p.is_symlink())

    def _make_cgroups(self) -> None:
        self._cgroups_made = True
        for h in self._hierarchies():
            mine = h / self.name
            mine.mkdir(exist_ok=True)
            if h.name == "cpuset":
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (mine / f).write_text((h / f).read_text())
        # pids: to find every process at the end; cpuacct: to account the node's CPU.
        for hierarchy in DAEMON_HIERARCHIES:
            (CGROUP_FS / hierarchy / self.name / "daemons").mkdir(exist_ok=True)

    def _cgroup_pids(self) -> list[int]:
        root = CGROUP_FS / "pids" / self.name
        pids: list[int] = []
        if not root.is_dir():
            return pids
        for dirpath, _dirs, _files in os.walk(root):
            with contextlib.suppress(OSError):
                text = (Path(dirpath) / "cgroup.procs").read_text()
                pids += [int(p) for p in text.split()]
        return pids

    def _kill_cgroup_processes(self, *, keep: Iterable[int] = ()) -> None:
        """SIGKILL every process left in the node's cgroup (shims, pods, plugins), by PID,
        except the PIDs in `keep`."""
        spare = set(keep)
        deadline = time.monotonic() + 30
        while (pids := set(self._cgroup_pids()) - spare) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    def _remove_cgroups(self) -> None:
        self._kill_cgroup_processes()
        for h in self._hierarchies():
            mine = h / self.name
            if not mine.is_dir():
                continue
            for dirpath, _dirs, _files in sorted(
                os.walk(mine), key=lambda t: t[0].count("/"), reverse=True
            ):
                deadline = time.monotonic() + 10
                while True:
                    try:
                        os.rmdir(dirpath)
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.1)
        self._cgroups_made = False

    def cpu_seconds(self, sub: str = "") -> float:
        """CPU time used so far by the node's cgroup (daemons, shims, pods) or a part of it
        (`sub`, e.g. "daemons" or "kubepods"), from cpuacct."""
        path = CGROUP_FS / "cpuacct" / self.name / sub / "cpuacct.usage"
        return int(path.read_text()) / 1e9

    def pod_cpu_seconds(self, uid: str) -> float:
        """CPU time used so far by one pod (its containers and sandbox), from cpuacct."""
        root = CGROUP_FS / "cpuacct" / self.name
        found = list(root.glob(f"kubepods/**/pod{uid}/cpuacct.usage"))
        return sum(int(p.read_text()) for p in found) / 1e9

    # ---- daemons -------------------------------------------------------------------------

    def spawn(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start a daemon in the node (both namespaces, the daemons cgroup); log to logs/NAME.log.

        `sh` moves itself into the cgroup and execs nsenter, which execs the daemon:
        the Popen's PID is the daemon's own.
        """
        moves = " && ".join(
            f"echo $$ > {CGROUP_FS / h / self.name / 'daemons' / 'cgroup.procs'}"
            for h in DAEMON_HIERARCHIES
        )
        script = f'{moves} && exec "$@"'
        with open(self.log_path(name), "ab") as out:
            proc = subprocess.Popen(
                ["sh", "-c", script, "sh", *self._enter(), *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.dir,
            )
        self.procs[name] = proc
        return proc

    def stop_daemon(self, name: str, *, kill: bool = False) -> None:
        """Stop one daemon (SIGTERM, or SIGKILL as in a crash)."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if kill:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)
        else:
            _terminate(proc)

    def _check_alive(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            code = proc.returncode if proc else None
            raise KubeNodeError(f"{name} exited ({code})\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_path(name)
        if not path.exists():
            return f"(no {path})"
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- last {len(text)} lines of {path} ---\n" + "\n".join(text)

    # ---- containerd ----------------------------------------------------------------------

    def containerd_config(self) -> str:
        c = self.dir / "containerd"
        pause = self._images["pause"].ref if "pause" in self._images else PAUSE_IMAGE
        return f"""\
version = 3
root = "{c / "root"}"
state = "{c / "state"}"
# Plugins that would use paths or services of the machine, or cannot work here.
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.nri.v1.nri",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs",
]

[grpc]
  address = "{self.containerd_socket}"

[ttrpc]
  address = "{c / "containerd.sock.ttrpc"}"

[debug]
  address = "{c / "debug.sock"}"

[metrics]
  address = ""

[plugins."io.containerd.shim.v1.manager"]
  # Else 2.x puts shim sockets under /run/containerd/s whatever `state` says.
  socket_dir = "{self.dir / "s"}"

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{pause}"

[plugins."io.containerd.cri.v1.runtime"]
  # root has no CAP_SYS_RESOURCE here: runc could not lower oom_score_adj.
  restrict_oom_score_adj = true
  enable_selinux = false
  disable_apparmor = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/opt/cni/bin"]
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
    use_internal_loopback = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{RUNC}"
        Root = "{c / "runc"}"
        SystemdCgroup = false
"""

    def _start_containerd(self) -> None:
        c = self.dir / "containerd"
        (c / "config.toml").write_text(self.containerd_config())
        (self.dir / "s").mkdir(mode=0o700, exist_ok=True)
        shim_dir = str(tool_path("containerd-shim-runc-v2").parent)
        # The shim binary is found on PATH.
        self.spawn(
            "containerd",
            [
                "env",
                f"PATH={shim_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                str(tool_path("containerd")),
                f"--config={c / 'config.toml'}",
                f"--log-level={self.containerd_log_level}",
            ],
        )

        def answers() -> bool:
            self._check_alive("containerd")
            return self._ctr(["version"], check=False).returncode == 0

        wait_until(
            answers,
            timeout=self.ready_timeout,
            what="containerd answering `ctr version`",
            interval=0.1,
        )
        (self.dir / "crictl.yaml").write_text(
            f"runtime-endpoint: unix://{self.containerd_socket}\n"
            f"image-endpoint: unix://{self.containerd_socket}\ntimeout: 30\n"
        )

    def _ctr(self, args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(tool_path("ctr")), f"--address={self.containerd_socket}", *args]
        return self.node_exec(argv, check=check, timeout=300)

    def crictl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """crictl against the node's containerd (debugging; needs the node tool set)."""
        argv = [str(tool_path("crictl")), f"--config={self.dir / 'crictl.yaml'}", *args]
        return self.node_exec(argv, check=check, timeout=120)

    def import_image(self, image: Image) -> None:
        self._ctr(["-n", "k8s.io", "images", "import", "--local", str(image.path)])

    def _import_images(self) -> None:
        for name in self.image_names:
            self.import_image(self._images[name])

    def image(self, name: str) -> Image:
        """A built image by name ("flock", "pause", "test")."""
        if name not in self._images:
            self._images = built_images()
        return self._images[name]

    # ---- Kubernetes daemons --------------------------------------------------------------

    def _kubeconfig(self, user: str) -> Path:
        return self.api.kubeconfig_for(self.users[user].name, path=self.dir / f"{user}.kubeconfig")

    def _write_kube_configs(self) -> None:
        for user in self.users:
            self._kubeconfig(user)
        kubelet: dict[str, Any] = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{self.name}",
            "failCgroupV1": False,
            "failSwapOn": False,
            "oomScoreAdj": 0,
            "localStorageCapacityIsolation": False,
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            # The eviction manager cannot read this disk's stats anyway.
            "evictionHard": {
                "memory.available": "1Mi",
                "nodefs.available": "0%",
                "nodefs.inodesFree": "0%",
                "imagefs.available": "0%",
            },
            "resolvConf": "",
            "protectKernelDefaults": False,  # reads the bind-mounted sysctl files, writes none
            "hairpinMode": "none",
            "podLogsDir": str(self.dir / "pod-logs"),
            "volumePluginDir": str(self.dir / "flex"),
            "readOnlyPort": 0,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.api.ca_path)},
            },
            "authorization": {"mode": "Webhook"},
            "clusterDomain": "cluster.local",
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "serializeImagePulls": False,
            "nodeStatusUpdateFrequency": "5s",
            "syncFrequency": "10s",
            "maxPods": 250,
        }
        (self.dir / "kubelet.yaml").write_text(yaml.safe_dump(kubelet))
        proxy = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "nftables",
            "clientConnection": {"kubeconfig": str(self.dir / "proxy.kubeconfig")},
            "hostnameOverride": self.name,
            "metricsBindAddress": "127.0.0.1:10249",
            "healthzBindAddress": "127.0.0.1:10256",
            # Zero: leave the conntrack sysctls as they are (nf_conntrack_max is global).
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
        }
        (self.dir / "kube-proxy.yaml").write_text(yaml.safe_dump(proxy))

    def _start_controllers(self) -> None:
        pki = self.api.dir / "pki"
        self.spawn(
            "kube-controller-manager",
            [
                str(tool_path("kube-controller-manager")),
                f"--kubeconfig={self.dir / 'controller-manager.kubeconfig'}",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={self.api.ca_path}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--flex-volume-plugin-dir={self.dir / 'flex'}",
                "--node-monitor-grace-period=20s",
            ],
        )
        self.spawn(
            "kube-scheduler",
            [
                str(tool_path("kube-scheduler")),
                f"--kubeconfig={self.dir / 'scheduler.kubeconfig'}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
            ],
        )
        if self.with_kube_proxy:
            self.start_kube_proxy()

    def start_kube_proxy(self) -> None:
        self.spawn(
            "kube-proxy",
            [str(tool_path("kube-proxy")), f"--config={self.dir / 'kube-proxy.yaml'}"],
        )

    def _start_kubelet(self) -> None:
        self.spawn(
            "kubelet",
            [
                str(tool_path("kubelet")),
                f"--config={self.dir / 'kubelet.yaml'}",
                f"--kubeconfig={self.dir / 'node.kubeconfig'}",
                f"--root-dir={self.dir / 'kubelet'}",
                f"--hostname-override={self.name}",
                f"--node-ip={NODE_IP4},{NODE_IP6}",
                "--v=2",
            ],
        )

    def start_kubelet(self) -> None:
        self._start_kubelet()

    def _wait_registered(self) -> None:
        def probe() -> bool:
            for d in ("kubelet", "containerd", "kube-controller-manager", "kube-scheduler"):
                self._check_alive(d)
            return self.kubectl("get", "node", self.name, check=False).returncode == 0

        wait_until(probe, timeout=self.ready_timeout, what=f"node {self.name} registered")

    def _wait_default_sa(self) -> None:
        # Pods are refused until the controller-manager created the namespace's account.
        wait_until(
            lambda: self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0,
            timeout=self.ready_timeout,
            what="the default ServiceAccount",
        )

    # ---- the API -------------------------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """The built kubectl as the cluster admin (inside the node's network namespace)."""
        try:
            return self.api.kubectl(*args, input=input, check=check, timeout=timeout)
        except ApiServerError as e:
            raise KubeNodeError(str(e)) from None

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, objects: Iterable[dict[str, Any]] | str) -> None:
        text = objects if isinstance(objects, str) else yaml.safe_dump_all(list(objects))
        self.kubectl("apply", "-f", "-", input=text)

    def node_ready(self) -> bool:
        node = self.get_json("node", self.name)
        conds = {c["type"]: c["status"] for c in node["status"].get("conditions", [])}
        return conds.get("Ready") == "True"

    def wait_node_ready(self, timeout: float | None = None) -> float:
        """Wait for the Node's Ready condition; returns the seconds waited."""
        t0 = time.monotonic()
        wait_until(
            self.node_ready,
            timeout=timeout or self.ready_timeout,
            what=f"node {self.name} Ready",
            interval=0.2,
        )
        return time.monotonic() - t0

    # ---- flock, installed as users install it ----------------------------------------------

    def flock_agent_pods(self) -> list[dict[str, Any]]:
        """The pods of flock's DaemonSet (found by the DaemonSet's own selector)."""
        sets = self.get_json("daemonsets", "-n", "kube-system")["items"]
        flock = [d for d in sets if "flock" in d["metadata"]["name"]]
        if not flock:
            return []
        labels = flock[0]["spec"]["selector"]["matchLabels"]
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        items: list[dict[str, Any]] = self.get_json("pods", "-n", "kube-system", "-l", selector)[
            "items"
        ]
        return items

    def flock_daemonset(self) -> str:
        sets = self.get_json("daemonsets", "-n", "kube-system")["items"]
        return str(next(d["metadata"]["name"] for d in sets if "flock" in d["metadata"]["name"]))

    def install_flock(
        self, *, install_yaml: Path = INSTALL_YAML, nodeconfig: dict[str, Any] | None = None
    ) -> None:
        """FRR up; deploy/install.yaml applied (the CRD waited for); the node labelled
        and its NodeConfig applied; then wait for the DaemonSet's pod Ready, the node
        Ready and both BGP sessions Established. Timings go to `timings`."""
        t0 = time.monotonic()
        frr = self.frr or self.start_router()
        self.kubectl("apply", "--server-side", "-f", str(install_yaml))
        self.kubectl(
            "wait", "--for=condition=established", "--timeout=60s",
            "crd/nodeconfigs.flock.fritzlab.net",
        )  # fmt: skip
        self.kubectl("label", "node", self.name, f"{AGENT_LABEL}=", "--overwrite")
        self.apply([nodeconfig or flock_nodeconfig(self.name)])

        def agents() -> list[tuple[str, str, bool]]:
            return [
                (p["metadata"]["name"], p["status"].get("phase", ""), _pod_ready(p))
                for p in self.flock_agent_pods()
            ]

        wait_until(
            agents,
            until=lambda s: len(s) == 1 and s[0][2],
            timeout=240,
            what="flock's DaemonSet pod Ready",
            interval=0.5,
        )
        self.timings["flock_agent_ready"] = time.monotonic() - t0
        self.wait_node_ready()
        self.timings["flock_node_ready"] = time.monotonic() - t0
        wait_until(
            frr.neighbor_states,
            until=lambda s: len(s) == 2 and all(v == "Established" for v in s.values()),
            timeout=120,
            what="both BGP sessions Established at the router",
        )
        self.timings["flock_bgp_up"] = time.monotonic() - t0

    # ---- CNI -----------------------------------------------------------------------------

    def write_cni_conf(self, name: str, conf: dict[str, Any]) -> Path:
        """Write a CNI config into the conf dir in place (containerd ignores a file
        renamed in from another directory)."""
        path = self.cni_conf_dir / name
        tmp = self.cni_conf_dir / f".{name}.tmp"
        tmp.write_text(json.dumps(conf, indent=2))
        os.replace(tmp, path)
        return path

    def use_reference_cni(self, ranges: Sequence[str] = REFERENCE_RANGES) -> Path:
        """ptp + host-local from Debian's containernetworking-plugins, both families."""
        for plugin in ("ptp", "host-local", "loopback"):
            src = REFERENCE_CNI_DIR / plugin
            if not src.exists():
                raise KubeNodeError(f"{src} is missing: run ./scripts/setup")
            shutil.copy2(src, self.cni_bin_dir / plugin)
        conf = {
            "cniVersion": "1.0.0",
            "name": "e2e-ptp",
            "plugins": [
                {
                    "type": "ptp",
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": r}] for r in ranges],
                        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
                        "dataDir": "/var/lib/cni/e2e-host-local",
                    },
                }
            ],
        }
        return self.write_cni_conf("10-e2e-ptp.conflist", conf)

    def remove_cni_conf(self) -> None:
        for p in self.cni_conf_dir.iterdir():
            p.unlink()

    # ---- failures and restarts -----------------------------------------------------------

    def reboot(self) -> None:
        """A node "reboot": containerd, kubelet, every shim and pod process killed, pod netns
        gone (a new mount namespace with an empty /run); then containerd and the kubelet
        start again. The control plane (and kube-proxy's kernel state) stays."""
        for name in ("kubelet", "containerd"):
            self.stop_daemon(name, kill=True)
        proxy = self.procs.pop("kube-proxy", None)
        if proxy is not None:
            proxy.kill()
            proxy.wait(timeout=10)
        # The control plane is not on the "rebooting" machine: it keeps running.
        self._kill_cgroup_processes(keep=(p.pid for p in self.procs.values()))
        self._drop_mount_ns()
        c = self.dir / "containerd"
        for volatile in (c / "state", c / "runc", self.dir / "s"):
            # Their mounts died with the old mount namespace: plain dirs now.
            shutil.rmtree(volatile, ignore_errors=True)
        (self.dir / "s").mkdir(mode=0o700)
        self._new_mount_ns()
        self._start_containerd()
        if self.with_kube_proxy:
            self.start_kube_proxy()
        self._start_kubelet()

    def containerd_cni_timings(self) -> dict[str, float]:
        """Seconds containerd spent in CNI setup per sandbox id, from its own log.

        containerd times the setup ("begin cni setup" ... "cni result", the span its
        network_plugin_operations_duration_seconds metric covers); the lines are
        logged at debug level only (`containerd_log_level="debug"`).
        """
        begins: dict[str, float] = {}
        out: dict[str, float] = {}
        if self.dir == Path() or not self.containerd_log.exists():
            return out
        for line in self.containerd_log.read_text(errors="replace").splitlines():
            if "begin cni setup" not in line and "cni result" not in line:
                continue
            fields = _parse_logfmt(line)
            sid, stamp = fields.get("podsandboxid", ""), fields.get("time", "")
            if not sid or not stamp:
                continue
            t = _timestamp(stamp)
            if fields.get("msg") == "begin cni setup":
                begins[sid] = t
            elif sid in begins:
                out[sid] = t - begins.pop(sid)
        return out


def _pod_ready(pod: dict[str, Any]) -> bool:
    conds = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def _parse_logfmt(line: str) -> dict[str, str]:
    out: dict[str, str] = {}
    with contextlib.suppress(ValueError):
        for tok in shlex.split(line):
            if "=" in tok:
                k, v = tok.split("=", 1)
                out[k] = v
    return out


def _timestamp(text: str) -> float:
    """Epoch seconds of containerd's RFC 3339 nanosecond timestamps."""
    head, _, frac = text.rstrip("Z").partition(".")
    dt = datetime.datetime.fromisoformat(head).replace(tzinfo=datetime.UTC)
    return dt.timestamp() + (float(f"0.{frac}") if frac else 0.0)
