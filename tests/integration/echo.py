"""The echo server the policy traffic tests run inside pod namespaces.

One script for every such test: for each port given on its command line it
answers TCP (`x` -> `ok:x`) and UDP (`u` -> `ok:u`) on both families, and prints
`ready` once it listens, so a test knows when probing can start.
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
