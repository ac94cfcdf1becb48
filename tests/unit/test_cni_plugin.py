"""The flock CNI plugin, executed exactly as a container runtime executes it.

Every test runs the plugin as a subprocess with a CNI environment and the
network config on stdin, against a fake agent listening on a unix socket in a
temporary directory (it records what the plugin sent and answers what the test
says). The plugin is run three ways: the source file under ``python3 -I -S``,
the tree `flock install-cni --python` installs, and the self-contained bundle
(packaging/build_plugin_bundle.py) that `flock install-cni --bundle` installs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flock.cni import install, plugin

REPO = Path(__file__).resolve().parents[2]
PLUGIN_SRC = REPO / "src" / "flock" / "cni" / "plugin.py"
SYSTEM_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable

RESULT_110: dict[str, Any] = {
    "interfaces": [
        {"name": "flk0a1b2c3d4e5", "mac": "ee:ee:ee:ee:ee:ee", "mtu": 1500},
        {"name": "eth0", "mac": "02:42:ac:11:00:02", "sandbox": "/run/netns/p", "mtu": 1500},
    ],
    "ips": [
        {"address": "2001:db8:f001::5/128", "gateway": "fe80::1", "interface": 1},
        {"address": "192.0.2.5/32", "gateway": "169.254.1.1", "interface": 1},
    ],
    "routes": [
        {"dst": "::/0", "gw": "fe80::1", "priority": 10, "scope": 0},
        {"dst": "0.0.0.0/0", "gw": "169.254.1.1"},
    ],
    "dns": {"nameservers": ["2001:db8::53"]},
}


@dataclass
class FakeAgent:
    """A unix-socket peer speaking the agent's side of the RPC, one reply per connection."""

    path: Path
    respond: Callable[[bytes], bytes | None] = lambda raw: json.dumps({"result": {}}).encode()
    received: list[bytes] = field(default_factory=list)
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None

    def start(self) -> FakeAgent:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.path))
        self._sock.listen(16)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                chunks = []
                while chunk := conn.recv(65536):
                    chunks.append(chunk)
                raw = b"".join(chunks)
                self.received.append(raw)
                reply = self.respond(raw)
                if reply is not None:
                    conn.sendall(reply)

    def stop(self) -> None:
        if self._sock is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone does not.
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def last(self) -> dict[str, Any]:
        """The last request as the agent reads it: the frame checked by `plugin.prepare`."""
        env, stdin = plugin.decode_frame(self.received[-1])
        _, msg = plugin.prepare(env, stdin, [])
        return msg


@pytest.fixture
def tmp() -> Iterator[Path]:
    # Short paths: unix socket paths are limited to 107 bytes. mkdtemp: unique also between
    # concurrent runs and after a crashed one (a pid-derived name can be reused).
    d = Path(tempfile.mkdtemp(prefix="fp-cni-", dir=os.environ.get("TMPDIR", "/tmp")))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def agent(tmp: Path) -> Iterator[FakeAgent]:
    a = FakeAgent(tmp / "agent.sock").start()
    try:
        yield a
    finally:
        a.stop()


@pytest.fixture(scope="session")
def installed_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fp-inst-py")
    install.install(bin_dir=root / "bin", conf_dir=root / "net.d", python=SYSTEM_PYTHON)
    return root / "bin" / "flock"


@pytest.fixture(scope="session")
def installed_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("cc") is None or shutil.which("ldd") is None:
        pytest.skip("building the bundle needs cc (gcc, libc6-dev) and ldd")
    root = tmp_path_factory.mktemp("fp-inst-bundle")
    subprocess.run(
        [SYSTEM_PYTHON, str(REPO / "packaging" / "build_plugin_bundle.py"), "--out", root / "b"],
        check=True,
        capture_output=True,
    )
    install.install(bin_dir=root / "bin", conf_dir=root / "net.d", bundle=root / "b")
    return root / "bin" / "flock"


RUNNERS = ("source", "installed-python", "bundle")


