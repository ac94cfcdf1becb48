"""The `flock` CNI plugin: the executable a container runtime runs for every pod.

Why it looks like this: it sits on every pod's start and stop path, so it does
as little as possible. It checks the CNI environment and the network config,
forwards the request to the node's flock agent over a unix socket (the RPC in
docs/architecture.md), and prints the agent's answer in the CNI version the
runtime asked for. All the work (IPAM, netlink, BGP) happens in the agent.

It is run as a plain script (``python -I -S plugin.py`` or the self-contained
bundle built by packaging/build_plugin_bundle.py), so it imports nothing from
flock and as little of the standard library as it can: ``_socket`` directly
instead of ``socket``, whose import (``enum``) would cost more than the rest of
the plugin's start-up together; ``posix`` instead of ``os``. JSON goes through
``_json``, json's C accelerator, directly: the public ``json`` module (it
imports ``re`` and more) doubled the plugin's CPU time (16.3 vs 8.2 ms per exec,
bench/bench_plugin_start.py --variant, loaded 2-CPU machine) and is imported
only to explain a document ``_json`` rejects. (A hand-written reader and writer
for plain JSON saved ~0.26 ms more per exec; it was dropped in issue 13, not
worth ~150 lines on a path native forwarding will replace.)

Exit status 0 and the result (ADD) or nothing (DEL, CHECK, GC, STATUS) on
stdout on success; exit status 1 and a CNI error object on stdout on failure.
Nothing ever ends in a traceback.

DEL when the agent cannot be reached (no socket, connection refused, or no
answer in time): the plugin writes the request to
``<stateDir>/deferred-del/<containerID>@<ifname>.json`` (atomically, fsynced;
'@' cannot occur in a container ID, so the name is unique per attachment)
and reports success, and the agent replays those files when it starts
(``flock.agent.rpc.replay_deferred_dels``). Returning an error instead would
make the kubelet retry forever and wedge pod deletion while the agent is down;
returning success without a record would leak the pod's addresses until a
runtime happens to send GC. DEL is idempotent, so a replay of a DEL that the
agent had in fact completed does no harm. If even the record cannot be written,
DEL fails with code 11 so that the runtime retries.
"""

import _socket
import posix
import sys
import time

PLUGIN_VERSION = "0.1.0"
SPEC_VERSION = "1.1.0"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

DEFAULT_AGENT_SOCKET = "/run/flock/agent.sock"
DEFAULT_STATE_DIR = "/var/lib/flock"
DEFERRED_DEL_DIRNAME = "deferred-del"
DEFAULT_AGENT_TIMEOUT = 60.0  # seconds; the agent may wait briefly for the pod to appear
STATUS_TIMEOUT = 5.0
CONNECT_WAIT = 2.0  # rides out an agent restart that is replacing its socket
MAX_STDIN = 16 << 20
MAX_REPLY = 16 << 20
# The wire format (docs/cni.md, "Wire format"), the same bytes from this plugin and from
# the native launcher (packaging/launcher.c): the request is FRAME_MAGIC, every CNI_*
# variable as NAME=VALUE\0 (environ order, first of a name wins), an empty entry (\0),
# then stdin exactly as the runtime wrote it; the plugin then half-closes. The reply is
# b"FLOCK/1 <exit status> <stdout length> <stderr length>\n", stdout, stderr: whole once
# that many bytes are in (the client does not wait for the agent's close).
FRAME_MAGIC = b"FLOCK/1\n"
REPLY_MAGIC = b"FLOCK/1 "

