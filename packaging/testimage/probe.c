/* A client for flock's end-to-end tests, run inside test-image pods: TCP, UDP, HTTP.
 *
 * Why: the static busybox in the test image cannot be the client. Its wget
 * segfaults as soon as /etc/hosts or /etc/resolv.conf exists (static glibc's
 * resolver), and the kubelet mounts both into every pod; its nc has no UDP.
 * This parses numeric addresses only (inet_pton, never the resolver), so it
 * stays a static binary that works in any pod.
 *
 *   probe tcp  ADDR PORT [PAYLOAD]   send, print the echo
 *   probe udp  ADDR PORT [PAYLOAD]   one datagram on a connected socket, print the reply
 *   probe http ADDR PORT [PATH]      GET, print the body; exit 3 unless the status is 200
 *   -w SECONDS (first argument)      timeout of every step (default 3)
 *
 * Exit 0 on an answer, 1 on a timeout (what a dropping policy looks like), 2 on
 * an error such as a refused connection or an ICMP unreachable (printed), 3 on a
 * non-200 HTTP status. ADDR is IPv4 or IPv6, with or without [brackets].
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int timeout_ms = 3000;

static int fail(int code, const char *what) {
    if (code == 1)
        printf("timeout\n");
    else
        printf("error: %s: %s\n", what, strerror(errno));
    return code;
}

/* Wait for `events` on fd; 0 when ready, 1 on timeout, 2 on error. */
static int wait_fd(int fd, short events) {
    struct pollfd p = {.fd = fd, .events = events};
    for (;;) {
        int n = poll(&p, 1, timeout_ms);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return 2;
        return n == 0 ? 1 : 0;
    }
}

static int parse(const char *addr, const char *port, struct sockaddr_storage *ss, socklen_t *len) {
    char buf[64];
    size_t n = strlen(addr);
    if (n >= sizeof buf) return -1;
    if (addr[0] == '[' && n > 2 && addr[n - 1] == ']') {
        memcpy(buf, addr + 1, n - 2);
        buf[n - 2] = 0;
    } else {
        strcpy(buf, addr);
    }
    long p = strtol(port, NULL, 10);
    if (p <= 0 || p > 65535) return -1;
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, buf, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((unsigned short)p);
        *len = sizeof *a4;
        return 0;
    }
    if (inet_pton(AF_INET6, buf, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((unsigned short)p);
        *len = sizeof *a6;
        return 0;
    }
    return -1;
}

static int open_connected(int type, struct sockaddr_storage *ss, socklen_t len, int *fd) {
    *fd = socket(ss->ss_family, type | SOCK_NONBLOCK, 0);
    if (*fd < 0) return fail(2, "socket");
    if (connect(*fd, (struct sockaddr *)ss, len) < 0 && errno != EINPROGRESS)
        return fail(2, "connect");
    if (type == SOCK_STREAM) {
        int w = wait_fd(*fd, POLLOUT);
        if (w) return fail(w, "connect");
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(*fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) {
            errno = err;
            return fail(2, "connect");
        }
    }
    return 0;
}

/* Read until `want` bytes (0: until EOF) or a timeout; returns bytes read or -code. */
static ssize_t read_reply(int fd, char *buf, size_t cap, size_t want) {
    size_t got = 0;
    while (got < cap - 1 && (want == 0 || got < want)) {
        int w = wait_fd(fd, POLLIN);
        if (w) {
            if (got > 0 && want == 0) break;
            return -fail(w, "read");
        }
        ssize_t n = read(fd, buf + got, cap - 1 - got);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -fail(2, "read");
        if (n == 0) break;
        got += (size_t)n;
    }
    buf[got] = 0;
    return (ssize_t)got;
}

int main(int argc, char **argv) {
    int i = 1;
    if (argc > 2 && strcmp(argv[1], "-w") == 0) {
        timeout_ms = (int)(atof(argv[2]) * 1000);
        i = 3;
    }
    if (argc - i < 3) {
        fprintf(stderr, "usage: probe [-w SECONDS] tcp|udp|http ADDR PORT [PAYLOAD|PATH]\n");
        return 2;
    }
    const char *mode = argv[i], *arg = argc - i > 3 ? argv[i + 3] : NULL;
    struct sockaddr_storage ss;
    socklen_t len;
    if (parse(argv[i + 1], argv[i + 2], &ss, &len) < 0) {
        fprintf(stderr, "probe: %s %s is not a numeric address and port\n", argv[i + 1], argv[i + 2]);
        return 2;
    }
    static char buf[65536];
    int fd, rc;
    if (strcmp(mode, "tcp") == 0 || strcmp(mode, "udp") == 0) {
        int udp = mode[0] == 'u';
        const char *payload = arg ? arg : "ping";
        if ((rc = open_connected(udp ? SOCK_DGRAM : SOCK_STREAM, &ss, len, &fd))) return rc;
        if (send(fd, payload, strlen(payload), 0) < 0) return fail(2, "send");
        ssize_t n = read_reply(fd, buf, sizeof buf, udp ? 1 : strlen(payload));
        if (n < 0) return (int)-n;
        printf("%s\n", buf);
        return 0;
    }
    if (strcmp(mode, "http") == 0) {
        if ((rc = open_connected(SOCK_STREAM, &ss, len, &fd))) return rc;
        char req[1024];
        snprintf(req, sizeof req, "GET %s HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n",
                 arg ? arg : "/", argv[i + 1]);
        if (send(fd, req, strlen(req), 0) < 0) return fail(2, "send");
        ssize_t n = read_reply(fd, buf, sizeof buf, 0);
        if (n < 0) return (int)-n;
        int status = 0;
        sscanf(buf, "HTTP/%*s %d", &status);
        char *body = strstr(buf, "\r\n\r\n");
        printf("%s", body ? body + 4 : "");
        if (status != 200) {
            fprintf(stderr, "probe: HTTP status %d\n", status);
            return 3;
        }
        return 0;
    }
    fprintf(stderr, "probe: unknown mode %s (tcp, udp, http)\n", mode);
    return 2;
}