@pytest.fixture(params=RUNNERS)
def argv(request: pytest.FixtureRequest) -> list[str]:
    if request.param == "source":
        return [SYSTEM_PYTHON, "-I", "-S", str(PLUGIN_SRC)]
    if request.param == "installed-python":
        return [str(request.getfixturevalue("installed_python"))]
    return [str(request.getfixturevalue("installed_bundle"))]


SOURCE = [SYSTEM_PYTHON, "-I", "-S", str(PLUGIN_SRC)]


@dataclass
class Run:
    rc: int
    out: dict[str, Any] | None
    stdout: bytes
    stderr: str


def run_plugin(
    argv: list[str], env: dict[str, str], stdin: bytes | dict[str, Any] = b"", timeout: float = 30
) -> Run:
    data = json.dumps(stdin).encode() if isinstance(stdin, dict) else stdin
    full_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env}
    p = subprocess.run(argv, input=data, capture_output=True, env=full_env, timeout=timeout)
    text = p.stderr.decode(errors="replace")
    assert "Traceback" not in text, text
    out = None
    if p.stdout.strip():
        lines = p.stdout.strip().splitlines()
        assert len(lines) == 1, p.stdout
        out = json.loads(lines[0])
        assert isinstance(out, dict)
    assert p.returncode in (0, 1), p
    return Run(p.returncode, out, p.stdout, text)


def attach_env(command: str, **extra: str) -> dict[str, str]:
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c0ffee1234",
        "CNI_NETNS": "/run/netns/fp-pod",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;"
        "K8S_POD_UID=1234-abcd",
        "CNI_PATH": "/opt/cni/bin:/usr/lib/cni",
    }
    env.update(extra)
    return env


def conf(agent: FakeAgent | Path, version: str = "1.1.0", **extra: Any) -> dict[str, Any]:
    path = agent.path if isinstance(agent, FakeAgent) else agent
    return {
        "cniVersion": version,
        "name": "flock",
        "type": "flock",
        "agentSocket": str(path),
        **extra,
    }


def ok(result: dict[str, Any]) -> Callable[[bytes], bytes]:
    return lambda raw: json.dumps({"result": result}).encode()


def expect_error(r: Run, code: int, *words: str) -> dict[str, Any]:
    assert r.rc == 1, r
    assert r.out is not None, r
    assert r.out["code"] == code, r.out
    assert isinstance(r.out["msg"], str) and r.out["msg"]
    text = (r.out["msg"] + " " + r.out.get("details", "")).lower()
    for w in words:
        assert w.lower() in text, (w, r.out)
    return r.out


# --- VERSION --------------------------------------------------------------------------------


def test_version_echoes_the_asked_version(argv: list[str]) -> None:
    for asked in plugin.SUPPORTED_VERSIONS:
        r = run_plugin(argv, {"CNI_COMMAND": "VERSION"}, {"cniVersion": asked})
        assert r.rc == 0
        assert r.out == {"cniVersion": asked, "supportedVersions": list(plugin.SUPPORTED_VERSIONS)}


def test_version_without_or_with_garbage_stdin_answers_1_1_0() -> None:
    for stdin in (b"", b"\xff\xfe garbage", b'{"cniVersion": "9.9.9"}', b"[1]"):
        r = run_plugin(SOURCE, {"CNI_COMMAND": "VERSION"}, stdin)
        assert r.rc == 0
        assert r.out is not None and r.out["cniVersion"] == "1.1.0"
        assert "1.1.0" in r.out["supportedVersions"] and "1.0.0" in r.out["supportedVersions"]


# --- ADD: forwarding and result conversion --------------------------------------------------


def test_add_forwards_the_rpc_request_and_prints_the_1_1_0_result(
    argv: list[str], agent: FakeAgent
) -> None:
    agent.respond = ok(RESULT_110)
    config = conf(agent, "1.1.0", runtimeConfig={"portMappings": []})
    r = run_plugin(argv, attach_env("ADD"), config)
    assert r.rc == 0, r
    assert r.out == {"cniVersion": "1.1.0", **RESULT_110}
    assert agent.last == {
        "command": "ADD",
        "containerID": "c0ffee1234",
        "netns": "/run/netns/fp-pod",
        "ifname": "eth0",
        "args": {
            "IgnoreUnknown": "1",
            "K8S_POD_NAMESPACE": "default",
            "K8S_POD_NAME": "web-0",
            "K8S_POD_UID": "1234-abcd",
        },
        "path": "/opt/cni/bin:/usr/lib/cni",
        "config": config,
    }
    assert next(iter(r.out)) == "cniVersion"


