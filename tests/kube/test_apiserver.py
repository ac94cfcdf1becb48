"""The test API server itself, and flock's CRD on it.

The harness is what every other real-server test stands on, so its promises are
checked here: it answers /readyz with the version build-tools stamped, kubectl
works inside its namespace, data survives a kube-apiserver restart, and an etcd
compaction (with the restart that drops the watch cache) turns a watch from an old
resourceVersion into 410 Gone, which is what the datastore's relist path is tested
with. Then the NodeConfig CRD: it installs and becomes Established, and the real
server's schema gives every good/bad spec of the unit tests' table the same verdict
as the agent's model, with messages that name the field.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flock.model.nodeconfig import NodeConfig, NodeConfigError
from flock.testbed import netns, tools
from flock.testbed.kube import ApiServer, ApiServerError, Daemon, node_user
from flock.testbed.tools import tool_path
from flock.testbed.wait import wait_until

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "deploy" / "crds" / "nodeconfig.yaml"
CRD_NAME = "nodeconfigs.flock.fritzlab.net"


def _unit_table() -> ModuleType:
    """The good/bad NodeConfig table of the unit tests (one table, two verdicts)."""
    path = REPO / "tests" / "unit" / "test_model_nodeconfig.py"
    spec = importlib.util.spec_from_file_location("flock_unit_nodeconfig_table", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _configmap(api: ApiServer, name: str, data: dict[str, str]) -> dict[str, Any]:
    status, body = api.request(
        "POST",
        "/api/v1/namespaces/default/configmaps",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data},
    )
    assert status == 201, body
    return dict(body)


def _first_watch_event(api: ApiServer, path: str, rv: str) -> dict[str, Any]:
    """The first event of a watch from `rv` (the server ends it after 10 s if none)."""
    conn = api.connection(timeout=30)
    try:
        conn.request(
            "GET",
            f"{path}?watch=1&resourceVersion={rv}&timeoutSeconds=10",
            headers={"Authorization": f"Bearer {api.admin_token}"},
        )
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        line = resp.readline()
        assert line, f"watch from resourceVersion {rv} ended without an event"
        event: dict[str, Any] = json.loads(line)
        return event
    finally:
        conn.close()


def test_readyz_and_version(apiserver: ApiServer) -> None:
    status, body = apiserver.request("GET", "/readyz")
    assert (status, body) == (200, "ok")
    status, version = apiserver.request("GET", "/version")
    assert status == 200
    assert version["gitVersion"] == "v1.34.4"
    assert (version["major"], version["minor"]) == ("1", "34")


def test_kubectl_runs_inside_the_namespace(apiserver: ApiServer) -> None:
    out = apiserver.kubectl("version", "-o", "json").stdout
    versions = json.loads(out)
    assert versions["clientVersion"]["gitVersion"] == "v1.34.4"
    assert versions["serverVersion"]["gitVersion"] == "v1.34.4"
    # Discovery is cached under the server's own dir, never in ~/.kube.
    assert (apiserver.dir / "kubectl-cache").is_dir()


def test_unauthenticated_and_unknown_tokens_are_refused(apiserver: ApiServer) -> None:
    status, _ = apiserver.request("GET", "/api/v1/namespaces", token="not-a-token")
    assert status == 401
    status, _ = apiserver.request("GET", "/api/v1/namespaces")
    assert status == 200


def test_attached_namespace_reaches_the_api_as_a_node(apiserver: ApiServer) -> None:
    """Another namespace reaches the API over a veth, both families, with a node token."""
    node = f"n{uuid.uuid4().hex[:6]}"
    other = netns.unique_name("fkto", 8)
    netns.create(other)
    try:
        apiserver.add_users(node_user(node))  # a restart: the token file is read at start
        urls = [
            apiserver.attach(other, api_cidr="203.0.113.1/30", peer_cidr="203.0.113.2/30",
                             peer_if="kapi4"),
            apiserver.attach(other, api_cidr="2001:db8:ad::1/64", peer_cidr="2001:db8:ad::2/64",
                             peer_if="kapi6"),
        ]  # fmt: skip
        for url in urls:
            kubeconfig = apiserver.kubeconfig_for(f"system:node:{node}", server=url)
            kubectl = [str(tool_path("kubectl")), f"--kubeconfig={kubeconfig}"]
            cache = f"--cache-dir={apiserver.dir / 'kubectl-cache'}"
            who = netns.run([*kubectl, cache, "auth", "whoami", "-o", "json"], netns=other)
            status = json.loads(who.stdout)["status"]["userInfo"]
            assert status["username"] == f"system:node:{node}", url
            assert "system:nodes" in status["groups"]
            denied = netns.run(
                [*kubectl, cache, "get", "secrets", "-n", "kube-system"], netns=other, check=False
            )
            assert denied.returncode != 0
            assert "Forbidden" in denied.stderr or "forbidden" in denied.stderr, denied.stderr
    finally:
        netns.delete(other)


def test_a_failed_start_shows_the_log_and_leaves_nothing(need_tools: Callable[..., None]) -> None:
    need_tools("etcd", "kube-apiserver", "kubectl")
    api = ApiServer(prefix="fktf", extra_args=["--no-such-flag=1"], ready_timeout=60)
    with pytest.raises(ApiServerError, match="unknown flag: --no-such-flag"):
        api.start()
    assert not netns.exists(api.netns)
    assert not api.dir.exists()
    assert api.pids() == {}


def test_another_process_loads_and_stops_a_running_server(
    tmp_path: Path, need_tools: Callable[..., None]
) -> None:
    """The lab's flow: `up` starts the server and exits, a later command loads and stops it."""
    need_tools("etcd", "kube-apiserver", "kubectl")
    workdir = tmp_path / "api"
    starter = (
        "import sys; from pathlib import Path; from flock.testbed.kube import ApiServer; "
        "api = ApiServer(prefix='fktl', workdir=Path(sys.argv[1])); api.start(); print(api.netns)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", starter, str(workdir)], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    name = proc.stdout.strip()
    try:
        api = ApiServer.load(workdir, forward=True)
        assert api.netns == name and netns.exists(name)
        daemons = json.loads(api.state_path.read_text())["daemons"]
        assert set(api.pids()) == set(daemons) == {"etcd", "kube-apiserver"}
        assert api.request("GET", "/readyz") == (200, "ok")
        assert "ok" in api.kubectl("get", "--raw", "/readyz").stdout
        api.stop()
        assert not netns.exists(name)
        assert not workdir.exists()
        for d in daemons.values():
            assert not Daemon(d["pid"], d["exe"]).running()
    finally:
        if (workdir / "state.json").exists():
            ApiServer.load(workdir).stop()
        if name:
            netns.delete(name)


