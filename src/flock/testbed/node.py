"""A flock node in a network namespace, driven the way a cluster drives a real one.

The integration tests, the benchmarks and the lab all need the same thing: a
"node" namespace with an uplink and addresses, its own state/run/manifests
directories, the real agent running inside it (`ip netns exec NODE flock agent
...`), pods written as manifests (what the API server would hold), pod
namespaces created the way a container runtime creates them, and the real CNI
plugin executed exactly as a runtime executes it: a subprocess with the CNI_*
environment and the network config on stdin, its stdout parsed as the result.

Everything is named with the caller's prefix and removed by `TestNode.destroy()`
(agent stopped by PID, pod namespaces, node namespace, directories), also after
a failure half-way through `create()`.

The plugin runs in the caller's namespace, not inside the node's: it only
talks to the agent's unix socket (a path), so the namespace it runs in does not
matter, and `ip netns exec` would add its own milliseconds to every measured
call. Reference plugins that do touch the kernel are run by the benchmark from
inside the node namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flock import ANNOTATION_PREFIX, CRD_GROUP, CRD_VERSION
from flock.testbed import netns
from flock.testbed.wait import WaitTimeout, wait_until

PYTHON = "/usr/bin/python3"
DEFAULT_NETWORK = "flock"


def repo_venv_bin() -> Path:
    """The `bin` directory of the interpreter running this code (the project's venv)."""
    return Path(sys.executable).parent


def install_plugin(bin_dir: Path, *, python: str = PYTHON, launcher: Path | None = None) -> Path:
    """Put an executable `flock` plugin in `bin_dir`, the way the node installer does.

    `launcher`: the native launcher as the entry (``install-cni --python --launcher``).

    Uses `flock install-cni --python` (the plugin module precompiled, run by the
    system interpreter in isolated mode without site, `-IS`), so tests and the lab
    exercise the installed layout. Falls back to a plain script copy if the
    installer is not importable.
    """
    try:
        from flock.cni.install import install
    except ImportError:
        pass
    else:
        install(
            bin_dir=bin_dir, conf_dir=bin_dir.parent / "net.d", python=python, launcher=launcher
        )
        return bin_dir / "flock"
    from flock.cni import plugin

    src = Path(plugin.__file__).read_text()
    if src.startswith("#!"):
        src = src.split("\n", 1)[1]
    bin_dir.mkdir(parents=True, exist_ok=True)
    dst = bin_dir / "flock"
    tmp = bin_dir / ".flock.tmp"
    tmp.write_text(f"#!{python} -IS\n{src}")
    tmp.chmod(0o755)
    os.replace(tmp, dst)
    return dst


@dataclass(frozen=True)
class PluginResult:
    """One plugin execution: exit status, raw output, and the parsed result or error."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def json(self) -> dict[str, Any]:
        if not self.stdout.strip():
            return {}
        out = json.loads(self.stdout)
        if not isinstance(out, dict):
            raise ValueError(f"plugin printed a non-object: {self.stdout[:200]!r}")
        return out

    @property
    def error(self) -> dict[str, Any] | None:
        """The CNI error object when the plugin failed."""
        return None if self.ok else self.json

    def ips(self) -> list[str]:
        """Addresses of the ADD result, without prefix length, in result order."""
        return [ip["address"].split("/")[0] for ip in self.json.get("ips", [])]


@dataclass
class Pod:
    """A pod as the testbed created it: manifest identity, netns and attachment."""

    namespace: str
    name: str
    uid: str
    netns_name: str
    container_id: str
    ifname: str = "eth0"
    result: PluginResult | None = None

    @property
    def netns_path(self) -> str:
        return netns.path(self.netns_name)

    def exec(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        return netns.run(list(args), netns=self.netns_name, check=check, timeout=timeout).stdout

    def global_addrs(self, dev: str = "eth0") -> set[str]:
        """The global-scope addresses on `dev` in the pod's namespace, as the kernel has them."""
        rows = json.loads(self.exec("ip", "-j", "addr", "show", "dev", dev))
        return {a["local"] for a in rows[0]["addr_info"] if a.get("scope") == "global"}


def pod_manifest(
    name: str,
    *,
    namespace: str = "default",
    node: str,
    uid: str,
    annotations: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    ready: bool = True,
    terminating: bool = False,
    ports: Sequence[Mapping[str, Any]] = (),
    image: str = "registry.example/app:1",
) -> dict[str, Any]:
    """A v1 Pod object as the API server would hold it once scheduled on `node`."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid}
    if annotations:
        meta["annotations"] = dict(annotations)
    if labels:
        meta["labels"] = dict(labels)
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "nodeName": node,
            "containers": [{"name": "app", "image": image, "ports": list(ports)}],
        },
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def nodeconfig_manifest(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{CRD_GROUP}/{CRD_VERSION}",
        "kind": "NodeConfig",
        "metadata": {"name": name},
        "spec": dict(spec),
    }


def write_manifest(path: Path, *docs: Mapping[str, Any]) -> None:
    """Atomically (temp file + rename) write one or more objects as YAML."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump_all([dict(d) for d in docs], sort_keys=False))
    os.replace(tmp, path)


@dataclass
class TestNode:
    """One node: namespace, directories, agent process, pods. Build with `TestNode.create`."""

    __test__ = False  # not a pytest test class

    name: str  # netns name, also the node name the agent uses
    prefix: str
    base_dir: Path
    uplink: str = "uplink0"
    v6: str | None = None  # node address with prefix length, e.g. 2001:db8:ffff::1/64
    v4: str | None = None
    agent: subprocess.Popen[bytes] | None = None
    pods: dict[str, Pod] = field(default_factory=dict)
    plugin: Path | None = None
    network: str = DEFAULT_NETWORK
    # The node's name in the cluster (NodeConfig name, pods' spec.nodeName); default: `name`.
    node_name: str | None = None
    # Where the agent reads the cluster from: default `--manifests <base_dir>/manifests`;
    # e.g. ["--kubeconfig", path] for a real API server.
    datastore_args: list[str] | None = None
    _agent_log: Any = None

    # ---- lifecycle ---------------------------------------------------------------

    @classmethod
    def create(
        cls,
        prefix: str,
        *,
        name: str | None = None,
        base_dir: Path | None = None,
        v6: str | None = "2001:db8:ffff::1/64",
        v4: str | None = "198.51.100.1/24",
        uplink_peer: str | None = None,
        uplink_peer_ifname: str | None = None,
        gateway6: str | None = None,
        gateway4: str | None = None,
        node_name: str | None = None,
        datastore_args: Sequence[str] | None = None,
        launcher: bool | None = None,
    ) -> TestNode:
        """Create the node namespace, its uplink and directories.

        `launcher`: the plugin's entry is the native launcher of this checkout
        (default: only if FLOCK_TEST_LAUNCHER=1), else the Python plugin alone.

        With `uplink_peer` (a namespace name, e.g. the lab's router) the uplink is a
        veth into that namespace (its end named `uplink_peer_ifname`); without, the
        veth's other end stays in the node (a stand-in NIC that gives the node its
        addresses). Default routes go via `gateway6`/`gateway4` when given, else out
        of the uplink.
        """
        name = name or netns.unique_name(prefix + "n", 6)
        base = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix=f"{name}-"))
        node = cls(
            name=name,
            prefix=prefix,
            base_dir=base,
            v6=v6,
            v4=v4,
            node_name=node_name,
            datastore_args=list(datastore_args) if datastore_args is not None else None,
        )
        try:
            netns.create(name, forwarding=True)
            for d in (node.state_dir, node.run_dir, node.manifests_dir, node.bin_dir):
                d.mkdir(parents=True, exist_ok=True)
            peer_ns = uplink_peer or name
            peer_if = uplink_peer_ifname or (node.uplink + "p" if uplink_peer is None else name)
            netns.veth(name, node.uplink, peer_ns, peer_if)
            for addr in (v6, v4):
                if addr:
                    netns.add_address(name, node.uplink, addr)
            for fam, gw, addr in (("-6", gateway6, v6), ("-4", gateway4, v4)):
                if not addr:
                    continue
                via = ["via", gw] if gw else []
                netns.run(
                    ["ip", fam, "route", "add", "default", *via, "dev", node.uplink], netns=name
                )
            if launcher is None:
                launcher = os.environ.get("FLOCK_TEST_LAUNCHER") == "1"
            native = None
            if launcher:
                from flock.testbed.launcher import built_launcher

                native = built_launcher()
                if native is None:
                    raise RuntimeError("the native launcher cannot be built here (no cc?)")
            node.plugin = install_plugin(node.bin_dir, launcher=native)
        except BaseException:
            node.destroy()
            raise
        return node

    @property
    def state_dir(self) -> Path:
        return self.base_dir / "state"

    @property
    def run_dir(self) -> Path:
        return self.base_dir / "run"

    @property
    def manifests_dir(self) -> Path:
        return self.base_dir / "manifests"

    @property
    def bin_dir(self) -> Path:
        return self.base_dir / "bin"

    @property
    def socket(self) -> Path:
        return self.run_dir / "agent.sock"

    @property
    def status_socket(self) -> Path:
        return self.run_dir / "status.sock"

    @property
    def agent_log(self) -> Path:
        return self.base_dir / "agent.log"

    @property
    def path(self) -> str:
        return netns.path(self.name)

    def destroy(self, *, keep_dir: bool = False) -> None:
        """Stop the agent, remove pod namespaces, the node namespace and (unless kept) files."""
        with contextlib.suppress(Exception):
            self.stop_agent()
        for pod in list(self.pods.values()):
            netns.delete(pod.netns_name)
        self.pods.clear()
        netns.delete(self.name)
        if not keep_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    # ---- manifests ---------------------------------------------------------------

    def write(self, filename: str, *docs: Mapping[str, Any]) -> Path:
        path = self.manifests_dir / filename
        write_manifest(path, *docs)
        return path

    def set_node_config(self, spec: Mapping[str, Any]) -> None:
        self.write("nodeconfig.yaml", nodeconfig_manifest(self.node_name or self.name, spec))

    def put_pod(
        self,
        name: str,
        *,
        namespace: str = "default",
        uid: str | None = None,
        annotations: Mapping[str, str] | None = None,
        ready: bool = True,
        **kw: Any,
    ) -> str:
        """Write (or rewrite) a pod's manifest; returns its uid."""
        uid = uid or str(uuid.uuid4())
        ann = {
            (k if "/" in k else ANNOTATION_PREFIX + k): v for k, v in (annotations or {}).items()
        }
        obj = pod_manifest(
            name,
            namespace=namespace,
            node=self.node_name or self.name,
            uid=uid,
            annotations=ann,
            ready=ready,
            **kw,
        )
        self.write(f"pod-{namespace}-{name}.yaml", obj)
        return uid

    def set_ready(self, pod: Pod, ready: bool, *, terminating: bool = False) -> None:
        """Rewrite the pod's manifest with its Ready condition flipped (the kubelet's job)."""
        path = self.manifests_dir / f"pod-{pod.namespace}-{pod.name}.yaml"
        obj = yaml.safe_load(path.read_text())
        obj["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
        if terminating:
            obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        write_manifest(path, obj)

    def remove_pod_manifest(self, pod: Pod) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.manifests_dir / f"pod-{pod.namespace}-{pod.name}.yaml").unlink()

    # ---- the agent ---------------------------------------------------------------

    def agent_command(self, *extra: str) -> list[str]:
        """The agent's command line: one set of flags, from the node's fields, plus `extra`."""
        datastore = (
            self.datastore_args
            if self.datastore_args is not None
            else ["--manifests", str(self.manifests_dir)]
        )
        return [
            str(repo_venv_bin() / "flock"),
            "agent",
            "--node-name",
            self.node_name or self.name,
            "--state-dir",
            str(self.state_dir),
            "--run-dir",
            str(self.run_dir),
            *datastore,
            *extra,
        ]

    def start_agent(self, *extra: str, wait: float = 60.0) -> int:
        """Start the real agent inside the node namespace; returns its PID once it serves."""
        if self.agent is not None and self.agent.poll() is None:
            raise RuntimeError(f"agent of {self.name} already running (pid {self.agent.pid})")
        self._agent_log = self.agent_log.open("ab")
        # `ip netns exec` execs the command in place: the PID is the agent's own.
        self.agent = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *self.agent_command(*extra)],
            stdin=subprocess.DEVNULL,
            stdout=self._agent_log,
            stderr=self._agent_log,
        )
        if wait:
            self.wait_agent(wait)
        return self.agent.pid

    def wait_agent(self, timeout: float = 60.0) -> None:
        """Wait until the agent answers on its status socket (it serves CNI by then)."""
        from flock.agent.status import query

        def serving() -> bool:
            if self.agent is not None and self.agent.poll() is not None:
                raise RuntimeError(
                    f"agent of {self.name} exited with {self.agent.returncode}:\n{self.log_tail()}"
                )
            query(self.status_socket, timeout=1)
            return True

        try:
            wait_until(
                serving,
                timeout=timeout,
                what=f"agent of {self.name} to serve",
                ignore=(OSError, ValueError),
                interval=0.02,
            )
        except WaitTimeout as e:
            raise TimeoutError(f"{e}\n{self.log_tail()}") from None

    def stop_agent(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal the agent by PID and reap it; SIGKILL if it does not exit in time."""
        proc = self.agent
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.agent = None
        if self._agent_log is not None:
            self._agent_log.close()
            self._agent_log = None
        return proc.returncode

    def kill_agent(self) -> None:
        self.stop_agent(signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.agent_log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no agent log)"

    def status(self) -> dict[str, Any]:
        from flock.agent.status import query

        return query(self.status_socket)

    # ---- pods and the plugin -----------------------------------------------------

    def network_config(self, **extra: Any) -> dict[str, Any]:
        return {
            "cniVersion": "1.1.0",
            "name": self.network,
            "type": "flock",
            "agentSocket": str(self.socket),
            "stateDir": str(self.state_dir),
            **extra,
        }

    def cni(
        self,
        command: str,
        *,
        container_id: str = "",
        netns_path: str = "",
        ifname: str = "eth0",
        pod_namespace: str = "",
        pod_name: str = "",
        pod_uid: str = "",
        config: Mapping[str, Any] | None = None,
        timeout: float = 60.0,
    ) -> PluginResult:
        """Execute the plugin exactly as a runtime does: CNI_* env, config on stdin."""
        assert self.plugin is not None
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command}
        if container_id:
            env["CNI_CONTAINERID"] = container_id
        if netns_path:
            env["CNI_NETNS"] = netns_path
        if ifname:
            env["CNI_IFNAME"] = ifname
        if pod_name:
            env["CNI_ARGS"] = (
                f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod_namespace};K8S_POD_NAME={pod_name};"
                f"K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={pod_uid}"
            )
        env["CNI_PATH"] = str(self.bin_dir)
        stdin = json.dumps(dict(config) if config is not None else self.network_config())
        t0 = time.perf_counter()
        proc = subprocess.run(
            [str(self.plugin)], input=stdin.encode(), env=env, capture_output=True, timeout=timeout
        )
        seconds = time.perf_counter() - t0
        return PluginResult(
            proc.returncode, proc.stdout.decode(), proc.stderr.decode(errors="replace"), seconds
        )

    def new_pod_netns(self) -> str:
        """A bare pod namespace (lo up), as a runtime creates a sandbox; returns its name."""
        name = netns.unique_name(self.prefix + "p", 8)
        netns.create(name)
        return name

    def add_pod(
        self,
        name: str,
        *,
        namespace: str = "default",
        annotations: Mapping[str, str] | None = None,
        ready: bool = True,
        manifest: bool = True,
        check: bool = True,
        **kw: Any,
    ) -> Pod:
        """Schedule a pod here: manifest, sandbox netns, plugin ADD. Raises if ADD fails
        and `check` (the netns is then removed again)."""
        uid = (
            self.put_pod(name, namespace=namespace, annotations=annotations, ready=ready, **kw)
            if manifest
            else str(uuid.uuid4())
        )
        ns_name = self.new_pod_netns()
        pod = Pod(
            namespace=namespace,
            name=name,
            uid=uid,
            netns_name=ns_name,
            container_id=uuid.uuid4().hex,
        )
        self.pods[f"{namespace}/{name}"] = pod
        pod.result = self.cni_add(pod)
        if check and not pod.result.ok:
            self.pods.pop(f"{namespace}/{name}")
            netns.delete(ns_name)
            raise RuntimeError(f"ADD {namespace}/{name} failed: {pod.result.stdout}")
        return pod

    def cni_add(self, pod: Pod, **kw: Any) -> PluginResult:
        return self.cni("ADD", **self.pod_env(pod), **kw)

    def cni_del(self, pod: Pod, **kw: Any) -> PluginResult:
        return self.cni("DEL", **self.pod_env(pod), **kw)

    def cni_check(self, pod: Pod, **kw: Any) -> PluginResult:
        """CHECK with the ADD result as prevResult, as a runtime sends it."""
        if "config" not in kw and pod.result is not None and pod.result.ok:
            kw["config"] = self.network_config(prevResult=pod.result.json)
        return self.cni("CHECK", **self.pod_env(pod), **kw)

    def cni_gc(self, valid: Sequence[Pod]) -> PluginResult:
        cfg = self.network_config(
            **{
                "cni.dev/valid-attachments": [
                    {"containerID": p.container_id, "ifname": p.ifname} for p in valid
                ]
            }
        )
        return self.cni("GC", config=cfg, ifname="")

    def cni_status(self) -> PluginResult:
        return self.cni("STATUS", ifname="")

    def pod_env(self, pod: Pod) -> dict[str, Any]:
        """The `cni()` keywords that name `pod`'s attachment, as a runtime sets them."""
        return {
            "container_id": pod.container_id,
            "netns_path": pod.netns_path,
            "ifname": pod.ifname,
            "pod_namespace": pod.namespace,
            "pod_name": pod.name,
            "pod_uid": pod.uid,
        }

    def delete_pod(self, pod: Pod, *, remove_netns: bool = True) -> PluginResult:
        """DEL through the plugin, then remove the sandbox (the runtime's order)."""
        res = self.cni_del(pod)
        if remove_netns:
            netns.delete(pod.netns_name)
            self.pods.pop(f"{pod.namespace}/{pod.name}", None)
        return res

    def exec(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        return netns.run(list(args), netns=self.name, check=check, timeout=timeout).stdout


@contextlib.contextmanager
def test_node(prefix: str, *, log_lines: int = 0, **kw: Any) -> Iterator[TestNode]:
    """A `TestNode` for the duration of a block; always destroyed afterwards.

    With `log_lines`, the last lines of the agent's log are printed after the
    node is gone (pytest shows them for a failed test).
    """
    node = TestNode.create(prefix, **kw)
    try:
        yield node
    finally:
        log = node.log_tail(log_lines) if log_lines else None
        node.destroy()
        if log is not None:
            print(log)


test_node.__test__ = False  # type: ignore[attr-defined]