def test_add_result_in_1_0_0_shape(agent: FakeAgent) -> None:
    agent.respond = ok(RESULT_110)
    r = run_plugin(SOURCE, attach_env("ADD"), conf(agent, "1.0.0"))
    assert r.rc == 0
    assert r.out == {
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "flk0a1b2c3d4e5", "mac": "ee:ee:ee:ee:ee:ee"},
            {"name": "eth0", "mac": "02:42:ac:11:00:02", "sandbox": "/run/netns/p"},
        ],
        "ips": [
            {"interface": 1, "address": "2001:db8:f001::5/128", "gateway": "fe80::1"},
            {"interface": 1, "address": "192.0.2.5/32", "gateway": "169.254.1.1"},
        ],
        "routes": [{"dst": "::/0", "gw": "fe80::1"}, {"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
        "dns": {"nameservers": ["2001:db8::53"]},
    }


@pytest.mark.parametrize("version", ["0.4.0", "0.3.1", "0.3.0"])
def test_add_result_in_0_x_shape_has_ip_versions(agent: FakeAgent, version: str) -> None:
    agent.respond = ok(RESULT_110)
    r = run_plugin(SOURCE, attach_env("ADD"), conf(agent, version))
    assert r.rc == 0
    assert r.out is not None
    assert r.out["cniVersion"] == version
    assert [(ip["version"], ip["address"]) for ip in r.out["ips"]] == [
        ("6", "2001:db8:f001::5/128"),
        ("4", "192.0.2.5/32"),
    ]
    assert all(set(i) <= {"name", "mac", "sandbox"} for i in r.out["interfaces"])
    assert all(set(rt) <= {"dst", "gw"} for rt in r.out["routes"])


def test_add_of_a_dual_stack_pod_against_the_real_rpc_server(tmp: Path) -> None:
    """The plugin against flock.agent.rpc.serve (not the fake): the contract both sides share."""
    from flock.agent import rpc
    from flock.model.cni import CniRequest

    seen: list[CniRequest] = []

    async def handler(req: CniRequest) -> dict[str, Any]:
        seen.append(req)
        return RESULT_110

    path = tmp / "rpc.sock"
    with rpc.serving_in_thread(path, handler):
        r = run_plugin(SOURCE, attach_env("ADD"), conf(path, "0.4.0"))
        assert r.rc == 0, r
        assert r.out is not None and r.out["ips"][0]["version"] == "6"
        assert seen[0].key.container_id == "c0ffee1234"
        assert (seen[0].pod_namespace, seen[0].pod_name) == ("default", "web-0")
    assert not path.exists()


# --- DEL, CHECK, GC, STATUS -----------------------------------------------------------------


@pytest.mark.parametrize("command", ["DEL", "CHECK"])
@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_del_and_check_print_nothing_on_success(
    agent: FakeAgent, command: str, version: str
) -> None:
    prev = plugin.convert_result(RESULT_110, version)
    r = run_plugin(SOURCE, attach_env(command), conf(agent, version, prevResult=prev))
    assert (r.rc, r.out, r.stdout) == (0, None, b"")
    assert agent.last["command"] == command
    assert agent.last["config"]["prevResult"] == prev


def test_del_needs_no_netns(argv: list[str], agent: FakeAgent) -> None:
    env = attach_env("DEL")
    del env["CNI_NETNS"]
    r = run_plugin(argv, env, conf(agent))
    assert r.rc == 0
    assert agent.last["netns"] == ""


def test_gc_forwards_valid_attachments_without_attachment_env(agent: FakeAgent) -> None:
    valid = [{"containerID": "c1", "ifname": "eth0"}, {"containerID": "c2", "ifname": "eth0"}]
    config = conf(agent, **{"cni.dev/valid-attachments": valid})
    r = run_plugin(SOURCE, {"CNI_COMMAND": "GC", "CNI_PATH": "/opt/cni/bin"}, config)
    assert (r.rc, r.stdout) == (0, b"")
    assert agent.last["command"] == "GC"
    assert agent.last["config"]["cni.dev/valid-attachments"] == valid
    assert agent.last["containerID"] == ""


def test_status_ok_and_not_available(agent: FakeAgent) -> None:
    r = run_plugin(SOURCE, {"CNI_COMMAND": "STATUS"}, conf(agent))
    assert (r.rc, r.stdout) == (0, b"")
    agent.respond = lambda raw: json.dumps(
        {"error": {"code": 50, "msg": "flock agent is starting", "details": "wait"}}
    ).encode()
    r = run_plugin(SOURCE, {"CNI_COMMAND": "STATUS"}, conf(agent))
    expect_error(r, 50, "starting")


# --- Errors from the agent and from the transport -------------------------------------------


def test_agent_error_is_printed_with_the_runtime_version(argv: list[str], agent: FakeAgent) -> None:
    agent.respond = lambda raw: json.dumps(
        {"error": {"code": 100, "msg": "annotation flock.fritzlab.net/ipv6: bad", "details": "x"}}
    ).encode()
    r = run_plugin(argv, attach_env("ADD"), conf(agent, "1.0.0"))
    out = expect_error(r, 100, "flock.fritzlab.net/ipv6")
    assert out == {
        "cniVersion": "1.0.0",
        "code": 100,
        "msg": "annotation flock.fritzlab.net/ipv6: bad",
        "details": "x",
    }


@pytest.mark.parametrize("command", ["ADD", "CHECK"])
def test_unreachable_agent_is_try_again_later(tmp: Path, command: str) -> None:
    r = run_plugin(SOURCE, attach_env(command), conf(tmp / "none.sock", agentTimeout=0.3))
    expect_error(r, 11, "not reachable", str(tmp / "none.sock"), "no socket")


def test_unreachable_agent_on_gc_is_try_again_later(tmp: Path) -> None:
    r = run_plugin(SOURCE, {"CNI_COMMAND": "GC"}, conf(tmp / "none.sock", agentTimeout=0.3))
    expect_error(r, 11, "not reachable")


def test_stale_socket_is_connection_refused(tmp: Path) -> None:
    stale = tmp / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # the file stays; nobody listens
    r = run_plugin(SOURCE, attach_env("ADD"), conf(stale, agentTimeout=0.3))
    expect_error(r, 11, "connection refused")


def test_unreachable_agent_on_status_is_not_available(tmp: Path) -> None:
    r = run_plugin(SOURCE, {"CNI_COMMAND": "STATUS"}, conf(tmp / "none.sock"))
    expect_error(r, 50, "not reachable")


def test_agent_that_never_answers_times_out(argv: list[str], agent: FakeAgent) -> None:
    block = threading.Event()

    def hang(raw: bytes) -> bytes | None:
        block.wait(5)
        return None

    agent.respond = hang
    try:
        r = run_plugin(argv, attach_env("ADD"), conf(agent, agentTimeout=0.5))
    finally:
        block.set()
    expect_error(r, 11, "no answer within 0.5s")


def test_agent_that_hangs_up_without_answer(agent: FakeAgent) -> None:
    agent.respond = lambda raw: None
    r = run_plugin(SOURCE, attach_env("ADD"), conf(agent))
    expect_error(r, 11, "without answering")


@pytest.mark.parametrize(
    "reply",
    [
        b"not json",
        b"[]",
        b'{"result": [1]}',
        b'{"error": {"code": "7", "msg": "x"}}',
        b'{"error": {"code": true, "msg": "x"}}',
        b'{"error": {"code": 7}}',
        b'{"neither": 1}',
        b'{"result": {}, "error": {"code": 7, "msg": "both"}}',
    ],
)
def test_malformed_agent_reply_is_an_internal_error(agent: FakeAgent, reply: bytes) -> None:
    agent.respond = lambda raw: reply
    r = run_plugin(SOURCE, attach_env("ADD"), conf(agent))
    # A well-formed error wins over a result: the agent said it failed.
    code = 7 if b"both" in reply else plugin.ERR_INTERNAL
    expect_error(r, code)


# --- DEL while the agent is down: deferred, never wedged, never leaked ----------------------


def test_del_with_agent_down_is_recorded_for_the_agent(argv: list[str], tmp: Path) -> None:
    state = tmp / "state"
    config = conf(tmp / "none.sock", agentTimeout=0.3, stateDir=str(state))
    r = run_plugin(argv, attach_env("DEL"), config)
    assert (r.rc, r.stdout) == (0, b""), r
    assert "recorded" in r.stderr
    spool = state / plugin.DEFERRED_DEL_DIRNAME
    files = list(spool.iterdir())
    assert [f.name for f in files] == ["c0ffee1234@eth0.json"]
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    recorded = json.loads(files[0].read_bytes())
    assert recorded["command"] == "DEL"
    assert recorded["containerID"] == "c0ffee1234"
    assert recorded["config"] == config
    # A second DEL (runtimes retry) rewrites the same record: one file, still valid.
    r = run_plugin(argv, attach_env("DEL"), config)
    assert r.rc == 0
    assert [f.name for f in spool.iterdir()] == ["c0ffee1234@eth0.json"]


def test_del_with_agent_down_and_unwritable_state_fails_to_be_retried(tmp: Path) -> None:
    blocker = tmp / "file"
    blocker.write_text("not a directory")
    config = conf(tmp / "none.sock", agentTimeout=0.3, stateDir=str(blocker / "state"))
    r = run_plugin(SOURCE, attach_env("DEL"), config)
    expect_error(r, 11, "could not be recorded")


def test_del_when_agent_answers_is_not_deferred(agent: FakeAgent, tmp: Path) -> None:
    state = tmp / "state"
    r = run_plugin(SOURCE, attach_env("DEL"), conf(agent, stateDir=str(state)))
    assert r.rc == 0
    assert not state.exists()


# --- Bad environment ------------------------------------------------------------------------


def test_no_cni_command_is_invalid_env_with_about_text(argv: list[str]) -> None:
    r = run_plugin(argv, {}, b"")
    expect_error(r, 4, "CNI_COMMAND")
    assert "flock CNI plugin" in r.stderr


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"CNI_COMMAND": "add"}, ["unknown CNI_COMMAND"]),
        ({"CNI_COMMAND": "FROB"}, ["unknown CNI_COMMAND", "ADD"]),
        ({"CNI_CONTAINERID": ""}, ["CNI_CONTAINERID"]),
        ({"CNI_NETNS": ""}, ["CNI_NETNS"]),
        ({"CNI_IFNAME": ""}, ["CNI_IFNAME"]),
        ({"CNI_CONTAINERID": "-bad"}, ["CNI_CONTAINERID", "-bad"]),
        ({"CNI_CONTAINERID": "a/b"}, ["CNI_CONTAINERID"]),
        ({"CNI_IFNAME": "eth0123456789012"}, ["CNI_IFNAME", "15"]),
        ({"CNI_IFNAME": "a/b"}, ["CNI_IFNAME", "'/'"]),
        ({"CNI_IFNAME": "a b"}, ["CNI_IFNAME"]),
        ({"CNI_IFNAME": ".."}, ["CNI_IFNAME"]),
        ({"CNI_ARGS": "K8S_POD_NAME"}, ["CNI_ARGS", "K8S_POD_NAME"]),
        ({"CNI_ARGS": "=x"}, ["CNI_ARGS"]),
        ({"CNI_IFNAME": "eth\udcc9"}, ["CNI_IFNAME", "UTF-8"]),
        ({"CNI_ARGS": "K8S_POD_NAME=\udcff"}, ["CNI_ARGS", "UTF-8"]),
    ],
)
def test_bad_environment_is_code_4_naming_the_variable(
    agent: FakeAgent, env: dict[str, str], words: list[str]
) -> None:
    full = attach_env("ADD", **env)
    r = run_plugin(SOURCE, full, conf(agent))
    expect_error(r, 4, *words)
    assert agent.received == []


