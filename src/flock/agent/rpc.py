"""The agent's end of the plugin <-> agent RPC: a unix-socket server (docs/architecture.md).

One JSON request per connection: the plugin writes it, half-closes, and reads
one JSON reply until EOF. This module owns the transport and its failure modes
so that the CNI verbs never see them:

- the socket file is created with mode 0600 under a temporary name and renamed
  into place, so there is no moment at which another user could connect, and a
  stale socket from a crashed agent is replaced atomically; a socket that a
  live process still serves is never stolen;
- every connection is its own task (concurrent requests); a request is bounded
  in size and in the time the peer may take to send it;
- the request is checked into a `CniRequest` before the handler runs; a
  `CniError` from the handler becomes ``{"error": ...}``; any other exception is
  logged with its traceback and becomes a 999 error naming it. The server keeps
  serving whatever a handler or a peer does.

It also replays the DELs the plugin recorded while the agent was unreachable
(see flock.cni.plugin) and has a small client used by tests and tools.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from flock.cni import plugin
from flock.cni.plugin import DEFERRED_DEL_DIRNAME as DEFERRED_DEL_DIRNAME
from flock.model.cni import ERR_DECODE, ERR_INTERNAL, ERR_IO, CniError, CniRequest

log = logging.getLogger(__name__)

Handler = Callable[[CniRequest], Awaitable[dict[str, Any]]]

# GC lists every live attachment (~100 bytes each); a frame adds the environment to stdin.
MAX_REQUEST = plugin.MAX_STDIN + (1 << 20)
READ_TIMEOUT = 30.0


# allow_nan=False: NaN is not JSON; better a 999 naming it than a reply no runtime parses.
# One encoder for every reply (json.dumps would build one per call for this option).
_encode_reply = json.JSONEncoder(allow_nan=False).encode


class SocketInUse(RuntimeError):
    """Another live process is serving the socket path."""


def _prepare_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return  # stale: left behind by an agent that died
    except OSError as e:
        log.warning("probing existing socket failed; replacing it", extra={"error": str(e)})
        return
    finally:
        probe.close()
    raise SocketInUse(f"{path} is served by another live process (another flock agent?)")


def _bind(path: Path) -> socket.socket:
    """A listening socket at `path` (see `bind_private`); a live server's socket is never stolen."""
    _prepare_path(path)
    return bind_private(path, backlog=512)