# The plugin <-> agent contract is defined here, once: this stdlib-only module is the
# leaf the agent imports it from (flock.model.cni, flock.agent.rpc), so the two sides
# cannot drift apart. Well-known CNI error codes (spec section 5, "Error"):
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_INVALID_NETNS = 8
ERR_TRY_AGAIN = 11
ERR_NOT_AVAILABLE = 50
ERR_LIMITED_CONNECTIVITY = 51
ERR_INTERNAL = 999
# flock's own codes (100+ are plugin-specific in the CNI spec); the agent answers them.
ERR_ANNOTATION = 100  # a pod annotation cannot be honoured (the message names it)
ERR_IPAM = 101  # range exhausted, supplied address already held
ERR_DATAPATH = 102  # the kernel refused part of the pod's network, or policy failed
ERR_CHECK = 103  # CHECK found the pod's network not as ADD left it

COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")
# Commands introduced after 0.3.x: the runtime must not ask for them at an older version.
MIN_VERSION = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}
# (variable, commands that require it) as the spec's "Required environment parameters".
REQUIRED_ENV = (
    ("CNI_CONTAINERID", ("ADD", "DEL", "CHECK")),
    ("CNI_NETNS", ("ADD", "CHECK")),
    ("CNI_IFNAME", ("ADD", "DEL", "CHECK")),
)

_NAME_FIRST = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_NAME_REST = _NAME_FIRST | frozenset("_.-")
_JSON_WS = " \t\n\r"
_HINT_AGENT = (
    "is the flock agent running on this node? "
    "(kubectl -n kube-system get pods -l app=flock-agent -o wide; "
    "the socket path is the network config's agentSocket)"
)

JsonObject = dict[str, object]


class Failure(Exception):
    """A CNI error: printed as the spec's error object, exit status 1."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


class Answer(Exception):
    """The plugin answers without the agent (VERSION, or a check failed): exit status, output."""

    def __init__(self, status: int, out: "JsonObject | None") -> None:
        super().__init__(status)
        self.status = status
        self.out = out


class AgentUnreachable(Exception):
    """The agent's socket could not be used; `detail` says why, for the error text."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


# --- JSON -----------------------------------------------------------------------------------


class _ScanContext:
    """The attributes `_json.make_scanner` reads: exactly what `json.loads` uses by default."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> object:
        raise ValueError(f"{name} is not valid JSON")


def _reject_unserialisable(obj: object) -> object:
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


# (scanner, encoder), typed loosely: importing `typing` here would cost more than _json.
_codec: tuple[object, object] | None = None


def _c_codec() -> tuple[object, object] | None:
    """(scanner, encoder) from json's C accelerator, made on first use; None without it."""
    global _codec
    if _codec is None:
        try:
            import _json
        except ImportError:  # pragma: no cover - every CPython build has it
            return None
        _codec = (
            _json.make_scanner(_ScanContext()),  # type: ignore[arg-type]
            _json.make_encoder(
                None, _reject_unserialisable, _json.encode_basestring_ascii, None, ":", ",",
                False, False, False,
            ),
        )  # fmt: skip
    return _codec


def _skip_ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _JSON_WS:
        i += 1
    return i


def json_loads(data: bytes) -> object:
    """Parse one JSON document; ValueError with a position on anything else."""
    text = data.decode("utf-8")  # UnicodeDecodeError is a ValueError
    if text.startswith("\ufeff"):
        text = text[1:]
    codec = _c_codec()
    if codec is None:  # pragma: no cover
        return _slow_loads(text)
    start = _skip_ws(text, 0)
    try:
        value, end = codec[0](text, start)  # type: ignore[operator]
    except (StopIteration, ValueError, SystemError, RecursionError):
        # The C scanner builds its error from json.decoder, which we do not import on the
        # way of a valid document (it drags in `re`): let the json module parse it again
        # and explain.
        return _slow_loads(text)
    end = _skip_ws(text, end)
    if end != len(text):
        raise ValueError(f"extra data after the JSON value at character {end}")
    return value