def test_a_reused_pid_is_never_signalled() -> None:
    """A loaded Daemon whose PID now runs another program is not ours: left alone."""
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        stranger = Daemon(sleeper.pid, "/var/cache/flock/tools/etcd-v3.6.4/bin/etcd")
        assert not stranger.running()
        stranger.terminate(grace=1)
        assert sleeper.poll() is None
        ours = Daemon(sleeper.pid, os.path.realpath(shutil.which("sleep") or "sleep"))
        assert ours.running()
        ours.terminate(grace=5)
        assert sleeper.wait(timeout=10) == -signal.SIGTERM
    finally:
        sleeper.kill()
        sleeper.wait()


def test_data_survives_an_apiserver_restart(apiserver: ApiServer) -> None:
    name = f"restart-{uuid.uuid4().hex[:8]}"
    _configmap(apiserver, name, {"k": "v"})
    etcd_pid = apiserver.pids()["etcd"]
    old_pid = apiserver.pids()["kube-apiserver"]
    apiserver.restart_apiserver()
    assert apiserver.pids()["kube-apiserver"] != old_pid
    assert apiserver.pids()["etcd"] == etcd_pid
    status, body = apiserver.request("GET", f"/api/v1/namespaces/default/configmaps/{name}")
    assert status == 200
    assert body["data"] == {"k": "v"}


