"""The `flock` command: a table of verbs, each owned by the module that implements it.

Verbs are imported lazily so that `flock install-cni` does not pay for pyroute2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# verb -> (module, function taking argv and returning an exit code, one-line help)
VERBS: dict[str, tuple[str, str, str]] = {
    "agent": ("flock.agent.main", "main", "run the node agent"),
    "status": ("flock.agent.status", "main", "show a node's allocations, anycast, BGP, policy"),
    "install-cni": ("flock.cni.install", "main", "install the CNI plugin and conflist"),
    "lab": ("flock.lab.cli", "main", "bring up / inspect / tear down the lab"),
}


def _usage() -> str:
    lines = ["usage: flock VERB [ARGS...]", "", "verbs:"]
    lines += [f"  {v:<12} {h}" for v, (_, _, h) in VERBS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    verb, rest = args[0], args[1:]
    if verb not in VERBS:
        print(f"flock: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = VERBS[verb]
    fn: Callable[[list[str]], int] = getattr(importlib.import_module(module), func)
    return fn(rest)


if __name__ == "__main__":
    raise SystemExit(main())
