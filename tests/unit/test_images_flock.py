"""flock's image does what the DaemonSet asks of it: installer, agent, BIRD and its probe.

The image is built by scripts/build-images' code (cached by content: a minute or
two the first time, seconds after a source change, nothing when unchanged), its
layers unpacked in order into a temp root as a snapshotter would, and its
programs run there by chroot with the image's PATH:

- the init container's command, as deploy/install.yaml has it, installs the bundle;
  the installed plugin then runs on this host, outside the image, and answers
  CNI VERSION: the bundle carries its own interpreter and libraries;
- the agent's Python environment imports flock and its dependencies;
- BIRD starts from a config file in a network namespace of its own, and the
  liveness probe's command (`birdc -s SOCK show status`) exits 0 while it answers
  and non-zero once it is gone: the probe notices a dead BIRD.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "deploy" / "install.yaml"
sys.path.insert(0, str(REPO / "packaging"))

import build_images  # noqa: E402
import image_archive as ia  # noqa: E402

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="chroot, mknod and mmdebstrap need root"),
]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    built = build_images.build_all(["flock"])["flock"]
    root = tmp_path_factory.mktemp("flock-image") / "root"
    got = ia.read_archive(built.path)
    with tarfile.open(built.path) as outer:
        for name in got["manifest"][0]["Layers"]:
            blob = outer.extractfile(name)
            assert blob is not None
            with tarfile.open(fileobj=blob, mode="r|") as tf:  # streamed, not in memory
                tf.extractall(root)  # our own archive (3.11.2 has no filter=)
    os.mknod(root / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return root, got


def in_image(root: Path, script: str, *, net: bool = False) -> subprocess.CompletedProcess[str]:
    """Run `script` with /bin/sh inside the image root, with the image's environment."""
    env = {"PATH": "/opt/flock/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
    argv = ["chroot", str(root), "/bin/sh", "-euc", script]
    if net:
        argv = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "-", *argv]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_image_config_and_agent_environment(image_root: tuple[Path, dict[str, object]]) -> None:
    root, got = image_root
    cfg = got["config"]["config"]  # type: ignore[index]
    assert cfg["Env"][0].startswith("PATH=/opt/flock/venv/bin:")
    res = in_image(
        root,
        "flock --help >/dev/null; python -c 'import flock, pydantic, pyroute2, yaml, "
        "prometheus_client; print(flock.__file__)'; nft --version; ip -V; bird --version 2>&1",
    )
    assert res.returncode == 0, res.stderr
    assert "/opt/flock/venv/lib/python3.11/site-packages/flock/__init__.py" in res.stdout
    assert "nftables" in res.stdout and "iproute2" in res.stdout and "BIRD version 2" in res.stdout
    # Every module of the package imports in the image: a dependency missing from
    # pyproject.toml (present in the dev venv only) fails here, not on a node.
    walk = (
        "import importlib, pkgutil, flock\n"
        "mods = [m.name for m in pkgutil.walk_packages(flock.__path__, 'flock.')]\n"
        "bad = []\n"
        "for name in mods:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{name}: {e!r}')\n"
        "print(len(mods), bad)\n"
    )
    res = in_image(root, f"python -c {shlex.quote(walk)}")
    assert res.returncode == 0, res.stderr
    count, bad = res.stdout.split(" ", 1)
    assert int(count) > 40 and bad.strip() == "[]", res.stdout


# The init container as the kubelet runs it with install.yaml's securityContext: root
# file system read-only, host dirs bind-mounted writable, no new privileges and only
# the capabilities the chart adds (setpriv --bounding-set: what root keeps).
AS_INIT_CONTAINER = r"""
set -eu
root=$1 bin=$2 conf=$3 caps=$4; shift 4
mount --bind "$root" "$root"
mount -o remount,bind,ro "$root"
mount --bind "$bin" "$root/host/opt/cni/bin"
mount --bind "$conf" "$root/host/etc/cni/net.d"
exec chroot "$root" setpriv --no-new-privs --inh-caps=-all --bounding-set="-all$caps" -- "$@"
"""


