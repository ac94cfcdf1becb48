"""Every seed and regression input of the fuzz targets runs here as a plain test.

The targets live in tests/fuzz/ (run them under atheris for a longer pass, see
docs/ipam.md); their corpora hold hand-written seeds plus the minimised inputs
earlier fuzz runs found, so each discovered edge case stays a regression test.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
TARGETS = ("annotations", "cni_plugin", "embed", "ipam")


def _target(name: str) -> Callable[[bytes], None]:
    spec = importlib.util.spec_from_file_location(f"fuzz_{name}", FUZZ / f"fuzz_{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fn: Callable[[bytes], None] = mod.one_input
    return fn


CASES = [(t, p) for t in TARGETS for p in sorted((FUZZ / "corpus" / t).iterdir())]


def test_every_target_has_a_corpus() -> None:
    for t in TARGETS:
        assert len([c for c in CASES if c[0] == t]) >= 5, t


@pytest.fixture(scope="module")
def targets() -> dict[str, Callable[[bytes], None]]:
    return {t: _target(t) for t in TARGETS}


@pytest.mark.parametrize(("target", "path"), CASES, ids=[f"{t}/{p.name}" for t, p in CASES])
def test_corpus_input(targets: dict[str, Callable[[bytes], None]], target: str, path: Path) -> None:
    targets[target](path.read_bytes())
