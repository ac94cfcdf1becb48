"""The docker-archive writer and the small images (packaging/image_archive.py, build_images.py).

What containerd's `ctr images import` relies on is checked on the bytes: the
manifest names a config and layers that exist in the archive, every layer blob's
name is the sha256 of its bytes and is the config's diff_id, the image ID is the
config's sha256. Determinism (same inputs, same bytes) is what makes the content
cache and the image ID stable, so it is checked against shuffled creation order
and different mtimes. The pause and echo binaries are built and run for real.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flock.testbed.wait import wait_until

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "packaging"))

import build_images  # noqa: E402
import image_archive as ia  # noqa: E402

ROOT = os.geteuid() == 0


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def members(layer: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(layer) as tf:
        return {m.name: m for m in tf.getmembers()}


def test_layer_from_entries_adds_parents_sorts_and_fixes_times(tmp_path: Path) -> None:
    layer = ia.layer_from_entries(
        [
            ia.FileEntry("usr/local/bin/x", b"#!/bin/sh\n", mode=0o755),
            ia.FileEntry("a", b"1"),
            ia.FileEntry("bin/sh", kind="symlink", target="busybox"),
            ia.FileEntry("tmp", kind="dir", mode=0o1777),
        ],
        tmp_path / "l.tar",
    )
    data = (tmp_path / "l.tar").read_bytes()
    assert layer.digest == sha256(data) and layer.size == len(data)
    with tarfile.open(layer.path) as tf:
        names = tf.getnames()
        ms = {m.name: m for m in tf.getmembers()}
        assert tf.extractfile("usr/local/bin/x").read() == b"#!/bin/sh\n"  # type: ignore[union-attr]
    assert names == sorted(names)
    assert names == [
        *("a", "bin", "bin/sh", "tmp"),
        *("usr", "usr/local", "usr/local/bin", "usr/local/bin/x"),
    ]
    assert {m.mtime for m in ms.values()} == {ia.DEFAULT_MTIME}
    assert {(m.uname, m.gname) for m in ms.values()} == {("", "")}
    assert ms["bin/sh"].issym() and ms["bin/sh"].linkname == "busybox"
    assert ms["tmp"].mode == 0o1777 and ms["usr/local/bin/x"].mode == 0o755


def test_layer_from_entries_refuses_duplicates(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="given twice"):
        ia.layer_from_entries([ia.FileEntry("a"), ia.FileEntry("/a")], tmp_path / "l.tar")


def _archive(
    tmp_path: Path, tags: list[str], name: str = "img.tar"
) -> tuple[Path, str, list[ia.Layer]]:
    l1 = ia.layer_from_entries([ia.FileEntry("etc/x", b"one")], tmp_path / "l1.tar")
    l2 = ia.layer_from_entries([ia.FileEntry("opt/y", b"two" * 1000)], tmp_path / "l2.tar")
    out = tmp_path / name
    image_id = ia.write_archive(
        out,
        repo_tags=tags,
        layers=[l1, l2],
        config=ia.ImageConfig(cmd=["/opt/y"], env=["A=1"], labels={"b": "2", "a": "1"}),
        history=["one", "two"],
    )
    return out, image_id, [l1, l2]


def test_archive_manifest_config_and_digests(tmp_path: Path) -> None:
    out, image_id, layers = _archive(tmp_path, ["ghcr.io/fritzlab/x:1", "x:latest"])
    got = ia.read_archive(out)
    (entry,) = got["manifest"]
    assert set(entry) == {"Config", "RepoTags", "Layers"}
    assert entry["RepoTags"] == ["ghcr.io/fritzlab/x:1", "x:latest"]
    assert got["config_sha256"] == image_id
    assert entry["Config"] == "blobs/sha256/" + image_id.removeprefix("sha256:")
    cfg = got["config"]
    assert cfg["architecture"] == "amd64" and cfg["os"] == "linux"
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": [la.digest for la in layers]}
    assert cfg["config"]["Cmd"] == ["/opt/y"] and cfg["config"]["Env"] == ["A=1"]
    assert list(cfg["config"]["Labels"]) == ["a", "b"]
    assert len(cfg["history"]) == 2
    # Each layer blob: its name is the sha256 of its bytes, equal to the diff_id.
    for name, recomputed, layer in zip(entry["Layers"], got["layers"], layers, strict=True):
        assert recomputed["name"] == name
        assert recomputed["sha256"] == layer.digest == sha256(layer.path.read_bytes())
        assert name == "blobs/sha256/" + layer.digest.removeprefix("sha256:")
    assert "manifest.json" in got["names"]


def test_archive_is_deterministic_and_atomic(tmp_path: Path) -> None:
    a, id_a, _ = _archive(tmp_path, ["x:1"], "a.tar")
    time.sleep(0.01)
    b, id_b, _ = _archive(tmp_path, ["x:1"], "b.tar")
    assert id_a == id_b and a.read_bytes() == b.read_bytes()
    assert not list(tmp_path.glob(".*tmp*")), "temporary archive left behind"


def test_archive_refuses_a_tag_without_a_tag(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="explicit tag"):
        _archive(tmp_path, ["localhost:5000/flock"])


def test_archive_stores_an_identical_layer_once(tmp_path: Path) -> None:
    l1 = ia.layer_from_entries([ia.FileEntry("x", b"same")], tmp_path / "l1.tar")
    out = tmp_path / "i.tar"
    cfg = ia.ImageConfig()
    ia.write_archive(out, repo_tags=["x:1"], layers=[l1, l1], config=cfg, history=["a", "b"])
    got = ia.read_archive(out)
    assert got["names"].count(got["manifest"][0]["Layers"][0]) == 1
    assert len(got["config"]["rootfs"]["diff_ids"]) == 2


def _make_tree(root: Path, files: dict[str, bytes], order: list[str], mtime: int) -> None:
    root.mkdir()
    for rel in order:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(files[rel])
        os.utime(p, (mtime, mtime))
    for d in sorted({p for p in root.rglob("*") if p.is_dir()}, reverse=True):
        os.utime(d, (mtime, mtime))


_names = st.text(alphabet="abcxyz019._-", min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..")
)
_trees = st.dictionaries(
    st.lists(_names, min_size=1, max_size=3).map("/".join), st.binary(max_size=300), max_size=12
).filter(
    # no path may be both a file and a directory
    lambda d: not any(a != b and b.startswith(a + "/") for a in d for b in d)
)


@settings(max_examples=40, deadline=None)
@given(files=_trees, seed=st.integers(0, 1000))
def test_layer_from_dir_same_bytes_whatever_order_and_mtime(
    tmp_path_factory: pytest.TempPathFactory, files: dict[str, bytes], seed: int
) -> None:
    base = tmp_path_factory.mktemp("tree")
    order = sorted(files)
    shuffled = order[:]
    random.Random(seed).shuffle(shuffled)
    _make_tree(base / "a", files, order, 1_000_000)
    _make_tree(base / "b", files, shuffled, 2_000_000 + seed)
    la = ia.layer_from_dir(base / "a", base / "a.tar")
    lb = ia.layer_from_dir(base / "b", base / "b.tar")
    assert la.digest == lb.digest
    with tarfile.open(la.path) as tf:
        got = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isreg()}  # type: ignore[union-attr]
    assert got == files


def test_layer_from_dir_keeps_hardlinks_symlinks_and_excludes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "dev").mkdir(parents=True)
    (root / "dev" / "junk").write_text("x")
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "a").write_bytes(b"A" * 100)
    os.link(root / "usr" / "bin" / "a", root / "usr" / "bin" / "b")
    (root / "bin").symlink_to("usr/bin")
    layer = ia.layer_from_dir(root, tmp_path / "l.tar", exclude=lambda rel: rel.startswith("dev/"))
    ms = members(layer.path)
    assert "dev" in ms and "dev/junk" not in ms
    assert ms["bin"].issym() and ms["bin"].linkname == "usr/bin"
    assert ms["usr/bin/a"].isreg() and ms["usr/bin/b"].islnk()
    assert ms["usr/bin/b"].linkname == "usr/bin/a"


@pytest.mark.skipif(not ROOT, reason="mknod and trusted.* xattrs need root")
def test_layer_from_dir_turns_overlay_whiteouts_into_oci_markers(tmp_path: Path) -> None:
    up = tmp_path / "up"
    (up / "etc" / "gone.d").mkdir(parents=True)
    os.mknod(up / "etc" / "removed", 0o600 | 0o020000, os.makedev(0, 0))
    os.setxattr(up / "etc" / "gone.d", "trusted.overlay.opaque", b"y")
    (up / "etc" / "gone.d" / "new").write_text("n")
    ms = members(ia.layer_from_dir(up, tmp_path / "l.tar", overlay_whiteouts=True).path)
    assert "etc/.wh.removed" in ms and ms["etc/.wh.removed"].isreg()
    assert "etc/removed" not in ms
    assert "etc/gone.d/.wh..wh..opq" in ms and "etc/gone.d/new" in ms


# --- the small images, built and run for real ---------------------------------------------


@pytest.fixture(scope="module")
def small_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, build_images.Built]:
    cache = tmp_path_factory.mktemp("cache")
    return build_images.build_all(["pause", "test"], cache)


def _extract(archive: Path, dest: Path) -> dict[str, object]:
    """Unpack the image's layers in order into dest (what a runtime's snapshotter does)."""
    got = ia.read_archive(archive)
    with tarfile.open(archive) as outer:
        for name in got["manifest"][0]["Layers"]:
            blob = outer.extractfile(name)
            assert blob is not None
            with tarfile.open(fileobj=blob, mode="r|") as tf:  # streamed, not in memory
                tf.extractall(dest)  # our own archive (3.11.2 has no filter=)
    return got


def _caught_signals(pid: int) -> set[int]:
    """The signals process `pid` has a handler for (SigCgt in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            mask = int(line.split()[1], 16)
            return {n + 1 for n in range(64) if mask >> n & 1}
    return set()


def _wait_catches(pid: int, sig: signal.Signals) -> None:
    wait_until(
        lambda: _caught_signals(pid),
        until=lambda caught: sig in caught,
        timeout=60,
        what=f"pid {pid} to catch {sig.name}",
    )


def test_pause_image_is_one_static_binary_that_stops_on_sigterm(
    small_images: dict[str, build_images.Built], tmp_path: Path
) -> None:
    b = small_images["pause"]
    got = _extract(b.path, tmp_path)
    assert got["manifest"][0]["RepoTags"] == ["ghcr.io/fritzlab/flock-pause:1"]
    assert got["config"]["config"]["Entrypoint"] == ["/pause"]
    assert [p.name for p in tmp_path.iterdir()] == ["pause"]
    assert not build_images._is_dynamic(tmp_path / "pause")
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen([tmp_path / "pause"])
        try:
            # Signalled only once its handler is in (SigCgt): earlier, the default action
            # would kill it (a sleep here was a race with a loaded machine's exec).
            _wait_catches(proc.pid, sig)
            assert proc.poll() is None, "pause exited by itself"
            proc.send_signal(sig)
            assert proc.wait(timeout=5) == 0
        finally:
            proc.kill()


def test_small_images_are_cached_by_content(
    small_images: dict[str, build_images.Built], tmp_path: Path
) -> None:
    cache = small_images["pause"].path.parent
    again = build_images.build_all(["pause", "test"], cache)
    for name in ("pause", "test"):
        assert again[name].cached and again[name].path == small_images[name].path
        assert again[name].image_id == small_images[name].image_id
    index = json.loads((cache / "index.json").read_text())
    assert index["test"]["ref"] == "ghcr.io/fritzlab/flock-test:1"


# Runs inside the extracted test image (chroot) in network, mount and UTS namespaces of
# its own (UTS: `hostname pod-a` must not rename the machine),
# with what the kubelet adds to every pod (/etc/hosts, /etc/resolv.conf: the static
# busybox wget segfaults with either, which is why the image has `probe`).
IN_POD = r"""
set -u
ip link set lo up
ip addr add 2001:db8::a/128 dev lo
nft -f - <<'NFT'
table inet t {
  chain in {
    type filter hook input priority 0;
    udp dport 9 drop
  }
}
NFT
exec chroot "$1" /bin/sh -c '
  hostname pod-a
  serve >/dev/null 2>&1 &
  server=$!
  for i in $(seq 100); do
    probe -w 1 http 127.0.0.1 8080 /ready >/dev/null 2>&1 && break; sleep 0.05
  done
  p() { out=$(probe -w 0.5 "$@" 2>/dev/null); rc=$?; echo "$* -> $rc $(echo "$out" | head -n1)"; }
  p http 127.0.0.1 8080 /hostname
  p http ::1 8080 /ready
  p tcp ::1 7 t6
  p tcp 127.0.0.1 7 t4
  p udp 127.0.0.1 7 u4
  p udp ::1 7 u6
  p udp 127.0.0.2 7 alias4
  p udp 2001:db8::a 7 alias6
  p tcp 127.0.0.1 9
  p udp 127.0.0.1 9
  rm /www/ready
  p http ::1 8080 /ready
  kill $server; wait $server
'
"""


@pytest.mark.skipif(not ROOT, reason="runs the image's servers in a network namespace of its own")
def test_test_image_serves_http_readiness_and_echo_on_both_families(
    small_images: dict[str, build_images.Built], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    got = _extract(small_images["test"].path, root)
    assert got["config"]["config"]["Cmd"] == ["/usr/local/bin/serve"]
    for prog in ("echod", "probe"):
        assert not build_images._is_dynamic(root / "usr" / "local" / "bin" / prog)
    assert (root / "bin" / "sh").is_symlink() and (root / "bin" / "httpd").is_symlink()
    for d in ("dev", "proc"):
        (root / d).mkdir(exist_ok=True)
    os.mknod(root / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
    (root / "etc" / "resolv.conf").write_text("nameserver 10.96.0.10\noptions ndots:5\n")
    out = subprocess.run(
        ["unshare", "--net", "--mount", "--uts", "sh", "-c", IN_POD, "in-pod", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = out.stdout.splitlines()
    assert lines == [
        "http 127.0.0.1 8080 /hostname -> 0 pod-a",
        "http ::1 8080 /ready -> 0 ok",
        "tcp ::1 7 t6 -> 0 t6",
        "tcp 127.0.0.1 7 t4 -> 0 t4",
        "udp 127.0.0.1 7 u4 -> 0 u4",
        "udp ::1 7 u6 -> 0 u6",
        # Replies leave from the address asked (an anycast address besides the pod's own).
        "udp 127.0.0.2 7 alias4 -> 0 alias4",
        "udp 2001:db8::a 7 alias6 -> 0 alias6",
        # Refused is an error (2), a silent drop a timeout (1).
        "tcp 127.0.0.1 9 -> 2 error: connect: Connection refused",
        "udp 127.0.0.1 9 -> 1 timeout",
        # Readiness follows the file: 404 once it is gone (exit 3).
        "http ::1 8080 /ready -> 3 <HTML><HEAD><TITLE>404 Not Found</TITLE></HEAD>",
    ], out.stderr