def _slow_loads(text: str) -> object:
    import json

    try:
        return json.loads(text, parse_constant=_ScanContext.parse_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def json_dumps(value: object) -> str:
    """Compact JSON, non-ASCII escaped (what ``json.dumps(separators=(",", ":"))`` writes)."""
    codec = _c_codec()
    if codec is None:  # pragma: no cover
        import json

        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    return "".join(codec[1](value, 0))  # type: ignore[operator]


# --- Validation -----------------------------------------------------------------------------


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def valid_name(name: str) -> bool:
    """Container IDs and network names: ``[a-zA-Z0-9][a-zA-Z0-9_.-]*``."""
    # issuperset: one C loop (a generator over a 64-character container ID costs ~20 us).
    return bool(name) and name[0] in _NAME_FIRST and _NAME_REST.issuperset(name[1:])


def ifname_problem(name: str) -> str:
    """Why `name` cannot be a Linux interface name, or '' if it can."""
    if not name:
        return "is empty"
    if len(name.encode()) > 15:
        return f"is {len(name.encode())} bytes long; Linux allows at most 15"
    if name in (".", ".."):
        return "is . or .."
    for c in name:
        if c in "/:" or c.isspace():
            return f"contains {c!r}; '/', ':' and whitespace are not allowed"
    return ""


def parse_cni_args(raw: str) -> dict[str, str]:
    """``K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p`` -> dict; Failure(4) on a malformed pair."""
    out: dict[str, str] = {}
    for pair in raw.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise Failure(
                ERR_INVALID_ENV,
                "CNI_ARGS is malformed",
                f"pair {pair!r} is not KEY=VALUE; CNI_ARGS must look like "
                "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pod",
            )
        out[key] = value
    return out


def check_env(command: str, env: dict[str, str]) -> None:
    for name in sorted(env):
        if "\0" in env[name]:  # not from a real environment; it would break the frame
            raise Failure(ERR_INVALID_ENV, f"{name} contains a NUL byte")
        try:
            env[name].encode()
        except UnicodeEncodeError:  # bytes that were not UTF-8, kept by surrogateescape
            raise Failure(
                ERR_INVALID_ENV,
                f"{name} is not valid UTF-8",
                f"{env[name].encode('utf-8', 'surrogateescape')!r}",
            ) from None
    missing = [name for name, cmds in REQUIRED_ENV if command in cmds and not env.get(name)]
    if missing:
        raise Failure(
            ERR_INVALID_ENV,
            f"required environment variables missing: {', '.join(missing)}",
            f"CNI_COMMAND={command} needs {', '.join(missing)}; the container runtime sets them",
        )
    if command in ("ADD", "DEL", "CHECK"):
        cid = env["CNI_CONTAINERID"]
        if not valid_name(cid):
            raise Failure(
                ERR_INVALID_ENV,
                "CNI_CONTAINERID is invalid",
                f"{cid!r}: must start with a letter or digit, then letters, digits, '_', '.', '-'",
            )
        problem = ifname_problem(env["CNI_IFNAME"])
        if problem:
            raise Failure(
                ERR_INVALID_ENV, "CNI_IFNAME is invalid", f"{env['CNI_IFNAME']!r} {problem}"
            )


def config_version(config: object) -> str | None:
    """The config's cniVersion if it is one flock speaks, else None."""
    if isinstance(config, dict):
        v = config.get("cniVersion")
        if isinstance(v, str) and v in SUPPORTED_VERSIONS:
            return v
    return None


def check_config(command: str, config: object) -> JsonObject:
    if not isinstance(config, dict):
        raise Failure(
            ERR_DECODE,
            "network config is not a JSON object",
            f"stdin held a JSON {type(config).__name__}; the runtime must pass the plugin's "
            "network configuration object",
        )
    version = config.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise Failure(ERR_INVALID_CONFIG, "network config has no cniVersion", "set cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise Failure(
            ERR_INCOMPATIBLE_VERSION,
            f"incompatible CNI version {version!r}",
            f"flock supports {', '.join(SUPPORTED_VERSIONS)}",
        )
    needed = MIN_VERSION.get(command)
    if needed and _version_tuple(version) < _version_tuple(needed):
        raise Failure(
            ERR_INCOMPATIBLE_VERSION,
            f"CNI {command} needs cniVersion {needed} or later, the config says {version}",
        )
    name = config.get("name")
    if not isinstance(name, str) or not valid_name(name):
        raise Failure(
            ERR_INVALID_CONFIG,
            "network config has no valid name",
            f"name={name!r}: must start with a letter or digit, then letters, digits, '_.-'",
        )
    for key in ("agentSocket", "stateDir"):
        value = config.get(key)
        if value is not None and not (isinstance(value, str) and value.startswith("/")):
            raise Failure(
                ERR_INVALID_CONFIG,
                f"network config key {key} must be an absolute path",
                f"{key}={value!r}",
            )
    sock = config.get("agentSocket")
    if isinstance(sock, str) and len(sock.encode("utf-8", "surrogateescape")) > 107:
        raise Failure(
            ERR_INVALID_CONFIG,
            "network config key agentSocket is longer than a unix socket path may be",
            f"{len(sock.encode('utf-8', 'surrogateescape'))} bytes; at most 107",
        )
    timeout = config.get("agentTimeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0
    ):
        raise Failure(
            ERR_INVALID_CONFIG,
            "network config key agentTimeout must be a positive number of seconds",
            f"agentTimeout={timeout!r}",
        )
    if command == "GC":
        atts = config.get("cni.dev/valid-attachments", [])
        if not isinstance(atts, list) or not all(
            isinstance(a, dict)
            and isinstance(a.get("containerID"), str)
            and isinstance(a.get("ifname"), str)
            for a in atts
        ):
            raise Failure(
                ERR_INVALID_CONFIG,
                "cni.dev/valid-attachments must be a list of {containerID, ifname} objects",
            )
    return config


# --- Result conversion ----------------------------------------------------------------------

_IFACE_1_0 = ("name", "mac", "sandbox")
_ROUTE_1_0 = ("dst", "gw")


def _pick(obj: object, keys: tuple[str, ...]) -> JsonObject:
    if not isinstance(obj, dict):
        return {}
    return {k: obj[k] for k in keys if k in obj}


def convert_result(result: JsonObject, version: str) -> JsonObject:
    """A 1.1.0 result body (no cniVersion) in the shape `version` defines, cniVersion first.

    1.0.0 lacks the interface fields mtu/socketPath/pciID and the route fields
    mtu/advmss/priority/table/scope; 0.3.x/0.4.0 also want ``version`` ("4"/"6")
    on every IP. Everything else is common to all three.
    """
    out: JsonObject = {"cniVersion": version}
    if version == SPEC_VERSION:
        out.update((k, v) for k, v in result.items() if k != "cniVersion")
        return out
    ifaces = result.get("interfaces")
    if isinstance(ifaces, list):
        out["interfaces"] = [_pick(i, _IFACE_1_0) for i in ifaces]
    ips = result.get("ips")
    if isinstance(ips, list):
        converted = []
        for ip in ips:
            entry = _pick(ip, ("interface", "address", "gateway"))
            if version.startswith("0."):
                addr = entry.get("address")
                entry = {"version": "6" if isinstance(addr, str) and ":" in addr else "4", **entry}
            converted.append(entry)
        out["ips"] = converted
    routes = result.get("routes")
    if isinstance(routes, list):
        out["routes"] = [_pick(r, _ROUTE_1_0) for r in routes]
    if isinstance(result.get("dns"), dict):
        out["dns"] = result["dns"]
    return out


# --- Talking to the agent -------------------------------------------------------------------


def encode_frame(env: dict[str, str], stdin: bytes) -> bytes:
    """The request frame for `env` (the CNI_* variables, in environ order) and `stdin`."""
    parts = [FRAME_MAGIC]
    for k, v in env.items():
        parts.append(f"{k}={v}".encode("utf-8", "surrogateescape") + b"\0")
    parts.append(b"\0")
    parts.append(stdin)
    return b"".join(parts)


def decode_frame(raw: bytes) -> tuple[dict[str, str], bytes]:
    """(environment, stdin) from a request frame; ValueError if it is not one."""
    if not raw.startswith(FRAME_MAGIC):
        raise ValueError("not a flock request frame")
    env: dict[str, str] = {}
    i = len(FRAME_MAGIC)
    while True:
        j = raw.find(b"\0", i)
        if j < 0:
            raise ValueError("request frame: the environment is not terminated")
        if j == i:
            return env, raw[j + 1 :]
        key, sep, value = raw[i:j].partition(b"=")
        if not sep or not key.startswith(b"CNI_"):
            raise ValueError(f"request frame: {raw[i:j][:60]!r} is not a CNI_* variable")
        env.setdefault(
            key.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")
        )
        i = j + 1


def encode_reply(status: int, out: JsonObject | None, notes: list[str]) -> bytes:
    """The reply frame: what the plugin would print and its exit status."""
    body = (json_dumps(out) + "\n").encode() if out is not None else b""
    err = ("\n".join(notes) + "\n").encode("utf-8", "replace") if notes else b""
    return b"%s%d %d %d\n%s%s" % (REPLY_MAGIC, status, len(body), len(err), body, err)


def call_agent(
    path: str, request: bytes, *, timeout: float, connect_wait: float
) -> JsonObject | tuple[int, bytes, bytes]:
    """One request, one reply, over the agent's unix socket (docs/cni.md, "Wire format").

    Returns (exit status, stdout, stderr) for a reply frame, or the result of an older
    agent's JSON reply. Raises AgentUnreachable when nothing answers (no socket, refused,
    timeout, a frame cut short) and Failure for a reply that is neither.
    """
    deadline = time.monotonic() + timeout
    connect_deadline = time.monotonic() + connect_wait
    while True:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError, BlockingIOError) as e:
            # BlockingIOError (EAGAIN): the agent's listen backlog is full; it is busy, not gone.
            sock.close()
            if time.monotonic() >= connect_deadline:
                why = {
                    FileNotFoundError: "no socket",
                    ConnectionRefusedError: "connection refused",
                }.get(type(e), "listen backlog full")
                raise AgentUnreachable(f"{path}: {why}") from None
            time.sleep(0.05)
        except TimeoutError:
            sock.close()
            raise AgentUnreachable(f"{path}: connect timed out after {timeout:g}s") from None
        except OSError as e:
            sock.close()
            raise AgentUnreachable(f"{path}: {e.strerror or e}") from None
    chunks: list[bytes] = []
    try:
        sock.sendall(request)
        sock.shutdown(_socket.SHUT_WR)
        size, whole = 0, -1
        while size != whole:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = sock.recv(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_REPLY:
                raise Failure(ERR_IO, f"the flock agent's reply exceeds {MAX_REPLY} bytes")
            chunks.append(chunk)
            if whole < 0:
                whole = _frame_size(chunks[0] if len(chunks) == 1 else b"".join(chunks))
    except TimeoutError:
        raise AgentUnreachable(f"{path}: no answer within {timeout:g}s") from None
    except OSError as e:
        raise AgentUnreachable(f"{path}: connection failed ({e.strerror or e})") from None
    finally:
        sock.close()
    raw = b"".join(chunks)
    if not raw:
        raise AgentUnreachable(f"{path}: the agent closed the connection without answering")
    if raw.startswith(REPLY_MAGIC[: len(raw)]):
        return _reply_frame(path, raw)
    try:
        reply = json_loads(raw)
    except ValueError as e:
        raise Failure(
            ERR_INTERNAL, "the flock agent sent a reply that is not JSON", str(e)
        ) from None
    if isinstance(reply, dict):
        err = reply.get("error")
        if isinstance(err, dict):
            code, msg, details = err.get("code"), err.get("msg"), err.get("details", "")
            if isinstance(code, int) and not isinstance(code, bool) and isinstance(msg, str):
                raise Failure(code, msg, details if isinstance(details, str) else str(details))
        result = reply.get("result")
        if isinstance(result, dict) and err is None:
            return result
    raise Failure(
        ERR_INTERNAL,
        "the flock agent sent a reply of the wrong shape",
        f"expected {{'result': {{...}}}} or {{'error': {{code, msg}}}}, got {raw[:200]!r}",
    )


def _frame_size(head: bytes) -> int:
    """The whole reply frame's length once its header is in, else -1."""
    line, nl, _ = head.partition(b"\n")
    fields = line[len(REPLY_MAGIC) :].split(b" ")
    if not nl or not line.startswith(REPLY_MAGIC) or len(fields) != 3:
        return -1
    if not all(f.isdigit() and len(f) < 10 for f in fields[1:]):
        return -1
    return len(line) + 1 + int(fields[1]) + int(fields[2])


def _reply_frame(path: str, raw: bytes) -> tuple[int, bytes, bytes]:
    head, nl, rest = raw.partition(b"\n")
    fields = head[len(REPLY_MAGIC) :].split(b" ")
    if not nl or len(fields) != 3 or not all(f.isdigit() and len(f) < 10 for f in fields):
        if not nl and len(head) < 40:  # the header itself was cut short
            raise AgentUnreachable(f"{path}: the agent closed the connection mid-reply")
        raise Failure(
            ERR_INTERNAL, "the flock agent sent a reply frame of the wrong shape", f"{raw[:200]!r}"
        )
    status, out_size, err_size = (int(f) for f in fields)
    if status not in (0, 1):
        raise Failure(ERR_INTERNAL, f"the flock agent sent exit status {status}", f"{raw[:200]!r}")
    if out_size + err_size > len(rest):
        raise AgentUnreachable(f"{path}: the agent closed the connection mid-reply")
    if out_size + err_size < len(rest):
        raise Failure(
            ERR_INTERNAL, "the flock agent sent more than its reply frame", f"{raw[:200]!r}"
        )
    return status, rest[:out_size], rest[out_size:]


def defer_del(state_dir: str, request: JsonObject) -> str:
    """Write a DEL the agent could not take to the deferred-DEL spool; returns its path."""
    spool = f"{state_dir}/{DEFERRED_DEL_DIRNAME}"
    for d in (state_dir, spool):
        try:
            posix.mkdir(d, 0o700)
        except FileExistsError:
            continue
    name = f"{request['containerID']}@{request['ifname']}.json"
    final = f"{spool}/{name}"
    tmp = f"{spool}/.{name}.{posix.getpid()}.tmp"
    data = json_dumps(request).encode()
    fd = posix.open(tmp, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC | posix.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[posix.write(fd, view) :]
        posix.fsync(fd)
    finally:
        posix.close(fd)
    posix.rename(tmp, final)
    dfd = posix.open(spool, posix.O_RDONLY | posix.O_DIRECTORY)
    try:
        posix.fsync(dfd)
    finally:
        posix.close(dfd)
    return final


# --- The verbs ------------------------------------------------------------------------------


def version_reply(stdin: bytes) -> JsonObject:
    """VERSION: echo the runtime's cniVersion when it sent one flock knows."""
    try:
        asked = config_version(json_loads(stdin)) if stdin.strip() else None
    except ValueError:
        asked = None
    return {"cniVersion": asked or SPEC_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


def error_object(version: str, code: int, msg: str, details: str = "") -> JsonObject:
    err: JsonObject = {"cniVersion": version, "code": code, "msg": msg}
    if details:
        err["details"] = details
    return err


def prepare(env: dict[str, str], stdin: bytes, notes: list[str]) -> tuple[str, JsonObject]:
    """Check what the runtime gave: (the cniVersion to answer in, the request for the agent).

    Raises Answer when the plugin answers by itself: VERSION, or a check that failed.
    The agent runs the same function on the frame it receives (it trusts no peer).
    """
    command = env.get("CNI_COMMAND", "")
    if command == "VERSION":
        raise Answer(0, version_reply(stdin))
    try:
        config: object = json_loads(stdin)
        decode_error = ""
    except ValueError as e:
        config, decode_error = None, str(e)
    version = config_version(config) or SPEC_VERSION
    try:
        if not command:
            notes.append(
                f"flock CNI plugin {PLUGIN_VERSION}; CNI versions {', '.join(SUPPORTED_VERSIONS)}"
            )
            raise Failure(
                ERR_INVALID_ENV,
                "CNI_COMMAND is not set",
                f"this program is a CNI plugin run by the container runtime; CNI_COMMAND must be "
                f"one of {', '.join(COMMANDS)}",
            )
        if command not in COMMANDS:
            raise Failure(
                ERR_INVALID_ENV,
                f"unknown CNI_COMMAND {command!r}",
                f"expected one of {', '.join(COMMANDS)}",
            )
        check_env(command, env)
        if decode_error:
            raise Failure(
                ERR_DECODE,
                "cannot decode the network config on stdin",
                f"{decode_error}; the runtime must pass the network config as JSON on stdin",
            )
        conf = check_config(command, config)
        args = parse_cni_args(env.get("CNI_ARGS", ""))
    except Failure as f:
        raise Answer(1, error_object(version, f.code, f.msg, f.details)) from None
    return version, {
        "command": command,
        "containerID": env.get("CNI_CONTAINERID", ""),
        "netns": env.get("CNI_NETNS", ""),
        "ifname": env.get("CNI_IFNAME", ""),
        "args": args,
        "path": env.get("CNI_PATH", ""),
        "config": conf,
    }


def finish(command: str, version: str, result: JsonObject) -> tuple[int, JsonObject | None]:
    """The agent's 1.1.0 result as printed: converted for ADD, nothing for the other verbs."""
    if command == "ADD":
        return 0, convert_result(result, version)
    return 0, None


def run(
    env: dict[str, str], stdin: bytes, log: list[str] | None = None
) -> tuple[int, JsonObject | None]:
    """Everything but the process plumbing: returns (exit status, JSON to print or None).

    `log` collects lines meant for stderr.
    """
    notes = log if log is not None else []
    try:
        version, request = prepare(env, stdin, notes)
    except Answer as a:
        return a.status, a.out
    try:
        return forward(request, version, encode_frame(env, stdin), notes)
    except Failure as f:
        return 1, error_object(version, f.code, f.msg, f.details)


def forward(
    request: JsonObject, version: str, frame: bytes, notes: list[str]
) -> tuple[int, JsonObject | None]:
    """Send `frame` to the agent; (exit status, output). An unreachable agent fails the
    verb with a code the runtime retries on, except DEL, which is recorded for later."""
    command = request["command"]
    assert isinstance(command, str)
    conf = request["config"]
    assert isinstance(conf, dict)
    sock = conf.get("agentSocket")
    sock_path = sock if isinstance(sock, str) else DEFAULT_AGENT_SOCKET
    raw_timeout = conf.get("agentTimeout")
    timeout = float(raw_timeout) if isinstance(raw_timeout, int | float) else DEFAULT_AGENT_TIMEOUT
    if command == "STATUS":
        timeout = min(timeout, STATUS_TIMEOUT)
    try:
        reply = call_agent(
            sock_path,
            frame,
            timeout=timeout,
            connect_wait=0.0 if command == "STATUS" else min(CONNECT_WAIT, timeout),
        )
    except AgentUnreachable as e:
        if command == "STATUS":
            raise Failure(
                ERR_NOT_AVAILABLE, "the flock agent is not reachable", f"{e.detail}; {_HINT_AGENT}"
            ) from None
        if command != "DEL":
            raise Failure(
                ERR_TRY_AGAIN,
                "the flock agent is not reachable",
                f"{e.detail}; {_HINT_AGENT}",
            ) from None
        state = conf.get("stateDir")
        state_dir = state if isinstance(state, str) else DEFAULT_STATE_DIR
        try:
            where = defer_del(state_dir, request)
        except OSError as oe:
            raise Failure(
                ERR_TRY_AGAIN,
                "the flock agent is not reachable and the DEL could not be recorded for it",
                f"{e.detail}; recording under {state_dir}/{DEFERRED_DEL_DIRNAME} failed: {oe}",
            ) from None
        notes.append(
            f"flock: agent unreachable ({e.detail}); DEL recorded in {where} for the agent"
        )
        return 0, None
    if isinstance(reply, dict):  # an agent from before the frame: the result to convert
        return finish(command, version, reply)
    status, out, err = reply
    if err:
        notes.append(err.decode("utf-8", "replace").rstrip("\n"))
    if not out:
        return status, None
    try:
        printed = json_loads(out)
    except ValueError as e:
        raise Failure(ERR_INTERNAL, "the flock agent's output is not JSON", str(e)) from None
    if not isinstance(printed, dict):
        raise Failure(
            ERR_INTERNAL, "the flock agent's output is not a JSON object", f"{out[:200]!r}"
        )
    return status, printed


def _environ() -> dict[str, str]:
    return {
        k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
        for k, v in posix.environ.items()
        if k.startswith(b"CNI_")
    }


def _read_stdin(*, optional: bool = False) -> bytes:
    """All of stdin. `optional` (VERSION): give up if nothing arrives within 0.2 s.

    The spec gives VERSION a config on stdin, but a runtime that leaves stdin
    open and empty must not hang the probe.
    """
    if posix.isatty(0):
        return b""
    if optional:
        import select  # built into CPython's binary: no import cost

        if not select.select([0], [], [], 0.2)[0]:
            return b""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = posix.read(0, 65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_STDIN:
            raise Failure(ERR_IO, f"the network config on stdin exceeds {MAX_STDIN} bytes")
        chunks.append(chunk)


def main() -> int:
    env: dict[str, str] = {}
    notes: list[str] = []
    try:
        env = _environ()
        try:
            stdin = _read_stdin(optional=env.get("CNI_COMMAND") == "VERSION")
        except OSError as e:
            raise Failure(ERR_IO, "cannot read the network config from stdin", str(e)) from None
        status, out = run(env, stdin, notes)
    except Failure as f:
        status, out = (
            1,
            {"cniVersion": SPEC_VERSION, "code": f.code, "msg": f.msg, "details": f.details},
        )
    except Exception as e:  # last resort: a CNI error, never a traceback
        status = 1
        out = {
            "cniVersion": SPEC_VERSION,
            "code": ERR_INTERNAL,
            "msg": "internal error in the flock CNI plugin",
            "details": f"{type(e).__name__}: {e} (command {env.get('CNI_COMMAND', '?')})",
        }
    try:
        if notes:
            sys.stderr.write("\n".join(notes) + "\n")
            sys.stderr.flush()
        if out is not None:
            sys.stdout.buffer.write(json_dumps(out).encode() + b"\n")
            sys.stdout.buffer.flush()
    except (OSError, ValueError):
        # stdout is gone (closed pipe): point fd 1 at /dev/null, or the interpreter's own
        # flush at exit fails again and turns the exit status into 120.
        try:  # noqa: SIM105 - contextlib is an import the plugin does not pay for
            posix.dup2(posix.open("/dev/null", posix.O_WRONLY), 1)
        except OSError:
            pass
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