def test_env_errors_are_reported_before_config_errors(agent: FakeAgent) -> None:
    r = run_plugin(SOURCE, attach_env("ADD", CNI_CONTAINERID=""), b"garbage")
    expect_error(r, 4, "CNI_CONTAINERID")


# --- Bad network config ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stdin", "code", "words"),
    [
        (b"", 6, ["decode"]),
        (b"garbage", 6, ["decode", "char 0"]),
        (b'{"cniVersion": "1.1.0", "name": "flock"', 6, ["decode"]),
        (b'{"a": 1} {"b": 2}', 6, ["extra data"]),
        (b"\xff\xfe\x00", 6, ["decode"]),
        (b"[1, 2]", 6, ["not a JSON object", "list"]),
        (b'"flock"', 6, ["not a JSON object"]),
        (b"[" * 100000, 6, ["decode"]),
        (b'{"name": "flock"}', 7, ["cniVersion"]),
        (b'{"cniVersion": 1, "name": "flock"}', 7, ["cniVersion"]),
        (b'{"cniVersion": "0.2.0", "name": "flock"}', 1, ["0.2.0", "1.1.0"]),
        (b'{"cniVersion": "2.0.0", "name": "flock"}', 1, ["2.0.0"]),
        (b'{"cniVersion": "1.1.0"}', 7, ["name"]),
        (b'{"cniVersion": "1.1.0", "name": "-x"}', 7, ["name"]),
        (b'{"cniVersion": "1.1.0", "name": "f", "agentSocket": "rel.sock"}', 7, ["agentSocket"]),
        (b'{"cniVersion": "1.1.0", "name": "f", "agentSocket": 5}', 7, ["agentSocket"]),
        (b'{"cniVersion": "1.1.0", "name": "f", "stateDir": "x"}', 7, ["stateDir"]),
        (
            json.dumps(
                {"cniVersion": "1.1.0", "name": "f", "agentSocket": "/" + "s" * 107}
            ).encode(),
            7,
            ["agentSocket", "107"],
        ),
        (b'{"cniVersion": "1.1.0", "name": "f", "agentTimeout": -1}', 7, ["agentTimeout"]),
        (b'{"cniVersion": "1.1.0", "name": "f", "agentTimeout": true}', 7, ["agentTimeout"]),
        (b'{"cniVersion": "1.1.0", "name": "f", "agentTimeout": NaN}', 6, ["NaN"]),
    ],
)
def test_bad_config_codes(stdin: bytes, code: int, words: list[str]) -> None:
    r = run_plugin(SOURCE, attach_env("ADD"), stdin)
    expect_error(r, code, *words)


