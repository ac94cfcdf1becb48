"""The agent's RPC server (flock.agent.rpc) and the typed request (flock.model.cni).

Real unix sockets in a temporary directory, real asyncio server; the handler
is the test's. No root needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from flock.agent import rpc
from flock.cni import plugin
from flock.model.allocation import AttachmentKey
from flock.model.cni import (
    ERR_DECODE,
    ERR_INTERNAL,
    ERR_INVALID_CONFIG,
    ERR_INVALID_ENV,
    ERR_INVALID_NETNS,
    ERR_IO,
    CniError,
    CniRequest,
)
from flock.testbed.wait import wait_until_async

CONFIG = {"cniVersion": "1.1.0", "name": "flock", "type": "flock"}


def add_request(cid: str = "c1", **extra: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "command": "ADD",
        "containerID": cid,
        "netns": "/run/netns/fp-x",
        "ifname": "eth0",
        "args": {"K8S_POD_NAMESPACE": "ns", "K8S_POD_NAME": "p", "K8S_POD_UID": "u"},
        "path": "/opt/cni/bin",
        "config": dict(CONFIG),
    }
    msg.update(extra)
    return msg


@pytest.fixture
def tmp() -> Iterator[Path]:
    d = Path(f"/tmp/fp-rpc-{os.getpid()}-{id(object())}")
    d.mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


Handler = Callable[[CniRequest], Awaitable[dict[str, Any]]]


@asynccontextmanager
async def serving(path: Path, handler: Handler, **kw: Any) -> AsyncIterator[asyncio.Server]:
    server = await rpc.serve(path, handler, **kw)
    try:
        yield server
    finally:
        await rpc.close_and_unlink(server, path)


async def echo(req: CniRequest) -> dict[str, Any]:
    return {"command": req.command, "cid": req.container_id, "pod": req.pod_name}


# --- The socket file ------------------------------------------------------------------------


def test_socket_is_mode_0600_in_a_created_directory_and_removed_on_close(tmp: Path) -> None:
    path = tmp / "run" / "flock" / "agent.sock"

    async def go() -> None:
        async with serving(path, echo):
            st = path.lstat()
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert [p.name for p in path.parent.iterdir()] == ["agent.sock"]  # no temp left
            assert await rpc.request(path, add_request()) == {
                "result": {"command": "ADD", "cid": "c1", "pod": "p"}
            }
        assert not path.exists()

    asyncio.run(go())


def test_stale_socket_is_replaced(tmp: Path) -> None:
    path = tmp / "agent.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # a crashed agent's leftover: the file exists, nobody listens

    async def go() -> None:
        async with serving(path, echo):
            assert (await rpc.request(path, add_request()))["result"]["cid"] == "c1"

    asyncio.run(go())


def test_live_socket_is_not_stolen(tmp: Path) -> None:
    path = tmp / "agent.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    try:
        with pytest.raises(rpc.SocketInUse, match="another live process"):
            asyncio.run(rpc.serve(path, echo))
        assert path.exists()
    finally:
        live.close()


def test_regular_file_at_socket_path_is_not_replaced(tmp: Path) -> None:
    path = tmp / "agent.sock"
    path.write_text("precious")
    with pytest.raises(FileExistsError, match="not a socket"):
        asyncio.run(rpc.serve(path, echo))
    assert path.read_text() == "precious"


# --- Replies --------------------------------------------------------------------------------


def test_cni_error_from_the_handler_becomes_an_error_reply(tmp: Path) -> None:
    path = tmp / "a.sock"

    async def fail(req: CniRequest) -> dict[str, Any]:
        raise CniError(100, "annotation flock.fritzlab.net/cidr6: bad", "fix the pod")

    async def go() -> None:
        async with serving(path, fail):
            reply = await rpc.request(path, add_request())
        assert reply == {
            "error": {
                "code": 100,
                "msg": "annotation flock.fritzlab.net/cidr6: bad",
                "details": "fix the pod",
            }
        }

    asyncio.run(go())


def test_unexpected_exception_is_logged_and_answered_and_the_server_keeps_serving(
    tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp / "a.sock"

    async def boom(req: CniRequest) -> dict[str, Any]:
        if req.container_id == "bad":
            raise KeyError("no-such-thing")
        if req.container_id == "notdict":
            return [1, 2]  # type: ignore[return-value]
        if req.container_id == "nan":
            return {"mtu": float("nan")}
        return {"ok": True}

    async def go() -> None:
        async with serving(path, boom):
            r1 = await rpc.request(path, add_request("bad"))
            r2 = await rpc.request(path, add_request("notdict"))
            r3 = await rpc.request(path, add_request("good"))
            r4 = await rpc.request(path, add_request("nan"))
        assert r1["error"]["code"] == ERR_INTERNAL
        assert "KeyError" in r1["error"]["msg"] and "no-such-thing" in r1["error"]["msg"]
        assert "ADD" in r1["error"]["msg"]
        assert r2["error"]["code"] == ERR_INTERNAL and "list" in r2["error"]["msg"]
        assert r3 == {"result": {"ok": True}}
        assert r4["error"]["code"] == ERR_INTERNAL and "JSON" in r4["error"]["msg"]

    asyncio.run(go())
    assert any("Traceback" in (r.exc_text or "") or r.exc_info for r in caplog.records)


@pytest.mark.parametrize(
    ("raw", "code", "word"),
    [
        (b"", ERR_DECODE, "not valid JSON"),
        (b"{nope", ERR_DECODE, "not valid JSON"),
        (b"[1]", ERR_DECODE, "not a JSON object"),
        (b'{"command": "FROB", "config": {}}', ERR_INVALID_ENV, "FROB"),
        (json.dumps(add_request(containerID="")).encode(), ERR_INVALID_ENV, "containerID"),
        (json.dumps(add_request(netns="")).encode(), ERR_INVALID_ENV, "netns"),
        (json.dumps(add_request(netns="rel/x")).encode(), ERR_INVALID_NETNS, "rel/x"),
        (json.dumps(add_request(ifname="a/b")).encode(), ERR_INVALID_ENV, "ifname"),
        (json.dumps(add_request(containerID=5)).encode(), ERR_DECODE, "containerID"),
        (json.dumps(add_request(args={"a": 1})).encode(), ERR_DECODE, "args"),
        (json.dumps(add_request(config=None)).encode(), ERR_INVALID_CONFIG, "config"),
        (json.dumps(add_request(config={"name": "f"})).encode(), ERR_INVALID_CONFIG, "cniVersion"),
        (
            json.dumps(add_request(config={"cniVersion": "1.1.0", "name": "-"})).encode(),
            ERR_INVALID_CONFIG,
            "name",
        ),
    ],
)
def test_malformed_requests_never_reach_the_handler(
    tmp: Path, raw: bytes, code: int, word: str
) -> None:
    path = tmp / "a.sock"
    called: list[CniRequest] = []

    async def handler(req: CniRequest) -> dict[str, Any]:
        called.append(req)
        return {}

    async def go() -> dict[str, Any]:
        async with serving(path, handler):
            return await asyncio.to_thread(rpc.call, path, raw)

    reply = asyncio.run(go())
    assert reply["error"]["code"] == code, reply
    assert word in reply["error"]["msg"] + reply["error"]["details"], reply
    assert called == []


def test_oversized_request_is_refused(tmp: Path) -> None:
    path = tmp / "a.sock"

    async def go() -> dict[str, Any]:
        async with serving(path, echo, max_request=1000):
            big = add_request(args={"K8S_POD_NAME": "x" * 5000})
            return await asyncio.to_thread(rpc.call, path, big)

    reply = asyncio.run(go())
    assert reply["error"]["code"] == ERR_IO
    assert "exceeds 1000 bytes" in reply["error"]["msg"]


def test_peer_that_never_finishes_its_request_times_out(tmp: Path) -> None:
    path = tmp / "a.sock"

    async def go() -> bytes:
        async with serving(path, echo, read_timeout=0.2):
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b'{"command": ')  # and never half-closes
            await writer.drain()
            reply = await asyncio.wait_for(reader.read(), 60)  # a deadline, not a bound
            writer.close()
            # The server still serves others.
            assert (await rpc.request(path, add_request()))["result"]["cid"] == "c1"
            return reply

    reply = json.loads(asyncio.run(go()))
    assert reply["error"]["code"] == ERR_IO
    assert "not received within" in reply["error"]["msg"]


def test_peer_that_hangs_up_early_does_not_hurt_the_server(tmp: Path) -> None:
    path = tmp / "a.sock"

    async def go() -> None:
        entered, release = asyncio.Event(), asyncio.Event()

        async def slow(req: CniRequest) -> dict[str, Any]:
            if req.container_id == "slow":
                entered.set()
                await release.wait()
            return {"cid": req.container_id}

        async with serving(path, slow):
            _, writer = await asyncio.open_unix_connection(str(path))
            writer.write(json.dumps(add_request("slow")).encode())
            writer.write_eof()
            await writer.drain()
            await asyncio.wait_for(entered.wait(), 60)  # the server holds the request
            writer.close()  # gone before the answer
            await writer.wait_closed()
            # The handler resumes at the loop's next turn, before any I/O of "next".
            release.set()
            assert (await rpc.request(path, add_request("next")))["result"] == {"cid": "next"}

    asyncio.run(go())


def test_requests_are_served_concurrently(tmp: Path) -> None:
    """16 requests whose handlers each wait until all 16 have started: only concurrency passes."""
    path = tmp / "a.sock"
    n = 16

    async def go() -> list[dict[str, Any]]:
        started = 0
        all_in = asyncio.Event()

        async def handler(req: CniRequest) -> dict[str, Any]:
            nonlocal started
            started += 1
            if started == n:
                all_in.set()
            await asyncio.wait_for(all_in.wait(), 60)  # a deadline, not a bound
            return {"cid": req.container_id}

        async with serving(path, handler):
            return await asyncio.gather(
                *(rpc.request(path, add_request(f"c{i}")) for i in range(n))
            )

    replies = asyncio.run(go())
    assert sorted(r["result"]["cid"] for r in replies) == sorted(f"c{i}" for i in range(n))


# --- CniRequest -----------------------------------------------------------------------------


def test_cni_request_fields_and_round_trip() -> None:
    prev = {
        "cniVersion": "0.4.0",
        "interfaces": [{"name": "eth0", "sandbox": "/run/netns/x"}],
        "ips": [{"version": "6", "address": "2001:db8::1/128", "interface": 0}],
    }
    msg = add_request(config={**CONFIG, "cniVersion": "0.4.0", "prevResult": prev})
    msg["command"] = "CHECK"
    req = CniRequest.from_wire(msg)
    assert req.key == AttachmentKey("c1", "eth0")
    assert (req.pod_namespace, req.pod_name, req.pod_uid) == ("ns", "p", "u")
    assert (req.cni_version, req.network) == ("0.4.0", "flock")
    assert req.prev_result == {
        "interfaces": [{"name": "eth0", "sandbox": "/run/netns/x"}],
        "ips": [{"address": "2001:db8::1/128", "interface": 0}],
    }
    assert CniRequest.from_wire(req.to_wire()) == req


def test_gc_request_lists_valid_attachments() -> None:
    config = {
        **CONFIG,
        "cni.dev/valid-attachments": [
            {"containerID": "a", "ifname": "eth0"},
            {"containerID": "b", "ifname": "net1"},
        ],
    }
    req = CniRequest.from_wire({"command": "GC", "config": config})
    assert req.valid_attachments == (AttachmentKey("a", "eth0"), AttachmentKey("b", "net1"))
    assert req.container_id == ""
    bad = {**CONFIG, "cni.dev/valid-attachments": [{"containerID": "a"}]}
    with pytest.raises(CniError, match=r"valid-attachments\[0\]") as e:
        CniRequest.from_wire({"command": "GC", "config": bad})
    assert e.value.code == ERR_INVALID_CONFIG


def test_del_and_status_need_less() -> None:
    req = CniRequest.from_wire(
        {"command": "DEL", "containerID": "c", "ifname": "eth0", "config": CONFIG}
    )
    assert req.netns == ""
    assert CniRequest.from_wire({"command": "STATUS", "config": CONFIG}).command == "STATUS"


# --- Deferred DELs: what the plugin records, the agent replays ------------------------------


def test_deferred_dels_written_by_the_plugin_are_replayed_then_removed(tmp: Path) -> None:
    state = tmp / "state"
    for cid in ("c1", "c2"):
        msg = {
            "command": "DEL",
            "containerID": cid,
            "netns": "",
            "ifname": "eth0",
            "args": {"K8S_POD_NAMESPACE": "ns", "K8S_POD_NAME": cid},
            "path": "",
            "config": dict(CONFIG),
        }
        plugin.defer_del(str(state), msg)
    spool = state / rpc.DEFERRED_DEL_DIRNAME
    (spool / "junk.json").write_text("{not json")
    seen: list[CniRequest] = []

    async def handler(req: CniRequest) -> dict[str, Any]:
        seen.append(req)
        if req.container_id == "c2" and len(seen) < 3:
            raise CniError(11, "busy")
        return {}

    assert asyncio.run(rpc.replay_deferred_dels(state, handler)) == 1
    assert sorted(r.container_id for r in seen) == ["c1", "c2"]
    assert all(r.command == "DEL" and r.pod_namespace == "ns" for r in seen)
    assert sorted(p.name for p in spool.iterdir()) == ["c2@eth0.json"]  # failed: kept; junk gone
    assert asyncio.run(rpc.replay_deferred_dels(state, handler)) == 1
    assert list(spool.iterdir()) == []
    assert asyncio.run(rpc.replay_deferred_dels(tmp / "nothing-here", handler)) == 0


def test_deferred_dels_recorded_after_start_are_picked_up(tmp: Path) -> None:
    """A plugin that found no socket while the agent started records its DEL after the
    start-up replay ran: the periodic pass must still deliver it."""
    state = tmp / "state"
    seen: list[str] = []

    async def handler(req: CniRequest) -> dict[str, Any]:
        seen.append(req.container_id)
        return {}

    async def go() -> None:
        assert await rpc.replay_deferred_dels(state, handler) == 0  # start-up: nothing yet
        task = asyncio.create_task(rpc.replay_deferred_dels_forever(state, handler, interval=0.05))
        try:
            late = {"command": "DEL", "containerID": "late", "ifname": "eth0", "config": CONFIG}
            plugin.defer_del(str(state), late)
            # The spool file goes only after the handler returned: both are awaited together
            # (stopping the pass as soon as the handler ran raced with that unlink).
            spool = state / rpc.DEFERRED_DEL_DIRNAME
            await wait_until_async(
                lambda: (list(seen), sorted(p.name for p in spool.iterdir())),
                until=lambda got: got == (["late"], []),
                timeout=60,
                what="the late DEL handled and its spool file removed",
            )
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(go())
    assert seen == ["late"]
    assert list((state / rpc.DEFERRED_DEL_DIRNAME).iterdir()) == []
