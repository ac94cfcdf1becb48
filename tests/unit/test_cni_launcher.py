"""The native launcher (packaging/launcher.c) against the Python plugin it stands in for.

The launcher forwards the runtime's environment and stdin to the agent without
parsing them, and execs the Python plugin for anything unusual. So every test
here runs the same input through both, exec'd as a runtime does, and compares:
the bytes the agent receives (one wire format), and what the runtime sees
(stdout, exit status). The fuzz corpus of the plugin runs through both too,
against the real RPC server, and the failure modes (bad or huge stdin, closed
stdout, an agent that hangs up mid-reply, no agent) end in a CNI error object,
never a hang or a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flock.agent import rpc
from flock.cni import install, plugin
from flock.model.cni import ERR_IPAM, CniError, CniRequest
from flock.testbed import launcher

FUZZ_CORPUS = Path(__file__).resolve().parents[1] / "fuzz" / "corpus" / "cni_plugin"
SYSTEM_PYTHON = "/usr/bin/python3"
RESULT: dict[str, Any] = {
    "interfaces": [
        {"name": "flk0a1b2c3d4e5", "mac": "ee:ee:ee:ee:ee:ee", "mtu": 1500},
        {"name": "eth0", "mac": "02:42:ac:11:00:02", "sandbox": "/run/netns/p"},
    ],
    "ips": [
        {"address": "2001:db8:f001::5/128", "gateway": "fe80::1", "interface": 1},
        {"address": "192.0.2.5/32", "gateway": "169.254.1.1", "interface": 1},
    ],
    "routes": [{"dst": "::/0", "gw": "fe80::1", "priority": 10}, {"dst": "0.0.0.0/0"}],
}

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None or not Path(SYSTEM_PYTHON).exists(),
    reason="needs cc (gcc, libc6-dev) and /usr/bin/python3",
)


@pytest.fixture(scope="module")
def tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="fp-ln-"))  # short: unix socket paths <= 107 bytes
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def installed(tmp: Path) -> dict[str, Path]:
    """`install-cni --python --launcher`: the launcher entry, and the Python plugin it execs."""
    built = launcher.build(tmp / "build" / "flock")  # -Wall -Wextra -Werror: warning-free
    install.install(
        bin_dir=tmp / "bin", conf_dir=tmp / "net.d", python=SYSTEM_PYTHON, launcher=built
    )
    alone = tmp / "alone"  # the launcher without any plugin to fall back on
    alone.mkdir()
    shutil.copy2(built, alone / "flock")
    return {
        "launcher": tmp / "bin" / "flock",
        "python": tmp / "bin" / "flock.d" / "plugin",
        "alone": alone / "flock",
    }


async def handler(req: CniRequest) -> dict[str, Any]:
    if req.args.get("K8S_POD_NAME") == "fail":
        raise CniError(ERR_IPAM, "range exhausted", "cidr6 2001:db8::/120 is full")
    return RESULT if req.command == "ADD" else {}


@pytest.fixture(scope="module")
def agent_sock(tmp: Path) -> Iterator[Path]:
    path = tmp / "agent.sock"
    with rpc.serving_in_thread(path, handler):
        yield path


class Capture:
    """A socket that records each request and answers with `reply(raw)` (None: hang up)."""

    def __init__(self, path: Path, reply: Callable[[bytes], bytes | None]) -> None:
        self.path, self.reply = path, reply
        self.received: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                chunks = []
                while chunk := conn.recv(65536):
                    chunks.append(chunk)
                self.received.append(b"".join(chunks))
                out = self.reply(self.received[-1])
                if out is not None:
                    with contextlib.suppress(OSError):
                        conn.sendall(out)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)
        self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def capture(tmp: Path, reply: Callable[[bytes], bytes | None]) -> Iterator[Capture]:
    c = Capture(tmp / f"cap{threading.get_ident() % 1000}.sock", reply)
    try:
        yield c
    finally:
        c.close()


def exec_plugin(
    exe: Path, env: dict[str, str | bytes], stdin: bytes, *, timeout: float = 30, **kw: Any
) -> subprocess.CompletedProcess[bytes]:
    full = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in env.items()}
    full[b"PATH"] = b"/usr/bin:/bin"
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    p = subprocess.run([str(exe)], input=stdin, env=full, timeout=timeout, **kw)
    assert p.returncode in (0, 1), p  # never killed by a signal
    assert b"Traceback" not in (p.stderr or b""), p.stderr
    return p


def attach_env(command: str = "ADD", pod: str = "web-0") -> dict[str, str | bytes]:
    return {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c0ffee1234",
        "CNI_NETNS": "/run/netns/fp-pod",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}",
        "CNI_PATH": "/opt/cni/bin",
    }


def config(sock: Path | str, version: str = "1.1.0", **extra: Any) -> bytes:
    return json.dumps(
        {"cniVersion": version, "name": "flock", "type": "flock", "agentSocket": str(sock), **extra}
    ).encode()


def is_cni_error(stdout: bytes, code: int | None = None) -> dict[str, Any]:
    out = json.loads(stdout)
    assert isinstance(out, dict) and isinstance(out["code"], int) and out["msg"], out
    assert out["cniVersion"] in plugin.SUPPORTED_VERSIONS, out
    if code is not None:
        assert out["code"] == code, out
    return out


# --- one wire format ------------------------------------------------------------------------

SAME_INPUTS: list[tuple[dict[str, str | bytes], bytes | None]] = [
    (attach_env("ADD"), None),
    (attach_env("DEL"), None),
    ({**attach_env("CHECK"), "CNI_ARGS": "K8S_POD_NAME=caf\u00e9;X=a=b"}, None),
    ({"CNI_COMMAND": "GC", "CNI_FOO": "x=y=z", "CNI_PATH": ""}, None),
    ({"CNI_COMMAND": "STATUS"}, None),
    (
        attach_env("ADD"),
        b' {"cniVersion": "1.0.0", "name":"x", "agentSocket" : "SOCK",'
        b' "ipam": {"agentSocket": 1}}\n',
    ),
    (attach_env("ADD"), b'{"cniVersion":"0.4.0","name":"n","agentSocket":"SOCK","x":"\xc3\xa9"}'),
    # Larger than a socket buffer: written while the agent reads (a short writev is completed).
    (
        attach_env("ADD"),
        b'{"cniVersion":"1.0.0","name":"n","agentSocket":"SOCK","p":"%s"}' % (b"x" * 900_000),
    ),
]


@pytest.mark.parametrize(("env", "stdin"), SAME_INPUTS)
def test_launcher_and_python_plugin_send_byte_identical_requests(
    installed: dict[str, Path], tmp: Path, env: dict[str, str | bytes], stdin: bytes | None
) -> None:
    with capture(tmp, lambda raw: plugin.encode_reply(0, None, [])) as cap:
        data = (
            stdin.replace(b"SOCK", str(cap.path).encode()) if stdin else config(cap.path, "1.1.0")
        )
        # The launcher alone (no plugin beside it): it must not have fallen back.
        a = exec_plugin(installed["alone"], env, data)
        b = exec_plugin(installed["python"], env, data)
        assert (a.returncode, a.stdout) == (0, b""), a
        assert (b.returncode, b.stdout) == (0, b""), b
        assert len(cap.received) == 2
        assert cap.received[0] == cap.received[1]
        assert cap.received[0].startswith(plugin.FRAME_MAGIC)
        assert plugin.decode_frame(cap.received[0])[1] == data


def test_frame_round_trips_the_environment_and_stdin() -> None:
    env = {"CNI_COMMAND": "ADD", "CNI_ARGS": "a=b;c=d", "CNI_X": "\udcff"}
    stdin = b'{"a": "\x00\xff"}'
    assert plugin.decode_frame(plugin.encode_frame(env, stdin)) == (env, stdin)
    with pytest.raises(ValueError):
        plugin.decode_frame(b"FLOCK/1\nCNI_COMMAND=ADD")  # never terminated


# --- the same answers as the Python plugin, against the real RPC server ---------------------


def both(installed: dict[str, Path], env: dict[str, str | bytes], stdin: bytes) -> bytes:
    """Run the launcher and the Python plugin; they must print the same and exit the same."""
    a = exec_plugin(installed["launcher"], env, stdin)
    b = exec_plugin(installed["python"], env, stdin)
    assert (a.returncode, a.stdout) == (b.returncode, b.stdout), (a, b)
    return a.stdout


@pytest.mark.parametrize("version", plugin.SUPPORTED_VERSIONS)
def test_add_result_in_every_version(
    installed: dict[str, Path], agent_sock: Path, version: str
) -> None:
    out = json.loads(both(installed, attach_env("ADD"), config(agent_sock, version)))
    assert out["cniVersion"] == version and out["ips"][0]["address"] == "2001:db8:f001::5/128"
    a = exec_plugin(installed["alone"], attach_env("ADD"), config(agent_sock, version))
    assert a.stdout == plugin.json_dumps(out).encode() + b"\n"  # natively, no fallback


def test_agent_error_and_bad_input_are_the_same_cni_error(
    installed: dict[str, Path], agent_sock: Path
) -> None:
    is_cni_error(both(installed, attach_env("ADD", pod="fail"), config(agent_sock)), ERR_IPAM)
    is_cni_error(
        both(installed, attach_env("ADD"), b'{"agentSocket": "%s", ' % str(agent_sock).encode()), 6
    )
    is_cni_error(both(installed, {**attach_env("ADD"), "CNI_IFNAME": "a/b"}, config(agent_sock)), 4)
    is_cni_error(both(installed, attach_env("GC"), config(agent_sock, "1.0.0")), 1)
    bad_env = {**attach_env("CHECK"), "CNI_NETNS": b"/run/netns/\xff\xfe"}  # not UTF-8
    is_cni_error(both(installed, bad_env, config(agent_sock)), 4)
    # ...and the launcher answered a bad config itself, through the agent (no fallback).
    no_name = b'{"cniVersion": "1.1.0", "agentSocket": "%s"}' % str(agent_sock).encode()
    a = exec_plugin(installed["alone"], attach_env("ADD"), no_name)
    assert a.stdout == exec_plugin(installed["python"], attach_env("ADD"), no_name).stdout
    is_cni_error(a.stdout, 7)


def corpus_input(data: bytes, sock: Path) -> tuple[dict[str, str | bytes], bytes] | None:
    """A fuzz corpus entry (tests/fuzz/fuzz_cni_plugin.py's format) aimed at `sock`."""
    head, _, stdin = data.partition(b"\n\n")
    env: dict[str, str | bytes] = {}
    for line in head.split(b"\n"):
        key, sep, value = line.partition(b"=")
        if sep and key and b"\0" not in line:
            name = key if key.startswith(b"CNI_") else b"CNI_" + key
            env.setdefault(name.decode("utf-8", "surrogateescape"), value)
    try:
        conf = json.loads(stdin)
    except (ValueError, RecursionError):
        return env, stdin
    if isinstance(conf, dict):
        conf.pop("agentTimeout", None)
        conf.update(agentSocket=str(sock), stateDir="/nonexistent/fp-ln-state")
        stdin = json.dumps(conf).encode()
    return env, stdin


@pytest.mark.parametrize("path", sorted(FUZZ_CORPUS.iterdir()), ids=lambda p: p.name)
def test_fuzz_corpus_gives_the_same_answers(
    installed: dict[str, Path], agent_sock: Path, path: Path
) -> None:
    case = corpus_input(path.read_bytes(), agent_sock)
    assert case is not None
    out = both(installed, *case)
    if out:
        assert isinstance(json.loads(out), dict)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    command=st.sampled_from(["ADD", "DEL", "CHECK", "GC", "STATUS"]),
    version=st.sampled_from([*plugin.SUPPORTED_VERSIONS, "0.2.0", 7]),
    name=st.sampled_from(["flock", "", "bad name"]),
    junk=st.binary(max_size=40),
    cut=st.integers(min_value=0, max_value=400),
)
def test_random_requests_give_the_same_answers(
    installed: dict[str, Path],
    agent_sock: Path,
    command: str,
    version: object,
    name: str,
    junk: bytes,
    cut: int,
) -> None:
    conf = {"cniVersion": version, "name": name, "agentSocket": str(agent_sock)}
    stdin = json.dumps(conf).encode()
    stdin = stdin[:cut] + junk if cut < len(stdin) else stdin
    out = both(installed, attach_env(command), stdin)
    if out and json.loads(out).get("code"):
        is_cni_error(out)


