"""The pure parts of the e2e node harness (flock.testbed.kubenode): config and log parsing."""

from __future__ import annotations

import tomllib
from pathlib import Path

from flock.testbed.kubenode import KubeNode, _parse_logfmt, _timestamp


def _node(tmp_path: Path) -> KubeNode:
    node = KubeNode(prefix="fku")
    node.dir = tmp_path
    return node


def test_containerd_config_keeps_off_the_machines_paths(tmp_path: Path) -> None:
    node = _node(tmp_path)
    cfg = tomllib.loads(node.containerd_config())
    settings = "\n".join(
        line for line in node.containerd_config().splitlines() if not line.lstrip().startswith("#")
    )
    assert "/run/containerd" not in settings and "/var/lib/containerd" not in settings
    assert cfg["root"].startswith(str(tmp_path)) and cfg["state"].startswith(str(tmp_path))
    plugins = cfg["plugins"]
    socket_dir = plugins["io.containerd.shim.v1.manager"]["socket_dir"]
    assert socket_dir.startswith(str(tmp_path))
    runtime = plugins["io.containerd.cri.v1.runtime"]
    assert runtime["restrict_oom_score_adj"] is True
    runc = runtime["containerd"]["runtimes"]["runc"]["options"]
    assert runc["Root"].startswith(str(tmp_path)) and runc["SystemdCgroup"] is False
    assert runtime["cni"]["conf_dir"] == "/etc/cni/net.d"  # bind-mounted in the node's mount ns
    pinned = plugins["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"]
    assert pinned.endswith("flock-pause:1")


def test_containerd_cni_timer_pairs_begin_and_result_per_sandbox(tmp_path: Path) -> None:
    node = _node(tmp_path)
    (tmp_path / "logs").mkdir()
    node.containerd_log.write_text(
        'time="2026-12-03T09:52:39.500000000Z" level=debug msg="begin cni setup" podsandboxid=a\n'
        'time="2026-12-03T09:52:39.600000000Z" level=debug msg="begin cni setup" podsandboxid=b\n'
        'time="2026-12-03T09:52:39.512500000Z" level=debug msg="cni result: '
        '{\\"Interfaces\\":{}}" podsandboxid=a\n'
        'time="2026-12-03T09:52:41.600000000Z" level=info msg="unrelated"\n'
    )
    timings = node.containerd_cni_timings()
    assert set(timings) == {"a"}  # b never got a result
    assert abs(timings["a"] - 0.0125) < 1e-6


def test_logfmt_and_timestamps() -> None:
    fields = _parse_logfmt('time="2026-01-01T00:00:01.25Z" level=info msg="a b" x=1')
    assert fields == {"time": "2026-01-01T00:00:01.25Z", "level": "info", "msg": "a b", "x": "1"}
    delta = _timestamp("2026-01-01T00:00:01.250001Z") - _timestamp("2026-01-01T00:00:00Z")
    assert abs(delta - 1.250001) < 1e-6
