"""The allocation store: durable snapshot + journal, loud on corruption, tolerant of a torn tail."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flock.apply.store import (
    JOURNAL_NAME,
    OLD_JOURNAL_SUFFIX,
    SCHEMA_VERSION,
    SNAPSHOT_NAME,
    AllocationStore,
    StoreError,
    StoreLockedError,
    allocation_from_dict,
    allocation_to_dict,
)
from flock.model.allocation import Allocation, AttachmentKey


def mk(i: int, **kw: object) -> Allocation:
    fields: dict[str, object] = {
        "key": AttachmentKey(f"{i:064x}", "eth0"),
        "namespace": "ns",
        "pod": f"pod-{i}",
        "pod_uid": f"uid-{i}",
        "netns": f"/var/run/netns/cni-{i}",
        "host_ifname": f"fl{i:08x}",
        "v6": ipaddress.IPv6Address(0x20010DB8F0010000 << 64 | (i + 1)),
        "v4": ipaddress.IPv4Address(0xC0000200 | (i % 250 + 1)),
    }
    fields.update(kw)
    return Allocation(**fields)  # type: ignore[arg-type]


def fresh(d: Path, **kw: Any) -> AllocationStore:
    s = AllocationStore(d, **kw)
    s.load()
    return s


def reload(d: Path) -> list[Allocation]:
    with AllocationStore(d) as s:
        return sorted(s.load(), key=lambda a: a.key)


def test_missing_dir_is_an_empty_store(tmp_path: Path) -> None:
    assert AllocationStore(tmp_path / "nope").load() == []


def test_record_put_and_delete_survive_reload(tmp_path: Path) -> None:
    s = fresh(tmp_path)
    a, b, c = mk(1), mk(2, anycast=(ipaddress.ip_address("2001:db8:a::53"),)), mk(3)
    s.record_put(a)
    s.record_put(b)
    s.record(put=[c], delete=[a.key])
    s.record_delete(AttachmentKey("unknown", "eth0"))
    s.close()
    assert reload(tmp_path) == sorted([b, c], key=lambda x: x.key)


def test_full_allocation_round_trip() -> None:
    a = mk(
        7,
        v6_supplied=True,
        extra_addresses=(ipaddress.ip_address("198.51.100.7"), ipaddress.ip_address("2001:db8::7")),
        anycast=(ipaddress.ip_address("198.51.100.53"),),
    )
    assert allocation_from_dict(json.loads(json.dumps(allocation_to_dict(a)))) == a


def test_snapshot_has_schema_version_at_documented_path(tmp_path: Path) -> None:
    s = fresh(tmp_path)
    s.save([mk(1), mk(2)])
    doc = json.loads((tmp_path / SNAPSHOT_NAME).read_text())
    assert doc["schemaVersion"] == SCHEMA_VERSION
    assert [x["pod"] for x in doc["allocations"]] == ["pod-1", "pod-2"]
    assert (tmp_path / JOURNAL_NAME).read_bytes() == b""
    assert stat.S_IMODE((tmp_path / SNAPSHOT_NAME).stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_save_replaces_state(tmp_path: Path) -> None:
    s = fresh(tmp_path)
    s.record_put(mk(1))
    s.save([mk(2)])
    s.record_put(mk(3))
    s.close()
    assert [a.pod for a in reload(tmp_path)] == ["pod-2", "pod-3"]


def test_compaction_when_journal_outgrows_snapshot(tmp_path: Path) -> None:
    # When to compact (synchronously here, so that the files can be counted at each step).
    s = fresh(tmp_path, compact_every=5, compact_in_background=False)
    for i in range(23):
        s.record_put(mk(i))
    # compacted at 5 records (floor), then at 5 more (snapshot had 5), then at 10 more
    lines = (tmp_path / JOURNAL_NAME).read_bytes().count(b"\n")
    assert lines == 3
    doc = json.loads((tmp_path / SNAPSHOT_NAME).read_text())
    assert len(doc["allocations"]) == 20 and doc["seq"] == 20
    for i in range(20):
        s.record_delete(mk(i).key)  # 3 + 17 = 20 records: compacts at 20
    doc = json.loads((tmp_path / SNAPSHOT_NAME).read_text())
    assert len(doc["allocations"]) == 23 - 17 and doc["seq"] == 23 + 17
    s.close()
    assert [a.pod for a in reload(tmp_path)] == ["pod-20", "pod-21", "pod-22"]


def test_crash_between_snapshot_and_journal_reset(tmp_path: Path) -> None:
    s = fresh(tmp_path)
    for i in range(4):
        s.record_put(mk(i))
    s.record_delete(mk(0).key)
    journal = (tmp_path / JOURNAL_NAME).read_bytes()
    s.compact()
    s.close()
    # as if the agent died after the new snapshot's rename, before the journal truncate
    (tmp_path / JOURNAL_NAME).write_bytes(journal)
    assert [a.pod for a in reload(tmp_path)] == ["pod-1", "pod-2", "pod-3"]
    # and keeps appending after that correctly
    s = fresh(tmp_path)
    s.record_put(mk(9))
    s.close()
    assert [a.pod for a in reload(tmp_path)] == ["pod-1", "pod-2", "pod-3", "pod-9"]


def test_process_killed_without_close_keeps_acknowledged_records(tmp_path: Path) -> None:
    pid = os.fork()
    if pid == 0:  # child: record, then die without any cleanup
        try:
            s = fresh(tmp_path)
            for i in range(20):
                s.record_put(mk(i))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status)
    assert len(reload(tmp_path)) == 20


# ---- corruption: loud, never a silent reset ------------------------------------------


def _with_snapshot(tmp_path: Path, n: int = 3) -> bytes:
    s = fresh(tmp_path)
    s.save([mk(i) for i in range(n)])
    s.close()
    return (tmp_path / SNAPSHOT_NAME).read_bytes()


@pytest.mark.parametrize("cut", [0, 1, 10, 0.5, -2, -3])
def test_truncated_snapshot_is_an_error_naming_the_file(tmp_path: Path, cut: float) -> None:
    raw = _with_snapshot(tmp_path)
    n = int(len(raw) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(raw) + cut)
    (tmp_path / SNAPSHOT_NAME).write_bytes(raw[:n])
    with pytest.raises(StoreError, match=str(tmp_path / SNAPSHOT_NAME)):
        AllocationStore(tmp_path).load()


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda d: d.update(schemaVersion=99), "schemaVersion 99"),
        (lambda d: d.pop("schemaVersion"), "schemaVersion None"),
        (lambda d: d.update(allocations={}), "must be a list"),
        (lambda d: d["allocations"][1].update(v4="300.1.1.1"), r"allocations\[1\]"),
        (lambda d: d["allocations"][0].update(v4="2001:db8::1"), "must be IPv4"),
        (lambda d: d["allocations"][2].pop("containerID"), "containerID"),
        (lambda d: d["allocations"][0].update(v6Supplied="yes"), "boolean"),
        (lambda d: d["allocations"].append(d["allocations"][0]), "appears twice"),
        (lambda d: d.update(seq=-1), "seq"),
    ],
)
def test_invalid_snapshot_content(tmp_path: Path, mutate: object, why: str) -> None:
    doc = json.loads(_with_snapshot(tmp_path))
    mutate(doc)  # type: ignore[operator]
    (tmp_path / SNAPSHOT_NAME).write_text(json.dumps(doc))
    with pytest.raises(StoreError, match=why) as info:
        AllocationStore(tmp_path).load()
    assert str(tmp_path / SNAPSHOT_NAME) in str(info.value)


def _journal_with(tmp_path: Path, n: int) -> bytes:
    s = fresh(tmp_path)
    for i in range(n):
        s.record_put(mk(i))
    s.close()
    return (tmp_path / JOURNAL_NAME).read_bytes()


@pytest.mark.parametrize("cut", [1, 9, 30, -1])
def test_torn_last_journal_record_is_dropped_and_cut(tmp_path: Path, cut: int) -> None:
    raw = _journal_with(tmp_path, 3)
    last_start = raw.rstrip(b"\n").rfind(b"\n") + 1
    torn = raw[: last_start + cut] if cut > 0 else raw[:cut]
    (tmp_path / JOURNAL_NAME).write_bytes(torn)
    assert [a.pod for a in reload(tmp_path)] == ["pod-0", "pod-1"]
    assert (tmp_path / JOURNAL_NAME).read_bytes() == raw[:last_start]
    s = fresh(tmp_path)
    s.record_put(mk(5))
    s.close()
    assert [a.pod for a in reload(tmp_path)] == ["pod-0", "pod-1", "pod-5"]


def test_last_record_with_bad_checksum_is_dropped(tmp_path: Path) -> None:
    raw = _journal_with(tmp_path, 3)
    bad = raw[:-5] + (b"X" if raw[-5:-4] != b"X" else b"Y") + raw[-4:]
    (tmp_path / JOURNAL_NAME).write_bytes(bad)
    assert len(reload(tmp_path)) == 2


def test_corrupt_record_in_the_middle_is_an_error(tmp_path: Path) -> None:
    raw = _journal_with(tmp_path, 3)
    lines = raw.split(b"\n")
    lines[1] = lines[1].replace(b"pod-1", b"pod-X")
    (tmp_path / JOURNAL_NAME).write_bytes(b"\n".join(lines))
    with pytest.raises(StoreError, match=rf"{tmp_path / JOURNAL_NAME}: line 2: checksum"):
        AllocationStore(tmp_path).load()


def test_missing_record_in_the_middle_is_an_error(tmp_path: Path) -> None:
    raw = _journal_with(tmp_path, 3)
    lines = raw.split(b"\n")
    del lines[1]
    (tmp_path / JOURNAL_NAME).write_bytes(b"\n".join(lines))
    with pytest.raises(StoreError, match="records are missing"):
        AllocationStore(tmp_path).load()


def test_garbage_journal_is_an_error(tmp_path: Path) -> None:
    _journal_with(tmp_path, 1)
    (tmp_path / JOURNAL_NAME).write_bytes(b"hello\nworld\n")
    with pytest.raises(StoreError, match=JOURNAL_NAME):
        AllocationStore(tmp_path).load()


def test_changes_need_load_first(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="load"):
        AllocationStore(tmp_path).record_put(mk(1))


# ---- property: the store agrees with a plain dict -----------------------------------


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["put", "del", "reload", "compact"]), st.integers(0, 6)),
        max_size=40,
    )
)
def test_store_matches_model(tmp_path_factory: pytest.TempPathFactory, ops: list) -> None:  # type: ignore[type-arg]
    d = tmp_path_factory.mktemp("fc-store")
    model: dict[AttachmentKey, Allocation] = {}
    s = fresh(d, compact_every=4)
    try:
        for op, i in ops:
            if op == "put":
                a = mk(i, pod_uid=f"v{len(model)}")
                s.record_put(a)
                model[a.key] = a
            elif op == "del":
                s.record_delete(mk(i).key)
                model.pop(mk(i).key, None)
            elif op == "reload":
                s.close()
                s = fresh(d, compact_every=4)
            else:
                s.compact()
            assert {a.key: a for a in s.allocations()} == model
    finally:
        s.close()
    assert {a.key: a for a in reload(d)} == model


def test_valid_json_bit_rot_is_caught_by_the_checksum(tmp_path: Path) -> None:
    raw = _with_snapshot(tmp_path)
    assert b"192.0.2.2" in raw
    (tmp_path / SNAPSHOT_NAME).write_bytes(raw.replace(b"192.0.2.2", b"192.0.2.9"))
    with pytest.raises(StoreError, match="crc32"):
        AllocationStore(tmp_path).load()


def test_hand_edit_accepted_once_the_checksum_is_removed(tmp_path: Path) -> None:
    doc = json.loads(_with_snapshot(tmp_path))
    del doc["crc32"]
    doc["allocations"][0]["v4"] = "192.0.2.200"
    (tmp_path / SNAPSHOT_NAME).write_text(json.dumps(doc, indent=2))
    s = fresh(tmp_path)
    assert str(s.allocations()[0].v4) == "192.0.2.200"
    s.compact()
    s.close()
    assert str(reload(tmp_path)[0].v4) == "192.0.2.200"


def test_compaction_after_load_reproduces_the_snapshot(tmp_path: Path) -> None:
    raw = _with_snapshot(tmp_path, n=5)
    s = fresh(tmp_path)
    s.compact()
    s.close()
    assert (tmp_path / SNAPSHOT_NAME).read_bytes() == raw


# ---- one writer per state directory -------------------------------------------------


def test_second_store_on_the_same_dir_is_refused(tmp_path: Path) -> None:
    a = fresh(tmp_path)
    a.record_put(mk(1))
    b = AllocationStore(tmp_path, lock_timeout=0.2)
    with pytest.raises(StoreLockedError, match=rf"pid {os.getpid()}"):
        b.load()
    a.close()
    assert [x.pod for x in b.load()] == ["pod-1"]
    b.close()


def test_lock_is_released_when_the_holder_dies(tmp_path: Path) -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: take the lock, tell the parent, then wait to be killed
        try:
            os.close(r)
            held = fresh(tmp_path)
            os.write(w, b"x")
            time.sleep(30)
            held.close()
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"x"
    with pytest.raises(StoreLockedError):
        AllocationStore(tmp_path, lock_timeout=0.1).load()
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    s = AllocationStore(tmp_path, lock_timeout=2)
    assert s.load() == []
    s.close()


def test_record_after_close_needs_load(tmp_path: Path) -> None:
    s = fresh(tmp_path)
    s.close()
    with pytest.raises(StoreError, match="load"):
        s.record_put(mk(1))


def test_an_unreferenced_store_releases_its_lock(tmp_path: Path) -> None:
    fresh(tmp_path)  # dropped at once: CPython finalises it and the lock goes with it
    s = AllocationStore(tmp_path, lock_timeout=0)
    s.load()
    s.close()


def test_crash_at_any_byte_of_the_journal_recovers_every_complete_record(
    tmp_path: Path,
) -> None:
    """Simulate power loss after every possible number of journal bytes hit the disk."""
    ops: list[tuple[str, Allocation]] = [("put", mk(i)) for i in range(4)]
    ops += [("del", mk(1)), ("put", mk(1, pod_uid="again")), ("del", mk(3))]
    s = fresh(tmp_path)
    states: list[dict[AttachmentKey, Allocation]] = [{}]
    for op, a in ops:
        if op == "put":
            s.record_put(a)
        else:
            s.record_delete(a.key)
        states.append({x.key: x for x in s.allocations()})
    s.close()
    journal = (tmp_path / JOURNAL_NAME).read_bytes()
    ends = [i + 1 for i, b in enumerate(journal) if b == ord("\n")]
    assert len(ends) == len(ops)
    # every byte around each record boundary, and a stride through the records
    cuts = {c for e in ends for c in range(e - 3, e + 4) if 0 <= c <= len(journal)}
    cuts |= set(range(0, len(journal) + 1, 17))
    for cut in sorted(cuts):
        (tmp_path / JOURNAL_NAME).write_bytes(journal[:cut])
        complete = sum(1 for e in ends if e <= cut)
        got = {a.key: a for a in reload(tmp_path)}
        assert got == states[complete], cut


def test_stale_temp_snapshot_from_a_crash_is_ignored(tmp_path: Path) -> None:
    raw = _with_snapshot(tmp_path, n=2)
    (tmp_path / f".{SNAPSHOT_NAME}.tmp.999999").write_bytes(raw[: len(raw) // 2])
    s = fresh(tmp_path)
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert len(s.allocations()) == 2
    s.record_put(mk(5))
    s.compact()
    s.close()
    assert [a.pod for a in reload(tmp_path)] == ["pod-0", "pod-1", "pod-5"]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


# ---- compaction off the request path -------------------------------------------------


def test_a_change_is_durable_while_a_compaction_is_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ADD's store write never waits for a snapshot: a compaction held at a barrier
    (not a timing) does not stop the next record from returning durable, and a crash
    at that moment (the files copied as they are) loses nothing."""
    started, release = threading.Event(), threading.Event()
    write = AllocationStore._write_snapshot_file

    def held(self: AllocationStore, parts: list[bytes], seq: int) -> None:
        started.set()
        assert release.wait(30), "the test never released the compaction"
        write(self, parts, seq)

    monkeypatch.setattr(AllocationStore, "_write_snapshot_file", held)
    s = fresh(tmp_path, compact_every=4)
    for i in range(4):
        s.record_put(mk(i))  # the 4th record starts a compaction, which now waits
    assert started.wait(10), "no compaction started"
    try:
        s.record_put(mk(4))  # returns: durable while the snapshot is not written
        s.record_delete(mk(0).key)
        assert not release.is_set()
        assert not (tmp_path / SNAPSHOT_NAME).exists()
        old = tmp_path / f"{JOURNAL_NAME}.4{OLD_JOURNAL_SUFFIX}"
        assert old.read_bytes().count(b"\n") == 4
        assert (tmp_path / JOURNAL_NAME).read_bytes().count(b"\n") == 2
        # A crash now: the state directory as it is on disk.
        crashed = tmp_path / "crashed"
        crashed.mkdir()
        for p in tmp_path.iterdir():
            if p.is_file() and not p.name.endswith(".lock"):
                shutil.copy2(p, crashed / p.name)
        assert [a.pod for a in reload(crashed)] == [f"pod-{i}" for i in range(1, 5)]
    finally:
        release.set()
    s.wait_compacted()
    doc = json.loads((tmp_path / SNAPSHOT_NAME).read_text())
    assert doc["seq"] == 4 and len(doc["allocations"]) == 4
    assert not old.exists()  # covered by the snapshot: removed
    s.record_put(mk(5))
    s.close()
    assert [a.pod for a in reload(tmp_path)] == [f"pod-{i}" for i in range(1, 6)]


def test_a_failed_background_compaction_keeps_the_old_journal_until_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = AllocationStore._write_snapshot_file
    fail = [True]

    def flaky(self: AllocationStore, parts: list[bytes], seq: int) -> None:
        if fail[0]:
            raise OSError(28, "No space left on device")
        write(self, parts, seq)

    monkeypatch.setattr(AllocationStore, "_write_snapshot_file", flaky)
    s = fresh(tmp_path, compact_every=3)
    for i in range(3):
        s.record_put(mk(i))
    s.wait_compacted()
    assert (tmp_path / f"{JOURNAL_NAME}.3{OLD_JOURNAL_SUFFIX}").exists()
    fail[0] = False
    for i in range(3, 6):
        s.record_put(mk(i))
    s.wait_compacted()
    assert not list(tmp_path.glob(f"*{OLD_JOURNAL_SUFFIX}"))
    assert json.loads((tmp_path / SNAPSHOT_NAME).read_text())["seq"] == 6
    s.close()
    assert [a.pod for a in reload(tmp_path)] == [f"pod-{i}" for i in range(6)]
