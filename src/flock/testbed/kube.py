"""A real kube-apiserver (and its etcd) in a network namespace of its own, for tests and the lab.

flock's Kubernetes datastore, its CRD, RBAC and install manifests are only proven
against the real server: schema validation, CEL messages, watch semantics (410
Gone, bookmarks), authorization by the Node and RBAC authorizers. This module
runs the binaries built by `scripts/build-tools` (see `flock.testbed.tools`).

    with ApiServer(users=[User("system:node:n1", groups=("system:nodes",))]) as api:
        api.kubectl("apply", "-f", "deploy/crds/nodeconfig.yaml")
        api.kubeconfig_path          # for processes inside api.netns (server 127.0.0.1:6443)
        api.host_kubeconfig_path     # for this process (root netns): a loopback forwarder
        api.kubeconfig_for("system:node:n1", host=True)
        api.restart_apiserver()      # etcd keeps the data
        api.compact_etcd()           # etcd forgets history (410 Gone: see "Watch cache")
        url = api.attach("node1-ns", api_cidr="192.0.2.1/30", peer_cidr="192.0.2.2/30")
        api.kubeconfig_for("system:node:n1", server=url)   # needs extra_sans=["192.0.2.1"]
        api.stop_apiserver(); api.start_apiserver()         # an API outage, etcd kept
        api.request("GET", "/readyz")                       # (status, JSON or text) from here

    api = ApiServer(workdir=lab_dir / "api"); api.start()   # `flock lab up`, then exit
    ApiServer.load(lab_dir / "api").stop()                  # `flock lab down`, later

What it sets up (all removed by `stop()`/`__exit__`, also after a failed start):

- a network namespace with a random name (`api.netns`, path `api.netns_path`; or
  `netns_name`), `lo` up; etcd listens on 127.0.0.1:2379 and kube-apiserver on
  `bind_address` (all addresses by default, so agents in other namespaces can reach
  it once `attach()` adds a veth with one of `extra_sans`) port 6443, both inside it;
  their processes are entered with `nsenter --net` and stopped by PID (`Daemon`);
- a temp dir (`api.dir`, or `workdir`) holding a CA, the serving certificate (SANs 127.0.0.1, ::1,
  localhost, kubernetes.default.svc..., the first Service IPs and `extra_sans`), a
  kubelet-client certificate, the service-account signing key, the static token
  file, kubeconfigs, etcd's data and both logs (`etcd.log`, `kube-apiserver.log`);
- authentication by static tokens: an admin (`ADMIN`, group system:masters) and the
  `users` given up front. `add_users()` appends to the token file and restarts the
  apiserver (kube-apiserver reads the file only at start). `token(name)` returns a
  user's token, `kubeconfig_for(name)` writes a kubeconfig for it; the client CA
  also accepts certificates signed by `api.ca_path` / `api.ca_key_path`;
- kube-apiserver flags for a control plane without controllers: `--authorization-mode
  Node,RBAC`, `--allow-privileged=true`, `--endpoint-reconciler-type none` (no
  loopback-advertise error every 10 s), `--disable-admission-plugins ServiceAccount`
  (no controller-manager creates tokens; `service_account_admission=True` turns it
  back on), NodeRestriction on, `--kubelet-preferred-address-types InternalIP`;
  `extra_args` are appended last (later flags win);
- the pytest process lives in the root namespace and cannot connect to the
  namespace's 127.0.0.1: a loopback TCP forwarder listens on 127.0.0.1:<ephemeral>
  in the root namespace (`api.host_url`) and splices each connection to a socket
  created inside the API namespace (by a thread that `setns`'d there). Nothing is
  listening on any other root-namespace address.

The daemons outlive the Python process that started them only if it exits without
`stop()`: `state.json` in the dir (rewritten at every kube-apiserver start) lets
`ApiServer.load()` in another process adopt and stop them, signalling a PID only
while /proc/PID/exe is still the binary it started.

`readyz_seconds` holds how long the last start took to /readyz; `rss()` the RSS of
etcd and kube-apiserver. Timeouts are deadlines (the machine is slow under load).
Measured on the 2-core test machine: /readyz 2.6-3.5 s after the start, RSS about
42 MB (etcd) + 270-300 MB (kube-apiserver) with the CRD installed.

Watch cache: kube-apiserver serves watches (and resourceVersion lists) from its own
memory, so an etcd compaction alone does not turn a watch at an old resourceVersion
into 410 Gone while the cache still holds events since then (checked: the watch
replays, an Exact list answers 200). `compact_etcd()` then `restart_apiserver()`
makes the cache start again at the current revision: a watch or list at an older
resourceVersion gets 410, as after a long outage in a real cluster.
`watch_cache=False` sends every watch to etcd directly: compaction alone then gives
410 (but no bookmarks: only the cache sends them).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flock.testbed import netns
from flock.testbed.tools import tool_path
from flock.testbed.wait import WaitTimeout, wait_until

ETCD_PORT = 2379
ETCD_PEER_PORT = 2380
APISERVER_PORT = 6443
ADMIN = "flock-admin"
DEFAULT_SERVICE_CIDRS = ("10.96.0.0/16", "fd00:10:96::/112")
CLONE_NEWNET = 0x40000000


class ApiServerError(RuntimeError):
    """A daemon failed to start or a command against it failed; says which and shows logs."""


@dataclass(frozen=True)
class User:
    """A token-authenticated identity: `name` (e.g. "system:node:n1") and its groups."""

    name: str
    groups: tuple[str, ...] = ()
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    uid: str = ""


def service_account_user(namespace: str, name: str) -> User:
    """A user that RBAC treats as ServiceAccount namespace/name (token auth, no controller)."""
    return User(
        f"system:serviceaccount:{namespace}:{name}",
        groups=("system:serviceaccounts", f"system:serviceaccounts:{namespace}"),
    )


def node_user(node: str) -> User:
    """A kubelet's identity for the Node authorizer and NodeRestriction."""
    return User(f"system:node:{node}", groups=("system:nodes",))


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NetnsDialer:
    """Opens TCP connections from inside a network namespace, for a root-namespace process.

    Sockets belong to the namespace of the thread that creates them; one worker thread
    enters the namespace once (setns affects only the calling thread) and creates them,
    and the caller connects and uses them from any thread.
    """

    def __init__(self, netns_path: str) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="netns-dialer",
            initializer=_setns,
            initargs=(netns_path,),
        )

    def new_socket(self, family: int = socket.AF_INET) -> socket.socket:
        """A TCP socket that belongs to the namespace."""
        return self._pool.submit(socket.socket, family, socket.SOCK_STREAM).result()

    def connect(self, host: str, port: int, timeout: float | None = 10) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = self.new_socket(family)
        s.settimeout(timeout)
        try:
            s.connect((host, port))
        except BaseException:
            s.close()
            raise
        return s

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class LoopbackForwarder:
    """Listens on 127.0.0.1:<ephemeral> in this namespace; splices each connection to `dial()`."""

    def __init__(self, dial: Callable[[], socket.socket]) -> None:
        self._dial = dial
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="kube-forwarder", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = self._dial()
        except OSError:
            client.close()  # the API server is down: the client sees a reset, as it would
            return
        upstream.settimeout(None)
        with self._lock:
            if self._closed:
                client.close()
                upstream.close()
                return
            self._open.update((client, upstream))
        back = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
        back.start()
        self._pump(client, upstream)
        back.join()
        with self._lock:
            self._open.difference_update((client, upstream))
        client.close()
        upstream.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def drop_connections(self) -> None:
        """Reset every open connection (an API outage as the clients see it)."""
        with self._lock:
            socks = list(self._open)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self.drop_connections()
        self._thread.join(timeout=5)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ip_literal(value: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in value else socket.AF_INET, value)
    except OSError:
        return False
    return True


