"""The echo server the policy traffic tests run inside pod namespaces, and their probe.

One server script for every such test: for each port given on its command line
it answers TCP (`x` -> `ok:x`) and UDP (`u` -> `ok:u`) on both families, and
prints `ready` once it listens, so a test knows when probing can start.

One probe script too (`PROBE`): it reads a JSON list of `[addr, proto, port]`
on stdin, tries each once (all at once), and prints one result per item:
`"ok"` (echoed), `"timeout"` (no answer: nftables dropped it) or what went
wrong otherwise (`"ConnectionRefusedError"`, `"echo-timeout"`, ...). Only a
timeout is a blocked cell: a refused connection means nothing listens there (a
dead echo server), which must fail an expected-blocked cell too, not pass it.
Only the connect is timed by the first argument; once connected, the echo gets
the second (long: a slow echo server on a loaded machine is not a drop).
"""

import textwrap

ECHO_SERVER = textwrap.dedent(
    """
    import selectors, socket, sys
    sel = selectors.DefaultSelector()
    for port in map(int, sys.argv[1:]):
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            s = socket.socket(socket.AF_INET6, kind)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::", port))
            if kind == socket.SOCK_STREAM:
                s.listen(64)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, kind)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            s = key.fileobj
            try:
                if key.data == socket.SOCK_DGRAM:
                    data, peer = s.recvfrom(2048)
                    s.sendto(b"ok:" + data, peer)
                elif key.data == socket.SOCK_STREAM:
                    c, _ = s.accept()
                    c.setblocking(False)
                    sel.register(c, selectors.EVENT_READ, "conn")
                else:
                    data = s.recv(2048)
                    if data:
                        s.send(b"ok:" + data)
                    else:
                        sel.unregister(s)
                        s.close()
            except BlockingIOError:
                pass
            except OSError:
                if key.data == "conn":
                    sel.unregister(s)
                    s.close()
    """
)

PROBE = textwrap.dedent(
    """
    import json, socket, sys
    from concurrent.futures import ThreadPoolExecutor
    timeout, echo_timeout = float(sys.argv[1]), float(sys.argv[2])
    def tcp(s, addr, port):
        s.settimeout(timeout)
        try:
            s.connect((addr, port))
        except socket.timeout:
            return "timeout"
        s.settimeout(echo_timeout)
        try:
            s.sendall(b"x")
            return "ok" if s.recv(16) == b"ok:x" else "bad-reply"
        except socket.timeout:
            return "echo-timeout"
    def udp(s, addr, port):
        s.connect((addr, port))  # connected: an ICMP port unreachable is reported as refused
        s.settimeout(timeout / 2)
        for _ in range(2):
            s.send(b"u")
            try:
                return "ok" if s.recv(16) == b"ok:u" else "bad-reply"
            except socket.timeout:
                continue
        return "timeout"
    def probe(item):
        addr, proto, port = item
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        with socket.socket(fam, kind) as s:
            try:
                return (tcp if proto == "tcp" else udp)(s, addr, port)
            except OSError as e:
                return type(e).__name__
    items = json.load(sys.stdin)
    with ThreadPoolExecutor(max_workers=max(1, len(items))) as ex:
        print(json.dumps(list(ex.map(probe, items))))
    """
)
