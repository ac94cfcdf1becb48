"""Parsing BIRD's control-socket replies (the protocol birdc speaks)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from flock.apply.bird import (
    BirdClient,
    BirdError,
    BirdUnavailable,
    Reply,
    parse_protocols,
    parse_reply,
)

SHOW_PROTOCOLS = (
    b"2002-Name       Proto      Table      State  Since         Info\n"
    b"1002-device1    Device     ---        up     2026-11-29 01:24:34  \n"
    b" flock_pods6 Kernel     master6    up     2026-11-29 01:24:34  \n"
    b" flock_p6_20010db8000000000000000000000001 BGP        ---        up     "
    b"2026-11-29 01:24:40  Established   \n"
    b" flock_p4_0a000001 BGP        ---        start  2026-11-29 01:24:34  Active"
    b"        Socket: Connection refused\n"
    b"0000 \n"
)


def test_parse_reply_codes_continuations_and_end() -> None:
    replies, done = parse_reply(SHOW_PROTOCOLS)
    assert done
    assert [r.code for r in replies] == [2002, 1002, 1002, 1002, 1002, 0]
    assert replies[2].text.startswith("flock_pods6")


def test_parse_reply_not_done_until_a_space_after_the_code() -> None:
    replies, done = parse_reply(b"0002-Reading configuration from /x\n")
    assert not done and replies == [Reply(2, "Reading configuration from /x")]
    replies, done = parse_reply(b" more\n", 2)
    assert not done and replies == [Reply(2, "more")]
    replies, done = parse_reply(b"+async notice\n0003 Reconfigured\n")
    assert done and replies == [Reply(3, "Reconfigured")]


def test_parse_reply_rejects_garbage() -> None:
    with pytest.raises(BirdUnavailable, match="unexpected line"):
        parse_reply(b"HTTP/1.1 400\n")


def test_parse_protocols() -> None:
    rows = parse_protocols(parse_reply(SHOW_PROTOCOLS)[0])
    assert [r.name for r in rows] == [
        "device1",
        "flock_pods6",
        "flock_p6_20010db8000000000000000000000001",
        "flock_p4_0a000001",
    ]
    bgp6, bgp4 = rows[2], rows[3]
    assert bgp6.established and bgp6.state == "up" and bgp6.since == "2026-11-29 01:24:40"
    assert not bgp4.established and bgp4.info == "Active        Socket: Connection refused"
    assert not rows[1].established


# ---- BirdClient against a scripted server speaking BIRD's CLI protocol (no root, no BIRD).


async def _serve(path: Path, script: dict[str, bytes], seen: list[str]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"0001 BIRD 2.0.12 ready.\n")
        await writer.drain()
        while line := await reader.readline():
            cmd = line.decode().strip()
            seen.append(cmd)
            if cmd == "hang up":
                writer.write(b"1000-partial\n")
                await writer.drain()
                break
            writer.write(script.get(cmd, b"9001 Parse error\n"))
            await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(handle, path=str(path))


def test_client_multiline_errors_and_reconnect(tmp_path: Path) -> None:
    async def scenario() -> None:
        sock = tmp_path / "bird.ctl"
        seen: list[str] = []
        script = {
            "show protocols": SHOW_PROTOCOLS,
            "show status": b"1000-BIRD 2.0.12\n1011-Router ID is 10.0.0.2\n"
            b" Last reboot on 2026-11-29 01:24:46\n0013 Daemon is up and running\n",
            'configure "/x"': b"0002-Reading configuration from /x\n8002 /x:3:1 syntax error\n",
        }
        server = await _serve(sock, script, seen)
        client = BirdClient(sock, timeout=2)
        try:
            rows = parse_protocols(await client.command("show protocols"))
            assert len(rows) == 4
            status = await client.command("show status")
            assert status[-1] == Reply(13, "Daemon is up and running")
            with pytest.raises(BirdError, match="syntax error") as e:
                await client.command('configure "/x"')
            assert e.value.code == 8002
            with pytest.raises(BirdError) as e:
                await client.command("bogus")
            assert e.value.code == 9001
            with pytest.raises(ValueError, match="one non-empty line"):
                await client.command("show status\nshutdown")
            with pytest.raises(BirdUnavailable, match="closed"):
                await client.command("hang up")
            # The next command reconnects.
            assert (await client.command("show status"))[0].code == 1000
            assert seen == [
                "show protocols",
                "show status",
                'configure "/x"',
                "bogus",
                "hang up",
                "show status",
            ]
        finally:
            await client.close()
            server.close()
            await server.wait_closed()
        with pytest.raises(BirdUnavailable, match=str(sock)):
            await BirdClient(sock, timeout=1).command("show status")

    asyncio.run(scenario())