def test_compaction_makes_an_old_watch_410(apiserver: ApiServer) -> None:
    path = "/api/v1/namespaces/default/configmaps"
    name = f"compact-{uuid.uuid4().hex[:8]}"
    old_rv = _configmap(apiserver, name, {"n": "0"})["metadata"]["resourceVersion"]
    for n in range(1, 4):
        status, body = apiserver.request(
            "PATCH",
            f"{path}/{name}",
            {"data": {"n": str(n)}},
            content_type="application/merge-patch+json",
        )
        assert status == 200, body
    # Before: a watch from old_rv replays the first update.
    event = _first_watch_event(apiserver, path, old_rv)
    assert event["type"] == "MODIFIED"
    assert event["object"]["data"] == {"n": "1"}

    revision = apiserver.compact_etcd()
    assert revision > int(old_rv)
    apiserver.restart_apiserver()  # the watch cache starts again at the current revision

    event = _first_watch_event(apiserver, path, old_rv)
    assert event["type"] == "ERROR", event
    assert event["object"]["code"] == 410, event
    status, body = apiserver.request(
        "GET", f"{path}?resourceVersion={old_rv}&resourceVersionMatch=Exact"
    )
    assert status == 410, body
    # A resourceVersion from after the restart is still served: the next change arrives.
    status, body = apiserver.request("GET", f"{path}/{name}")
    assert status == 200
    recent_rv = body["metadata"]["resourceVersion"]
    status, body = apiserver.request(
        "PATCH", f"{path}/{name}", {"data": {"n": "4"}}, content_type="application/merge-patch+json"
    )
    assert status == 200, body
    event = _first_watch_event(apiserver, path, recent_rv)
    assert event["type"] == "MODIFIED", event
    assert event["object"]["data"] == {"n": "4"}


def _crd_installed(api: ApiServer) -> None:
    api.kubectl("apply", "--server-side", "-f", str(CRD))
    api.kubectl(
        "wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s", timeout=90
    )
    # Established is not yet servable: for a moment the new resource answers 429
    # ("storage is (re)initializing").
    wait_until(
        lambda: api.request("GET", "/apis/flock.fritzlab.net/v1alpha1/nodeconfigs")[0],
        timeout=60,
        what="nodeconfigs listable",
        until=lambda status: status == 200,
    )


@pytest.fixture(scope="module")
def crd(apiserver: ApiServer) -> ApiServer:
    _crd_installed(apiserver)
    return apiserver


def _apply_nodeconfig(api: ApiServer, name: str, spec: dict[str, Any]) -> tuple[bool, str]:
    """kubectl apply (strict field validation, kubectl's default); (accepted, stderr)."""
    doc = {
        "apiVersion": "flock.fritzlab.net/v1alpha1",
        "kind": "NodeConfig",
        "metadata": {"name": name},
        "spec": spec,
    }
    proc = api.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc), check=False)
    if proc.returncode == 0:
        api.kubectl("delete", "nodeconfig", name, "--wait=true")
    return proc.returncode == 0, proc.stderr


