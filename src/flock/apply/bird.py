"""Drive a running BIRD: its config file, its control socket and the per-pod export table.

The agent is the only writer of BIRD's configuration and of what BIRD exports.
This module turns "the node config and the export set are now X" into the
smallest change that gets BIRD there without dropping any BGP session:

- Session and aggregate changes (NodeConfig, local addresses, passwords)
  re-render the config (`flock.compile.bird`), write it atomically and ask
  BIRD to `configure`. BIRD only restarts the protocols whose options changed.
- Per-pod routes (/128, /32) go, by default, into a dedicated kernel table
  (`Mechanism.KERNEL`): a withdraw is one netlink delete that BIRD's `kernel`
  protocol sees at once and turns into a BGP UPDATE (about 0.2 ms, flat in the
  number of routes), where a re-render + `configure` costs milliseconds that
  grow with the number of routes (see bench/bench_withdraw.py). Large bursts
  are followed by `reload in` on the learning protocols, which makes BIRD
  rescan the table, so a dropped netlink notification cannot leave a route
  stale until the next periodic scan.

BIRD is talked to over its control socket directly, with the line protocol
`birdc` speaks (4-digit reply codes, `-` continuation), never by forking birdc.
`check()` notices a restarted BIRD (its "Last reboot" time changes, or it comes
back after being unreachable) and re-applies the full state.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import re
import socket
import struct
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path

from flock.apply import rtnl
from flock.apply.nlsock import RtnlSocket
from flock.apply.rtnl import Request
from flock.compile.bird import (
    PODS_PROTO,
    LocalAddress,
    Mechanism,
    Options,
    exportable,
    host_length,
    protocol_name,
    render,
)
from flock.durable import fsync_dir
from flock.model.nodeconfig import IPAddress, IPNetwork, NodeConfig, Peer

log = logging.getLogger(__name__)

DEFAULT_SOCKET = Path("/run/flock/bird.ctl")
DEFAULT_CONFIG = Path("/run/flock/bird.conf")
# More changes than this in one sync make BIRD rescan the export table afterwards.
BURST_RESCAN = 256

_CODE_LINE = re.compile(rb"^(\d{4})([ -])(.*)$")


class BirdError(RuntimeError):
    """BIRD answered a command with an error code (8xxx/9xxx)."""

    def __init__(self, command: str, code: int, text: str) -> None:
        super().__init__(f"BIRD rejected {command!r}: {code} {text}")
        self.code = code
        self.text = text


class BirdUnavailable(ConnectionError):
    """BIRD's control socket cannot be reached or closed mid-reply."""


@dataclass(frozen=True)
class Reply:
    code: int
    text: str


@dataclass(frozen=True)
class ProtocolState:
    """One row of `show protocols`."""

    name: str
    proto: str
    table: str
    state: str
    since: str
    info: str

    @property
    def established(self) -> bool:
        return self.proto == "BGP" and self.info.split()[:1] == ["Established"]


@dataclass
class SyncResult:
    added: int = 0
    removed: int = 0
    configured: bool = False
    rejected: list[IPNetwork] = field(default_factory=list)


def parse_reply(data: bytes, code: int = 0) -> tuple[list[Reply], bool]:
    """Parse complete lines of BIRD CLI output: the replies, and whether the last one ended it.

    Lines are `DDDD-text` (more follows), `DDDD text` (last line), or ` text`
    (continuation of the previous code). Lines starting with `+` are
    asynchronous notices and are skipped. `code` is the code in effect before
    `data` (for a continuation line fed on its own).
    """
    replies: list[Reply] = []
    done = False
    for raw in data.split(b"\n"):
        if not raw or raw.startswith(b"+"):
            continue
        m = _CODE_LINE.match(raw)
        if m:
            code = int(m.group(1))
            replies.append(Reply(code, m.group(3).decode(errors="replace")))
            done = m.group(2) == b" "
        elif raw.startswith(b" "):
            replies.append(Reply(code, raw[1:].decode(errors="replace")))
            done = False
        else:
            raise BirdUnavailable(f"unexpected line from BIRD: {raw[:80]!r}")
    return replies, done