# --- the unusual: the Python plugin takes over, the runtime always gets a CNI answer --------


def test_version_and_unknown_verbs_go_to_the_python_plugin(installed: dict[str, Path]) -> None:
    out = json.loads(both(installed, {"CNI_COMMAND": "VERSION"}, b'{"cniVersion":"1.0.0"}'))
    assert out["cniVersion"] == "1.0.0"
    is_cni_error(both(installed, {"CNI_COMMAND": "FROB"}, b"{}"), 4)
    a = exec_plugin(installed["alone"], {"CNI_COMMAND": "VERSION"}, b"{}")
    out = is_cni_error(a.stdout, 999)  # nothing to fall back on: the launcher says so
    assert "flock.d" in out["details"]


def test_stdin_over_the_fast_path_limit_goes_through_python(
    installed: dict[str, Path], agent_sock: Path
) -> None:
    padded = config(agent_sock, "1.1.0", pad="x" * (2 << 20))
    out = json.loads(both(installed, attach_env("ADD"), padded))
    assert out["cniVersion"] == "1.1.0" and "ips" in out
    huge = b" " * (plugin.MAX_STDIN + 10)
    is_cni_error(exec_plugin(installed["launcher"], attach_env("ADD"), huge).stdout, 5)


def test_no_agent_is_try_again_and_del_is_deferred(installed: dict[str, Path], tmp: Path) -> None:
    gone = tmp / "nobody.sock"
    r = exec_plugin(installed["launcher"], attach_env("ADD"), config(gone))
    is_cni_error(r.stdout, 11)
    state = tmp / "state"
    r = exec_plugin(installed["launcher"], attach_env("DEL"), config(gone, stateDir=str(state)))
    assert (r.returncode, r.stdout) == (0, b""), r
    assert (state / "deferred-del" / "c0ffee1234@eth0.json").is_file()


