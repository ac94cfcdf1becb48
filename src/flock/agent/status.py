"""`flock status`: what one node's agent holds, as a table or as JSON.

The agent serves its state on a second unix socket, `RUN_DIR/status.sock`
(mode 0600, the same one-request-per-connection framing as the plugin RPC),
kept apart from the plugin's socket so that an operator's query can never be
mistaken for, or delay, a CNI verb. The reply is the agent's `inspect()`:
allocations, the anycast set (with next hops), the BGP export set, BGP
sessions, the policy engine's state, attachments by state, and what the
start-up re-sync could not repair.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from flock.agent.rpc import bind_private, call

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = Path("/run/flock")
STATUS_SOCKET = "status.sock"  # in the run dir, beside the plugin's agent.sock


async def serve_status(
    path: Path, inspect: Callable[[], Awaitable[dict[str, Any]]]
) -> asyncio.Server:
    """Serve `inspect()` as JSON to anyone who connects to `path` (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = bind_private(path, backlog=16)

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(4096), 2)
            try:
                body = await inspect()
            except Exception as e:
                log.exception("status request failed")
                body = {"error": str(e)}
            writer.write(json.dumps(body, default=str).encode())
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return await asyncio.start_unix_server(on_conn, sock=sock)


def query(path: Path, *, timeout: float = 10.0) -> dict[str, Any]:
    """Ask the agent behind `path` for its state."""
    return call(path, b"{}", timeout=timeout, what="status")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)) for r in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def render(st: dict[str, Any]) -> str:
    """The human view of an `inspect()` reply."""
    out = [
        f"node {st.get('node')}  up {st.get('uptime_s')}s  datastore "
        f"{'synced' if st.get('datastore_synced') else 'NOT synced'}  "
        f"NodeConfig {st.get('node_config')}",
        "",
    ]
    allocs = st.get("allocations") or []
    out.append(f"ALLOCATIONS ({len(allocs)})")
    rows = [
        [
            f"{a['namespace']}/{a['pod']}",
            a["containerID"][:12],
            a["hostIfname"],
            a.get("v6") or "-",
            a.get("v4") or "-",
            ",".join(a.get("extraAddresses") or []) or "-",
            ",".join(a.get("anycast") or []) or "-",
        ]
        for a in allocs
    ]
    out.append(_table(rows, ["POD", "CONTAINER", "VETH", "IPV6", "IPV4", "EXTRA", "ANYCAST"]))
    out.append("")
    anycast = st.get("anycast") or {}
    out.append(f"ANYCAST ROUTED AND EXPORTED ({len(anycast)})")
    rows = [
        [ip, ", ".join(f"{h['via']} dev {h['dev']}" for h in hops)] for ip, hops in anycast.items()
    ]
    out.append(_table(rows, ["ADDRESS", "NEXT HOPS (Ready replicas)"]))
    out.append("")
    exports = st.get("exports") or []
    out.append(f"PER-POD EXPORTS ({len(exports)}): " + (", ".join(exports) or "-"))
    out.append("")
    bgp = st.get("bgp")
    if bgp is None:
        out.append("BGP: not configured (agent runs without --bird-socket)")
    else:
        out.append(f"BGP: BIRD {bgp.get('bird')}")
        rows = [
            [peer, s.get("state", ""), s.get("info", "")]
            for peer, s in (bgp.get("sessions") or {}).items()
        ]
        out.append(_table(rows, ["PEER", "STATE", "INFO"]))
    out.append("")
    pol = st.get("policy")
    if pol is None:
        out.append("POLICY: disabled")
    else:
        err = pol.get("last_error")
        rec = st.get("reconcile") or {}
        fed = (
            f" (fed {rec['policy_updates']} changes, {rec['policy_syncs']} whole views)"
            if "policy_updates" in rec
            else ""
        )
        out.append(
            f"POLICY: {pol.get('syncs')} syncs{fed}, last {pol.get('last_duration_s')}s"
            + (f", ERROR {err}" if err else "")
        )
        closed = pol.get("fail_closed") or {}
        for k, v in (pol.get("rejected_policies") or {}).items():
            # What it isolates until fixed: the pods it may select, in these directions.
            dirs = "+".join(closed.get(k) or ()) or "?"
            out.append(f"  REJECTED {k}, fail closed for {dirs}: {v}")
    events = st.get("events") or []
    if events:
        out.append("")
        out.append(f"RECENT POD EVENTS ({len(events)})")
        for e in events:
            out.append(f"  {e['pod']}: {e['reason']}: {e['message']}")
    resync = st.get("resync") or {}
    for f in resync.get("failures") or []:
        who = f.get("pod") or f.get("ifname") or f.get("dst") or ""
        out.append(f"START-UP RE-SYNC FAILED {f.get('step')} {who}: {f.get('error')}")
    states = st.get("attachments") or {}
    busy = {k: v for k, v in states.items() if k != "wired" and v}
    if busy:
        out.append("ATTACHMENTS in progress: " + ", ".join(f"{v} {k}" for k, v in busy.items()))
    rec = st.get("reconcile") or {}
    if rec.get("last_error"):
        out.append(f"RECONCILE last error: {rec['last_error']}")
    return "\n".join(out)


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="flock status", description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    p.add_argument("--socket", type=Path, help="status socket (default RUN_DIR/status.sock)")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    a = p.parse_args(list(argv))
    path = a.socket or a.run_dir / STATUS_SOCKET
    try:
        st = query(path)
    except (OSError, ValueError) as e:
        print(f"flock status: cannot reach the agent at {path}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(st, indent=2) if a.json else render(st))
    return 0
