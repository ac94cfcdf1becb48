/* TCP and UDP echo on one port, both families: the test image's traffic endpoint.
 *
 * Why: flock's end-to-end tests send real traffic through pods (policy allowed or
 * blocked, Services, both families) and busybox's nc has no UDP and serves one
 * peer at a time. Usage: echod [PORT] (default 7). One dual-stack socket per
 * protocol ([::], IPV6_V6ONLY off); a forked child per TCP connection echoes
 * until EOF; UDP datagrams are sent back to their source. Static, no libraries.
 */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int bound(int type, int port) {
    int fd = socket(AF_INET6, type, 0);
    if (fd < 0) return -1;
    int off = 0, on = 1;
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    struct sockaddr_in6 a;
    memset(&a, 0, sizeof a);
    a.sin6_family = AF_INET6;
    a.sin6_addr = in6addr_any;
    a.sin6_port = htons((unsigned short)port);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) return -1;
    if (type == SOCK_STREAM && listen(fd, 128) < 0) return -1;
    return fd;
}

static void echo_stream(int c) {
    char buf[65536];
    for (;;) {
        ssize_t n = read(c, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(c, buf + off, (size_t)(n - off));
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) _exit(0);
            off += w;
        }
    }
    _exit(0);
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 7;
    if (port <= 0 || port > 65535) {
        fprintf(stderr, "echod: bad port %s\n", argv[1]);
        return 2;
    }
    signal(SIGCHLD, SIG_IGN); /* children are reaped by the kernel */
    signal(SIGPIPE, SIG_IGN);
    int t = bound(SOCK_STREAM, port), u = bound(SOCK_DGRAM, port);
    if (t < 0 || u < 0) {
        perror("echod: bind");
        return 1;
    }
    fprintf(stderr, "echod: tcp+udp echo on [::]:%d\n", port);
    struct pollfd fds[2] = {{.fd = t, .events = POLLIN}, {.fd = u, .events = POLLIN}};
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            perror("echod: poll");
            return 1;
        }
        if (fds[0].revents & POLLIN) {
            int c = accept(t, NULL, NULL);
            if (c >= 0) {
                pid_t pid = fork();
                if (pid == 0) {
                    close(t);
                    close(u);
                    echo_stream(c);
                }
                close(c);
            }
        }
        if (fds[1].revents & POLLIN) {
            char buf[65536];
            struct sockaddr_storage from;
            socklen_t len = sizeof from;
            ssize_t n = recvfrom(u, buf, sizeof buf, 0, (struct sockaddr *)&from, &len);
            if (n >= 0) sendto(u, buf, (size_t)n, 0, (struct sockaddr *)&from, len);
        }
    }
}