@pytest.mark.parametrize(
    ("command", "version"), [("CHECK", "0.3.1"), ("GC", "1.0.0"), ("STATUS", "0.4.0")]
)
def test_verbs_newer_than_the_config_version_are_incompatible(
    agent: FakeAgent, command: str, version: str
) -> None:
    r = run_plugin(SOURCE, attach_env(command), conf(agent, version))
    out = expect_error(r, 1, command)
    assert out["cniVersion"] == version
    assert agent.received == []


@pytest.mark.parametrize(
    "atts",
    [
        "c1",
        [{"containerID": "c1"}],
        [{"containerID": 5, "ifname": "eth0"}],
        ["c1"],
    ],
)
def test_gc_with_malformed_valid_attachments_is_invalid_config(
    agent: FakeAgent, atts: object
) -> None:
    config = conf(agent, **{"cni.dev/valid-attachments": atts})
    r = run_plugin(SOURCE, {"CNI_COMMAND": "GC"}, config)
    expect_error(r, 7, "valid-attachments")


def test_oversized_stdin_is_io_failure() -> None:
    r = run_plugin(SOURCE, attach_env("ADD"), b" " * (plugin.MAX_STDIN + 1))
    expect_error(r, 5, "exceeds")


# --- Garbage never makes a traceback --------------------------------------------------------

