"""A blocking rtnetlink socket opened inside any network namespace, without forking.

pyroute2 0.9 opens a socket in another namespace by forking a child that
`setns`es and passes the fd back: ~50 ms on the test machine, the whole ADD
budget several times over. A network namespace is a per-thread property, so
the calling thread instead `setns`es into the target, creates the socket (which
stays bound to that namespace for life) and `setns`es back: ~20 µs. The thread
is only ever away for the duration of one `socket()` call, and the return is
checked: a thread that cannot come back is a fatal error, never silent.

Requests go out as one datagram per batch (the kernel processes the messages of
a datagram in order and acknowledges each), so a pod's namespace is programmed
in one or two system calls.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
import socket
import threading
from collections.abc import Sequence

from flock.apply import rtnl
from flock.apply.rtnl import Request

__all__ = ["NetlinkError", "Request", "RtnlSocket", "read_sysctl", "socket_in", "write_sysctl"]

SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12
CLONE_NEWNET = 0x40000000
_RECV_SIZE = 1 << 18
# Requests per datagram: each is acknowledged separately, and the acks of one
# datagram must fit the socket's receive buffer (ENOBUFS would lose some).
_BATCH = 64

_libc = ctypes.CDLL(None, use_errno=True)


class NetlinkError(OSError):
    """A request the kernel refused; `what` says which one, `kernel_msg` the kernel's reason."""

    def __init__(self, err: int, what: str, kernel_msg: str = "") -> None:
        detail = f"{what}: {os.strerror(err)}"
        if kernel_msg:
            detail += f" ({kernel_msg})"
        super().__init__(err, detail)
        self.what = what
        self.kernel_msg = kernel_msg

    def __str__(self) -> str:
        return str(self.strerror)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def socket_in(netns: str | None) -> socket.socket:
    """A NETLINK_ROUTE socket in namespace `netns` (a path), or in the caller's when None."""
    if netns is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            finally:
                try:
                    _setns(own)
                except OSError as exc:  # pragma: no cover - would need a broken kernel
                    raise SystemExit(
                        f"cannot return thread to its network namespace: {exc}"
                    ) from exc
        finally:
            os.close(own)
    finally:
        os.close(target)


def write_sysctl(netns: str | None, key: str, value: str) -> None:
    """Write a /proc/sys/net key as seen from `netns`, using a short-lived thread.

    /proc/sys/net resolves against the network namespace of the opening thread,
    so a helper thread that `setns`es keeps the caller's thread untouched.
    """
    _sysctl(netns, key, value, f"set {key}={value}")


def read_sysctl(netns: str | None, key: str) -> str:
    """Read a /proc/sys/net key as seen from `netns` (see `write_sysctl`)."""
    return _sysctl(netns, key, None, f"read {key}")


def _sysctl(netns: str | None, key: str, value: str | None, what: str) -> str:
    """Read (`value` None) or write `key` from a helper thread in `netns`; the value read."""
    path = "/proc/sys/" + key.replace(".", "/")
    out: list[str] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            if netns is not None:
                fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _setns(fd)
                finally:
                    os.close(fd)
            if value is None:
                with open(path) as fh:
                    out.append(fh.read().strip())
            else:
                with open(path, "w") as fh:
                    fh.write(value)
                out.append(value)
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=work, name="flock-sysctl")
    worker.start()
    worker.join()
    if failure:
        raise OSError(f"cannot {what} in {netns or 'own namespace'}: {failure[0]}")
    return out[0]


