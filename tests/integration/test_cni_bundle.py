"""The self-contained plugin bundle on a host that has no Python and no shared libraries.

A private mount namespace (it vanishes with the process; the host's mounts
are untouched) hides every Python install and the whole system library
directory (glibc included) behind empty tmpfs mounts, then execs the
installed /opt/cni/bin-style `flock` exactly as a runtime would. The plugin
must still answer VERSION and forward an ADD to a real agent RPC server
(flock.agent.rpc) and print the converted result.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flock.agent import rpc
from flock.cni import install
from flock.model.cni import CniRequest

REPO = Path(__file__).resolve().parents[2]
PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def bundle_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (shutil.which("cc") and shutil.which("ldd") and shutil.which("unshare")):
        pytest.skip("needs cc, ldd and unshare")
    root = tmp_path_factory.mktemp("fp-bundle-it")
    subprocess.run(
        [PYTHON, str(REPO / "packaging/build_plugin_bundle.py"), "--out", str(root / "b")],
        check=True,
        capture_output=True,
    )
    install.install(bin_dir=root / "bin", conf_dir=root / "net.d", bundle=root / "b")
    return root / "bin" / "flock"


@pytest.fixture
def agent_socket() -> Iterator[tuple[Path, list[CniRequest]]]:
    # A short path of its own (unix sockets: 107 bytes; a pid-derived name can be reused).
    sock_dir = Path(tempfile.mkdtemp(prefix="fp-it-"))
    path = sock_dir / "agent.sock"
    seen: list[CniRequest] = []

    async def handler(req: CniRequest) -> dict[str, Any]:
        seen.append(req)
        return {
            "interfaces": [{"name": "eth0", "sandbox": req.netns, "mtu": 1500}],
            "ips": [{"address": "2001:db8::7/128", "gateway": "fe80::1", "interface": 0}],
        }

    try:
        with rpc.serving_in_thread(path, handler):
            yield path, seen
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def _system_lib_dir() -> str:
    out = subprocess.run(["ldd", PYTHON], capture_output=True, text=True, check=True).stdout
    libc = next(line.split("=>")[1].split()[0] for line in out.splitlines() if "libc.so" in line)
    return os.path.dirname(os.path.realpath(libc))


def run_without_host_python(plugin: Path, env: dict[str, str], stdin: bytes) -> tuple[int, str]:
    libdir = _system_lib_dir()
    script = f"""
set -e
for d in /usr/lib/python3* /usr/local/lib/python3* /usr/lib/python3/dist-packages; do
  [ -d "$d" ] && mount -t tmpfs fp-hide "$d"
done
for f in /usr/bin/python3*; do [ -f "$f" ] && mount --bind /dev/null "$f"; done
mount -t tmpfs fp-hide {libdir}
set -- {libdir}/*
[ "$1" = "{libdir}/*" ] || {{ echo "system libraries still visible" >&2; exit 97; }}
exec {plugin}
"""
    p = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script],
        input=stdin,
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert b"Traceback" not in p.stderr, p.stderr
    assert p.returncode != 97, p.stderr
    return p.returncode, p.stdout.decode()


def test_bundle_answers_version_without_host_python_or_libc(bundle_bin: Path) -> None:
    rc, out = run_without_host_python(
        bundle_bin, {"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.4.0"}'
    )
    assert rc == 0, out
    assert json.loads(out)["cniVersion"] == "0.4.0"


def test_bundle_forwards_add_without_host_python_or_libc(
    bundle_bin: Path, agent_socket: tuple[Path, list[CniRequest]]
) -> None:
    path, seen = agent_socket
    conf = {"cniVersion": "1.0.0", "name": "flock", "type": "flock", "agentSocket": str(path)}
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "fpbundle1",
        "CNI_NETNS": "/run/netns/fp-bundle",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=nopython",
        "CNI_PATH": str(bundle_bin.parent),
    }
    rc, out = run_without_host_python(bundle_bin, env, json.dumps(conf).encode())
    assert rc == 0, out
    assert json.loads(out) == {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": "/run/netns/fp-bundle"}],
        "ips": [{"interface": 0, "address": "2001:db8::7/128", "gateway": "fe80::1"}],
    }
    assert [(r.command, r.container_id, r.pod_name) for r in seen] == [
        ("ADD", "fpbundle1", "nopython")
    ]


def test_bundle_error_path_without_host_python_or_libc(bundle_bin: Path) -> None:
    """The error path imports json.decoder (and re): the bundle must carry them."""
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "fpbundle2",
        "CNI_NETNS": "/run/netns/x",
        "CNI_IFNAME": "eth0",
    }
    rc, out = run_without_host_python(bundle_bin, env, b'{"cniVersion": "1.1.0", "name": [')
    assert rc == 1
    err = json.loads(out)
    assert err["code"] == 6 and "line 1" in err["details"]


def test_control_a_plugin_needing_host_python_fails_there(tmp_path: Path) -> None:
    """Proves the hiding works: the --python install cannot run in the same setting."""
    install.install(bin_dir=tmp_path / "bin", conf_dir=tmp_path / "net.d", python=PYTHON)
    rc, out = run_without_host_python(
        tmp_path / "bin" / "flock", {"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.4.0"}'
    )
    assert rc not in (0, 1)
    assert out == ""