def test_installer_puts_a_plugin_that_runs_on_the_host(
    image_root: tuple[Path, dict[str, object]], tmp_path: Path
) -> None:
    root, _ = image_root
    # The init container's command and securityContext exactly as deploy/install.yaml has them.
    (ds,) = [d for d in yaml.safe_load_all(INSTALL.read_text()) if d and d["kind"] == "DaemonSet"]
    (init,) = ds["spec"]["template"]["spec"]["initContainers"]
    sc = init["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]
    caps = "".join(",+" + c.lower() for c in sc["capabilities"].get("add", []))
    mounts = [m["mountPath"] for m in init["volumeMounts"]]
    assert mounts == ["/host/opt/cni/bin", "/host/etc/cni/net.d"]
    for m in mounts:
        (root / m.lstrip("/")).mkdir(parents=True, exist_ok=True)
    host_bin, host_conf = tmp_path / "opt-cni-bin", tmp_path / "etc-cni-net.d"
    host_bin.mkdir()
    host_conf.mkdir()
    env = {"PATH": "/opt/flock/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", AS_INIT_CONTAINER,
            "-", str(root), str(host_bin), str(host_conf), caps, *init["command"]]  # fmt: skip
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "installed plugin tree" in res.stdout
    assert not (root / "host" / "opt" / "cni" / "bin" / "flock").exists(), "wrote the image"
    conf = json.loads((host_conf / "01-flock.conflist").read_text())
    assert conf["plugins"][0] == {
        "type": "flock",
        "agentSocket": "/run/flock/agent.sock",
        "stateDir": "/var/lib/flock",
    }
    # The installed plugin, exec'd from this host as a runtime does (outside the image).
    out = subprocess.run(
        [str(host_bin / "flock")],
        input=b'{"cniVersion": "1.0.0"}',
        env={"CNI_COMMAND": "VERSION", "PATH": "/nonexistent"},
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "1.1.0" in json.loads(out.stdout)["supportedVersions"]


# The BIRD container as the kubelet runs it: its command and capabilities from
# install.yaml, read-only root, the run dir bind-mounted, in a netns of its own; the
# liveness probe's command runs the same way (an exec probe enters the container).
AS_BIRD_CONTAINER = r"""
set -eu
root=$1 run=$2 caps=$3 conf=$4; shift 4
ip link set lo up
mount --bind "$root" "$root"
mount -o remount,bind,ro "$root"
mount --bind "$run" "$root/run/flock"
in_container() {
  chroot "$root" setpriv --no-new-privs --inh-caps=-all --bounding-set="-all$caps" -- "$@"
}
probe() { in_container $PROBE >/dev/null 2>&1 && echo 0 || echo $?; }
chroot "$root" setpriv --no-new-privs --inh-caps=-all --bounding-set="-all$caps" -- "$@" &
bird=$!  # chroot execs setpriv execs sh execs bird: one PID
trap 'kill $bird 2>/dev/null || true' EXIT  # also when a step below fails
sleep 0.3
echo "before config: $(probe) $(kill -0 $bird && echo waiting)"
printf '%s' "$conf" > "$run/.bird.conf.tmp" && mv "$run/.bird.conf.tmp" "$run/bird.conf"
i=0; until [ "$(probe)" = 0 ]; do
  i=$((i+1)); [ $i -lt 200 ] || { echo "bird never answered"; exit 1; }; sleep 0.05
done
echo "alive: $(probe)"
# BGP's port 179 (NET_BIND_SERVICE), LISTEN state 0A, in this netns
i=0; until cat /proc/net/tcp /proc/net/tcp6 | grep -q ':00B3 [0-9A-F]*:0000 0A'; do
  i=$((i+1)); [ $i -lt 200 ] || { echo "bgp listen: no"; exit 1; }; sleep 0.05
done
echo "bgp listen: yes"
kill $bird
wait $bird || true
kill -0 $bird 2>/dev/null && { echo "bird still running"; exit 1; }
echo "dead: $(probe)"
"""
BIRD_CONF = """router id 192.0.2.1;
protocol device {}
protocol bgp peer1 {
  local as 65001;
  neighbor 127.0.0.2 as 65002;
  multihop;  # no directly-connected check: listen at once
  passive on;
  ipv4 { import none; export none; };
}
"""


def test_bird_container_starts_on_config_and_its_probe_notices_death(
    image_root: tuple[Path, dict[str, object]], tmp_path: Path
) -> None:
    root, _ = image_root
    (ds,) = [d for d in yaml.safe_load_all(INSTALL.read_text()) if d and d["kind"] == "DaemonSet"]
    bird = ds["spec"]["template"]["spec"]["containers"][1]
    assert bird["name"] == "bird"
    sc = bird["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]
    assert not sc.get("privileged") and sc["allowPrivilegeEscalation"] is False
    caps = "".join(",+" + c.lower() for c in sc["capabilities"].get("add", []))
    assert [m["mountPath"] for m in bird["volumeMounts"]] == ["/run/flock"]
    (root / "run" / "flock").mkdir(parents=True, exist_ok=True)
    run = tmp_path / "run-flock"
    run.mkdir()
    env = {
        "PATH": "/opt/flock/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "PROBE": " ".join(bird["livenessProbe"]["exec"]["command"]),
    }
    res = subprocess.run(
        [
            "unshare",
            "--net",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            AS_BIRD_CONTAINER,
            "-",
            str(root),
            str(run),
            caps,
            BIRD_CONF,
            *bird["command"],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.splitlines() == [
        "before config: 1 waiting",  # the probe fails while BIRD waits for the agent
        "alive: 0",
        "bgp listen: yes",
        "dead: 1",  # a dead BIRD fails the liveness probe
    ], res.stdout + res.stderr
