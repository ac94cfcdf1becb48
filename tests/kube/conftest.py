"""The real-API-server tier: one etcd + kube-apiserver per session, in its own netns.

The `apiserver` fixture (session scope) is a `flock.testbed.kube.ApiServer` with the
admin user; tests that need other identities add them with `apiserver.add_users`
(a restart) or start their own `ApiServer(users=...)`. Every test here is marked
`kube` (select with `-m kube`, leave out with `-m "not kube"`).

Without root the tier is skipped. Without the built binaries it is skipped on a
developer's machine with the build command in the reason, and FAILS under CI
(CI set), where `.ci/run` builds them first: a CI that silently skipped the real
server would prove nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flock.testbed import tools
from flock.testbed.kube import ApiServer

NEEDED = ("etcd", "kube-apiserver", "kubectl")
KUBE_DIR = Path(__file__).resolve().parent
ATTACH_SANS = ("203.0.113.1", "2001:db8:ad::1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kube: runs against a real etcd + kube-apiserver")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if KUBE_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.kube)


def require_tools(*names: str) -> None:
    """Skip (or fail under CI) unless root and the named tools are built."""
    if os.geteuid() != 0:
        pytest.skip("needs root: runs etcd and kube-apiserver in a network namespace")
    missing = tools.missing(*names)
    if missing:
        msg = "; ".join(missing)
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"CI must build the tools first: {msg}")
        pytest.skip(msg)


@pytest.fixture(scope="session")
def apiserver() -> Iterator[ApiServer]:
    require_tools(*NEEDED)
    # Addresses a test may attach() other namespaces by (TEST-NET-3 and documentation v6).
    with ApiServer(prefix="fkt", extra_sans=ATTACH_SANS) as api:
        yield api


@pytest.fixture(scope="session")
def need_tools() -> Callable[..., None]:
    """`need_tools("helm")`: skip, or fail under CI, unless the named tools are built.

    A fixture because test modules here cannot import this conftest (no package).
    """
    return require_tools
