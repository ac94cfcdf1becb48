"""Write container images as docker-archive tarballs, without a registry or a daemon.

Why: no registry is reachable from the machines flock is built and tested on, so
``FROM debian`` cannot work, and there is no container daemon to ``docker save``.
containerd imports the docker-archive format (``ctr -n k8s.io images import
--local FILE``): a tar holding one tar per layer, an image config JSON and a
``manifest.json`` that names the config, the layers and the image's RepoTags.
That format is simple enough to write here, in the standard library only:

    manifest.json                      [{"Config": ..., "RepoTags": [...], "Layers": [...]}]
    blobs/sha256/<config digest>       the image config (architecture, env, cmd, diff_ids)
    blobs/sha256/<layer digest>        each layer, an uncompressed tar

Everything is deterministic, so the same inputs give the same bytes and the same
image ID: entries sorted by name, every mtime fixed (SOURCE_DATE_EPOCH style),
owner names dropped (numeric ids kept), no atime/ctime. A layer's digest is the
sha256 of its bytes, which is also its diff_id (it is not compressed).

An overlayfs upper directory can be a layer: its whiteouts (character devices
0:0) and opaque directories (xattr ``trusted.overlay.opaque=y``) become the OCI
``.wh.<name>`` and ``.wh..wh..opq`` markers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

#: Every entry's mtime unless the caller says otherwise (2024-01-01T00:00:00Z):
#: a fixed date, not 0, so that tools that treat 0 as "unknown" behave.
DEFAULT_MTIME = 1704067200
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Layer:
    """A finished layer tar on disk and its sha256 (also its diff_id)."""

    path: Path
    digest: str  # "sha256:<hex>"
    size: int


@dataclass(frozen=True)
class FileEntry:
    """One entry of a layer built from memory (small images: pause, test)."""

    name: str  # path inside the image, no leading slash
    data: bytes = b""
    mode: int = 0o644
    kind: str = "file"  # file | dir | symlink
    target: str = ""  # symlink target
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an OCI/docker image config flock's images set."""

    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] = field(default_factory=lambda: ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
    working_dir: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    user: str = ""
    stop_signal: str = ""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _normalise(ti: tarfile.TarInfo, mtime: int) -> tarfile.TarInfo:
    ti.mtime = mtime
    ti.uname = ""
    ti.gname = ""
    ti.pax_headers = {}
    return ti


def _walk_sorted(root: Path, d: Path, exclude: Callable[[str], bool]) -> Iterator[tuple[Path, str]]:
    """(path, path relative to root) under d, each directory's entries by sorted
    name, a directory before its contents: the same order whatever the file
    system's. An excluded path is skipped with everything under it."""
    for e in sorted(os.scandir(d), key=lambda e: e.name):
        p = Path(e.path)
        rel = p.relative_to(root).as_posix()
        if exclude(rel):
            continue
        yield p, rel
        if e.is_dir(follow_symlinks=False):
            yield from _walk_sorted(root, p, exclude)


def _is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def layer_from_dir(
    root: Path,
    out: Path,
    *,
    mtime: int = DEFAULT_MTIME,
    exclude: Callable[[str], bool] = lambda _rel: False,
    overlay_whiteouts: bool = False,
) -> Layer:
    """Tar the tree under `root` into `out`, deterministically.

    `exclude(rel)` is asked for every path relative to root ("usr/bin/x"); an
    excluded directory is left out with its contents (exclude "dev/*"-like paths,
    not "dev", to keep an empty /dev). Hard links inside the tree stay hard
    links; ownership is numeric.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for p, rel in _walk_sorted(root, root, exclude):
            st = p.lstat()
            if overlay_whiteouts and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                ti = tarfile.TarInfo(str(Path(rel).parent / (WHITEOUT_PREFIX + p.name)))
                tf.addfile(_normalise(ti, mtime))
                continue
            ti = tf.gettarinfo(str(p), arcname=rel)
            _normalise(ti, mtime)
            if ti.isreg():
                with p.open("rb") as src:
                    tf.addfile(ti, src)
            else:
                tf.addfile(ti)
            if overlay_whiteouts and ti.isdir() and _is_opaque(p):
                marker = tarfile.TarInfo(f"{rel}/{OPAQUE_MARKER}")
                tf.addfile(_normalise(marker, mtime))
    return Layer(out, _sha256_file(out), out.stat().st_size)


def layer_from_entries(
    entries: Iterable[FileEntry], out: Path, *, mtime: int = DEFAULT_MTIME
) -> Layer:
    """A layer from in-memory entries; parent directories are added as needed."""
    by_name: dict[str, FileEntry] = {}
    for e in entries:
        name = e.name.strip("/")
        if not name or name in by_name:
            raise ValueError(f"layer entry {e.name!r}: empty or given twice")
        by_name[name] = dataclasses.replace(e, name=name)
    for name in list(by_name):
        parent = Path(name).parent
        while str(parent) != ".":
            by_name.setdefault(str(parent), FileEntry(str(parent), kind="dir", mode=0o755))
            parent = parent.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(by_name):
            e = by_name[name]
            ti = tarfile.TarInfo(name)
            ti.mode = e.mode
            ti.uid, ti.gid = e.uid, e.gid
            if e.kind == "dir":
                ti.type = tarfile.DIRTYPE
                tf.addfile(_normalise(ti, mtime))
            elif e.kind == "symlink":
                ti.type = tarfile.SYMTYPE
                ti.linkname = e.target
                tf.addfile(_normalise(ti, mtime))
            elif e.kind == "file":
                ti.size = len(e.data)
                tf.addfile(_normalise(ti, mtime), io.BytesIO(e.data))
            else:
                raise ValueError(f"layer entry {name!r}: unknown kind {e.kind!r}")
    return Layer(out, _sha256_file(out), out.stat().st_size)


def image_config(
    config: ImageConfig, layers: list[Layer], *, created: str, history: list[str]
) -> dict[str, Any]:
    """The image config JSON object (OCI image spec, also what docker writes)."""
    cfg: dict[str, Any] = {"Env": list(config.env)}
    if config.entrypoint is not None:
        cfg["Entrypoint"] = list(config.entrypoint)
    if config.cmd is not None:
        cfg["Cmd"] = list(config.cmd)
    if config.working_dir:
        cfg["WorkingDir"] = config.working_dir
    if config.labels:
        cfg["Labels"] = dict(sorted(config.labels.items()))
    if config.user:
        cfg["User"] = config.user
    if config.stop_signal:
        cfg["StopSignal"] = config.stop_signal
    if len(history) != len(layers):
        raise ValueError("one history line per layer")
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
        "history": [{"created": created, "created_by": h} for h in history],
    }


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mode = 0o644
    tf.addfile(_normalise(ti, mtime), io.BytesIO(data))


def _add_file(tf: tarfile.TarFile, name: str, path: Path, size: int, mtime: int) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mode = 0o644
    with path.open("rb") as f:
        tf.addfile(_normalise(ti, mtime), f)


def write_archive(
    out: Path,
    *,
    repo_tags: list[str],
    layers: list[Layer],
    config: ImageConfig,
    history: list[str],
    mtime: int = DEFAULT_MTIME,
) -> str:
    """Write the docker-archive tarball; returns the image ID (the config's sha256).

    Written to a temporary name and renamed, so a reader never sees half an archive.
    """
    if not repo_tags or any(":" not in t.rpartition("/")[2] for t in repo_tags):
        raise ValueError(f"repo tags need an explicit tag (name:tag): {repo_tags}")
    created = _rfc3339(mtime)
    cfg = _canonical(image_config(config, layers, created=created, history=history))
    cfg_hex = hashlib.sha256(cfg).hexdigest()
    layer_names = [f"blobs/sha256/{layer.digest.removeprefix('sha256:')}" for layer in layers]
    manifest = [
        {"Config": f"blobs/sha256/{cfg_hex}", "RepoTags": list(repo_tags), "Layers": layer_names}
    ]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            _write_tar(f, cfg, cfg_hex, layers, layer_names, manifest, mtime)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return "sha256:" + cfg_hex


def _write_tar(
    f: IO[bytes],
    cfg: bytes,
    cfg_hex: str,
    layers: list[Layer],
    layer_names: list[str],
    manifest: list[dict[str, Any]],
    mtime: int,
) -> None:
    with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in ("blobs", "blobs/sha256"):
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o755
            tf.addfile(_normalise(ti, mtime))
        seen: set[str] = set()
        for layer, name in zip(layers, layer_names, strict=True):
            if name not in seen:  # two identical layers are stored once
                _add_file(tf, name, layer.path, layer.size, mtime)
                seen.add(name)
        _add_bytes(tf, f"blobs/sha256/{cfg_hex}", cfg, mtime)
        _add_bytes(tf, "manifest.json", _canonical(manifest), mtime)


def _rfc3339(epoch: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_archive(path: Path) -> dict[str, Any]:
    """The manifest, config and layer digests of an archive, each layer's digest
    recomputed from its bytes (for tests and for `build-images --check`)."""
    with tarfile.open(path) as tf:
        manifest_f = tf.extractfile("manifest.json")
        assert manifest_f is not None
        manifest = json.loads(manifest_f.read())
        (entry,) = manifest
        cfg_f = tf.extractfile(entry["Config"])
        assert cfg_f is not None
        cfg_bytes = cfg_f.read()
        layers = []
        for name in entry["Layers"]:
            lf = tf.extractfile(name)
            assert lf is not None
            h = hashlib.sha256()
            for block in iter(lambda lf=lf: lf.read(_CHUNK), b""):  # type: ignore[misc]
                h.update(block)
            layers.append({"name": name, "sha256": "sha256:" + h.hexdigest()})
        names = tf.getnames()
    return {
        "manifest": manifest,
        "config": json.loads(cfg_bytes),
        "config_sha256": "sha256:" + hashlib.sha256(cfg_bytes).hexdigest(),
        "layers": layers,
        "names": names,
    }
