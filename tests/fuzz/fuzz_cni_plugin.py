#!/usr/bin/env python3
"""Fuzz target: the CNI plugin answers every environment and stdin with a CNI-shaped reply.

Input: environment lines ``KEY=VALUE`` (a key without ``CNI_`` gets it), a
blank line, then the bytes the runtime would put on stdin. `plugin.run` must
return exit status 0 or 1, and on 1 an error object with an int code, a
non-empty msg and a cniVersion flock speaks; it must never raise. Whatever the
plugin would send to the agent must also pass the agent's own check
(`CniRequest.from_wire` raises nothing but CniError), and the request frame
round-trips. tests/unit/test_cni_launcher.py runs this corpus through the native
launcher and the Python plugin against the real RPC server and compares them.

The agent socket is pointed at a path that does not exist and the state dir at
one that cannot be created, so the fuzzer never talks to a real agent nor
writes deferred DELs.

    cp -r tests/fuzz/corpus/cni_plugin /tmp/fp-corpus
    .venv/bin/python tests/fuzz/fuzz_cni_plugin.py -max_total_time=300 /tmp/fp-corpus
"""

from __future__ import annotations

import json
import sys

from flock.cni import plugin
from flock.model.cni import CniError, CniRequest

NOWHERE = {
    "agentSocket": "/nonexistent/fp-fuzz.sock",
    "agentTimeout": 1e-9,
    "stateDir": "/nonexistent/fp-fuzz-state",
}


def decode(data: bytes) -> tuple[dict[str, str], bytes]:
    head, _, stdin = data.partition(b"\n\n")
    env: dict[str, str] = {}
    for line in head.decode("utf-8", "surrogateescape").split("\n"):
        key, sep, value = line.partition("=")
        if sep:
            env[key if key.startswith("CNI_") else "CNI_" + key] = value
    try:
        config = json.loads(stdin)
    except (ValueError, RecursionError):
        return env, stdin
    if isinstance(config, dict):
        config.update(NOWHERE)
        stdin = json.dumps(config).encode()
    return env, stdin


def one_input(data: bytes) -> None:
    env, stdin = decode(data)
    rc, out = plugin.run(env, stdin, [])
    assert rc in (0, 1), rc
    if rc == 1:
        assert out is not None
        assert isinstance(out["code"], int) and out["code"] > 0, out
        assert isinstance(out["msg"], str) and out["msg"], out
        assert out["cniVersion"] in plugin.SUPPORTED_VERSIONS, out
    elif env.get("CNI_COMMAND") == "VERSION":
        assert out is not None and out["supportedVersions"] == list(plugin.SUPPORTED_VERSIONS)
    else:
        raise AssertionError(f"success without an agent: {env} {out}")
    plugin.json_loads(plugin.json_dumps(out).encode())
    # The wire frame (what the launcher sends too) carries env and stdin unchanged.
    if not any("\0" in k or "\0" in v for k, v in env.items()):
        assert plugin.decode_frame(plugin.encode_frame(env, stdin)) == (env, stdin)

    # The agent's side: any JSON object, as the request it would be.
    try:
        msg = json.loads(stdin)
    except (ValueError, RecursionError):
        return
    for candidate in (msg, {"command": env.get("CNI_COMMAND"), "config": msg}):
        try:
            req = CniRequest.from_wire(candidate)
        except CniError as e:
            assert e.code > 0 and e.msg
            continue
        assert CniRequest.from_wire(req.to_wire()) == req


def main() -> None:
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
