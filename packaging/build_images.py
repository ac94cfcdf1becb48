#!/usr/bin/env python3
"""Build flock's container images from Debian packages and PyPI, with no registry.

Why: a cluster needs flock as an image (agent, BIRD sidecar and CNI installer
share one), and its tests need a pause image and a small test image; but no
registry is reachable here, so neither ``FROM debian`` nor ``docker pull`` can
work. Every image is built from parts that are reachable and written as a
docker-archive tarball (packaging/image_archive.py) that
``ctr -n k8s.io images import --local FILE`` loads:

flock   ghcr.io/fritzlab/flock:<version>, what packaging/Containerfile describes:
        layer 1, a Debian bookworm root file system from Debian packages (mmdebstrap,
        variant essential + python3, bird2, nftables, iproute2; merged /usr without
        the usrmerge package and its perl; no docs but copyright files);
        layer 2, /opt/flock: a venv with flock and its PyPI dependencies (installed
        inside layer 1 through overlayfs and chroot, by the image's own python3) and
        the self-contained CNI plugin bundle at /opt/flock/cni.
pause   ghcr.io/fritzlab/flock-pause:1, one static binary (packaging/pause.c).
test    ghcr.io/fritzlab/flock-test:1, busybox-static + static TCP/UDP echo server and
        client (packaging/testimage/): HTTP readiness from a file, echo, both families.

Outputs are cached by the hash of their inputs under $FLOCK_IMAGES_CACHE
(default /var/cache/flock/images), so a second build with nothing changed only
hashes its inputs; `index.json` there maps each image to its archive.

Usage: scripts/build-images [--only flock,pause,test] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import image_archive as ia

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path(os.environ.get("FLOCK_IMAGES_CACHE", "/var/cache/flock/images"))
REGISTRY = "ghcr.io/fritzlab"

SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
#: What the agent and BIRD need at run time (the Containerfile's runtime stage).
PACKAGES = ("python3", "bird2", "nftables", "iproute2")
DPKG_OPTS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/lintian/*",
)
MERGED_USR_HOOK = "/usr/share/mmdebstrap/hooks/merged-usr"
#: The runtime gives each container its own /dev, /proc, /sys, /tmp; logs and
#: apt's lists are build leftovers (and carry timestamps).
BASE_EXCLUDES = ("dev/", "proc/", "sys/", "tmp/", "run/", "var/log/", "var/lib/apt/lists/",
                 "var/cache/apt/", "var/cache/ldconfig/aux-cache")  # fmt: skip
BASE_EXCLUDE_EXACT = ("var/cache/debconf/config.dat-old", "var/cache/debconf/templates.dat-old",
                      "var/lib/dpkg/status-old", "var/lib/dpkg/diversions-old")  # fmt: skip
APP_ENV = ["PATH=/opt/flock/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONDONTWRITEBYTECODE=1"]
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONDONTWRITEBYTECODE": "1",
              "HOME": "/root", "LC_ALL": "C.UTF-8"}  # fmt: skip


def log(msg: str) -> None:
    print(f"build-images: {msg}", file=sys.stderr, flush=True)


def flock_version() -> str:
    with (REPO / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


class Key:
    """A cache key: sha256 over every input that decides an output's bytes."""

    def __init__(self, kind: str) -> None:
        self._h = hashlib.sha256(f"flock-image:{kind}\n".encode())

    def text(self, label: str, value: str) -> Key:
        self._h.update(f"{label}={value}\n".encode())
        return self

    def file(self, path: Path, label: str = "") -> Key:
        self._h.update(f"file {label or path.name} {path.stat().st_mode & 0o111:o}\n".encode())
        self._h.update(path.read_bytes())
        return self

    def tree(self, root: Path, label: str) -> Key:
        for p in sorted(root.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
                self.file(p, f"{label}/{p.relative_to(root).as_posix()}")
        return self

    def command(self, *argv: str) -> Key:
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        return self.text(" ".join(argv), out.splitlines()[0] if out else "")

    def hex(self) -> str:
        return self._h.hexdigest()[:20]


def _writer_key(key: Key) -> Key:
    return key.file(HERE / "image_archive.py").file(Path(__file__))


@dataclass(frozen=True)
class Built:
    name: str
    ref: str
    path: Path
    image_id: str
    bytes: int
    seconds: float
    cached: bool

    def as_json(self) -> dict[str, object]:
        return {
            "ref": self.ref,
            "path": str(self.path),
            "image_id": self.image_id,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 1),
            "cached": self.cached,
        }


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """One build at a time per cache dir (tests and a developer may both build)."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _run(argv: list[str], **kw: object) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if res.returncode != 0:
        raise SystemExit(
            f"build-images: {' '.join(argv[:6])}... failed ({res.returncode}):\n"
            f"{res.stdout[-3000:]}{res.stderr[-3000:]}"
        )


def _cached_archive(
    cache: Path, name: str, ref: str, key: str, build: Callable[[Path], str]
) -> Built:
    """The archive for `key`, built by `build(out) -> image id` only if missing."""
    out = cache / f"{name}-{key}.tar"
    meta = out.with_suffix(".json")
    t0 = time.monotonic()
    if out.is_file() and meta.is_file():
        m = json.loads(meta.read_text())
        return Built(name, ref, out, m["image_id"], out.stat().st_size, m["seconds"], True)
    image_id = build(out)
    seconds = time.monotonic() - t0
    meta.write_text(json.dumps({"image_id": image_id, "ref": ref, "seconds": seconds}) + "\n")
    # Earlier builds of this image go, but the newest of them stays: a test that read
    # index.json just before this build may be about to import it.
    older = sorted((p for p in cache.glob(f"{name}-*.tar") if p != out), key=_mtime)
    for old in older[:-1]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    return Built(name, ref, out, image_id, out.stat().st_size, seconds, False)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _static_binary(src: Path, out: Path) -> None:
    _run(["gcc", "-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(src)])


# --- pause ---------------------------------------------------------------------------------


def build_pause(cache: Path) -> Built:
    ref = f"{REGISTRY}/flock-pause:1"
    src = HERE / "pause.c"
    key = _writer_key(Key("pause").file(src).command("gcc", "--version")).hex()

    def build(out: Path) -> str:
        with tempfile.TemporaryDirectory(prefix="flock-img-") as tmp:
            binary = Path(tmp) / "pause"
            _static_binary(src, binary)
            layer = ia.layer_from_entries(
                [ia.FileEntry("pause", binary.read_bytes(), mode=0o755)], Path(tmp) / "layer.tar"
            )
            return ia.write_archive(
                out,
                repo_tags=[ref],
                layers=[layer],
                config=ia.ImageConfig(entrypoint=["/pause"], env=[]),
                history=["flock packaging/pause.c, gcc -static"],
            )

    return _cached_archive(cache, "pause", ref, key, build)


# --- test ----------------------------------------------------------------------------------

BUSYBOX = Path("/bin/busybox")


def build_test(cache: Path) -> Built:
    ref = f"{REGISTRY}/flock-test:1"
    tdir = HERE / "testimage"
    if not BUSYBOX.is_file():
        raise SystemExit("build-images: no /bin/busybox (apt-get install busybox-static)")
    key = Key("test").file(BUSYBOX).tree(tdir, "testimage").command("gcc", "--version")
    key = _writer_key(key)

    def build(out: Path) -> str:
        bb = BUSYBOX.read_bytes()
        if _is_dynamic(BUSYBOX):
            raise SystemExit(f"build-images: {BUSYBOX} is not static (need busybox-static)")
        applets = subprocess.run(
            [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
        ).stdout.split()
        with tempfile.TemporaryDirectory(prefix="flock-img-") as tmp:
            static = {}
            for prog in ("echod", "probe"):
                _static_binary(tdir / f"{prog}.c", Path(tmp) / prog)
                static[prog] = (Path(tmp) / prog).read_bytes()
            entries = [
                ia.FileEntry("bin/busybox", bb, mode=0o755),
                ia.FileEntry("usr/local/bin/echod", static["echod"], mode=0o755),
                ia.FileEntry("usr/local/bin/probe", static["probe"], mode=0o755),
                ia.FileEntry("usr/local/bin/serve", (tdir / "serve").read_bytes(), mode=0o755),
                ia.FileEntry(
                    "etc/passwd",
                    b"root:x:0:0:root:/root:/bin/sh\n"
                    b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
                ),
                ia.FileEntry("etc/group", b"root:x:0:\nnogroup:x:65534:\n"),
                ia.FileEntry("root", kind="dir", mode=0o700),
                ia.FileEntry("tmp", kind="dir", mode=0o1777),
                ia.FileEntry("www", kind="dir", mode=0o755),
            ]
            entries += [
                ia.FileEntry(f"bin/{a}", kind="symlink", target="busybox")
                for a in sorted(set(applets) - {"busybox"})
            ]
            layer = ia.layer_from_entries(entries, Path(tmp) / "layer.tar")
            return ia.write_archive(
                out,
                repo_tags=[ref],
                layers=[layer],
                config=ia.ImageConfig(
                    cmd=["/usr/local/bin/serve"],
                    env=["PATH=/usr/local/bin:/bin", "HTTP_PORT=8080", "ECHO_PORT=7"],
                ),
                history=["busybox-static + packaging/testimage (echod, probe, serve)"],
            )

    return _cached_archive(cache, "test", ref, key.hex(), build)


def _is_dynamic(path: Path) -> bool:
    """True when the ELF file has a PT_INTERP program header (needs a loader)."""
    data = path.read_bytes()
    return b"/lib64/ld-linux" in data[:4096] or b"/lib/ld-linux" in data[:4096]


# --- flock ---------------------------------------------------------------------------------


def _base_key() -> Key:
    key = Key("debian-base").text("suite", SUITE).text("packages", ",".join(PACKAGES))
    key.text("mirrors", "|".join(MIRRORS)).text("dpkg", "|".join(DPKG_OPTS))
    key.text("excludes", "|".join(BASE_EXCLUDES + BASE_EXCLUDE_EXACT))
    key.text("how", f"--mode=root --variant=essential --hook-dir={MERGED_USR_HOOK} compileall")
    return key.command("mmdebstrap", "--version").file(HERE / "image_archive.py")


def _base_exclude(rel: str) -> bool:
    return rel in BASE_EXCLUDE_EXACT or any(
        rel.startswith(p) and rel != p.rstrip("/") for p in BASE_EXCLUDES
    )


def _build_rootfs(key: str, cache: Path) -> tuple[Path, ia.Layer, float]:
    """The Debian root file system (a directory, kept for layer 2) and its layer."""
    rootfs = cache / "rootfs" / f"base-{key}"
    layer_path = cache / "layers" / f"base-{key}.tar"
    meta = layer_path.with_suffix(".json")
    if rootfs.is_dir() and layer_path.is_file() and meta.is_file():
        m = json.loads(meta.read_text())
        return rootfs, ia.Layer(layer_path, m["digest"], m["size"]), 0.0
    if shutil.which("mmdebstrap") is None:
        raise SystemExit("build-images: no mmdebstrap (apt-get install mmdebstrap)")
    t0 = time.monotonic()
    tmp_root = rootfs.with_name(rootfs.name + ".tmp")
    shutil.rmtree(tmp_root, ignore_errors=True)
    tmp_root.parent.mkdir(parents=True, exist_ok=True)
    log(f"debian base: mmdebstrap {SUITE} + {', '.join(PACKAGES)} (a minute or two)")
    argv = ["mmdebstrap", "--mode=root", "--variant=essential", "--quiet",
            f"--include={','.join(PACKAGES)}", f"--hook-dir={MERGED_USR_HOOK}"]  # fmt: skip
    argv += [f"--dpkgopt={o}" for o in DPKG_OPTS]
    argv += [SUITE, str(tmp_root), *MIRRORS]
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(ia.DEFAULT_MTIME))
    _run(argv, env=env)
    # Debian's python3 postinst compiled the stdlib with timestamp-based .pyc files,
    # whose headers hold the build time; recompile them unchecked-hash (deterministic).
    _run(["chroot", str(tmp_root), "python3", "-m", "compileall", "-q", "-f",
          "--invalidation-mode", "unchecked-hash", "/usr/lib/python3.11",
          "/usr/lib/python3/dist-packages"], env=CHROOT_ENV)  # fmt: skip
    layer = ia.layer_from_dir(tmp_root, layer_path, exclude=_base_exclude)
    shutil.rmtree(rootfs, ignore_errors=True)
    os.rename(tmp_root, rootfs)
    meta.write_text(json.dumps({"digest": layer.digest, "size": layer.size}) + "\n")
    for old in (cache / "rootfs").glob("base-*"):
        if old != rootfs:
            shutil.rmtree(old, ignore_errors=True)
    for old in (cache / "layers").glob("base-*"):
        if old not in (layer_path, meta):
            old.unlink(missing_ok=True)
    return rootfs, layer, time.monotonic() - t0


def _app_sources(dst: Path) -> None:
    """What `pip wheel` needs to build flock, copied out of the (shared) work tree
    so that the build writes no build/ or egg-info into it."""
    shutil.copy2(REPO / "pyproject.toml", dst / "pyproject.toml")
    shutil.copy2(REPO / "README.md", dst / "README.md")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(REPO / "src", dst / "src", ignore=skip)


def _app_key(base_key: str) -> Key:
    key = Key("flock-app").text("base", base_key).file(REPO / "pyproject.toml")
    key.file(REPO / "README.md").tree(REPO / "src" / "flock", "src/flock")
    # Everything in packaging/ but the other images' sources: the bundle builder, the
    # launcher, and this file (the install script that makes the venv).
    for p in sorted(HERE.iterdir()):
        if p.is_file() and p.name != "pause.c" and p.suffix != ".pyc":
            key.file(p)
    key.command("/usr/bin/python3", "-VV").command("ldd", "--version").command("gcc", "--version")
    return key


# Runs inside a private mount namespace: overlay the empty layer-2 directory on the
# Debian root, chroot into it, make the venv with the image's own python3 and install
# the wheels into it; everything written lands in the upper directory, i.e. layer 2.
_INSTALL_SH = r"""
set -eu
base=$1 up=$2 work=$3 mnt=$4
mount -t overlay overlay -o "lowerdir=$base,upperdir=$up,workdir=$work" "$mnt"
mount -t tmpfs tmpfs "$mnt/tmp"
mkdir -p "$mnt/tmp/build"
mount --bind "$5" "$mnt/tmp/build"
ch() { chroot "$mnt" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin PYTHONDONTWRITEBYTECODE=1 \
       HOME=/root LC_ALL=C.UTF-8 "$@"; }