def parse_protocols(replies: Sequence[Reply]) -> list[ProtocolState]:
    """`show protocols` rows (needs `timeformat protocol iso long`, which the renderer sets)."""
    rows: list[ProtocolState] = []
    for r in replies:
        if r.code != 1002:
            continue
        parts = r.text.split(None, 6)
        if len(parts) < 6:
            continue
        name, proto, table, state, date, time_ = parts[:6]
        info = parts[6].strip() if len(parts) > 6 else ""
        rows.append(ProtocolState(name, proto, table, state, f"{date} {time_}", info))
    return rows


class BirdClient:
    """One persistent connection to BIRD's control socket; commands are serialised."""

    def __init__(self, socket_path: Path = DEFAULT_SOCKET, *, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is not None and self._writer is not None:
            return self._reader, self._writer
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.socket_path), limit=1 << 24), self.timeout
            )
            hello, _ = parse_reply(await asyncio.wait_for(reader.readline(), self.timeout))
        except (OSError, TimeoutError) as e:
            raise BirdUnavailable(f"BIRD control socket {self.socket_path}: {e}") from e
        if not hello or hello[0].code != 1:
            writer.close()
            raise BirdUnavailable(f"BIRD control socket {self.socket_path}: bad greeting {hello}")
        self._reader, self._writer = reader, writer
        return reader, writer

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def command(self, cmd: str) -> list[Reply]:
        """Run one CLI command; BirdError on an error reply, BirdUnavailable if BIRD is gone."""
        if "\n" in cmd or "\r" in cmd or not cmd.strip():
            raise ValueError(f"BIRD command must be one non-empty line: {cmd!r}")
        async with self._lock:
            reader, writer = await self._connect()
            try:
                writer.write(cmd.encode() + b"\n")
                await writer.drain()
                replies: list[Reply] = []
                while True:
                    line = await asyncio.wait_for(reader.readline(), self.timeout)
                    if not line.endswith(b"\n"):
                        raise BirdUnavailable("BIRD closed the control connection")
                    got, done = parse_reply(line, replies[-1].code if replies else 0)
                    replies += got
                    if done:
                        break
            except (OSError, TimeoutError, BirdUnavailable) as e:
                await self.close()
                if isinstance(e, BirdUnavailable):
                    raise
                raise BirdUnavailable(f"BIRD control socket {self.socket_path}: {e!r}") from e
        last = replies[-1]
        if last.code >= 8000:
            raise BirdError(cmd, last.code, last.text)
        return replies


_RTMSG = struct.Struct("=BBBBBBBBI")
RTN_BLACKHOLE = 6
RT_TABLE_UNSPEC = 0
RT_SCOPE_UNIVERSE = 0
BULK = 100  # changes per datagram (the acks must fit the receive buffer)


def _netns_path(netns: str | None) -> str | None:
    if netns is None or netns.startswith("/"):
        return netns
    return f"/run/netns/{netns}"


def export_route(prefix: IPNetwork, *, table: int, proto: int, delete: bool = False) -> Request:
    """RTM_NEWROUTE/DELROUTE for a blackhole host route in the export table."""
    family = socket.AF_INET6 if prefix.version == 6 else socket.AF_INET
    body = _RTMSG.pack(
        family, prefix.prefixlen, 0, 0, RT_TABLE_UNSPEC, proto, RT_SCOPE_UNIVERSE, RTN_BLACKHOLE, 0
    )
    body += rtnl.attr(rtnl.RTA_DST, prefix.network_address.packed)
    body += rtnl.attr_u32(rtnl.RTA_TABLE, table)
    # `what` stays a constant: formatting an IPv6 address costs more than the whole request.
    if delete:
        return Request(rtnl.RTM_DELROUTE, 0, body, "withdraw a per-pod route from the export table")
    flags = rtnl.NLM_F_CREATE | rtnl.NLM_F_REPLACE
    return Request(rtnl.RTM_NEWROUTE, flags, body, "add a per-pod route to the export table")


