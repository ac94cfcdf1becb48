#!/usr/bin/env python3
"""Build the self-contained `flock` CNI plugin bundle that runs on hosts without Python.

Why: the runtime execs /opt/cni/bin/flock on the host, and a Kubernetes node
need not have Python (Flatcar, Talos, Bottlerocket, minimal images), nor the
same glibc as our image. So the image carries a bundle that brings everything:

    OUT/flock                  static launcher (packaging/launcher.c)
    OUT/flock.d/ld.so          the glibc loader the interpreter was linked with
    OUT/flock.d/lib/*.so*      the interpreter's shared libraries (libc, libm, libz, ...)
    OUT/flock.d/bin/python3    the interpreter that runs this script (Debian's python3.11)
    OUT/flock.d/lib/python3.X/ only the stdlib modules the plugin can import, as .pyc
    OUT/flock.d/plugin.pyc     src/flock/cni/plugin.py, compiled

The launcher execs ``ld.so --library-path flock.d/lib python3 -I -S plugin.pyc``:
the same start-up path as ``/usr/bin/python3 -I -S plugin.py``, minus compiling
the plugin at every start. Only Debian packages are needed (python3, gcc,
libc6-dev for the static launcher); nothing is downloaded.

`flock install-cni --bundle OUT` copies it into the host's CNI bin dir.

Usage (in the image build, with the interpreter to bundle):
    python3 packaging/build_plugin_bundle.py --out /opt/flock/cni
"""

from __future__ import annotations

import argparse
import json
import modulefinder
import os
import py_compile
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLUGIN = HERE.parent / "src" / "flock" / "cni" / "plugin.py"
LAUNCHER_C = HERE / "launcher.c"

# Imported at start-up before any script (not frozen), or needed as a landmark
# (getpath looks for os.py/os.pyc to find the stdlib), or imported lazily by C code
# (_json imports json.decoder to raise JSONDecodeError).
ALWAYS = ("encodings", "os", "json", "json.decoder")
# modulefinder follows every import statement, including lazy ones inside
# functions the plugin never reaches (os.popen -> subprocess -> ...). These are
# cut; the plugin's test suite runs against the bundle to prove nothing needed is.
EXCLUDES = (
    "asyncio", "concurrent", "ctypes", "distutils", "doctest", "email", "http", "importlib",
    "lib2to3", "logging", "multiprocessing", "pdb", "pydoc", "pydoc_data", "ssl", "subprocess",
    "tarfile", "test", "unittest", "urllib", "xml", "xmlrpc", "zipfile", "inspect", "tracemalloc",
    "bz2", "lzma", "gzip", "decimal", "_pydecimal", "argparse", "datetime", "calendar", "locale",
    "gettext", "pickle", "shutil", "tempfile", "threading", "typing", "dataclasses", "socket",
    "selectors", "signal", "random", "hashlib", "base64", "platform", "sysconfig", "readline",
    "_ssl", "_hashlib", "_ctypes", "_decimal", "_asyncio", "_multiprocessing", "_testcapi",
    "_testinternalcapi", "mmap", "termios", "resource", "_posixshmem", "_queue", "_lzma", "_bz2",
)  # fmt: skip


def _ldd(binary: Path) -> tuple[Path, list[Path]]:
    """(loader, shared libraries) of a dynamically linked executable or module."""
    out = subprocess.run(["ldd", str(binary)], check=True, capture_output=True, text=True).stdout
    loader: Path | None = None
    libs: list[Path] = []
    for line in out.splitlines():
        line = line.strip()
        m = re.match(r"\S+ => (/\S+) \(0x", line)
        if m:
            libs.append(Path(m.group(1)))
        elif line.startswith("/"):
            loader = Path(line.split()[0])
    if loader is None and "statically linked" not in out:
        raise SystemExit(f"build: {binary} has no ELF interpreter (ldd said: {out!r})")
    return loader or Path(), libs


def _stdlib_modules(plugin: Path, stdlib: Path, dynload: Path) -> dict[str, Path]:
    """Every stdlib module the plugin imports, at any depth, by name -> file."""
    finder = modulefinder.ModuleFinder(path=[str(stdlib), str(dynload)], excludes=list(EXCLUDES))
    finder.run_script(str(plugin))
    for name in ALWAYS:
        finder.import_hook(name)
    # encodings is imported by name at run time (the locale decides which codec).
    for f in (stdlib / "encodings").glob("*.py"):
        finder.import_hook(f"encodings.{f.stem}" if f.stem != "__init__" else "encodings")
    found: dict[str, Path] = {}
    for name, mod in finder.modules.items():
        if mod.__file__ and name != "__main__":
            found[name] = Path(mod.__file__)
    return found