ch python3 -m venv --without-pip /opt/flock/venv
ch env PYTHONPATH=/tmp/build/pip /opt/flock/venv/bin/python -m pip install --quiet \
   --no-index --find-links /tmp/build/wheels --no-compile --no-cache-dir \
   --disable-pip-version-check --root-user-action=ignore flock
rm -f "$mnt"/opt/flock/venv/bin/Activate.ps1 "$mnt"/opt/flock/venv/bin/activate.csh \
      "$mnt"/opt/flock/venv/bin/activate.fish
ch /opt/flock/venv/bin/python -m compileall -q --invalidation-mode unchecked-hash \
   /opt/flock/venv/lib
ch /opt/flock/venv/bin/flock --help >/dev/null
"""


def _build_app_layer(base_rootfs: Path, key: str, cache: Path) -> ia.Layer:
    layer_path = cache / "layers" / f"app-{key}.tar"
    meta = layer_path.with_suffix(".json")
    if layer_path.is_file() and meta.is_file():
        m = json.loads(meta.read_text())
        return ia.Layer(layer_path, m["digest"], m["size"])
    import pip  # the running interpreter's pip, run by the image's python3 in the chroot

    with tempfile.TemporaryDirectory(prefix="flock-img-", dir=cache) as tmp_s:
        tmp = Path(tmp_s)
        src, build, up, work, mnt = (tmp / d for d in ("src", "build", "up", "work", "mnt"))
        for d in (src, build / "wheels", up, work, mnt):
            d.mkdir(parents=True)
        _app_sources(src)
        log("flock layer: pip wheel flock and its dependencies")
        _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
              "--wheel-dir", str(build / "wheels"), str(src)])  # fmt: skip
        shutil.copytree(Path(pip.__file__).parent, build / "pip" / "pip",
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        log("flock layer: venv in the Debian root (overlayfs + chroot)")
        _run(["unshare", "--mount", "--propagation", "private", "sh", "-c", _INSTALL_SH,
              "install", str(base_rootfs), str(up), str(work), str(mnt), str(build)])  # fmt: skip
        log("flock layer: CNI plugin bundle (packaging/build_plugin_bundle.py)")
        _run(["/usr/bin/python3", str(HERE / "build_plugin_bundle.py"),
              "--out", str(up / "opt" / "flock" / "cni")])  # fmt: skip
        unexpected = sorted(p.name for p in up.iterdir() if p.name != "opt")
        if unexpected:
            raise SystemExit(f"build-images: the flock layer wrote outside /opt: {unexpected}")
        layer = ia.layer_from_dir(up, layer_path, overlay_whiteouts=True)
    meta.write_text(json.dumps({"digest": layer.digest, "size": layer.size}) + "\n")
    for old in (cache / "layers").glob("app-*"):
        if old not in (layer_path, meta):
            old.unlink(missing_ok=True)
    return layer


def build_flock(cache: Path) -> Built:
    version = flock_version()
    ref = f"{REGISTRY}/flock:{version}"
    base_key = _base_key().hex()
    app_key = _app_key(base_key).hex()
    key = _writer_key(Key("flock").text("base", base_key).text("app", app_key)).hex()

    def build(out: Path) -> str:
        rootfs, base, secs = _build_rootfs(base_key, cache)
        if secs:
            log(f"debian base: {base.size / 1e6:.1f} MB layer in {secs:.0f} s")
        app = _build_app_layer(rootfs, app_key, cache)
        return ia.write_archive(
            out,
            repo_tags=[ref],
            layers=[base, app],
            config=ia.ImageConfig(
                cmd=["flock", "--help"],
                env=APP_ENV,
                labels={
                    "org.opencontainers.image.title": "flock",
                    "org.opencontainers.image.version": version,
                    "org.opencontainers.image.description": "flock agent, BIRD and CNI installer",
                    "net.fritzlab.flock.inputs": app_key,
                },
            ),
            history=[
                f"mmdebstrap {SUITE} essential + {' '.join(PACKAGES)}",
                "flock venv + CNI plugin bundle at /opt/flock",
            ],
        )

    return _cached_archive(cache, "flock", ref, key, build)


BUILDERS: dict[str, Callable[[Path], Built]] = {
    "pause": build_pause,
    "test": build_test,
    "flock": build_flock,
}


def build_all(names: list[str], cache: Path = CACHE) -> dict[str, Built]:
    out: dict[str, Built] = {}
    with _locked(cache):
        for name in names:
            out[name] = BUILDERS[name](cache)
        index = cache / "index.json"
        try:
            current = json.loads(index.read_text())
        except (OSError, ValueError):
            current = {}
        current.update({n: b.as_json() for n, b in out.items()})
        ia_tmp = index.with_name(".index.json.tmp")
        ia_tmp.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
        os.replace(ia_tmp, index)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="pause,test,flock", help="comma-separated image names")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    bad = [n for n in names if n not in BUILDERS]
    if bad:
        ap.error(f"unknown image(s) {bad}; known: {sorted(BUILDERS)}")
    t0 = time.monotonic()
    built = build_all(names, args.cache)
    if args.json:
        print(json.dumps({n: b.as_json() for n, b in built.items()}, indent=2))
    else:
        for b in built.values():
            how = "cached" if b.cached else f"built in {b.seconds:.1f} s"
            print(f"{b.ref:40} {b.bytes / 1e6:7.1f} MB  {how}  {b.path}")
        print(f"build-images: {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
