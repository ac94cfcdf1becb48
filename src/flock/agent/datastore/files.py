"""Standalone datastore: a directory of Kubernetes-shaped YAML manifests.

Standalone mode (the lab, the tests, small bare-metal setups) has no API
server. The operator, or a test, writes the same objects `kubectl` would accept
(NodeConfig, Pod, Namespace, NetworkPolicy, Secret; multi-document files and
`kind: List` are fine) into one directory, and the agent follows it.

Why inotify, read directly through ctypes, rather than polling or a library:
a Pod's Ready flip gates anycast withdraw latency, so a change must reach the
agent in well under a millisecond. inotify wakes the event loop as soon as the
writer closes (or renames) a file; polling would add its period to every
withdraw, and `watchfiles` debounces changes by design (and pulls in anyio).
The interface is four syscalls, so no dependency is worth it. A full rescan
(stat-based: only changed files are re-parsed) still runs every
`rescan_interval` seconds as a safety net, after an inotify queue overflow, and
as the whole mechanism where inotify is unavailable.

The ADD race: a runtime can call ADD right after the pod's manifest is written,
before the event loop has read the inotify event. `get_pod` therefore first
drains the inotify queue synchronously (the kernel queues the event when the
writer closes the file, so it is there by then), and if the pod is still
unknown, rescans the directory before answering.

Files are parsed with libyaml. A file that does not parse (a writer caught
half-way, a typo) is logged with its path and reason and its previous good
content is kept, so that a torn write never looks like pods vanished (which
would withdraw their anycast routes). A single bad object is logged with file,
document index and reason, and skipped. Hidden files and editor leftovers are
ignored.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flock.agent.datastore.base import (
    Event,
    EventType,
    Kind,
    NodeConfigUnavailable,
    PodEvent,
    PodKey,
    Snapshot,
)
from flock.model.nodeconfig import API_VERSION, NodeConfig, NodeConfigError
from flock.model.pod import Namespace, Pod

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")
POLL_INTERVAL = 0.2  # seconds, only while the directory cannot be watched

_Loader: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# (kind, namespace, name) identifies one object in the merged view.
ObjKey = tuple[Kind, str, str]


@dataclass(frozen=True, slots=True)
class _FileState:
    signature: tuple[int, int, int, int]  # (ino, size, mtime_ns, ctime_ns)
    objects: Mapping[ObjKey, Any]


class ManifestError(ValueError):
    """One manifest object that cannot be used; the message says which and why."""


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _wanted(name: str) -> bool:
    return name.endswith(SUFFIXES) and not name.startswith(".") and not name.endswith("~")


def _decode_secret(obj: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (obj.get("data") or {}).items():
        try:
            out[str(k)] = base64.b64decode(str(v), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as e:
            raise ManifestError(f"data.{k} is not valid base64 text ({e})") from None
    for k, v in (obj.get("stringData") or {}).items():
        out[str(k)] = str(v)
    return out


def parse_object(obj: Any, *, node_name: str) -> tuple[ObjKey, Any] | None:
    """One manifest object to (key, typed value); None for kinds the agent ignores.

    Raises ManifestError naming what is wrong.
    """
    if not isinstance(obj, Mapping):
        raise ManifestError(f"expected a mapping, got {type(obj).__name__}")
    api, kind = obj.get("apiVersion"), obj.get("kind")
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str):
        raise ManifestError(f"{kind or 'object'} without metadata.name")
    name: str = meta["name"]
    ns = str(meta.get("namespace") or "default")
    try:
        if kind == "NodeConfig" and api == API_VERSION:
            if name != node_name:
                return None  # another node's; not ours to validate
            return (Kind.NODE_CONFIG, "", name), NodeConfig.from_object(obj)
        if api == "v1" and kind == "Pod":
            return (Kind.POD, ns, name), Pod.from_object(obj)
        if api == "v1" and kind == "Namespace":
            return (Kind.NAMESPACE, "", name), Namespace.from_object(obj)
        if api == "v1" and kind == "Secret":
            return (Kind.SECRET, ns, name), _decode_secret(obj)
        if api == "networking.k8s.io/v1" and kind == "NetworkPolicy":
            return (Kind.NETWORK_POLICY, ns, name), dict(obj)
    except NodeConfigError as e:
        raise ManifestError(str(e)) from None
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"{kind} {ns}/{name}: {type(e).__name__}: {e}") from None
    return None


def parse_documents(docs: list[Any], *, node_name: str, source: str) -> dict[ObjKey, Any]:
    """Every usable object of one file; bad ones are logged (file, index, reason) and skipped."""
    out: dict[ObjKey, Any] = {}

    def items() -> Iterator[tuple[str, Any]]:
        for i, doc in enumerate(docs):
            if doc is None:
                continue
            if isinstance(doc, Mapping) and doc.get("kind") == "List":
                for j, item in enumerate(doc.get("items") or []):
                    yield f"{i}.items[{j}]", item
            else:
                yield str(i), doc

    for where, doc in items():
        try:
            parsed = parse_object(doc, node_name=node_name)
        except ManifestError as e:
            log.warning(
                "skipping bad manifest object",
                extra={"file": source, "document": where, "reason": str(e)},
            )
            continue
        if parsed is not None:
            out[parsed[0]] = parsed[1]
    return out


class _Inotify:
    """The four inotify calls the datastore needs, via libc."""

    IN_MODIFY = 0x002
    IN_ATTRIB = 0x004
    IN_CLOSE_WRITE = 0x008
    IN_MOVED_FROM = 0x040
    IN_MOVED_TO = 0x080
    IN_CREATE = 0x100
    IN_DELETE = 0x200
    IN_DELETE_SELF = 0x400
    IN_MOVE_SELF = 0x800
    IN_Q_OVERFLOW = 0x4000
    IN_IGNORED = 0x8000
    IN_NONBLOCK = 0o4000
    IN_CLOEXEC = 0o2000000
    _HEADER = struct.Struct("iIII")

    def __init__(self, directory: Path) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fd = libc.inotify_init1(self.IN_NONBLOCK | self.IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        # Close-write and renames, not every write: a file is read once complete.
        mask = (
            self.IN_CLOSE_WRITE
            | self.IN_MOVED_FROM
            | self.IN_MOVED_TO
            | self.IN_DELETE
            | self.IN_ATTRIB
            | self.IN_DELETE_SELF
            | self.IN_MOVE_SELF
        )
        wd = libc.inotify_add_watch(fd, os.fsencode(directory), mask)
        if wd < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch({directory}) failed")
        self.fd: int = fd

    def read(self) -> tuple[set[str], bool]:
        """Pending events as (changed file names, needs full rescan)."""
        names: set[str] = set()
        rescan = False
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            off = 0
            while off + self._HEADER.size <= len(buf):
                _wd, mask, _cookie, length = self._HEADER.unpack_from(buf, off)
                off += self._HEADER.size
                raw = buf[off : off + length].split(b"\0", 1)[0]
                off += length
                if mask & (
                    self.IN_Q_OVERFLOW | self.IN_IGNORED | self.IN_DELETE_SELF | self.IN_MOVE_SELF
                ):
                    rescan = True
                elif raw:
                    names.add(os.fsdecode(raw))
        return names, rescan

    def close(self) -> None:
        os.close(self.fd)


class FilesDatastore:
    """A `Datastore` following one directory of manifests (not recursive)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        node_name: str,
        rescan_interval: float = 30.0,
        use_inotify: bool = True,
    ) -> None:
        self._dir = Path(directory)
        self._node_name = node_name
        self._rescan_interval = rescan_interval
        self._use_inotify = use_inotify
        self._files: dict[str, _FileState] = {}
        # Merged view: key -> (value, file that provided it).
        self._objects: dict[ObjKey, tuple[Any, str]] = {}
        # The same objects by kind, keyed (namespace, name), kept in step with _objects.
        self._by_kind: dict[Kind, dict[PodKey, Any]] = {k: {} for k in Kind}
        self._snap: Snapshot | None = None
        self._subscribers: list[asyncio.Queue[Event]] = []
        self._synced = asyncio.Event()
        self._inotify: _Inotify | None = None
        self._task: asyncio.Task[None] | None = None
        self._warned = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # Files that do not parse, and files whose copy of our NodeConfig is invalid.
        self.file_errors: dict[str, str] = {}
        self.events: list[PodEvent] = []
        self._nc_errors: dict[str, str] = {}

    # -- Datastore protocol ---------------------------------------------------------

    @property
    def node_name(self) -> str:
        return self._node_name

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def watching(self) -> bool:
        """Whether an inotify watch is armed (False: the directory is polled)."""
        return self._inotify is not None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # Watch first, then list: a change between the two is seen twice, never missed.
        self._arm()
        self._full_rescan()
        self._synced.set()
        self._snap = None
        self._emit(Event(None, EventType.RESYNC))
        self._task = asyncio.create_task(self._rescan_loop(), name="files-datastore-rescan")

    def _arm(self) -> bool:
        """(Re)create the inotify watch; False (and polling) while that is impossible,
        e.g. the directory does not exist yet."""
        if not self._use_inotify or self._inotify is not None or self._loop is None:
            return self._inotify is not None
        try:
            self._inotify = _Inotify(self._dir)
        except OSError as e:
            if not self._warned:
                log.warning(
                    "cannot watch the manifests directory, polling it until it can be watched",
                    extra={"directory": str(self._dir), "reason": str(e)},
                )
                self._warned = True
            return False
        self._loop.add_reader(self._inotify.fd, self._on_inotify)
        self._warned = False
        return True

    def _disarm(self) -> None:
        if self._inotify is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._inotify.fd)
            self._inotify.close()
            self._inotify = None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._disarm()

    async def wait_synced(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._synced.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def snapshot(self) -> Snapshot:
        """The current view; cached until something changes (a pass per event stays cheap)."""
        if self._snap is None:
            entry = self._objects.get((Kind.NODE_CONFIG, "", self._node_name))
            self._snap = Snapshot(
                node_name=self._node_name,
                node_config=entry[0] if entry else None,
                node_config_error="" if entry else self._node_config_error(),
                pods=self._by_kind[Kind.POD].copy(),
                namespaces={k[1]: v for k, v in self._by_kind[Kind.NAMESPACE].items()},
                network_policies=self._by_kind[Kind.NETWORK_POLICY].copy(),
                synced=self.synced,
            )
        return self._snap

    def subscribe(self) -> asyncio.Queue[Event]:
        q: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers.append(q)
        return q

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        if queue in self._subscribers:
            self._subscribers.remove(queue)

    async def get_pod(self, namespace: str, name: str) -> Pod | None:
        return self._read_through((Kind.POD, namespace, name))  # type: ignore[no-any-return]

    async def get_node_config(self) -> NodeConfig:
        nc = self._read_through((Kind.NODE_CONFIG, "", self._node_name))
        if nc is None:
            raise NodeConfigUnavailable(self._node_config_error())
        return nc  # type: ignore[no-any-return]

    async def get_secret(self, namespace: str, name: str, key: str) -> str | None:
        data = self._read_through((Kind.SECRET, namespace, name))
        if data is None:
            return None
        value = data.get(key)
        return value if isinstance(value, str) else None

    async def record_event(self, event: PodEvent) -> None:
        """Standalone mode has no API server: the event is a structured log line and
        stays in `events` (the last 256) for `flock status`."""
        self.events.append(event)
        del self.events[:-256]
        log.warning(
            "pod event",
            extra={
                "event_reason": event.reason,
                "pod": f"{event.namespace}/{event.name}",
                "event_message": event.message,
            },
        )

    # -- internals ------------------------------------------------------------------

    def _read_through(self, key: ObjKey) -> Any:
        self.drain()
        entry = self._objects.get(key)
        if entry is None:
            # Not delivered yet, or an event was lost: look at the directory itself.
            self._full_rescan()
            entry = self._objects.get(key)
        return entry[0] if entry else None

    def drain(self) -> None:
        """Apply every change the kernel has queued, synchronously."""
        if self._inotify is None:
            return
        names, rescan = self._inotify.read()
        if rescan:
            # Overflow, or the directory itself went away or moved: re-arm the watch
            # (it may be gone) and read everything again.
            self._disarm()
            self._arm()
            self._full_rescan()
            return
        for n in sorted(names):
            if _wanted(n):
                self._rescan_file(n)

    def _on_inotify(self) -> None:
        try:
            self.drain()
        except Exception:
            log.exception("manifest watch failed; will rescan", extra={"dir": str(self._dir)})

    async def _rescan_loop(self) -> None:
        last = time.monotonic()
        while True:
            # Tick often; rescan everything only without a watch (readiness flips gate
            # anycast withdraws) or every rescan_interval as a safety net.
            await asyncio.sleep(POLL_INTERVAL)
            try:
                armed = self._inotify is None and self._arm()
                if armed:  # watch first, then list everything (as at start)
                    log.info("watching the manifests directory", extra={"dir": str(self._dir)})
                due = time.monotonic() - last >= self._rescan_interval
                if armed or due or self._inotify is None:
                    last = time.monotonic()
                    self._full_rescan()
            except Exception:
                log.exception("manifest rescan failed", extra={"dir": str(self._dir)})

    def _node_config_error(self) -> str:
        for path, reason in self._nc_errors.items():
            return f"NodeConfig {self._node_name!r} in {path} is invalid: {reason}"
        return f"no NodeConfig named {self._node_name!r} (apiVersion {API_VERSION}) in {self._dir}"

    def _full_rescan(self) -> None:
        try:
            present = {n for n in os.listdir(self._dir) if _wanted(n)}
        except FileNotFoundError:
            present = set()
        for n in sorted(present | set(self._files)):
            self._rescan_file(n)

    def _rescan_file(self, name: str) -> None:
        path = self._dir / name
        old = self._files.get(name)
        self._snap = None  # error texts may change even when no object does
        try:
            st = path.stat()
        except FileNotFoundError:
            if old is not None:
                del self._files[name]
                self.file_errors.pop(str(path), None)
                self._nc_errors.pop(str(path), None)
                self._replace(name, old.objects, {})
            else:
                self.file_errors.pop(str(path), None)
            return
        sig = _signature(st)
        if old is not None and old.signature == sig:
            return
        try:
            with path.open("rb") as f:
                docs = list(yaml.load_all(f, Loader=_Loader))
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
            reason = str(e).replace("\n", " ")
            self.file_errors[str(path)] = reason
            log.warning(
                "skipping manifest file that does not parse (keeping its previous content)",
                extra={"file": str(path), "reason": reason},
            )
            return
        objects = parse_documents(docs, node_name=self._node_name, source=str(path))
        self._note_nodeconfig_error(path, docs)
        self._files[name] = _FileState(signature=sig, objects=objects)
        self._replace(name, old.objects if old else {}, objects)

    def _note_nodeconfig_error(self, path: Path, docs: list[Any]) -> None:
        """Remember why our NodeConfig was rejected, so ADD/STATUS can say it."""
        self.file_errors.pop(str(path), None)
        self._nc_errors.pop(str(path), None)
        for doc in docs:
            if (
                isinstance(doc, Mapping)
                and doc.get("kind") == "NodeConfig"
                and (doc.get("metadata") or {}).get("name") == self._node_name
            ):
                try:
                    NodeConfig.from_object(doc)
                except NodeConfigError as e:
                    self._nc_errors[str(path)] = str(e)

    def _replace(self, source: str, old: Mapping[ObjKey, Any], new: Mapping[ObjKey, Any]) -> None:
        for key in old.keys() - new.keys():
            entry = self._objects.get(key)
            if entry is not None and entry[1] == source:
                del self._objects[key]
                del self._by_kind[key[0]][(key[1], key[2])]
                self._snap = None
                self._emit(Event(key[0], EventType.DELETED, key[1], key[2]))
        for key, value in new.items():
            entry = self._objects.get(key)
            if entry is not None and entry[1] != source:
                log.warning(
                    "object defined in two files; the later one wins",
                    extra={"object": f"{key[0]} {key[1]}/{key[2]}", "files": [entry[1], source]},
                )
            if entry is None:
                self._set(key, value, source)
                self._emit(Event(key[0], EventType.ADDED, key[1], key[2]))
            elif entry[0] != value or entry[1] != source:
                # Unchanged objects keep their identity (consumers cache by it).
                self._set(key, value if entry[0] != value else entry[0], source)
                self._emit(Event(key[0], EventType.MODIFIED, key[1], key[2]))

    def _set(self, key: ObjKey, value: Any, source: str) -> None:
        self._objects[key] = (value, source)
        self._by_kind[key[0]][(key[1], key[2])] = value
        self._snap = None

    def _emit(self, event: Event) -> None:
        for q in self._subscribers:
            q.put_nowait(event)


__all__ = ["FilesDatastore", "ManifestError", "NodeConfigUnavailable", "parse_object"]
