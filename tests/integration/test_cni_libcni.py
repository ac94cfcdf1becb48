"""The installed plugin and conflist driven by the real libcni (what containerd and CRI-O run).

tests/integration/libcni/ holds a small Go driver built against two libcni
releases: 1.2.3 (containerd 2.x, CNI spec 1.1: GC, STATUS, `cniVersions`) and
1.1.2 (containerd 1.7: spec 1.0, reads only `cniVersion`). The plugin is
installed by `flock install-cni` and talks to flock.agent.rpc.serve with a
recording handler, so what is checked is the runtime side: version
negotiation on our conflist, libcni parsing and converting our results, the
prevResult it caches for CHECK and DEL, GC's valid attachments, STATUS, and
errors arriving as typed CNI errors. Needs Go and the Go module proxy (or a
filled module cache); skipped with the reason otherwise. No root needed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from flock.agent import rpc
from flock.cni import install
from flock.model.cni import CniError, CniRequest

HERE = Path(__file__).resolve().parent
PYTHON = "/usr/bin/python3"
RESULT = {
    "interfaces": [
        {"name": "flk0123456789a", "mac": "ee:ee:ee:ee:ee:ee"},
        {"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/run/netns/fp-x", "mtu": 1500},
    ],
    "ips": [
        {"address": "2001:db8:f0::5/128", "gateway": "fe80::1", "interface": 1},
        {"address": "10.240.0.5/32", "gateway": "169.254.1.1", "interface": 1},
    ],
    "routes": [{"dst": "::/0", "gw": "fe80::1"}, {"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
}
ARGS = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_UID=u-1"

pytestmark = pytest.mark.slow


def _go() -> str | None:
    return shutil.which("go") or (
        "/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None
    )


@pytest.fixture(scope="module")
def drivers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    go = _go()
    if go is None:
        pytest.skip("needs the Go toolchain to build the libcni driver")
    out = tmp_path_factory.mktemp("fp-libcni")
    built = {}
    for name in ("v12", "v11"):
        exe = out / f"libcni-{name}"
        p = subprocess.run(
            [go, "build", "-o", str(exe), "."],
            cwd=HERE / "libcni" / name,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if p.returncode != 0:
            pytest.skip(f"cannot build the libcni driver {name} (module proxy?): {p.stderr[-500:]}")
        built[name] = exe
    return built


@dataclass
class Agent:
    path: Path
    seen: list[CniRequest] = field(default_factory=list)
    status_error: CniError | None = None


@pytest.fixture
def agent() -> Iterator[Agent]:
    # A short path of its own (unix sockets: 107 bytes; a pid-derived name can be reused).
    sock_dir = Path(tempfile.mkdtemp(prefix="fp-libcni-"))
    a = Agent(sock_dir / "agent.sock")

    async def handler(req: CniRequest) -> dict[str, Any]:
        a.seen.append(req)
        if req.pod_name == "broken":
            raise CniError(100, "annotation flock.fritzlab.net/ipv6: 'maybe' is not true/false")
        if req.command == "STATUS" and a.status_error is not None:
            raise a.status_error
        return RESULT if req.command == "ADD" else {}

    try:
        with rpc.serving_in_thread(a.path, handler):
            yield a
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


@dataclass
class Host:
    bin_dir: Path
    conflist: Path
    cache: Path


@pytest.fixture
def host(tmp_path: Path, agent: Agent) -> Host:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    install.install(
        bin_dir=bin_dir,
        conf_dir=conf_dir,
        python=PYTHON,
        socket=str(agent.path),
        state_dir=str(tmp_path / "state"),
    )
    return Host(bin_dir, conf_dir / install.CONFLIST_NAME, tmp_path / "cache")


def drive(exe: Path, host: Host, verb: str, *args: str, conflist: Path | None = None) -> Any:
    p = subprocess.run(
        [str(exe), str(conflist or host.conflist), str(host.bin_dir), str(host.cache), verb, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def attach(cid: str, pod: str = "web") -> tuple[str, ...]:
    return (cid, "/run/netns/fp-x", "eth0", ARGS.replace("=web", f"={pod}"))


def test_containerd2_libcni_negotiates_1_1_0_and_runs_every_verb(
    drivers: dict[str, Path], host: Host, agent: Agent
) -> None:
    exe = drivers["v12"]
    ver = drive(exe, host, "VERSION")
    assert ver["ok"] and "1.1.0" in ver["supportedVersions"]

    add = drive(exe, host, "ADD", *attach("c1"))
    assert add["ok"], add
    assert add["cniVersion"] == "1.1.0"
    assert add["result"]["cniVersion"] == "1.1.0"
    assert add["result"]["ips"] == RESULT["ips"]
    assert add["result"]["interfaces"][1]["mtu"] == 1500
    assert agent.seen[-1].cni_version == "1.1.0"
    assert (agent.seen[-1].pod_namespace, agent.seen[-1].pod_name) == ("default", "web")

    assert drive(exe, host, "CHECK", *attach("c1"))["ok"]
    check = agent.seen[-1]
    assert check.command == "CHECK"
    assert check.prev_result is not None and check.prev_result["ips"] == RESULT["ips"]

    assert drive(exe, host, "ADD", *attach("c2"))["ok"]
    gc = drive(exe, host, "GC", "c2/eth0")
    assert gc["ok"], gc
    # libcni DELs the cached attachments that are not valid, then sends GC.
    assert [(r.command, r.container_id) for r in agent.seen[-2:]] == [("DEL", "c1"), ("GC", "")]
    from flock.model.allocation import AttachmentKey

    assert agent.seen[-1].valid_attachments == (AttachmentKey("c2", "eth0"),)

    assert drive(exe, host, "DEL", *attach("c2"))["ok"]
    assert agent.seen[-1].command == "DEL" and agent.seen[-1].prev_result is not None

    assert drive(exe, host, "STATUS")["ok"]
    agent.status_error = CniError(50, "flock agent is starting: state not loaded yet")
    st = drive(exe, host, "STATUS")
    assert not st["ok"] and st["error"]["code"] == 50


def test_containerd17_libcni_uses_1_0_0_from_the_same_conflist(
    drivers: dict[str, Path], host: Host, agent: Agent
) -> None:
    exe = drivers["v11"]
    add = drive(exe, host, "ADD", *attach("c1"))
    assert add["ok"], add
    assert add["cniVersion"] == "1.0.0"
    assert add["result"]["cniVersion"] == "1.0.0"
    assert "mtu" not in add["result"]["interfaces"][1]
    assert agent.seen[-1].cni_version == "1.0.0"
    assert drive(exe, host, "CHECK", *attach("c1"))["ok"]
    assert drive(exe, host, "DEL", *attach("c1"))["ok"]
    assert [r.command for r in agent.seen] == ["ADD", "CHECK", "DEL"]


def test_why_the_conflist_is_not_plain_1_1_0(
    drivers: dict[str, Path], host: Host, agent: Agent, tmp_path: Path
) -> None:
    """A conflist saying only cniVersion 1.1.0 breaks every pod on containerd 1.7."""
    plain = tmp_path / "plain.conflist"
    plain.write_bytes(
        install.render_conflist(
            socket=str(agent.path), state_dir="", cni_version="1.1.0", portmap=False
        )
    )
    conf = json.loads(plain.read_text())
    del conf["cniVersions"]
    plain.write_text(json.dumps(conf))
    old = drive(drivers["v11"], host, "ADD", *attach("c9"), conflist=plain)
    assert not old["ok"]
    assert 'unsupported CNI result version "1.1.0"' in old["error"]["msg"], old
    new = drive(drivers["v12"], host, "ADD", *attach("c9"), conflist=plain)
    assert new["ok"], new


def test_errors_reach_the_runtime_as_typed_cni_errors(
    drivers: dict[str, Path], host: Host, agent: Agent
) -> None:
    for exe in drivers.values():
        bad = drive(exe, host, "ADD", *attach("c3", pod="broken"))
        assert not bad["ok"]
        assert bad["error"]["code"] == 100
        assert "flock.fritzlab.net/ipv6" in bad["error"]["msg"]


def test_agent_down_is_try_again_later_for_the_runtime(
    drivers: dict[str, Path], tmp_path: Path
) -> None:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    install.install(
        bin_dir=bin_dir, conf_dir=conf_dir, python=PYTHON, socket=str(tmp_path / "none.sock")
    )
    host = Host(bin_dir, conf_dir / install.CONFLIST_NAME, tmp_path / "cache")
    res = drive(drivers["v12"], host, "ADD", *attach("c4"))
    assert not res["ok"]
    assert res["error"]["code"] == 11 and "not reachable" in res["error"]["msg"]