ENV_KEYS = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")
env_values = st.one_of(
    st.sampled_from(["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "", "eth0", "/x"]),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00")),
)
stdins = st.one_of(
    st.binary(max_size=200),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda kids: st.lists(kids) | st.dictionaries(st.text(), kids),
        max_leaves=20,
    ).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"cniVersion": st.sampled_from(["0.4.0", "1.0.0", "1.1.0", "x"]), "name": st.text()},
        optional={"agentSocket": st.text(), "agentTimeout": st.floats(), "stateDir": st.text()},
    ).map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(env=st.dictionaries(st.sampled_from(ENV_KEYS), env_values), stdin=stdins)
def test_run_never_raises_and_always_answers_in_cni_shape(
    env: dict[str, str], stdin: bytes
) -> None:
    # Keep the fuzzer off the real /run/flock socket and off the host's state dir.
    env = {**env}
    log: list[str] = []
    try:
        config = json.loads(stdin)
    except ValueError:
        config = None
    if env.get("CNI_COMMAND") in ("ADD", "DEL", "CHECK", "GC", "STATUS") and isinstance(
        config, dict
    ):
        config["agentSocket"] = "/nonexistent/fp-fuzz.sock"
        config["agentTimeout"] = 0.001
        config["stateDir"] = "/nonexistent/fp-fuzz-state"
        stdin = json.dumps(config).encode()
    rc, out = plugin.run(env, stdin, log)
    assert rc in (0, 1)
    if rc == 1:
        assert out is not None
        assert isinstance(out["code"], int) and isinstance(out["msg"], str) and out["msg"]
        assert out["cniVersion"] in plugin.SUPPORTED_VERSIONS
    json.loads(plugin.json_dumps(out))


