"""Where the Go tools built by `scripts/build-tools` live: `tool_path("kube-apiserver")`.

The real-API-server tests and the lab run kube-apiserver, etcd, kubectl, helm,
containerd ... built from the tools modules under `tools/` (Debian ships none of
them at the versions flock targets, and no binary can be downloaded here). The
builds are cached outside the work tree, by version, so every clone of the
repository shares them:

    ${FLOCK_TOOLS_CACHE:-/var/cache/flock/tools}/<set>-<version>/bin/<binary>

`tools/sets.tsv` is the one table of which set builds which binary and which
module's required version names the set's directory; `scripts/build-tools`
reads the same table. `FLOCK_TOOLS_BIN`, when set, is a directory searched
first (binaries built some other way).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path("/var/cache/flock/tools")
REPO_ROOT = Path(__file__).resolve().parents[3]
TOOLS_DIR = REPO_ROOT / "tools"


class ToolMissing(FileNotFoundError):
    """A tool is not built; the message names the command that builds it."""


@dataclass(frozen=True)
class Tool:
    """One row of tools/sets.tsv."""

    set: str
    module: str
    version_module: str
    binary: str
    package: str


def cache_dir() -> Path:
    return Path(os.environ.get("FLOCK_TOOLS_CACHE") or DEFAULT_CACHE)


def table(tools_dir: Path = TOOLS_DIR) -> dict[str, Tool]:
    """The binaries of tools/sets.tsv, by name."""
    out: dict[str, Tool] = {}
    for line in (tools_dir / "sets.tsv").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) < 5:
            raise ValueError(f"{tools_dir / 'sets.tsv'}: malformed row {line!r}")
        tool = Tool(*fields[:5])
        out[tool.binary] = tool
    return out


def module_version(module: str, path: str, tools_dir: Path = TOOLS_DIR) -> str:
    """The version tools/<module>/go.mod requires of module `path`."""
    gomod = tools_dir / module / "go.mod"
    for line in gomod.read_text().splitlines():
        words = line.split()
        if words[:1] == ["require"]:
            words = words[1:]
        if len(words) >= 2 and words[0] == path:
            return words[1]
    raise ValueError(f"{gomod} does not require {path}")


def set_dir(set_name: str, tools_dir: Path = TOOLS_DIR) -> Path:
    """The cache directory of a set at the version the work tree's tools modules pin."""
    for tool in table(tools_dir).values():
        if tool.set == set_name:
            version = module_version(tool.module, tool.version_module, tools_dir)
            return cache_dir() / f"{set_name}-{version}"
    raise KeyError(f"no tool set {set_name!r} in {tools_dir / 'sets.tsv'}")


def tool_path(name: str) -> Path:
    """The built binary `name` (e.g. "kube-apiserver", "etcd", "kubectl", "helm").

    Raises `ToolMissing` naming `./scripts/build-tools SET` when it is not built.
    """
    override = os.environ.get("FLOCK_TOOLS_BIN")
    if override and os.access(Path(override) / name, os.X_OK):
        return Path(override) / name
    tools = table()
    if name not in tools:
        raise KeyError(f"{name!r} is not a tool of {TOOLS_DIR / 'sets.tsv'}: {sorted(tools)}")
    tool = tools[name]
    path = set_dir(tool.set) / "bin" / name
    if not os.access(path, os.X_OK):
        raise ToolMissing(
            f"{name} is not built (looked for {path}): run ./scripts/build-tools {tool.set}"
            " (a cold build takes minutes; later ones only re-link)"
        )
    return path


def missing(*names: str) -> list[str]:
    """Which of `names` are not built (their ToolMissing messages); empty if all are."""
    out = []
    for name in names:
        try:
            tool_path(name)
        except ToolMissing as e:
            out.append(str(e))
    return out