def _first_ip(cidr: str) -> str:
    import ipaddress

    return str(next(ipaddress.ip_network(cidr).hosts()))


class ApiServer:
    """etcd + kube-apiserver in a private network namespace; a context manager (sync)."""

    def __init__(
        self,
        *,
        prefix: str = "fkapi",
        netns_name: str | None = None,
        workdir: Path | None = None,
        users: Iterable[User] = (),
        extra_sans: Sequence[str] = (),
        bind_address: str = "::",
        advertise_address: str = "127.0.0.1",
        service_cidrs: Sequence[str] = DEFAULT_SERVICE_CIDRS,
        service_account_admission: bool = False,
        watch_cache: bool = True,
        etcd_fsync: bool = False,
        extra_args: Sequence[str] = (),
        ready_timeout: float = 90,
    ) -> None:
        # `netns_name` fixes the name (the lab's `fl-<lab>-api`, found by `down` by prefix).
        self.netns = netns_name or netns.unique_name(prefix, 8)
        # `workdir` (must not exist; created, and removed by stop()) instead of a temp dir.
        self.workdir = workdir
        self.netns_path = netns.path(self.netns)
        self.users: dict[str, User] = {ADMIN: User(ADMIN, groups=("system:masters",))}
        for u in users:
            self.users[u.name] = u
        self.extra_sans = tuple(extra_sans)
        self.bind_address = bind_address
        self.advertise_address = advertise_address
        self.service_cidrs = tuple(service_cidrs)
        self.service_account_admission = service_account_admission
        self.watch_cache = watch_cache
        self.etcd_fsync = etcd_fsync
        self.extra_args = tuple(extra_args)
        self.ready_timeout = ready_timeout
        self.port = APISERVER_PORT
        self.url = f"https://127.0.0.1:{APISERVER_PORT}"
        self.dir = Path()
        self.readyz_seconds = 0.0
        self._etcd: Daemon | None = None
        self._apiserver: Daemon | None = None
        self._dialer: NetnsDialer | None = None
        self._forwarder: LoopbackForwarder | None = None
        self._netns_made = False

    # ---- paths -------------------------------------------------------------------------

    @property
    def ca_path(self) -> Path:
        return self.dir / "pki" / "ca.crt"

    @property
    def ca_key_path(self) -> Path:
        return self.dir / "pki" / "ca.key"

    @property
    def kubeconfig_path(self) -> Path:
        """Admin kubeconfig for processes inside `netns` (server https://127.0.0.1:6443)."""
        return self.dir / "admin.kubeconfig"

    @property
    def host_kubeconfig_path(self) -> Path:
        """Admin kubeconfig for processes in the root namespace (through the forwarder)."""
        return self.dir / "admin-host.kubeconfig"

    @property
    def host_url(self) -> str:
        if self._forwarder is None:
            raise ApiServerError("the API server is not started")
        return f"https://127.0.0.1:{self._forwarder.port}"

    @property
    def admin_token(self) -> str:
        return self.users[ADMIN].token

    def token(self, name: str) -> str:
        return self.users[name].token

    # ---- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Create the namespace and dirs, start etcd and kube-apiserver, wait for /readyz."""
        try:
            etcd = tool_path("etcd")
            tool_path("kube-apiserver")
            tool_path("kubectl")
            if self.workdir is not None:
                self.workdir.mkdir(mode=0o700, parents=True)
                self.dir = self.workdir
            else:
                self.dir = Path(tempfile.mkdtemp(prefix=f"flock-{self.netns}-"))
            netns.create(self.netns)
            self._netns_made = True
            self._dialer = NetnsDialer(self.netns_path)
            self._make_pki()
            self._write_tokens()
            self._etcd = self._spawn(etcd, self._etcd_args(), "etcd.log")
            try:
                wait_until(
                    self._etcd_health,
                    timeout=self.ready_timeout,
                    what="etcd /health",
                    ignore=(OSError, http.client.HTTPException),
                    interval=0.1,
                )
            except WaitTimeout as e:
                raise ApiServerError(f"{e}\n{self.log_tail('etcd.log')}") from e
            self._forwarder = LoopbackForwarder(lambda: self._dial_apiserver())
            self.kubeconfig_for(ADMIN, path=self.kubeconfig_path)
            self.kubeconfig_for(ADMIN, path=self.host_kubeconfig_path, host=True)
            self.start_apiserver()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop what start() started (by PID), remove the namespace and the temp dir."""
        if self._forwarder is not None:
            self._forwarder.close()
            self._forwarder = None
        self.stop_apiserver()
        if self._etcd is not None:
            self._etcd.terminate()
            self._etcd = None
        if self._dialer is not None:
            self._dialer.close()
            self._dialer = None
        if self._netns_made:
            netns.delete(self.netns)
            self._netns_made = False
        if self.dir != Path() and self.dir.is_dir():
            shutil.rmtree(self.dir, ignore_errors=True)

    def start_apiserver(self) -> float:
        """Start kube-apiserver (etcd must run) and wait for /readyz; returns the seconds."""
        if self._apiserver is not None and self._apiserver.running():
            raise ApiServerError("kube-apiserver is already running")
        t0 = time.monotonic()
        self._apiserver = self._spawn(
            tool_path("kube-apiserver"), self._apiserver_args(), "kube-apiserver.log"
        )
        try:
            wait_until(
                self._readyz,
                timeout=self.ready_timeout,
                what="kube-apiserver /readyz",
                ignore=(OSError, http.client.HTTPException, ssl.SSLError),
                interval=0.1,
            )
        except WaitTimeout as e:
            raise ApiServerError(f"{e}\n{self.log_tail('kube-apiserver.log')}") from e
        self.readyz_seconds = time.monotonic() - t0
        self.save()
        return self.readyz_seconds

    def stop_apiserver(self) -> None:
        """Stop kube-apiserver only (an API outage); etcd and the forwarder stay."""
        if self._apiserver is not None:
            self._apiserver.terminate()
            self._apiserver = None
        if self._forwarder is not None:
            self._forwarder.drop_connections()

    def restart_apiserver(self) -> float:
        """Stop and start kube-apiserver (etcd keeps the data); returns seconds to /readyz."""
        self.stop_apiserver()
        return self.start_apiserver()

    def add_users(self, *users: User) -> None:
        """Add token users; restarts kube-apiserver (it reads the token file only at start)."""
        for u in users:
            self.users[u.name] = u
        if self._netns_made:  # else start() writes them
            self._write_tokens()
        if self._apiserver is not None:
            self.restart_apiserver()

    # ---- another process: the lab's `up` starts, its `down` stops -----------------------

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    def save(self) -> Path:
        """Write what `load()` needs to `state_path` (done after every kube-apiserver start)."""
        daemons = {
            name: {"pid": d.pid, "exe": d.exe}
            for name, d in (("etcd", self._etcd), ("kube-apiserver", self._apiserver))
            if d is not None
        }
        state = {
            "netns": self.netns,
            "dir": str(self.dir),
            "daemons": daemons,
            "users": [
                {"name": u.name, "groups": list(u.groups), "token": u.token, "uid": u.uid}
                for u in self.users.values()
            ],
            "extra_sans": list(self.extra_sans),
            "bind_address": self.bind_address,
            "advertise_address": self.advertise_address,
            "service_cidrs": list(self.service_cidrs),
            "service_account_admission": self.service_account_admission,
            "watch_cache": self.watch_cache,
            "etcd_fsync": self.etcd_fsync,
            "extra_args": list(self.extra_args),
            "ready_timeout": self.ready_timeout,
        }
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.chmod(0o600)
        os.replace(tmp, self.state_path)
        return self.state_path

    @classmethod
    def load(cls, workdir: Path, *, forward: bool = False) -> ApiServer:
        """The ApiServer a previous process started in `workdir` and left running.

        `stop()`, `kubectl()`, `restart_apiserver()`, `add_users()`, `compact_etcd()`
        work on it; its daemons are signalled only while their PID still runs the
        same executable. `forward=True` also starts a root-namespace forwarder
        (a new port; `host_kubeconfig_path` is rewritten for it).
        """
        state = json.loads((Path(workdir) / "state.json").read_text())
        api = cls(
            netns_name=state["netns"],
            users=[
                User(u["name"], groups=tuple(u["groups"]), token=u["token"], uid=u["uid"])
                for u in state["users"]
            ],
            extra_sans=state["extra_sans"],
            bind_address=state["bind_address"],
            advertise_address=state["advertise_address"],
            service_cidrs=state["service_cidrs"],
            service_account_admission=state["service_account_admission"],
            watch_cache=state["watch_cache"],
            etcd_fsync=state["etcd_fsync"],
            extra_args=state["extra_args"],
            ready_timeout=state["ready_timeout"],
        )
        api.dir = Path(state["dir"])
        api.workdir = api.dir
        api._netns_made = netns.exists(api.netns)
        daemons = state["daemons"]
        if "etcd" in daemons:
            api._etcd = Daemon(daemons["etcd"]["pid"], daemons["etcd"]["exe"])
        if "kube-apiserver" in daemons:
            d = daemons["kube-apiserver"]
            api._apiserver = Daemon(d["pid"], d["exe"])
        if api._netns_made:
            api._dialer = NetnsDialer(api.netns_path)
            if forward:
                api._forwarder = LoopbackForwarder(api._dial_apiserver)
                api.kubeconfig_for(ADMIN, path=api.host_kubeconfig_path, host=True)
        return api

    # ---- etcd --------------------------------------------------------------------------

    def etcd_revision(self) -> int:
        """etcd's current revision (what resourceVersions are made of)."""
        reply = self._etcd_post("/v3/kv/range", {"key": base64.b64encode(b"\0").decode()})
        return int(reply["header"]["revision"])

    def compact_etcd(self) -> int:
        """Compact etcd to its current revision (physically); returns that revision.

        Reads and watches at older resourceVersions that reach etcd then fail with 410
        Gone; see the module docstring for the apiserver's watch cache.
        """
        rev = self.etcd_revision()
        self._etcd_post("/v3/kv/compaction", {"revision": rev, "physical": True})
        return rev

    # ---- clients -----------------------------------------------------------------------

    def attach(
        self, other_netns: str, *, api_cidr: str, peer_cidr: str, peer_if: str = "kapi0"
    ) -> str:
        """Connect namespace `other_netns` to the API by a veth pair; returns the server URL.

        The API end gets `api_cidr` (its address must be one of `extra_sans`, or TLS
        fails), the other end `peer_cidr` (same subnet). The pair goes with either
        namespace. Use the URL as `kubeconfig_for(name, server=url)`.
        """
        ip = api_cidr.split("/")[0]
        if ip not in self.extra_sans:
            raise ValueError(f"{ip} is not in extra_sans {self.extra_sans}: TLS would fail")
        api_if = netns.unique_name("kapi", 8)
        netns.veth(self.netns, api_if, other_netns, peer_if)
        netns.add_address(self.netns, api_if, api_cidr)
        netns.add_address(other_netns, peer_if, peer_cidr)
        host = f"[{ip}]" if ":" in ip else ip
        return f"https://{host}:{APISERVER_PORT}"

    def kubeconfig_for(
        self, name: str, *, path: Path | None = None, host: bool = False, server: str = ""
    ) -> Path:
        """Write a kubeconfig authenticating as user `name` (by token); returns its path.

        The server is `server` if given, else with `host=True` the root-namespace
        forwarder, else 127.0.0.1:6443 inside the API namespace. The CA is embedded
        so the file is self-contained.
        """
        user = self.users[name]
        server = server or (self.host_url if host else self.url)
        if path is None:
            safe = name.replace(":", "_").replace("/", "_")
            path = self.dir / f"{safe}{'-host' if host else ''}.kubeconfig"
        ca = base64.b64encode(self.ca_path.read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "flock", "cluster": {"server": server, "certificate-authority-data": ca}}
            ],
            "users": [{"name": name, "user": {"token": user.token}}],
            "contexts": [{"name": "flock", "context": {"cluster": "flock", "user": name}}],
            "current-context": "flock",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 120,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl inside the API namespace (admin unless `kubeconfig`).

        With `check`, a non-zero exit raises ApiServerError carrying stderr.
        """
        cmd = [
            "nsenter",
            f"--net={self.netns_path}",
            str(tool_path("kubectl")),
            f"--kubeconfig={kubeconfig or self.kubeconfig_path}",
            f"--cache-dir={self.dir / 'kubectl-cache'}",
            *args,
        ]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ApiServerError(
                f"kubectl {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}"
            )
        return proc

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        content_type: str = "application/json",
        timeout: float = 30,
    ) -> tuple[int, Any]:
        """One HTTPS request to the apiserver from this process; returns (status, JSON body)."""
        conn = self.connection(timeout=timeout)
        try:
            headers = {
                "Authorization": f"Bearer {token or self.admin_token}",
                "Accept": "application/json",
            }
            data = None
            if body is not None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                headers["Content-Type"] = content_type
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            try:
                return resp.status, json.loads(raw) if raw else None
            except ValueError:
                return resp.status, raw.decode(errors="replace")
        finally:
            conn.close()

    def connection(self, *, timeout: float = 30) -> http.client.HTTPSConnection:
        """An HTTPS connection to the apiserver through the forwarder (caller closes it)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        port = self._forwarder.port if self._forwarder else 0
        return http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=timeout)

    # ---- diagnostics -------------------------------------------------------------------

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.dir / name
        if not path.exists():
            return f"(no {name})"
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- last {len(text)} lines of {path} ---\n" + "\n".join(text)

    def pids(self) -> dict[str, int]:
        out = {}
        for name, proc in (("etcd", self._etcd), ("kube-apiserver", self._apiserver)):
            if proc is not None and proc.running():
                out[name] = proc.pid
        return out

    def rss(self) -> dict[str, int]:
        """Resident set size in bytes of etcd and kube-apiserver."""
        out = {}
        for name, pid in self.pids().items():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[name] = int(line.split()[1]) * 1024
        return out

    # ---- internals ---------------------------------------------------------------------

    def _spawn(self, binary: Path, args: Sequence[str], log: str) -> Daemon:
        # nsenter execs the binary: the Popen's PID is the daemon's own, killed by PID.
        exe = os.path.realpath(binary)
        with open(self.dir / log, "ab") as out:
            popen = subprocess.Popen(
                ["nsenter", f"--net={self.netns_path}", exe, *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.dir,
            )
        return Daemon(popen.pid, exe, popen)

    def _etcd_args(self) -> list[str]:
        client = f"http://127.0.0.1:{ETCD_PORT}"
        peer = f"http://127.0.0.1:{ETCD_PEER_PORT}"
        args = [
            "--name=flock",
            f"--data-dir={self.dir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=flock={peer}",
            "--log-level=warn",
        ]
        if not self.etcd_fsync:
            args.append("--unsafe-no-fsync")  # a test server: speed over crash safety
        return args

    def _apiserver_args(self) -> list[str]:
        pki = self.dir / "pki"
        args = [
            f"--etcd-servers=http://127.0.0.1:{ETCD_PORT}",
            f"--bind-address={self.bind_address}",
            f"--secure-port={APISERVER_PORT}",
            f"--advertise-address={self.advertise_address}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--kubelet-client-certificate={pki / 'kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'kubelet-client.key'}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={','.join(self.service_cidrs)}",
            f"--token-auth-file={self.dir / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",
            "--endpoint-reconciler-type=none",
            "--enable-admission-plugins=NodeRestriction",
            "--profiling=false",
        ]
        if not self.service_account_admission:
            args.append("--disable-admission-plugins=ServiceAccount")
        if not self.watch_cache:
            args.append("--watch-cache=false")
        return [*args, *self.extra_args]

    def _make_pki(self) -> None:
        pki = self.dir / "pki"
        pki.mkdir(mode=0o700)
        (pki / "openssl.cnf").write_text(
            "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = x\n"
        )
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        common = ["req", "-x509", "-new", *ec, "-config", "openssl.cnf"]
        _openssl(
            *common, "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
            "-subj", "/CN=flock-test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=pki,
        )  # fmt: skip
        sans = ["127.0.0.1", "::1", "localhost", "kubernetes", "kubernetes.default",
                "kubernetes.default.svc", "kubernetes.default.svc.cluster.local",
                *(_first_ip(c) for c in self.service_cidrs), *self.extra_sans]  # fmt: skip
        if self.advertise_address not in sans:
            sans.append(self.advertise_address)
        san = ",".join(f"IP:{s}" if _ip_literal(s) else f"DNS:{s}" for s in dict.fromkeys(sans))
        leaf = [*common, "-days", "365", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-addext", "basicConstraints=critical,CA:FALSE",
                "-addext", "keyUsage=critical,digitalSignature"]  # fmt: skip
        _openssl(
            *leaf, "-keyout", "apiserver.key", "-out", "apiserver.crt",
            "-subj", "/CN=kube-apiserver",
            "-addext", f"subjectAltName={san}", "-addext", "extendedKeyUsage=serverAuth",
            cwd=pki,
        )  # fmt: skip
        _openssl(
            *leaf, "-keyout", "kubelet-client.key", "-out", "kubelet-client.crt",
            "-subj", "/O=system:masters/CN=kube-apiserver-kubelet-client",
            "-addext", "extendedKeyUsage=clientAuth",
            cwd=pki,
        )  # fmt: skip
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-out", "sa.key", cwd=pki)  # fmt: skip
        _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)

    def _write_tokens(self) -> None:
        # token,user,uid,"group1,group2" (kube-apiserver's static token file format)
        lines = []
        for u in self.users.values():
            groups = ",".join(u.groups)
            lines.append(f'{u.token},{u.name},{u.uid or u.name},"{groups}"')
        path = self.dir / "tokens.csv"
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)

    def _dial_apiserver(self) -> socket.socket:
        if self._dialer is None:
            raise OSError("the API namespace is gone")
        return self._dialer.connect("127.0.0.1", APISERVER_PORT)

    def _readyz(self) -> bool:
        if self._apiserver is None or not self._apiserver.running():
            code = self._apiserver.returncode if self._apiserver else None
            tail = self.log_tail("kube-apiserver.log")
            raise ApiServerError(f"kube-apiserver exited ({code}) before /readyz\n{tail}")
        status, _ = self.request("GET", "/readyz", timeout=5)
        return status == 200

    def _etcd_health(self) -> bool:
        if self._etcd is None or not self._etcd.running():
            code = self._etcd.returncode if self._etcd else None
            raise ApiServerError(f"etcd exited ({code})\n{self.log_tail('etcd.log')}")
        return bool(self._etcd_request("GET", "/health", None).get("health") == "true")

    def _etcd_post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._etcd_request("POST", path, body)

    def _etcd_request(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        if self._dialer is None:
            raise ApiServerError("not started")
        conn = http.client.HTTPConnection("127.0.0.1", ETCD_PORT, timeout=10)
        conn.sock = self._dialer.connect("127.0.0.1", ETCD_PORT)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
            if resp.status != 200:
                raise ApiServerError(f"etcd {method} {path}: {resp.status} {raw[:300]!r}")
            reply: dict[str, Any] = json.loads(raw)
            return reply
        finally:
            conn.close()


class Daemon:
    """A process the harness started, stopped by its PID and nothing else.

    In the process that started it, the Popen is kept (exit codes, reaping). After
    `ApiServer.load()` in another process (the lab's `down`), only the PID and the
    executable are known: the PID counts as ours only while /proc/PID/exe is still
    that executable, so a PID reused by an unrelated process is never signalled.
    """

    def __init__(self, pid: int, exe: str, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.exe = exe
        self.popen = popen

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode if self.popen is not None else None

    def running(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            exe = os.readlink(f"/proc/{self.pid}/exe")
        except OSError:
            return False  # gone (or a zombie: no exe link)
        return exe.removesuffix(" (deleted)") == self.exe

    def terminate(self, grace: float = 10) -> None:
        """SIGTERM, SIGKILL after `grace` seconds; returns once it is gone."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            if not self.running():
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            deadline = time.monotonic() + wait
            while self.running() and time.monotonic() < deadline:
                if self.popen is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.popen.wait(timeout=0.1)
                else:
                    time.sleep(0.05)
        if self.running():
            raise ApiServerError(f"{self.exe} (pid {self.pid}) survived SIGKILL")