def bind_private(path: Path, *, backlog: int) -> socket.socket:
    """A non-blocking listening socket at `path`, mode 0600 from the first moment it is reachable.

    An existing file at `path` is replaced atomically; the caller decides whether that is safe.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # No umask games (the umask is process-wide): nobody can connect before
        # listen(), and by then the mode is 0600 and only then is the name public.
        sock.bind(str(tmp))
        os.chmod(tmp, 0o600)
        sock.listen(backlog)
        os.replace(tmp, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    sock.setblocking(False)
    return sock


def error_reply(code: int, msg: str, details: str = "") -> bytes:
    return json.dumps({"error": CniError(code, msg, details).to_wire()}).encode()


async def _read_request(reader: asyncio.StreamReader, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise CniError(ERR_IO, f"RPC request exceeds {limit} bytes")
        chunks.append(chunk)


async def _answer(raw: bytes, handler: Handler) -> tuple[bytes, str, str]:
    """(reply bytes, command, outcome) for one raw request."""
    command = "?"
    try:
        try:
            msg = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise CniError(ERR_DECODE, "RPC request is not valid JSON", str(e)) from None
        req = CniRequest.from_wire(msg)
        command = req.command
        result = await handler(req)
        if not isinstance(result, dict):
            raise TypeError(f"handler returned {type(result).__name__}, not a dict")
        return _encode_reply({"result": result}).encode(), command, "ok"
    except CniError as e:
        return json.dumps({"error": e.to_wire()}).encode(), command, f"error {e.code}"
    except Exception as e:
        log.exception("CNI %s: unexpected failure in the agent", command)
        reply = error_reply(
            ERR_INTERNAL,
            f"flock agent: internal error during {command}: {type(e).__name__}: {e}",
            "this is a bug in flock; the agent log has the traceback",
        )
        return reply, command, "internal error"


async def _answer_frame(raw: bytes, handler: Handler) -> tuple[bytes, str, str]:
    """(reply frame, command, outcome) for a request frame (docs/cni.md, "Wire format").

    The frame carries the runtime's CNI_* environment and stdin as they were: the
    plugin's own checks (`plugin.prepare`) turn them into the request, and the reply
    is exactly what the plugin prints, so the native launcher only copies it.
    """
    notes: list[str] = []
    version, command = plugin.SPEC_VERSION, "?"
    try:
        try:
            env, stdin = plugin.decode_frame(raw)
        except ValueError as e:
            raise CniError(ERR_DECODE, "RPC request is not a valid frame", str(e)) from None
        command = env.get("CNI_COMMAND", "?")
        version, request = plugin.prepare(env, stdin, notes)
        req = CniRequest.from_wire(request)
        result = await handler(req)
        if not isinstance(result, dict):
            raise TypeError(f"handler returned {type(result).__name__}, not a dict")
        status, out = plugin.finish(req.command, version, result)
        outcome = "ok"
    except plugin.Answer as a:
        status, out = a.status, a.out
        outcome = f"error {a.out.get('code')}" if a.status and a.out else "ok"
    except CniError as e:
        status, out = 1, plugin.error_object(version, e.code, e.msg, e.details)
        outcome = f"error {e.code}"
    except Exception as e:
        log.exception("CNI %s: unexpected failure in the agent", command)
        status, out, outcome = 1, _internal(version, command, e), "internal error"
    try:
        return plugin.encode_reply(status, out, notes), command, outcome
    except ValueError as e:  # a result JSON cannot carry (NaN)
        log.exception("CNI %s: result not encodable", command)
        return (
            plugin.encode_reply(1, _internal(version, command, e), notes),
            command,
            "internal error",
        )


def _internal(version: str, command: str, e: Exception) -> dict[str, object]:
    return plugin.error_object(
        version,
        ERR_INTERNAL,
        f"flock agent: internal error during {command}: {type(e).__name__}: {e}",
        "this is a bug in flock; the agent log has the traceback",
    )


async def serve(
    path: Path,
    handler: Handler,
    *,
    max_request: int = MAX_REQUEST,
    read_timeout: float = READ_TIMEOUT,
) -> asyncio.Server:
    """Start serving the plugin RPC at `path`; the returned server is already serving.

    Close it with ``server.close(); await server.wait_closed()``; the socket file
    is removed by `close_and_unlink` (a leftover one is replaced at the next start).
    """
    sock = _bind(path)

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        start = time.perf_counter()
        command, outcome = "?", "aborted"
        try:
            try:
                # asyncio.timeout, not wait_for: no extra task (and loop pass) per request.
                async with asyncio.timeout(read_timeout):
                    raw = await _read_request(reader, max_request)
            except TimeoutError:
                reply = error_reply(ERR_IO, f"RPC request not received within {read_timeout:g}s")
                outcome = "timeout"
            except CniError as e:
                reply = json.dumps({"error": e.to_wire()}).encode()
                outcome = f"error {e.code}"
            else:
                if raw.startswith(plugin.FRAME_MAGIC):
                    reply, command, outcome = await _answer_frame(raw, handler)
                else:
                    reply, command, outcome = await _answer(raw, handler)
            writer.write(reply)
            await writer.drain()
        except OSError as e:
            log.info("CNI %s: peer went away: %s", command, e)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "CNI %s %s",
                    command,
                    outcome,
                    extra={
                        "verb": command,
                        "outcome": outcome,
                        "ms": round((time.perf_counter() - start) * 1000, 3),
                    },
                )

    server = await asyncio.start_unix_server(on_connection, sock=sock, limit=65536)
    log.info("RPC server listening", extra={"socket": str(path)})
    return server


@contextlib.contextmanager
def serving_in_thread(path: Path, handler: Handler, *, timeout: float = 10.0) -> Iterator[None]:
    """`serve(path, handler)` on its own event loop in a background thread, for one block.

    For tests, benchmarks and tools that drive the plugin synchronously. Raises
    TimeoutError if the server is not serving within `timeout`; the socket file is
    removed (`close_and_unlink`) when the block ends.
    """
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(serve(path, handler))
        ready.set()
        loop.run_forever()
        loop.run_until_complete(close_and_unlink(server, path))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        if not ready.wait(timeout):
            raise TimeoutError(f"RPC server at {path} not serving within {timeout:g}s")
        yield
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(timeout)
        loop.close()


async def close_and_unlink(server: asyncio.Server, path: Path) -> None:
    """Stop serving and remove the socket file (only if it is still ours)."""
    sockets = server.sockets
    inode = None
    if sockets:
        with contextlib.suppress(OSError):
            inode = os.stat(path).st_ino
    server.close()
    await server.wait_closed()
    with contextlib.suppress(FileNotFoundError):
        if inode is not None and os.stat(path).st_ino == inode:
            path.unlink()


# --- Deferred DELs --------------------------------------------------------------------------


def deferred_dels(state_dir: Path) -> list[tuple[Path, CniRequest | CniError]]:
    """The DELs the plugin recorded while the agent was unreachable, oldest first."""
    spool = state_dir / DEFERRED_DEL_DIRNAME
    try:
        files = [p for p in spool.iterdir() if p.suffix == ".json" and not p.name.startswith(".")]
    except FileNotFoundError:
        return []
    files.sort(key=lambda p: p.stat().st_mtime)
    out: list[tuple[Path, CniRequest | CniError]] = []
    for p in files:
        try:
            req = CniRequest.from_wire(json.loads(p.read_bytes()))
            if req.command != "DEL":
                raise CniError(ERR_DECODE, f"deferred request is {req.command}, not DEL")
            out.append((p, req))
        except (ValueError, OSError) as e:
            out.append((p, CniError(ERR_DECODE, f"unreadable deferred DEL {p.name}", str(e))))
        except CniError as e:
            out.append((p, e))
    return out


async def replay_deferred_dels(state_dir: Path, handler: Handler) -> int:
    """Run every recorded DEL through `handler`; returns how many completed.

    A file is removed once its DEL succeeded, or when it cannot be parsed (it
    could never succeed; it is logged). A DEL that fails stays for the next start.
    Call this after the allocation store is loaded and before serving ADDs.
    """
    done = 0
    for p, item in deferred_dels(state_dir):
        if isinstance(item, CniError):
            log.error("dropping deferred DEL %s: %s (%s)", p.name, item.msg, item.details)
            p.unlink(missing_ok=True)
            continue
        try:
            await handler(item)
        except Exception as e:
            log.warning("deferred DEL %s failed, kept for the next start: %s", p.name, e)
            continue
        p.unlink(missing_ok=True)
        done += 1
        log.info("deferred DEL replayed", extra={"container_id": item.container_id})
    return done


async def replay_deferred_dels_forever(
    state_dir: Path, handler: Handler, *, interval: float = 10.0
) -> None:
    """Replay deferred DELs every `interval` seconds until cancelled.

    The start-up replay cannot see a DEL that a plugin recorded while the agent
    was starting (it found no socket yet, then wrote its record just after the
    replay ran); this pass picks such records up within `interval`.
    """
    while True:
        await asyncio.sleep(interval)
        try:
            await replay_deferred_dels(state_dir, handler)
        except Exception:
            log.exception("replaying deferred DELs failed; retrying in %gs", interval)


# --- Client ---------------------------------------------------------------------------------


async def request(path: Path, message: dict[str, Any], *, timeout: float = 30.0) -> dict[str, Any]:
    """Send one RPC request the way the plugin does and return the decoded reply."""

    async def exchange() -> bytes:
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            writer.write(json.dumps(message).encode())
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            return await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    raw = await asyncio.wait_for(exchange(), timeout)
    reply = json.loads(raw)
    if not isinstance(reply, dict):
        raise ValueError(f"RPC reply is not an object: {raw[:200]!r}")
    return reply


def call(
    path: Path, message: dict[str, Any] | bytes, *, timeout: float = 30.0, what: str = "RPC"
) -> dict[str, Any]:
    """Blocking variant of `request`, for tests and tools (bytes are sent as they are).

    `what` names the service in the error raised when the reply is not a JSON object.
    """
    raw = message if isinstance(message, bytes) else json.dumps(message).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    reply = json.loads(b"".join(chunks))
    if not isinstance(reply, dict):
        raise ValueError(f"{what} reply is not an object")
    return reply