@pytest.mark.parametrize(
    "reply",
    [
        None,  # hangs up without a word
        b'FLOCK/1 0 50 0\n{"cniVersion"',  # closes mid-reply
        b'FLOCK/1 0 50\n{"cniVersion"',  # a header without the stderr size
        b"FLOCK/1 0",  # mid-header
        b"FLOCK/1 7 0 0\n",  # not an exit status
        b"FLOCK/1 0 0 0\nmore",  # more than the frame says
        b"garbage",
    ],
)
def test_agent_closing_mid_reply_is_a_cni_error(
    installed: dict[str, Path], tmp: Path, reply: bytes | None
) -> None:
    with capture(tmp, lambda raw: reply) as cap:
        r = exec_plugin(installed["launcher"], attach_env("ADD"), config(cap.path), timeout=20)
    out = is_cni_error(r.stdout)
    assert out["code"] in (11, 999), out
    assert len(cap.received) == 2  # the launcher's try, then the Python plugin's own


def test_an_agent_error_frame_passes_through_unchanged(
    installed: dict[str, Path], tmp: Path
) -> None:
    frame = plugin.encode_reply(1, plugin.error_object("1.0.0", 102, "veth"), ["a note"])
    with capture(tmp, lambda raw: frame) as cap:
        r = exec_plugin(installed["alone"], attach_env("ADD"), config(cap.path))
    assert r.returncode == 1
    assert r.stdout == b'{"cniVersion":"1.0.0","code":102,"msg":"veth"}\n'
    assert r.stderr == b"a note\n"