class ExportTable:
    """The kernel table BIRD learns per-pod routes from: blackhole host routes with our protocol.

    Uses the datapath's raw rtnetlink socket (`flock.apply.nlsock`): a change is
    one datagram and a few microseconds of Python, and a namespace socket is
    opened without forking.
    """

    def __init__(self, *, table: int, proto: int, netns: str | None = None) -> None:
        self.table = table
        self.proto = proto
        self.netns = _netns_path(netns)
        self._sock: RtnlSocket | None = None

    def _get(self) -> RtnlSocket:
        if self._sock is None:
            self._sock = RtnlSocket(self.netns)
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def dump(self) -> set[IPNetwork]:
        sock = self._get()
        found: set[IPNetwork] = set()
        for family in (socket.AF_INET6, socket.AF_INET):
            for r in sock.routes(family, proto=self.proto):
                if r.table == self.table and r.proto == self.proto and r.dst is not None:
                    found.add(ipaddress.ip_network(f"{r.dst}/{r.dst_len}"))
        return found

    def apply(self, *, remove: Iterable[IPNetwork] = (), add: Iterable[IPNetwork] = ()) -> None:
        """Deletes first (in one datagram per BULK), then adds; a missing route is not an error."""
        reqs = [export_route(p, table=self.table, proto=self.proto, delete=True) for p in remove]
        reqs += [export_route(p, table=self.table, proto=self.proto) for p in add]
        sock = self._get()
        for i in range(0, len(reqs), BULK):
            errors = [e for e in sock.batch(reqs[i : i + BULK]) if e.errno != errno.ESRCH]
            if errors:
                raise errors[0]


def local_addresses(netns: str | None = None) -> list[LocalAddress]:
    """Every address on the node's interfaces (for choosing each session's source address)."""
    with RtnlSocket(_netns_path(netns)) as sock:
        names = {link.index: link.name for link in sock.links()}
        return [
            LocalAddress(names[a.index], ipaddress.ip_interface(f"{a.ip}/{a.prefixlen}"))
            for a in sock.addrs()
            if a.index in names
        ]


async def read_password_file(peer: Peer) -> str:
    """Standalone mode: the peer's password from `passwordFile`, trailing newline dropped."""
    if peer.password_file is None:
        raise ValueError(f"peer {peer.address}: no passwordFile to read")
    text = await asyncio.to_thread(Path(peer.password_file).read_text)
    return text.rstrip("\r\n")