def test_crd_established_and_listed(crd: ApiServer) -> None:
    status, body = crd.request(
        "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}"
    )
    assert status == 200
    conditions = {c["type"]: c["status"] for c in body["status"]["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    status, listing = crd.request("GET", "/apis/flock.fritzlab.net/v1alpha1/nodeconfigs")
    assert status == 200
    assert listing["kind"] == "NodeConfigList"
    assert crd.kubectl("get", "nc").returncode == 0  # the short name resolves


TABLE = _unit_table()


@pytest.mark.parametrize(("name", "spec", "ok"), TABLE.AGREE, ids=[a[0] for a in TABLE.AGREE])
def test_real_server_gives_the_unit_table_verdicts(
    crd: ApiServer, name: str, spec: dict[str, Any], ok: bool
) -> None:
    # A server-side dry run with strict field validation (what kubectl apply asks for):
    # the whole validation, nothing stored, a tenth of a kubectl run.
    status, body = crd.request(
        "POST",
        "/apis/flock.fritzlab.net/v1alpha1/nodeconfigs?dryRun=All&fieldValidation=Strict",
        {
            "apiVersion": "flock.fritzlab.net/v1alpha1",
            "kind": "NodeConfig",
            "metadata": {"name": f"t-{name}"},
            "spec": spec,
        },
    )
    assert status in (201, 400, 422), body  # 400: unknown field (strict), 422: invalid
    assert (status == 201) is ok, body


# The three messages a real server gave that did not say what was wrong: each case's
# error must name the field and say what is allowed.
PEER = {"address": "192.0.2.1", "asn": 65000}
MESSAGES = [
    ("asn-trans", {"bgp": {"asn": 23456}}, "spec.bgp.asn", "23456"),
    ("asn-65535", {"bgp": {"asn": 65535}}, "spec.bgp.asn", "65535"),
    (
        "peer-asn-trans",
        {"bgp": {"asn": 1, "peers": [{**PEER, "asn": 23456}]}},
        "spec.bgp.peers[0].asn",
        "23456",
    ),
    (
        "peer-bad-v6",
        {"bgp": {"asn": 1, "peers": [{**PEER, "address": "2001:db8::g1"}]}},
        "spec.bgp.peers[0].address",
        "IPv6",
    ),
    (
        "peer-bad-v6-groups",
        {"bgp": {"asn": 1, "peers": [{**PEER, "address": "2001:db8:1:2:3:4:5:6:7"}]}},
        "spec.bgp.peers[0].address",
        "IPv6",
    ),
    (
        "peer-link-local-no-zone",
        {"bgp": {"asn": 1, "peers": [{**PEER, "address": "fe80::1"}]}},
        "spec.bgp.peers[0].address",
        "fe80::1%eth0",
    ),
    (
        "peer-multicast",
        {"bgp": {"asn": 1, "peers": [{**PEER, "address": "ff02::2"}]}},
        "spec.bgp.peers[0].address",
        "multicast",
    ),
    (
        "hold-2",
        {"bgp": {"asn": 1, "peers": [{**PEER, "holdTime": 2}]}},
        "spec.bgp.peers[0].holdTime",
        "3",
    ),
]


@pytest.mark.parametrize(
    ("name", "spec", "field", "detail"), MESSAGES, ids=[m[0] for m in MESSAGES]
)
def test_crd_messages_name_the_field(
    crd: ApiServer, name: str, spec: dict[str, Any], field: str, detail: str
) -> None:
    accepted, stderr = _apply_nodeconfig(crd, f"m-{name}", spec)
    assert not accepted
    assert field in stderr, stderr
    assert detail in stderr, stderr
    for poor in ("must not validate the schema", "supported values", "must be of type ipv4"):
        assert poor not in stderr, stderr


def test_wait_until_sees_a_created_nodeconfig(crd: ApiServer) -> None:
    name = f"w-{uuid.uuid4().hex[:8]}"
    doc = {
        "apiVersion": "flock.fritzlab.net/v1alpha1",
        "kind": "NodeConfig",
        "metadata": {"name": name},
        "spec": {"bgp": {"asn": 65101}},
    }
    crd.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
    got = wait_until(
        lambda: crd.request("GET", f"/apis/flock.fritzlab.net/v1alpha1/nodeconfigs/{name}"),
        timeout=30,
        what=f"NodeConfig {name} readable",
        until=lambda r: r[0] == 200,
    )
    assert got[1]["spec"]["bgp"]["asn"] == 65101
    crd.kubectl("delete", "nodeconfig", name)


def test_tool_path_names_the_build_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOCK_TOOLS_CACHE", str(tmp_path))
    monkeypatch.delenv("FLOCK_TOOLS_BIN", raising=False)
    with pytest.raises(tools.ToolMissing, match=r"run \./scripts/build-tools etcd"):
        tools.tool_path("etcd")
    assert tools.set_dir("kube") == tmp_path / "kube-v1.34.4"
    with pytest.raises(KeyError):
        tools.tool_path("no-such-tool")


def test_every_tool_of_the_test_sets_is_built(need_tools: Callable[..., None]) -> None:
    """What .ci/run's build step promises the tests: every binary of kube, etcd, helm."""
    names = [t.binary for t in tools.table().values() if t.set in ("kube", "etcd", "helm")]
    assert {"kube-apiserver", "kubectl", "etcd", "helm"} <= set(names)
    need_tools(*names)
    for name in names:
        assert tools.tool_path(name).parent == tools.set_dir(tools.table()[name].set) / "bin"


# ---- the model and the real server agree on the fields the CEL rules check --------------

ASNS = st.one_of(
    st.integers(min_value=1, max_value=4294967294),
    st.sampled_from([1, 23455, 23456, 23457, 65534, 65535, 65536, 4294967294]),
)
HOLD_TIMES = st.one_of(st.integers(min_value=0, max_value=65535), st.sampled_from([0, 1, 2, 3]))
ZONES = st.from_regex(r"\A[A-Za-z0-9_.-]{1,15}\Z")
ADDRESSES = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.ip_addresses(v=6, network="fe80::/10").map(str),
    st.tuples(st.ip_addresses(v=6, network="fe80::/10"), ZONES).map(lambda t: f"{t[0]}%{t[1]}"),
    # a zone on what is not IPv6 link-local: both must refuse it
    st.tuples(st.ip_addresses(v=4), ZONES).map(lambda t: f"{t[0]}%{t[1]}"),
    st.tuples(st.ip_addresses(v=6, network="2001:db8::/32"), ZONES).map(lambda t: f"{t[0]}%{t[1]}"),
)


def _model_accepts(obj: dict[str, Any]) -> bool:
    try:
        NodeConfig.from_object(obj)
    except NodeConfigError:
        return False
    return True


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(asn=1, peer_asn=1, address="::ffff:192.0.2.1", hold=0)
@example(asn=1, peer_asn=1, address="fe80::1", hold=0)
@example(asn=1, peer_asn=1, address="ff02::2", hold=0)
@example(asn=1, peer_asn=1, address="224.0.0.5", hold=0)
@example(asn=1, peer_asn=1, address="127.0.0.2", hold=0)
@example(asn=1, peer_asn=1, address="169.254.0.1", hold=0)
@given(asn=ASNS, peer_asn=ASNS, address=ADDRESSES, hold=HOLD_TIMES)
def test_server_and_model_agree_on_asn_address_and_hold_time(
    crd: ApiServer, asn: int, peer_asn: int, address: str, hold: int
) -> None:
    """The server refuses nothing the model accepts, and refuses whatever the model
    refuses for these fields: so `kubectl apply` says at once what the agent would
    refuse later."""
    obj = {
        "apiVersion": "flock.fritzlab.net/v1alpha1",
        "kind": "NodeConfig",
        "metadata": {"name": "prop"},
        "spec": {"bgp": {"asn": asn, "peers": [{"address": address, "asn": peer_asn,
                                                "holdTime": hold}]}},
    }  # fmt: skip
    status, body = crd.request(
        "POST",
        "/apis/flock.fritzlab.net/v1alpha1/nodeconfigs?dryRun=All&fieldValidation=Strict",
        obj,
    )
    assert status in (201, 422), body
    if _model_accepts(obj):
        assert status == 201, f"the server refuses what the model accepts: {body}"
    else:
        assert status == 422, f"the model refuses {obj['spec']}, the server accepts it"