def test_closed_stdout_is_an_exit_status_not_a_crash(
    installed: dict[str, Path], agent_sock: Path
) -> None:
    for exe in (installed["launcher"], installed["python"]):
        r, w = os.pipe()
        os.close(r)  # nobody reads stdout: writing to it fails (EPIPE, not SIGPIPE)
        try:
            p = exec_plugin(exe, attach_env("ADD"), config(agent_sock), stdout=w)
        finally:
            os.close(w)
        assert p.returncode == 1


def raw_exchange(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "frame",
    [
        b"FLOCK/1\nCNI_COMMAND=ADD",  # the environment never ends
        b"FLOCK/1\nNOT_CNI=1\0\0{}",  # not a CNI_* variable
        b"FLOCK/1\nCNI_COMMAND\0\0{}",  # no '='
    ],
)
def test_the_agent_answers_a_malformed_frame_with_a_frame(agent_sock: Path, frame: bytes) -> None:
    reply = raw_exchange(agent_sock, frame)
    head, _, rest = reply.partition(b"\n")
    status, out_len, err_len = (int(f) for f in head.removeprefix(b"FLOCK/1 ").split(b" "))
    assert status == 1 and len(rest) == out_len + err_len
    assert is_cni_error(rest[:out_len], 6)["msg"] == "RPC request is not a valid frame"