@settings(max_examples=40, deadline=None)
@given(env=st.dictionaries(st.sampled_from(ENV_KEYS), env_values), stdin=st.binary(max_size=100))
def test_subprocess_never_tracebacks_on_garbage(env: dict[str, str], stdin: bytes) -> None:
    if env.get("CNI_COMMAND") in ("ADD", "DEL", "CHECK", "GC", "STATUS"):
        stdin = b"{" + stdin  # never a config that would reach /run/flock
    run_plugin(SOURCE, env, stdin)


# --- The in-process codec and conversion ----------------------------------------------------


def test_json_codec_round_trips_like_the_json_module() -> None:
    value = {"a": [1, 2.5, -3e-7, True, None, 'ü\n"\\'], "b": {"c": ""}, "d": 10**30}
    text = plugin.json_dumps(value)
    assert json.loads(text) == value
    assert plugin.json_loads(json.dumps(value).encode()) == value
    assert plugin.json_loads(b' \n\t{"x": 1}\r\n ') == {"x": 1}
    assert plugin.json_loads('\ufeff{"x": 1}'.encode()) == {"x": 1}
    for bad in (b"NaN", b"Infinity", b"[1,]", b"{'a': 1}", b"", b"1 2"):
        with pytest.raises(ValueError):
            plugin.json_loads(bad)
    with pytest.raises(TypeError):
        plugin.json_dumps({"x": {1, 2}})


_JSON_LEAF = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
_JSON_VALUE = st.recursive(
    _JSON_LEAF, lambda c: st.lists(c) | st.dictionaries(st.text(), c), max_leaves=20
)


@settings(max_examples=400, deadline=None)
@given(value=_JSON_VALUE)
def test_json_codec_writes_and_reads_what_the_json_module_does(value: object) -> None:
    # Byte for byte json.dumps, and whatever json.dumps writes (compact or indented,
    # escaped or not) reads back.
    assert plugin.json_dumps(value) == json.dumps(value, separators=(",", ":"))
    for text in (json.dumps(value), json.dumps(value, indent=1, ensure_ascii=False)):
        assert plugin.json_loads(text.encode()) == value