def build(out: Path, *, plugin: Path = PLUGIN, cc: str = "cc") -> dict[str, object]:
    python = Path(os.path.realpath(sys.executable))
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = Path(sysconfig.get_path("stdlib"))
    dynload = Path(sysconfig.get_config_var("DESTSHARED") or stdlib / "lib-dynload")
    if out.exists():
        shutil.rmtree(out)
    root = out / "flock.d"
    lib = root / "lib"
    pylib = lib / version
    (root / "bin").mkdir(parents=True)
    (pylib / "lib-dynload").mkdir(parents=True)

    shutil.copy2(python, root / "bin" / "python3")
    modules = _stdlib_modules(plugin, stdlib, dynload)
    extensions: list[Path] = []
    for name, src in sorted(modules.items()):
        if src.suffix == ".so":
            dst = pylib / "lib-dynload" / src.name
            shutil.copy2(src, dst)
            extensions.append(dst)
            continue
        rel = src.relative_to(stdlib)
        dst = (pylib / rel).with_suffix(".pyc")
        dst.parent.mkdir(parents=True, exist_ok=True)
        py_compile.compile(
            str(src),
            cfile=str(dst),
            dfile=f"<flock bundle>/{rel}",
            doraise=True,
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        )
        del name
    loader, libs = _ldd(python)
    for ext in extensions:
        libs += _ldd(ext)[1]
    shutil.copy2(loader, root / "ld.so")
    for so in sorted(set(libs)):
        shutil.copy2(os.path.realpath(so), lib / so.name)
    py_compile.compile(
        str(plugin),
        cfile=str(root / "plugin.pyc"),
        dfile="flock/cni/plugin.py",
        doraise=True,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )
    subprocess.run(
        [
            cc,
            "-static",
            "-Os",
            "-s",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
            str(out / "flock"),
            str(LAUNCHER_C),
        ],
        check=True,
    )
    info = {
        "python": str(python),
        "python_version": sys.version.split()[0],
        "loader": str(loader),
        "libs": sorted(p.name for p in set(libs)),
        "modules": len(modules),
        "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
    }
    (root / "BUILD-INFO.json").write_text(json.dumps(info, indent=2) + "\n")
    _self_test(out, root)
    return info


def _self_test(out: Path, root: Path) -> None:
    """Refuse to ship a bundle that would fall back on the host's Python or libraries."""
    probe = (
        "import sys, json, json.decoder, encodings.latin_1, _json;"
        "print(json.dumps({'prefix': sys.prefix, 'path': sys.path}))"
    )
    env = {"PATH": "/nonexistent", "PYTHONHOME": "/nonexistent", "PYTHONPATH": "/nonexistent"}
    res = subprocess.run(
        [
            str(root / "ld.so"),
            "--inhibit-cache",
            "--library-path",
            str(root / "lib"),
            str(root / "bin" / "python3"),
            "-I",
            "-S",
            "-c",
            probe,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if res.returncode != 0:
        raise SystemExit(f"build: bundled interpreter failed: {res.stderr}")
    seen = json.loads(res.stdout)
    outside = [p for p in [seen["prefix"], *seen["path"]] if not p.startswith(str(root))]
    if outside:
        raise SystemExit(f"build: bundled interpreter looks outside the bundle: {outside}")
    with tempfile.TemporaryDirectory(prefix="fp-bundle-test-") as tmp:
        res = subprocess.run(
            [str(out / "flock")],
            input=b'{"cniVersion": "1.0.0"}',
            capture_output=True,
            env={"CNI_COMMAND": "VERSION"},
            cwd=tmp,
            check=False,
        )
    reply = json.loads(res.stdout)
    if res.returncode != 0 or reply.get("cniVersion") != "1.0.0":
        raise SystemExit(f"build: launcher self-test failed: {res.stdout!r} {res.stderr!r}")
    _self_test_forwarding(out)


def _self_test_forwarding(out: Path) -> None:
    """The launcher's native path: an ADD framed to a socket, the reply frame copied out."""
    import socket
    import threading

    frame = b'FLOCK/1 0 15 5\n{"ok":"frame"}\nnote\n'
    with tempfile.TemporaryDirectory(prefix="fp-bundle-fwd-") as tmp:
        path = f"{tmp}/agent.sock"
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(1)
        got: list[bytes] = []

        def answer() -> None:
            conn, _ = srv.accept()
            with conn:
                while chunk := conn.recv(65536):
                    got.append(chunk)
                conn.sendall(frame)

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        stdin = json.dumps({"cniVersion": "1.1.0", "name": "n", "agentSocket": path}).encode()
        res = subprocess.run(
            [str(out / "flock")],
            input=stdin,
            capture_output=True,
            env={"CNI_COMMAND": "ADD", "CNI_IFNAME": "eth0"},
            timeout=30,
            check=False,
        )
        t.join(10)
        srv.close()
    sent = b"FLOCK/1\nCNI_COMMAND=ADD\0CNI_IFNAME=eth0\0\0" + stdin
    if (res.returncode, res.stdout, res.stderr, b"".join(got)) != (
        0,
        b'{"ok":"frame"}\n',
        b"note\n",
        sent,
    ):
        raise SystemExit(f"build: launcher forwarding self-test failed: {res!r} {got!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="bundle directory (replaced)")
    ap.add_argument("--plugin", type=Path, default=PLUGIN)
    ap.add_argument("--cc", default=os.environ.get("CC", "cc"))
    args = ap.parse_args(argv)
    info = build(args.out, plugin=args.plugin, cc=args.cc)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
