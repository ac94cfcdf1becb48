"""The plugin <-> agent contract has one definition: the stdlib-only plugin module.

The agent imports the CNI error codes, flock's codes 100-103, the name
validators and the deferred-DEL directory name from `flock.cni.plugin`; these
tests pin the values (the CNI spec's and the ones docs/agent.md promises) and
that the plugin stays a leaf (it imports nothing but the standard library, so it
runs as a plain script with `python -I -S`).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from flock.agent import rpc, service
from flock.cni import plugin
from flock.model import cni

REPO = Path(__file__).resolve().parents[2]


def test_error_codes_are_the_specs_and_flocks_documented_ones() -> None:
    spec = {
        "ERR_INCOMPATIBLE_VERSION": 1,
        "ERR_UNSUPPORTED_FIELD": 2,
        "ERR_UNKNOWN_CONTAINER": 3,
        "ERR_INVALID_ENV": 4,
        "ERR_IO": 5,
        "ERR_DECODE": 6,
        "ERR_INVALID_CONFIG": 7,
        "ERR_INVALID_NETNS": 8,
        "ERR_TRY_AGAIN": 11,
        "ERR_NOT_AVAILABLE": 50,
        "ERR_LIMITED_CONNECTIVITY": 51,
        "ERR_INTERNAL": 999,
        "ERR_ANNOTATION": 100,
        "ERR_IPAM": 101,
        "ERR_DATAPATH": 102,
        "ERR_CHECK": 103,
    }
    for name, code in spec.items():
        assert getattr(plugin, name) == code, name
        assert getattr(cni, name) == code, name
    assert service.ERR_DATAPATH == plugin.ERR_DATAPATH
    doc = (REPO / "docs/agent.md").read_text()
    for code in (100, 101, 102, 103):
        assert f"{code} " in doc, f"docs/agent.md does not document code {code}"


def test_one_definition_of_the_validators_and_the_spool_dir() -> None:
    assert cni.valid_cni_name is plugin.valid_name
    assert cni.ifname_problem is plugin.ifname_problem
    assert rpc.DEFERRED_DEL_DIRNAME == plugin.DEFERRED_DEL_DIRNAME == "deferred-del"


def test_the_plugin_imports_only_the_standard_library() -> None:
    tree = ast.parse(Path(plugin.__file__).read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, "relative import in the plugin"
            names.add(node.module.split(".")[0])
    foreign = {n for n in names if n not in sys.stdlib_module_names}
    assert not foreign, f"the plugin imports {foreign}: it must run as a plain script"
