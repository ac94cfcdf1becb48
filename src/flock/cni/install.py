"""`flock install-cni`: put the plugin and its network config on the host (the init container).

Why it is careful: a container runtime may exec the plugin, or read the conf
dir, at any moment, including while this runs, and the init container may be
killed half-way. So every file appears by rename only (temp file, fsync,
rename, fsync of the directory), the plugin's runtime tree is installed under a
content-hashed name before the `flock.d` symlink is switched to it, and running
the installer twice changes nothing the second time.

Layout in the CNI bin dir:

    flock                    the entry the runtime execs: the bundle's static launcher,
                             or (``--python``) a two-line stub for a host Python
    flock.d -> .flock-<hash> the plugin's runtime tree (bundle or plugin module)
    .flock-<hash>/           one per installed version; the previous one is kept for
                             plugin processes started just before the switch

Two ways to provide the plugin:

- ``--bundle DIR`` (default ``$FLOCK_CNI_BUNDLE`` or /opt/flock/cni): the
  self-contained build of packaging/build_plugin_bundle.py, for hosts without
  Python (its own interpreter, stdlib subset and glibc loader);
- ``--python PATH``: the host's own Python 3.11+ runs the plugin module
  (development machines, the lab, tests).

The conflist (``01-flock.conflist``) sorts first among typical names, so the
runtime picks it. Its ``cniVersion`` is 1.0.0 with ``cniVersions`` listing
1.1.0: a runtime with libcni 1.2+ (containerd 2, CRI-O 1.30+) picks 1.1.0 and
can send GC and STATUS, while containerd 1.7 (libcni 1.1, which reads only
``cniVersion`` and cannot parse a 1.1.0 result) still works. ``portmap`` is
chained only on request (``--portmap``): flock pods have routable addresses and
need no NAT; hostPort needs portmap's DNAT, and the binary must exist on the
host or every ADD would fail.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from flock.durable import fsync_dir, write_all

PLUGIN_NAME = "flock"
TREE_LINK = "flock.d"
TREE_PREFIX = ".flock-"
CONFLIST_NAME = "01-flock.conflist"
DEFAULT_BUNDLE = Path(os.environ.get("FLOCK_CNI_BUNDLE", "/opt/flock/cni"))
DEFAULT_SOCKET = "/run/flock/agent.sock"
MODULE_NAME = "flock_cni_plugin"

# With --launcher: the native launcher is the entry and execs this script in flock.d
# for whatever it does not forward itself (packaging/launcher.c).
TREE_STUB = """#!{python} -IS
# flock CNI plugin (installed by `flock install-cni --python --launcher`); the launcher
# execs it for what it does not forward natively. Runs {module} from this directory.
import sys
sys.path.insert(0, sys.argv[0].rpartition("/")[0])
import {module}
sys.exit({module}.main())
"""
TREE_STUB_NAME = "plugin"

STUB = """#!{python} -IS
# flock CNI plugin entry (installed by `flock install-cni --python`); runs {module} from flock.d.
import sys
sys.path.insert(0, sys.argv[0].rpartition("/")[0] + "/{link}")
import {module}
sys.exit({module}.main())
"""


class InstallError(Exception):
    pass


def write_atomic(path: Path, data: bytes, mode: int) -> bool:
    """Replace `path` with `data` by rename; False (and no write) if it already holds it."""
    try:
        st = path.lstat()
        same_kind = stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == mode
        if same_kind and path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, data)
        os.fchmod(fd, mode)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return True


def symlink_atomic(path: Path, target: str) -> bool:
    with contextlib.suppress(OSError):
        if os.readlink(path) == target:
            return False
    if path.is_dir() and not path.is_symlink():
        # A real directory (a hand-made or older install): rename() cannot replace it
        # by a symlink; move it aside under the tree prefix, so pruning removes it.
        os.rename(path, path.with_name(f"{TREE_PREFIX}displaced-{os.getpid()}"))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return True


def tree_digest(root: Path) -> str:
    """A digest of a directory's files (paths, modes, contents); symlinks by target."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if "__pycache__" in p.parts:
            continue
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            h.update(f"L {rel} {os.readlink(p)}\n".encode())
        elif stat.S_ISREG(st.st_mode):
            h.update(f"F {rel} {stat.S_IMODE(st.st_mode) & 0o111:o} {st.st_size}\n".encode())
            with p.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def _copy_tree_durable(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for p in sorted(dst.rglob("*"), reverse=True):
        if p.is_file() and not p.is_symlink():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif p.is_dir() and not p.is_symlink():
            fsync_dir(p)
    fsync_dir(dst)


def install_tree(src: Path, bin_dir: Path) -> tuple[str, bool]:
    """Install `src` as ``bin_dir/.flock-<digest>`` and point flock.d at it."""
    name = TREE_PREFIX + tree_digest(src)
    final = bin_dir / name
    changed = False
    if not final.is_dir() or tree_digest(final) != name[len(TREE_PREFIX) :]:
        tmp = bin_dir / f"{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        _copy_tree_durable(src, tmp)
        if final.exists():
            shutil.rmtree(final)  # damaged copy of the same version
        os.rename(tmp, final)
        fsync_dir(bin_dir)
        changed = True
    changed |= symlink_atomic(bin_dir / TREE_LINK, name)
    return name, changed


def prune_trees(bin_dir: Path, keep: set[str]) -> list[str]:
    """Remove old versions and leftovers of interrupted installs (keeping `keep`)."""
    removed = []
    for p in bin_dir.iterdir():
        if p.name.startswith(TREE_PREFIX) and p.name not in keep and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def render_conflist(
    *, socket: str, state_dir: str, cni_version: str, portmap: bool, name: str = "flock"
) -> bytes:
    plugin: dict[str, object] = {"type": PLUGIN_NAME, "agentSocket": socket}
    if state_dir:
        plugin["stateDir"] = state_dir
    plugins: list[dict[str, object]] = [plugin]
    if portmap:
        plugins.append(
            {"type": "portmap", "capabilities": {"portMappings": True}, "backend": "nftables"}
        )
    conf = {
        "cniVersion": cni_version,
        "cniVersions": ["0.4.0", "1.0.0", "1.1.0"],
        "name": name,
        "plugins": plugins,
    }
    return (json.dumps(conf, indent=2) + "\n").encode()


def _plugin_source() -> Path:
    return Path(__file__).with_name("plugin.py")


def _script_tree(staging: Path, python: str, launcher: bool) -> None:
    staging.mkdir()
    shutil.copy2(_plugin_source(), staging / f"{MODULE_NAME}.py")
    if launcher:
        stub = staging / TREE_STUB_NAME
        stub.write_text(TREE_STUB.format(python=python, module=MODULE_NAME))
        stub.chmod(0o755)


def _precompile(tree: Path, python: str) -> None:
    """Compile the plugin module with the interpreter that will run it (no compile per exec)."""
    subprocess.run(
        [python, "-I", "-S", "-m", "py_compile", str(tree / f"{MODULE_NAME}.py")],
        check=True,
        capture_output=True,
    )


def check_python(python: str) -> None:
    try:
        out = subprocess.run(
            [python, "-I", "-S", "-c", "import sys; print(sys.version_info >= (3, 11))"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        raise InstallError(f"--python {python}: cannot run it: {e}") from None
    if out != "True":
        raise InstallError(f"--python {python}: the plugin needs Python 3.11 or later")


def install(
    *,
    bin_dir: Path,
    conf_dir: Path,
    socket: str = DEFAULT_SOCKET,
    state_dir: str = "",
    bundle: Path | None = None,
    python: str | None = None,
    launcher: Path | None = None,
    cni_version: str = "1.0.0",
    portmap: bool = False,
    conflist_name: str = CONFLIST_NAME,
) -> list[str]:
    """Install; returns one line per action taken (empty when nothing changed).

    `launcher` (with `python`): the static launcher built from packaging/launcher.c
    becomes the entry, forwarding natively and exec'ing the host Python's plugin
    for the rest; without it the entry is the Python stub.
    """
    if not socket.startswith("/"):
        raise InstallError(f"--socket {socket!r} must be an absolute path")
    if state_dir and not state_dir.startswith("/"):
        raise InstallError(f"--state-dir {state_dir!r} must be an absolute path")
    if launcher is not None and python is None:
        raise InstallError("--launcher goes with --python (a bundle brings its own launcher)")
    if cni_version not in ("0.4.0", "1.0.0", "1.1.0"):
        raise InstallError(f"--cni-version {cni_version!r}: use 0.4.0, 1.0.0 or 1.1.0")
    for d in (bin_dir, conf_dir):
        d.mkdir(parents=True, exist_ok=True)
    actions: list[str] = []
    previous = None
    with contextlib.suppress(OSError):
        previous = os.readlink(bin_dir / TREE_LINK)

    if python is not None:
        check_python(python)
        with tempfile.TemporaryDirectory(prefix="flock-install-") as tmp:
            staging = Path(tmp) / "tree"
            _script_tree(staging, python, launcher is not None)
            name, changed = install_tree(staging, bin_dir)
        if not (bin_dir / name / "__pycache__").is_dir():
            _precompile(bin_dir / name, python)
        if launcher is not None:
            entry = launcher.read_bytes()
        else:
            entry = STUB.format(python=python, module=MODULE_NAME, link=TREE_LINK).encode()
    else:
        src = bundle if bundle is not None else DEFAULT_BUNDLE
        if not (src / PLUGIN_NAME).is_file() or not (src / TREE_LINK).is_dir():
            raise InstallError(
                f"no plugin bundle at {src} (expected {src}/flock and {src}/flock.d/); build it "
                "with packaging/build_plugin_bundle.py --out DIR and pass --bundle DIR, or use "
                "--python PATH on a host that has Python 3.11+"
            )
        name, changed = install_tree(src / TREE_LINK, bin_dir)
        entry = (src / PLUGIN_NAME).read_bytes()
    if changed:
        actions.append(f"installed plugin tree {bin_dir / name} (flock.d -> {name})")
    if write_atomic(bin_dir / PLUGIN_NAME, entry, 0o755):
        actions.append(f"wrote {bin_dir / PLUGIN_NAME}")
    keep = {name} | ({previous} if previous and previous != name else set())
    for old in prune_trees(bin_dir, keep):
        actions.append(f"removed old plugin tree {old}")

    conf = render_conflist(
        socket=socket, state_dir=state_dir, cni_version=cni_version, portmap=portmap
    )
    conf_path = conf_dir / conflist_name
    if write_atomic(conf_path, conf, 0o644):
        actions.append(f"wrote {conf_path}")
    return actions


def uninstall(*, bin_dir: Path, conf_dir: Path, conflist_name: str = CONFLIST_NAME) -> list[str]:
    """Remove what `install` put there; the conflist first, so no new pod picks flock.

    For node-by-node migration: once the node's label is gone, the runtime must
    stop choosing a network whose agent no longer runs. The conflist is removed
    only if it is flock's (a file of that name with another plugin is left).
    """
    actions: list[str] = []
    conf_path = conf_dir / conflist_name
    try:
        conf = json.loads(conf_path.read_bytes())
    except FileNotFoundError:
        conf = None
    except ValueError:
        raise InstallError(f"{conf_path} is not JSON; not removing it") from None
    if conf is not None:
        plugins = conf.get("plugins") if isinstance(conf, dict) else None
        first = plugins[0] if isinstance(plugins, list) and plugins else None
        if not (isinstance(first, dict) and first.get("type") == PLUGIN_NAME):
            raise InstallError(f"{conf_path} is not flock's conflist; not removing it")
        conf_path.unlink()
        fsync_dir(conf_dir)
        actions.append(f"removed {conf_path}")
    entry = bin_dir / PLUGIN_NAME
    if entry.is_file() or entry.is_symlink():
        entry.unlink()
        actions.append(f"removed {entry}")
    link = bin_dir / TREE_LINK
    if link.is_symlink():
        link.unlink()
        actions.append(f"removed {link}")
    if bin_dir.is_dir():
        for old in prune_trees(bin_dir, keep=set()):
            actions.append(f"removed plugin tree {old}")
        fsync_dir(bin_dir)
    return actions


def shadowing_configs(conf_dir: Path, conflist_name: str = CONFLIST_NAME) -> list[str]:
    """Network configs a runtime would pick before ours (it takes the first by name)."""
    return sorted(
        p.name
        for p in conf_dir.iterdir()
        if p.suffix in (".conf", ".conflist", ".json") and p.name < conflist_name
    )


def main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="flock install-cni",
        description="Install the flock CNI plugin and its network config on this host.",
    )
    ap.add_argument(
        "--bin-dir", type=Path, default=Path("/opt/cni/bin"), help="CNI plugin dir (%(default)s)"
    )
    ap.add_argument(
        "--conf-dir", type=Path, default=Path("/etc/cni/net.d"), help="CNI config dir (%(default)s)"
    )
    ap.add_argument("--socket", default=DEFAULT_SOCKET, help="the agent's socket (%(default)s)")
    ap.add_argument("--state-dir", default="", help="where DELs wait while the agent is down")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--bundle", type=Path, help=f"self-contained build (default {DEFAULT_BUNDLE})")
    src.add_argument("--python", help="run the plugin with this host Python 3.11+ instead")
    ap.add_argument(
        "--launcher",
        type=Path,
        help="with --python: the static launcher (packaging/launcher.c, built by scripts/setup)"
        " as the entry, forwarding to the agent without starting Python",
    )
    ap.add_argument(
        "--cni-version",
        default="1.0.0",
        help="the conflist's cniVersion (%(default)s; cniVersions always lists up to 1.1.0)",
    )
    ap.add_argument("--portmap", action="store_true", help="chain portmap (hostPort support)")
    ap.add_argument("--conflist-name", default=CONFLIST_NAME)
    ap.add_argument(
        "--uninstall", action="store_true", help="remove the conflist, the plugin and its trees"
    )
    args = ap.parse_args(list(argv))
    if args.uninstall:
        try:
            done = uninstall(
                bin_dir=args.bin_dir, conf_dir=args.conf_dir, conflist_name=args.conflist_name
            )
        except (InstallError, OSError) as e:
            print(f"flock install-cni: {e}", file=sys.stderr)
            return 1
        for line in done or ["nothing to remove"]:
            print(f"flock install-cni: {line}")
        return 0
    try:
        actions = install(
            bin_dir=args.bin_dir,
            conf_dir=args.conf_dir,
            socket=args.socket,
            state_dir=args.state_dir,
            bundle=args.bundle,
            python=args.python,
            launcher=args.launcher,
            cni_version=args.cni_version,
            portmap=args.portmap,
            conflist_name=args.conflist_name,
        )
    except (InstallError, OSError, subprocess.CalledProcessError) as e:
        print(f"flock install-cni: {e}", file=sys.stderr)
        return 1
    for line in actions or ["already installed; nothing changed"]:
        print(f"flock install-cni: {line}")
    if args.portmap and not (args.bin_dir / "portmap").exists():
        print(
            f"flock install-cni: warning: --portmap but no {args.bin_dir}/portmap", file=sys.stderr
        )
    shadow = shadowing_configs(args.conf_dir, args.conflist_name)
    if shadow:
        print(
            f"flock install-cni: warning: {', '.join(shadow)} in {args.conf_dir} sort before "
            f"{args.conflist_name}; the runtime uses the first one",
            file=sys.stderr,
        )
    return 0