@settings(max_examples=1500, deadline=None)
@given(text=st.text(alphabet='{}[]",:0123456789-.eEtrufalsnNI \\\t\nxé\x01', max_size=30))
def test_json_loads_accepts_and_rejects_exactly_what_json_does(text: str) -> None:
    try:
        expected: tuple[object, ...] = ("ok", json.loads(text, parse_constant=_no_constant))
    except (ValueError, RecursionError):
        expected = ("error",)
    try:
        got: tuple[object, ...] = ("ok", plugin.json_loads(text.encode()))
    except ValueError:
        got = ("error",)
    assert got == expected
    if got[0] == "ok":
        assert type(got[1]) is type(expected[1])


def _no_constant(name: str) -> object:
    raise ValueError(name)


def test_plugin_start_does_not_load_the_json_module() -> None:
    # A config and a result as a runtime and the agent write them go through _json, the
    # C accelerator, alone: the json package (re and more, doubling the plugin's CPU
    # time) is not imported on an ADD's way.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import plugin as p; "
        'c = p.json_loads(b\'{"cniVersion": "1.0.0", "name": "flock", "agentTimeout": 60}\'); '
        "p.json_dumps({'config': c, 'args': {'K8S_POD_NAME': 'p'}, 'n': [1, True, None]}); "
        "print(sorted(m for m in sys.modules if 'json' in m))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, str(Path(plugin.__file__).parent)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "['_json']"


def test_convert_result_keeps_1_1_0_fields_only_at_1_1_0() -> None:
    assert plugin.convert_result(RESULT_110, "1.1.0") == {"cniVersion": "1.1.0", **RESULT_110}
    assert "mtu" not in plugin.convert_result(RESULT_110, "1.0.0")["interfaces"][0]  # type: ignore[index]
    empty = plugin.convert_result({}, "0.4.0")
    assert empty == {"cniVersion": "0.4.0"}


def test_deferred_del_records_are_unique_per_attachment(tmp: Path) -> None:
    # ("a_b", "c") and ("a", "b_c") would collide with "_" as the separator.
    for cid, ifname in (("a_b", "c"), ("a", "b_c")):
        plugin.defer_del(str(tmp), {"command": "DEL", "containerID": cid, "ifname": ifname})
    names = sorted(p.name for p in (tmp / plugin.DEFERRED_DEL_DIRNAME).iterdir())
    assert names == ["a@b_c.json", "a_b@c.json"]


def test_version_does_not_hang_on_an_open_empty_stdin(argv: list[str]) -> None:
    p = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={"CNI_COMMAND": "VERSION"}
    )
    assert p.stdin is not None and p.stdout is not None
    try:
        assert p.wait(timeout=10) == 0  # stdin still open: the plugin must not wait for EOF
        assert json.loads(p.stdout.read())["cniVersion"] == "1.1.0"
    finally:
        p.stdin.close()
        p.stdout.close()
        if p.poll() is None:
            p.kill()
            p.wait()


def test_full_listen_backlog_is_retried_not_failed(tmp: Path) -> None:
    """A burst of CNI calls can fill the agent's listen backlog: connect() then fails
    with EAGAIN at once. That means busy, not gone: the plugin must retry."""
    path = tmp / "busy.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    fillers = []
    for _ in range(4):  # fill the backlog (more than it holds)
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(str(path))
        fillers.append(c)

    def serve_late() -> None:
        time.sleep(0.4)  # a chance for the plugin to meet the full backlog (not an ordering)
        for c in fillers:
            c.close()
        while True:
            conn, _ = srv.accept()
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                if data:  # the plugin's request (fillers send nothing)
                    conn.sendall(json.dumps({"result": RESULT_110}).encode())
                    return

    t = threading.Thread(target=serve_late, daemon=True)
    t.start()
    try:
        # agentTimeout is a deadline here: the plugin retries until the backlog drains.
        r = run_plugin(SOURCE, attach_env("ADD"), conf(path, "1.1.0", agentTimeout=60))
    finally:
        t.join(10)
        srv.close()
    assert r.rc == 0, r
    assert r.out is not None and r.out["ips"] == RESULT_110["ips"]