def write_atomically(path: Path, text: str, *, mode: int = 0o600, durable: bool = True) -> None:
    """Write a temp file and rename it over `path`: readers never see a torn config.

    With `durable`, the file and the directory are fsynced too (8-12 ms on
    this machine's ext4). BIRD's config does not need that: it is derived
    state that the agent re-renders at start and after every BIRD restart.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


PasswordResolver = Callable[[Peer], Awaitable[str]]
AddressSource = Callable[[], Awaitable[Sequence[LocalAddress]]]


class BirdController:
    """What the agent calls: `sync` the desired state, `check` BIRD's health, read sessions.

    `sync(node, exports)` is cheap to call on every change: the config is
    re-rendered only when the NodeConfig (or a password, or the node's
    addresses after `refresh`) changed; otherwise only the export
    set is diffed against what was last applied, withdrawals first.
    """

    def __init__(
        self,
        *,
        config_path: Path = DEFAULT_CONFIG,
        socket_path: Path = DEFAULT_SOCKET,
        netns: str | None = None,
        options: Options | None = None,
        router_id: ipaddress.IPv4Address | None = None,
        resolve_password: PasswordResolver = read_password_file,
        addresses: AddressSource | None = None,
    ) -> None:
        self.config_path = config_path
        self.options = options or Options()
        self.netns = netns
        self.router_id = router_id
        self.client = BirdClient(socket_path)
        self.table = ExportTable(
            table=self.options.export_table, proto=self.options.export_route_proto, netns=netns
        )
        self._resolve_password = resolve_password
        self._addresses: AddressSource = addresses or (
            lambda: asyncio.to_thread(local_addresses, netns)
        )
        self._local: Sequence[LocalAddress] | None = None
        self._node: NodeConfig | None = None  # judges exports (set by every sync)
        self._configured_node: NodeConfig | None = None  # what BIRD's config was rendered from
        self._config_text: str | None = None
        self._exports: set[IPNetwork] = set()
        self._applied: set[IPNetwork] | None = None  # what the kernel table holds, once known
        self._reboot_mark: str | None = None
        self._sync_lock = asyncio.Lock()

    @property
    def exports(self) -> frozenset[IPNetwork]:
        """The export set as last requested (after dropping rejected prefixes)."""
        return frozenset(self._exports)

    async def close(self) -> None:
        await self.client.close()
        self.table.close()

    async def sync(self, node: NodeConfig, exports: Iterable[IPNetwork]) -> SyncResult:
        """Make BIRD export exactly the aggregates of `node` plus `exports` (host routes).

        The full reconcile: at start, after a NodeConfig change, periodically.
        It costs two set differences over `exports` (about 2 ms for 10,000
        prefixes on a 2-core machine); the per-pod hot path is `update`.
        """
        async with self._sync_lock:
            result = SyncResult()
            wanted: AbstractSet[IPNetwork] = (
                exports if isinstance(exports, set | frozenset) else frozenset(exports)
            )
            gone: set[IPNetwork]
            new: set[IPNetwork]
            if node != self._node:
                # The allow-list may have changed: every prefix is judged again.
                gone, new = set(self._exports), set(wanted)
            else:
                gone, new = self._exports - wanted, set(wanted - self._exports)
            for p in new:
                if not exportable(node, p):
                    result.rejected.append(p)
            new.difference_update(result.rejected)
            gone.difference_update(new)
            self._log_rejected(result)
            self._exports -= gone
            self._exports |= new
            self._node = node
            if self.options.mechanism is Mechanism.KERNEL:
                # Table first (withdrawals are what must be fast), then the config if it changed
                # (or an earlier configure failed).
                await self._apply_table(result, remove=gone, add=new)
                if node != self._configured_node or self._config_text is None:
                    result.configured = await self._configure(node, force=False)
            else:
                result.removed, result.added = len(gone), len(new)
                result.configured = await self._configure(node, force=False)
            return result

    async def update(
        self, *, add: Iterable[IPNetwork] = (), remove: Iterable[IPNetwork] = ()
    ) -> SyncResult:
        """Change the export set by a delta: the hot path, O(len(delta)) and no BIRD round trip.

        Needs a prior `sync` (for the NodeConfig). A prefix in both `add` and
        `remove` ends up removed.
        """
        async with self._sync_lock:
            node = self._node
            if node is None:
                raise RuntimeError("BirdController.update before the first sync")
            result = SyncResult()
            drop = {p for p in remove if p in self._exports}
            put = set()
            for p in add:
                if p in self._exports or p in drop:
                    continue
                if exportable(node, p):
                    put.add(p)
                else:
                    result.rejected.append(p)
            self._log_rejected(result)
            self._exports -= drop
            self._exports |= put
            if self.options.mechanism is Mechanism.KERNEL:
                await self._apply_table(result, remove=drop, add=put)
            else:
                result.removed, result.added = len(drop), len(put)
                result.configured = await self._configure(node, force=False)
            return result

    @staticmethod
    def _log_rejected(result: SyncResult) -> None:
        if result.rejected:
            log.warning(
                "not exporting %d prefixes (not host routes in spec.allowedAddresses): %s",
                len(result.rejected),
                ", ".join(map(str, result.rejected[:10])),
            )

    async def refresh(self) -> bool:
        """Re-read the node's addresses and the peers' passwords; configures if the text changed.

        Call it when an address on the node changes or a password Secret is rotated.
        """
        async with self._sync_lock:
            self._local = list(await self._addresses())
            if self._node is None:
                return False
            return await self._configure(self._node, force=False)

    async def _render(self, node: NodeConfig) -> str:
        if self._local is None:
            self._local = list(await self._addresses())
        passwords: dict[IPAddress, str] = {}
        for peer in node.spec.bgp.peers if node.spec.bgp else ():
            if peer.password_secret_ref is not None or peer.password_file is not None:
                passwords[peer.address] = await self._resolve_password(peer)
        return render(
            node,
            router_id=self.router_id,
            local_addresses=self._local,
            passwords=passwords,
            exports=self._exports if self.options.mechanism is Mechanism.STATIC else (),
            options=self.options,
        )

    async def _configure(self, node: NodeConfig, *, force: bool) -> bool:
        text = await self._render(node)
        if text == self._config_text and not force:
            self._configured_node = node
            return False
        await asyncio.to_thread(write_atomically, self.config_path, text, durable=False)
        path = str(self.config_path)
        if '"' in path:
            raise ValueError(f"config path {path!r} must not contain a double quote")
        await self.client.command(f'configure "{path}"')
        self._config_text = text
        self._configured_node = node
        self._reboot_mark = await self._status_mark()
        return True

    async def _status_mark(self) -> str:
        replies = await self.client.command("show status")
        return next((r.text for r in replies if r.text.startswith("Last reboot")), "")

    async def _apply_table(
        self,
        result: SyncResult,
        *,
        full: bool = False,
        remove: set[IPNetwork] | None = None,
        add: set[IPNetwork] | None = None,
    ) -> None:
        """Bring the kernel export table to `self._exports`: fully (diff) or by a known delta."""
        if self._applied is None:
            self._applied = await asyncio.to_thread(self.table.dump)
            full = True
        applied = self._applied
        if full:
            gone, new = applied - self._exports, self._exports - applied
        else:
            gone = (remove or set()) & applied
            new = (add or set()) - applied
        # In a thread also for one route: it is a netlink call, and the event loop
        # thread does no kernel work (STYLE.md). The hop added 0.2-0.4 ms to the
        # call (bench_withdraw, loaded 2-CPU machine) of a withdraw that reaches the
        # router's table ~61 ms later either way.
        await asyncio.to_thread(self.table.apply, remove=gone, add=new)
        applied -= gone
        applied |= new
        result.removed, result.added = len(gone), len(new)
        if len(gone) + len(new) > BURST_RESCAN and self._config_text is not None:
            await self.rescan({p.version for p in gone | new})

    async def rescan(self, versions: Iterable[int] = (6, 4)) -> None:
        """Make BIRD re-read the export table now (catches dropped netlink notifications)."""
        for v in sorted(set(versions)):
            with contextlib.suppress(BirdError):  # the protocol may not exist (no such family)
                await self.client.command(f"reload in {PODS_PROTO[v]}")

    async def healthy(self) -> bool:
        """BIRD answers on its control socket."""
        try:
            await self.client.command("show status")
        except (BirdUnavailable, BirdError):
            return False
        return True

    async def check(self) -> bool:
        """Health check for the agent's loop; restores the full state after a BIRD restart.

        Returns whether BIRD is healthy. Call it periodically (every second or so).
        """
        try:
            mark = await self._status_mark()
        except (BirdUnavailable, BirdError):
            self._reboot_mark = None
            return False
        if mark != self._reboot_mark:
            if self._node is not None:
                log.info("BIRD (re)started (%s): restoring config and exports", mark)
                await self.restore()
            self._reboot_mark = mark
        return True

    async def restore(self) -> None:
        """Re-apply everything: config (forced configure), export table from scratch, rescan."""
        async with self._sync_lock:
            if self._node is None:
                return
            self._local = None
            await self._configure(self._node, force=True)
            if self.options.mechanism is Mechanism.KERNEL:
                self._applied = None
                await self._apply_table(SyncResult(), full=True)
                await self.rescan()

    async def protocols(self) -> list[ProtocolState]:
        return parse_protocols(await self.client.command("show protocols"))

    async def sessions(self) -> dict[IPAddress, ProtocolState]:
        """BGP session state per configured peer (missing if BIRD has no such protocol yet)."""
        rows = {p.name: p for p in await self.protocols()}
        peers = self._node.spec.bgp.peers if self._node and self._node.spec.bgp else ()
        return {
            p.address: rows[protocol_name(p.address)]
            for p in peers
            if protocol_name(p.address) in rows
        }

    async def exported_count(self) -> dict[int, int]:
        """Per-pod routes BIRD has learned, per family (from `show route count`)."""
        counts: dict[int, int] = {}
        for v in (6, 4):
            try:
                replies = await self.client.command(f"show route protocol {PODS_PROTO[v]} count")
            except BirdError:
                counts[v] = 0
                continue
            m = next(
                (re.match(r"(\d+) of (\d+) routes", r.text) for r in replies),
                None,
            )
            counts[v] = int(m.group(1)) if m else 0
        return counts


__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_SOCKET",
    "BirdClient",
    "BirdController",
    "BirdError",
    "BirdUnavailable",
    "ExportTable",
    "ProtocolState",
    "Reply",
    "SyncResult",
    "host_length",
    "local_addresses",
    "parse_protocols",
    "parse_reply",
    "read_password_file",
    "write_atomically",
]