class RtnlSocket:
    """Synchronous rtnetlink requests on one socket. Not thread-safe: one per thread."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._sock = socket_in(netns)
        self._sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        # Strict checking lets route dumps be filtered in the kernel (by proto, oif).
        self._sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        self._sock.bind((0, 0))
        self._seq = 0
        self._buf = bytearray(_RECV_SIZE)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RtnlSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        return self._seq

    def _recv(self) -> list[rtnl.Reply]:
        n = self._sock.recv_into(self._buf)
        return list(rtnl.split(bytes(self._buf[:n])))

    def batch(self, requests: Sequence[Request]) -> list[NetlinkError]:
        """Send the requests (in datagrams of up to 64); return the failures, [] when none.

        The kernel runs the messages of a datagram in order and goes on after a
        failure, so every request is tried.
        """
        errors: list[NetlinkError] = []
        for start in range(0, len(requests), _BATCH):
            errors += self._batch(requests[start : start + _BATCH])
        return errors

    def _batch(self, requests: Sequence[Request]) -> list[NetlinkError]:
        pending: dict[int, Request] = {}
        chunks = []
        for req in requests:
            seq = self._next_seq()
            pending[seq] = req
            chunks.append(rtnl.message(req.kind, req.flags | rtnl.NLM_F_ACK, seq, req.body))
        self._sock.send(b"".join(chunks))
        errors: list[NetlinkError] = []
        while pending:
            for reply in self._recv():
                if reply.kind != rtnl.NLMSG_ERROR or reply.seq not in pending:
                    continue
                req = pending.pop(reply.seq)
                err, text = rtnl.error_of(reply)
                if err:
                    errors.append(NetlinkError(err, req.what, text))
        return errors

    def call(self, req: Request, *, ignore: tuple[int, ...] = ()) -> None:
        """One request; raises NetlinkError unless it succeeded or failed with an `ignore` errno."""
        errors = self.batch([req])
        if errors and errors[0].errno not in ignore:
            raise errors[0]

    def run(self, requests: Sequence[Request]) -> None:
        """A batch that must fully succeed; raises the first failure."""
        errors = self.batch(requests)
        if errors:
            raise errors[0]

    def dump(self, kind: int, body: bytes) -> list[bytes]:
        """Bodies of all messages of a dump request."""
        seq = self._next_seq()
        self._sock.send(rtnl.message(kind, rtnl.NLM_F_DUMP, seq, body))
        out: list[bytes] = []
        while True:
            for reply in self._recv():
                if reply.seq != seq:
                    continue
                if reply.kind == rtnl.NLMSG_DONE:
                    return out
                if reply.kind == rtnl.NLMSG_ERROR:
                    err, text = rtnl.error_of(reply)
                    if err == errno_mod.EINTR:  # dump interrupted by a concurrent change
                        return self.dump(kind, body)
                    raise NetlinkError(err, f"dump {kind}", text)
                out.append(reply.body)

    def get_link(self, name: str) -> rtnl.Link | None:
        """The link called `name`, or None when there is none."""
        seq = self._next_seq()
        self._sock.send(rtnl.message(rtnl.RTM_GETLINK, 0, seq, rtnl.link_get(name)))
        while True:
            for reply in self._recv():
                if reply.seq != seq:
                    continue
                if reply.kind == rtnl.NLMSG_ERROR:
                    err, text = rtnl.error_of(reply)
                    if err in (errno_mod.ENODEV, errno_mod.ENOENT):
                        return None
                    raise NetlinkError(err, f"get link {name}", text)
                return rtnl.parse_link(reply.body)

    def links(self) -> list[rtnl.Link]:
        return [rtnl.parse_link(b) for b in self.dump(rtnl.RTM_GETLINK, rtnl.link_dump())]

    def addrs(self, family: int = 0, *, index: int = 0) -> list[rtnl.Addr]:
        body = rtnl.addr_dump(family, index)
        return [rtnl.parse_addr(b) for b in self.dump(rtnl.RTM_GETADDR, body)]

    def routes(
        self, family: int, *, proto: int = 0, oif: int | None = None, table: int = 0
    ) -> list[rtnl.Route]:
        """Routes of `family`, filtered in the kernel by whichever of proto/oif/table is set."""
        body = rtnl.route_dump(family, proto=proto, oif=oif, table=table)
        return [rtnl.parse_route(b) for b in self.dump(rtnl.RTM_GETROUTE, body)]

    def neighbours(self, family: int = 0, *, index: int = 0) -> list[rtnl.Neigh]:
        body = rtnl.neigh_dump(family, index)
        return [rtnl.parse_neigh(b) for b in self.dump(rtnl.RTM_GETNEIGH, body)]
