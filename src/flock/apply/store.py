"""Crash-safe persistence of the node's allocations under the state directory.

The allocation store is what stops an agent restart from handing out an address
twice, so it never guesses: a snapshot or journal it cannot read completely is a
`StoreError` naming the file, never a silent reset.

Layout (default state directory /var/lib/flock):

* `allocations.json` -- a snapshot,
  `{"schemaVersion": 1, "seq": N, "crc32": "...", "allocations": [...]}` with one
  allocation per line and a CRC-32 over those lines (so bit rot that still parses
  as JSON is caught too). It is only ever replaced whole: written to a temp file
  in the same directory, fsynced, renamed over the old one, directory fsynced.
* `allocations.journal` -- an append-only log of changes made since that
  snapshot, one line per record: `<crc32 hex> <json>\\n` where the JSON is
  `{"seq": n, "op": "put", "allocation": {...}}` or `{"seq": n, "op": "del", "key": {...}}`.
  Each append is fsynced (fdatasync) before the call returns, so a change the
  agent acted on is on disk.

Rewriting 100,000 allocations costs hundreds of milliseconds, far too much for
every ADD; appending one record costs one small write and one fdatasync. When the
journal grows past `compact_every` records the store writes a fresh snapshot and
starts a new journal (see docs/ipam.md for the crash-safety argument).

Compaction is off the request path: the store thread only renames the journal to
`allocations.journal.<seq>.old` (records up to seq) and takes a list of the
allocations' JSON lines; a background thread writes the snapshot (seq) and then
removes the old journals it covers. Changes go on being appended to a fresh
journal meanwhile. `load()` replays the old journals in seq order, then the
journal, so a crash at any point of a compaction loses nothing.

Recovery rule: only the final journal line may be torn (no trailing newline, or
a bad checksum on the last line), because only the record being appended when
the process died can be incomplete, and that record was never acknowledged;
it is dropped (and cut off the file). Anything else unreadable is a StoreError.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import socket
import threading
import time
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flock.durable import fsync_dir, write_all
from flock.model.allocation import Allocation, AttachmentKey, IPAddress

SCHEMA_VERSION = 1
SNAPSHOT_NAME = "allocations.json"
JOURNAL_NAME = "allocations.journal"
OLD_JOURNAL_SUFFIX = ".old"  # allocations.journal.<seq>.old, while a compaction runs
LOCK_NAME = "allocations.lock"
DEFAULT_STATE_DIR = Path("/var/lib/flock")


log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """The persisted state cannot be trusted; the message names the file and the problem."""


class StoreLockedError(StoreError):
    """Another process has the state directory open: two agents must never share it."""


# ---- (de)serialisation -----------------------------------------------------------


def allocation_to_dict(a: Allocation) -> dict[str, Any]:
    """The JSON shape of one allocation (also what `flock status` prints)."""
    return {
        "containerID": a.key.container_id,
        "ifname": a.key.ifname,
        "namespace": a.namespace,
        "pod": a.pod,
        "podUID": a.pod_uid,
        "netns": a.netns,
        "hostIfname": a.host_ifname,
        "v6": str(a.v6) if a.v6 is not None else None,
        "v4": str(a.v4) if a.v4 is not None else None,
        "v6Supplied": a.v6_supplied,
        "v4Supplied": a.v4_supplied,
        "extraAddresses": [str(x) for x in a.extra_addresses],
        "anycast": [str(x) for x in a.anycast],
    }


def _key_to_dict(k: AttachmentKey) -> dict[str, str]:
    return {"containerID": k.container_id, "ifname": k.ifname}


def _str(d: Mapping[str, Any], name: str, *, required: bool = True) -> str:
    v = d.get(name, None if required else "")
    if not isinstance(v, str) or (required and not v):
        raise ValueError(f"field {name!r} must be a non-empty string, got {v!r}")
    return v


def _bool(d: Mapping[str, Any], name: str) -> bool:
    v = d.get(name, False)
    if not isinstance(v, bool):
        raise ValueError(f"field {name!r} must be a boolean, got {v!r}")
    return v


def _ip(v: Any, name: str, version: int | None = None) -> IPAddress:
    if not isinstance(v, str):
        raise ValueError(f"field {name!r} must be an IP address string, got {v!r}")
    # inet_pton (C, strict: no leading zeros, no zones) and construction from the
    # integer: ipaddress's pure-Python parser would dominate start-up at 100k.
    is_v6 = ":" in v
    if version is not None and (version == 6) != is_v6:
        raise ValueError(f"field {name!r} must be IPv{version}, got {v!r}")
    try:
        packed = socket.inet_pton(socket.AF_INET6 if is_v6 else socket.AF_INET, v)
    except OSError:
        raise ValueError(f"field {name!r}: {v!r} is not an IP address") from None
    n = int.from_bytes(packed, "big")
    return ipaddress.IPv6Address(n) if is_v6 else ipaddress.IPv4Address(n)


def _ips(d: Mapping[str, Any], name: str) -> tuple[IPAddress, ...]:
    v = d.get(name, [])
    if not isinstance(v, list):
        raise ValueError(f"field {name!r} must be a list, got {v!r}")
    if not v:
        return ()
    return tuple([_ip(x, name) for x in v])


def key_from_dict(d: Any) -> AttachmentKey:
    if not isinstance(d, Mapping):
        raise ValueError(f"attachment key must be an object, got {d!r}")
    return AttachmentKey(container_id=_str(d, "containerID"), ifname=_str(d, "ifname"))


def allocation_from_dict(d: Any) -> Allocation:
    """Parse one allocation strictly; raises ValueError saying which field is wrong."""
    if not isinstance(d, Mapping):
        raise ValueError(f"allocation must be an object, got {d!r}")
    v6 = d.get("v6")
    v4 = d.get("v4")
    ip6 = _ip(v6, "v6", 6) if v6 is not None else None
    ip4 = _ip(v4, "v4", 4) if v4 is not None else None
    assert ip6 is None or isinstance(ip6, ipaddress.IPv6Address)
    assert ip4 is None or isinstance(ip4, ipaddress.IPv4Address)
    return Allocation(
        key=key_from_dict(d),
        namespace=_str(d, "namespace"),
        pod=_str(d, "pod"),
        pod_uid=_str(d, "podUID", required=False),
        netns=_str(d, "netns", required=False),
        host_ifname=_str(d, "hostIfname", required=False),
        v6=ip6,
        v4=ip4,
        v6_supplied=_bool(d, "v6Supplied"),
        v4_supplied=_bool(d, "v4Supplied"),
        extra_addresses=_ips(d, "extraAddresses"),
        anycast=_ips(d, "anycast"),
    )


# ---- file helpers ----------------------------------------------------------------


def _encode(a: Allocation) -> bytes:
    return json.dumps(allocation_to_dict(a), separators=(",", ":")).encode()


def _hex8(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 8 and all(c in "0123456789abcdef" for c in v)


def _line(body: bytes) -> bytes:
    return b"%08x %s\n" % (zlib.crc32(body), body)


class AllocationStore:
    """The allocations of one node, persisted under `state_dir`.

    Use `load()` once at start-up, then `record_put`/`record_delete` (or `record`
    for a batch, e.g. a GC) after every change; each returns once the change is
    durable. `save()` writes a full snapshot (it is also how the journal is
    compacted). Not thread-safe: the agent serialises calls.
    """

    def __init__(
        self,
        state_dir: Path = DEFAULT_STATE_DIR,
        *,
        compact_every: int = 1024,
        lock_timeout: float = 10.0,
        compact_in_background: bool = True,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / SNAPSHOT_NAME
        self.journal_path = self.state_dir / JOURNAL_NAME
        self.lock_path = self.state_dir / LOCK_NAME
        self.compact_every = compact_every
        self.lock_timeout = lock_timeout
        self._lock_fd: int | None = None
        self._state: dict[AttachmentKey, Allocation] = {}
        # JSON of each allocation, kept from its journal record so that a snapshot
        # is a join rather than 100,000 re-serialisations.
        self._encoded: dict[AttachmentKey, bytes] = {}
        self._seq = 0  # seq of the last change made durable
        self._snapshot_seq = 0
        self._snapshot_len = 0  # allocations in the snapshot on disk
        self._journal_records = 0
        self._journal_fd: int | None = None
        self._loaded = False
        self.compact_in_background = compact_in_background
        self._compactor: threading.Thread | None = None

    # ---- start-up ------------------------------------------------------------

    def load(self) -> list[Allocation]:
        """Lock the state directory, read the snapshot and replay the journal.

        A missing state directory is created and is an empty store (first start).
        The lock (flock on allocations.lock, released by the kernel when the process
        dies) is held until `close()`; if another process holds it for longer than
        `lock_timeout` seconds this raises StoreLockedError.
        """
        self.close()
        self._lock()
        try:
            # Temp snapshots left by a crash mid-compaction: never read, only removed
            # (safe: we hold the lock, so no other writer is producing one).
            for stale in self.state_dir.glob(f".{SNAPSHOT_NAME}.tmp.*"):
                stale.unlink(missing_ok=True)
            self._state = {}
            self._encoded = {}
            self._seq = self._snapshot_seq = 0
            if self.path.exists():
                self._load_snapshot()
            records = 0
            for _, old in self._old_journals():
                records += self._replay_journal(old)
            if self.journal_path.exists():
                records += self._replay_journal(self.journal_path)
            self._journal_records = records
        except BaseException:
            self.close()
            raise
        self._loaded = True
        return list(self._state.values())

    def _lock(self) -> None:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise StoreLockedError(
                        f"{self.lock_path}: the allocation store is in use by another process "
                        f"({holder}); two agents must never share a state directory"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _load_snapshot(self) -> None:
        where = str(self.path)
        try:
            raw = self.path.read_bytes()
        except OSError as e:
            raise StoreError(f"{where}: cannot read: {e}") from e
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreError(
                f"{where}: not valid JSON (corrupt or truncated, {len(raw)} bytes): {e}; "
                "refusing to start with an empty store, which could hand out addresses twice"
            ) from None
        if not isinstance(doc, dict):
            raise StoreError(f"{where}: expected a JSON object at the top level")
        version = doc.get("schemaVersion")
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{where}: schemaVersion {version!r} is not supported (this agent reads "
                f"{SCHEMA_VERSION})"
            )
        seq = doc.get("seq", 0)
        allocs = doc.get("allocations")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise StoreError(f"{where}: 'seq' must be a non-negative integer, got {seq!r}")
        if not isinstance(allocs, list):
            raise StoreError(f"{where}: 'allocations' must be a list")
        for i, item in enumerate(allocs):
            try:
                a = allocation_from_dict(item)
            except ValueError as e:
                raise StoreError(f"{where}: allocations[{i}]: {e}") from None
            if a.key in self._state:
                raise StoreError(f"{where}: allocations[{i}]: attachment {a.key} appears twice")
            self._state[a.key] = a
        crc = doc.get("crc32")
        if crc is not None:
            self._check_body(raw, crc, len(allocs))
        self._seq = self._snapshot_seq = seq
        self._snapshot_len = len(self._state)

    def _check_body(self, raw: bytes, crc: Any, count: int) -> None:
        """Verify the checksum this store wrote over the allocation lines, and keep
        those lines so that the next compaction need not re-serialise them."""
        lines = raw.split(b"\n")
        body = b"\n".join(lines[1:-2])
        if not _hex8(crc) or zlib.crc32(body) != int(crc, 16):
            raise StoreError(
                f"{self.path}: crc32 {crc!r} does not match the allocations (corrupted, or "
                "edited by hand: to accept a hand edit, delete the crc32 field)"
            )
        if count and len(lines) == count + 3:
            for k, line in zip(self._state, lines[1:-2], strict=True):
                self._encoded[k] = line.removesuffix(b",")

    def _old_journals(self) -> list[tuple[int, Path]]:
        """Journals renamed aside by compactions, (seq they end at, path), oldest first."""
        out = []
        for p in self.state_dir.glob(f"{JOURNAL_NAME}.*{OLD_JOURNAL_SUFFIX}"):
            mid = p.name[len(JOURNAL_NAME) + 1 : -len(OLD_JOURNAL_SUFFIX)]
            if mid.isdigit():
                out.append((int(mid), p))
        return sorted(out)

    def _replay_journal(self, path: Path) -> int:
        """Apply one journal file's records past the snapshot; returns how many."""
        where = str(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise StoreError(f"{where}: cannot read: {e}") from e
        lines = raw.split(b"\n")
        tail = lines.pop()  # b"" when the file ends in a newline
        good_len = len(raw) - len(tail)
        torn = bool(tail)
        records = 0
        for i, line in enumerate(lines):
            last = i == len(lines) - 1 and not torn
            try:
                rec = self._parse_record(line)
            except ValueError as e:
                if last:
                    # The final record with a bad checksum: an append that never completed.
                    good_len -= len(line) + 1
                    torn = True
                    break
                raise StoreError(f"{where}: line {i + 1}: {e}") from None
            seq = rec["seq"]
            if seq <= self._snapshot_seq:
                continue  # already contained in the snapshot (crash during compaction)
            if seq != self._seq + 1:
                raise StoreError(
                    f"{where}: line {i + 1}: sequence {seq} follows {self._seq}; "
                    "records are missing"
                )
            try:
                self._apply(rec)
            except ValueError as e:
                raise StoreError(f"{where}: line {i + 1}: {e}") from None
            self._seq = seq
            records += 1
        if torn:
            # Cut the unacknowledged partial record so the next append starts cleanly.
            with open(path, "r+b") as f:
                f.truncate(good_len)
                f.flush()
                os.fsync(f.fileno())
        return records

    @staticmethod
    def _parse_record(line: bytes) -> dict[str, Any]:
        crc, sep, body = line.partition(b" ")
        if not sep or len(crc) != 8:
            raise ValueError("malformed record (no checksum)")
        try:
            want = int(crc, 16)
        except ValueError:
            raise ValueError("malformed checksum") from None
        if zlib.crc32(body) != want:
            raise ValueError("checksum mismatch")
        try:
            rec = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"not JSON: {e}") from None
        if not isinstance(rec, dict) or rec.get("op") not in ("put", "del"):
            raise ValueError("record must be an object with op put or del")
        seq = rec.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise ValueError(f"bad seq {seq!r}")
        return rec

    def _apply(self, rec: Mapping[str, Any]) -> None:
        if rec["op"] == "put":
            a = allocation_from_dict(rec.get("allocation"))
            self._state[a.key] = a
            self._encoded.pop(a.key, None)
        else:
            k = key_from_dict(rec.get("key"))
            self._state.pop(k, None)
            self._encoded.pop(k, None)

    # ---- changes -------------------------------------------------------------

    def record_put(self, allocation: Allocation) -> None:
        """Durably record a new (or replaced) allocation."""
        self.record(put=(allocation,))

    def record_delete(self, key: AttachmentKey) -> None:
        """Durably record a release (a key the store does not hold is a no-op)."""
        self.record(delete=(key,))

    def record(
        self, *, put: Iterable[Allocation] = (), delete: Iterable[AttachmentKey] = ()
    ) -> None:
        """Durably record several changes with one fsync (deletes are applied after puts)."""
        self._require_loaded()
        lines: list[bytes] = []
        seq = self._seq
        # Changes not yet durable; the state is updated only once the write is.
        pending: dict[AttachmentKey, tuple[Allocation, bytes] | None] = {}
        for a in put:
            seq += 1
            enc = _encode(a)
            lines.append(_line(b'{"seq":%d,"op":"put","allocation":%s}' % (seq, enc)))
            pending[a.key] = (a, enc)
        for k in delete:
            if (pending[k] is None) if k in pending else (k not in self._state):
                continue
            seq += 1
            body = {"seq": seq, "op": "del", "key": _key_to_dict(k)}
            lines.append(_line(json.dumps(body, separators=(",", ":")).encode()))
            pending[k] = None
        if not lines:
            return
        fd = self._journal()
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            write_all(fd, b"".join(lines))
            os.fdatasync(fd)
        except OSError:
            # e.g. ENOSPC after a partial write: cut the partial record so that the
            # journal stays a sequence of whole records, and report the failure.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
                os.fdatasync(fd)
            self._close_journal()
            raise
        for k, v in pending.items():
            if v is None:
                self._state.pop(k, None)
                self._encoded.pop(k, None)
            else:
                self._state[k], self._encoded[k] = v
        self._seq = seq
        self._journal_records += len(lines)
        # Compact when the journal outgrows the last snapshot (and a floor): the
        # snapshot's O(n) cost is then paid once per n changes, O(1) amortised.
        if self._journal_records >= max(self.compact_every, self._snapshot_len):
            if self.compact_in_background:
                self._compact_soon()
            else:
                self.compact()

    def _compact_soon(self) -> None:
        """Start a compaction on a background thread; the caller (the store thread, and
        the ADD waiting on it) pays only for a rename and a list of references."""
        if self._compactor is not None and self._compactor.is_alive():
            return  # one at a time; the journal goes on growing meanwhile
        self.wait_compacted()
        parts = self._encoded_parts()
        seq = self._seq
        self._close_journal()
        # The next append creates a fresh journal and fsyncs the directory, which
        # makes this rename durable before any record lands in the new file.
        os.rename(self.journal_path, self._old_journal_path(seq))
        self._journal_records = 0
        self._snapshot_len = len(parts)
        self._compactor = threading.Thread(
            target=self._compact_worker, args=(parts, seq), name="store-compact", daemon=True
        )
        self._compactor.start()

    def _old_journal_path(self, seq: int) -> Path:
        return self.state_dir / f"{JOURNAL_NAME}.{seq}{OLD_JOURNAL_SUFFIX}"

    def _compact_worker(self, parts: list[bytes], seq: int) -> None:
        try:
            self._write_snapshot_file(parts, seq)
            self._snapshot_seq = seq
            self._drop_old_journals(seq)
        except Exception:
            # The old journal stays (load() replays it); the next compaction covers it.
            log.exception("allocation store: background compaction failed; will retry")

    def _drop_old_journals(self, seq: int) -> None:
        """Remove the old journals a durable snapshot at `seq` contains."""
        dropped = False
        for end, p in self._old_journals():
            if end <= seq:
                p.unlink(missing_ok=True)
                dropped = True
        if dropped:
            fsync_dir(self.state_dir)

    def wait_compacted(self) -> None:
        """Wait for a background compaction in progress (if any) to finish."""
        if self._compactor is not None:
            self._compactor.join()
            self._compactor = None

    def save(self, allocations: Iterable[Allocation]) -> None:
        """Replace the whole persisted state with `allocations` (a durable snapshot)."""
        self._require_loaded()
        self.wait_compacted()
        state: dict[AttachmentKey, Allocation] = {}
        for a in allocations:
            if a.key in state:
                raise StoreError(f"save: attachment {a.key} given twice")
            state[a.key] = a
        self._state = state
        self._encoded = {}
        self._write_snapshot(self._seq + 1)
        self._seq = self._snapshot_seq = self._seq + 1
        self._reset_journal()
        self._drop_old_journals(self._seq)

    def compact(self) -> None:
        """Fold the journal into a fresh snapshot and start an empty journal."""
        self._require_loaded()
        self.wait_compacted()
        self._write_snapshot(self._seq)
        self._snapshot_seq = self._seq
        self._reset_journal()
        self._drop_old_journals(self._seq)

    def allocations(self) -> list[Allocation]:
        """What the store holds now (the last durable state)."""
        return list(self._state.values())

    def close(self) -> None:
        """Close the journal and release the directory lock; `load()` again to reuse."""
        self.wait_compacted()
        self._close_journal()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._loaded = False

    def _close_journal(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # ---- internals -----------------------------------------------------------

    def _require_loaded(self) -> None:
        if not self._loaded:
            raise StoreError(f"{self.state_dir}: load() must be called before changing the store")

    def _journal(self) -> int:
        if self._journal_fd is None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            existed = self.journal_path.exists()
            self._journal_fd = os.open(
                self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
            if not existed:
                fsync_dir(self.state_dir)
        return self._journal_fd

    def _write_snapshot(self, seq: int) -> None:
        parts = self._encoded_parts()
        self._write_snapshot_file(parts, seq)
        self._snapshot_len = len(parts)

    def _encoded_parts(self) -> list[bytes]:
        """Every allocation's JSON line, in state order (encoded now if not kept)."""
        parts: list[bytes] = []
        for k, a in self._state.items():
            enc = self._encoded.get(k)
            if enc is None:
                enc = self._encoded[k] = _encode(a)
            parts.append(enc)
        return parts

    def _write_snapshot_file(self, parts: list[bytes], seq: int) -> None:
        """Write a snapshot of `parts` at `seq`: temp file, fsync, rename, fsync dir."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        body = b",\n".join(parts)
        data = b'{"schemaVersion":%d,"seq":%d,"crc32":"%08x","allocations":[\n%s\n]}\n' % (
            SCHEMA_VERSION,
            seq,
            zlib.crc32(body),
            body,
        )
        tmp = self.state_dir / f".{SNAPSHOT_NAME}.tmp.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.close(fd)
        os.replace(tmp, self.path)
        fsync_dir(self.state_dir)

    def _reset_journal(self) -> None:
        # Safe at any point: the snapshot is durable and carries `seq`, so records
        # still in an old journal are skipped on replay.
        self._close_journal()
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.state_dir)
        self._journal_records = 0

    def __enter__(self) -> AllocationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
