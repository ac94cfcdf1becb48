"""`flock agent`'s command line: the flags, their defaults, and the `Options` they make."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from flock.agent.status import DEFAULT_RUN_DIR

AGENT_SOCKET = "agent.sock"
# docs/agent.md "Start-up and shutdown": how long SIGTERM lets running verbs finish.
DEFAULT_DRAIN_TIMEOUT = 10.0


@dataclasses.dataclass
class Options:
    node_name: str
    state_dir: Path
    run_dir: Path
    manifests: Path | None
    socket: Path
    bird_socket: Path | None = None
    bird_config: Path | None = None
    router_id: ipaddress.IPv4Address | None = None
    metrics_addr: tuple[str, int] | None = None
    policy: bool = True
    pod_wait: float = 5.0
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    # Kubernetes datastore: in-cluster config, or a kubeconfig file (else --manifests).
    kubernetes: bool = False
    kubeconfig: Path | None = None
    # Leak reconciliation (Kubernetes only): how long a pod must be gone, how often to look.
    leak_grace: float = 60.0
    leak_interval: float = 30.0


def _metrics_addr(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_args(argv: Sequence[str]) -> tuple[Options, str]:
    """(options, log level) from `flock agent`'s arguments."""
    p = argparse.ArgumentParser(prog="flock agent", description="run the flock node agent")
    p.add_argument("--node-name", required=True)
    p.add_argument("--state-dir", type=Path, default=Path("/var/lib/flock"))
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifests", type=Path, help="standalone: a directory of manifests")
    source.add_argument(
        "--kubernetes", action="store_true", help="the Kubernetes API, in-cluster config"
    )
    source.add_argument("--kubeconfig", type=Path, help="the Kubernetes API, by this kubeconfig")
    p.add_argument("--socket", type=Path, help="plugin RPC socket (default RUN_DIR/agent.sock)")
    p.add_argument("--bird-socket", type=Path, help="BIRD control socket; omit to run without BGP")
    p.add_argument("--bird-config", type=Path, help="BIRD config file (default RUN_DIR/bird.conf)")
    p.add_argument("--router-id", type=ipaddress.IPv4Address)
    p.add_argument("--metrics-addr", type=_metrics_addr, help="HOST:PORT for /metrics, /healthz")
    p.add_argument("--no-policy", action="store_true", help="do not program NetworkPolicy")
    p.add_argument("--pod-wait", type=float, default=5.0, help="seconds an ADD waits for its pod")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT,
        help="seconds SIGTERM lets running CNI verbs finish before the agent exits anyway",
    )
    p.add_argument(
        "--leak-grace",
        type=float,
        default=60.0,
        help="Kubernetes: seconds a pod must be gone (and its netns too) before its addresses "
        "are released without a DEL",
    )
    p.add_argument("--leak-interval", type=float, default=30.0, help="seconds between leak checks")
    p.add_argument("--log-level", default="info")
    a = p.parse_args(list(argv))
    opts = Options(
        node_name=a.node_name,
        state_dir=a.state_dir,
        run_dir=a.run_dir,
        manifests=a.manifests,
        socket=a.socket or a.run_dir / AGENT_SOCKET,
        bird_socket=a.bird_socket,
        bird_config=a.bird_config,
        router_id=a.router_id,
        metrics_addr=a.metrics_addr,
        policy=not a.no_policy,
        pod_wait=a.pod_wait,
        drain_timeout=a.drain_timeout,
        kubernetes=a.kubernetes,
        kubeconfig=a.kubeconfig,
        leak_grace=a.leak_grace,
        leak_interval=a.leak_interval,
    )
    return opts, a.log_level
