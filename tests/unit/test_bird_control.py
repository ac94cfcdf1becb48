"""Parsing BIRD's control-socket replies (the protocol birdc speaks)."""

from __future__ import annotations

import pytest

from flock.apply.bird import BirdUnavailable, Reply, parse_protocols, parse_reply

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
