/* TCP and UDP echo on one port, both families: the test image's traffic endpoint.
 *
 * Why: flock's end-to-end tests send real traffic through pods (policy allowed or
 * blocked, Services, both families) and busybox's nc has no UDP and serves one
 * peer at a time. Usage: echod [PORT] (default 7). One dual-stack socket per
 * protocol ([::], IPV6_V6ONLY off); a forked child per TCP connection echoes
 * until EOF; UDP datagrams are sent back to their source. Static, no libraries.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int bound(int family, int type, int port, int v6only) {
    int fd = socket(family, type, 0);
    if (fd < 0) return -1;
    int on = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    socklen_t len;
    if (family == AF_INET6) {
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof v6only);
        if (type == SOCK_DGRAM) setsockopt(fd, IPPROTO_IPV6, IPV6_RECVPKTINFO, &on, sizeof on);
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        a->sin6_family = AF_INET6;
        a->sin6_addr = in6addr_any;
        a->sin6_port = htons((unsigned short)port);
        len = sizeof *a;
    } else {
        if (type == SOCK_DGRAM) setsockopt(fd, IPPROTO_IP, IP_PKTINFO, &on, sizeof on);
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET;
        a->sin_addr.s_addr = htonl(INADDR_ANY);
        a->sin_port = htons((unsigned short)port);
        len = sizeof *a;
    }
    if (bind(fd, (struct sockaddr *)&ss, len) < 0) return -1;
    if (type == SOCK_STREAM && listen(fd, 128) < 0) return -1;
    return fd;
}

/* Echo one datagram back from the address it was sent to. */
static void echo_datagram(int u) {
    static char buf[65536];
    char control[256];
    struct sockaddr_storage from;
    struct iovec iov = {.iov_base = buf, .iov_len = sizeof buf};
    struct msghdr m = {.msg_name = &from, .msg_namelen = sizeof from, .msg_iov = &iov,
                       .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
    ssize_t n = recvmsg(u, &m, 0);
    if (n < 0) return;
    char out[256];
    size_t outlen = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
        if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO) {
            struct in_pktinfo pi;
            memcpy(&pi, CMSG_DATA(c), sizeof pi);
            pi.ipi_ifindex = 0;
            pi.ipi_spec_dst = pi.ipi_addr; /* reply from the destination address */
            struct cmsghdr *o = (struct cmsghdr *)out;
            o->cmsg_level = IPPROTO_IP;
            o->cmsg_type = IP_PKTINFO;
            o->cmsg_len = CMSG_LEN(sizeof pi);
            memcpy(CMSG_DATA(o), &pi, sizeof pi);
            outlen = CMSG_SPACE(sizeof pi);
        } else if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO) {
            struct in6_pktinfo pi;
            memcpy(&pi, CMSG_DATA(c), sizeof pi);
            /* keep the interface: a link-local destination needs it */
            struct cmsghdr *o = (struct cmsghdr *)out;
            o->cmsg_level = IPPROTO_IPV6;
            o->cmsg_type = IPV6_PKTINFO;
            o->cmsg_len = CMSG_LEN(sizeof pi);
            memcpy(CMSG_DATA(o), &pi, sizeof pi);
            outlen = CMSG_SPACE(sizeof pi);
        }
    }
    iov.iov_len = (size_t)n;
    struct msghdr r = {.msg_name = &from, .msg_namelen = m.msg_namelen, .msg_iov = &iov,
                       .msg_iovlen = 1, .msg_control = outlen ? out : NULL,
                       .msg_controllen = outlen};
    sendmsg(u, &r, 0);
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
    int t = bound(AF_INET6, SOCK_STREAM, port, 0);
    int u4 = bound(AF_INET, SOCK_DGRAM, port, 0), u6 = bound(AF_INET6, SOCK_DGRAM, port, 1);
    if (t < 0 || u4 < 0 || u6 < 0) {
        perror("echod: bind");
        return 1;
    }
    fprintf(stderr, "echod: tcp+udp echo on [::]:%d and 0.0.0.0:%d\n", port, port);
    struct pollfd fds[3] = {
        {.fd = t, .events = POLLIN}, {.fd = u4, .events = POLLIN}, {.fd = u6, .events = POLLIN}};
    for (;;) {
        if (poll(fds, 3, -1) < 0) {
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
                    close(u4);
                    close(u6);
                    echo_stream(c);
                }
                close(c);
            }
        }
        if (fds[1].revents & POLLIN) echo_datagram(u4);
        if (fds[2].revents & POLLIN) echo_datagram(u6);
    }
}
