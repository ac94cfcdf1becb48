/*
 * /opt/cni/bin/flock: the entry the container runtime execs for every pod.
 *
 * Why C: it is on every pod's start and stop path, and a Python interpreter's
 * start alone (~8 ms CPU) is several times what the agent needs for the whole
 * ADD. So the common case never starts one: the launcher reads stdin and the
 * CNI_* environment, sends them to the agent's socket exactly as they are, in
 * the frame of docs/cni.md ("Wire format"), and copies the agent's stdout,
 * stderr and exit status back. It parses no JSON: the agent checks the request
 * with the Python plugin's own code and writes the final CNI output. The only
 * thing read from the config is the top-level "agentSocket" string, by a lexical
 * scan that gives up (see below) whenever the answer is not certain.
 *
 * Anything unusual execs the Python plugin, the reference implementation, with
 * the same stdin (replayed from a memfd if already read): VERSION or an unknown
 * verb; a config with "agentTimeout", an escape, or an agentSocket the scan
 * cannot pin down; stdin over FAST_MAX; no socket, refused, timed out, or a
 * reply that is not a whole frame (the agent closed mid-reply). The Python
 * plugin then retries, explains, or records a DEL for later (deferred DEL);
 * ADD and DEL are idempotent in the agent, so a second attempt is safe.
 *
 * The Python plugin lives in one of two layouts, tried in this order:
 *   <dir>/flock.d/plugin          a #! script for a host Python (install-cni --python)
 *   <dir>/flock.d/ld.so ... bin/python3 -I -S plugin.pyc    the self-contained bundle
 * Running the bundled glibc loader makes the bundle independent of the host's
 * glibc; -I -S keeps the host's PYTHON* variables and site-packages out.
 * If no plugin can be exec'd, the launcher prints a CNI error object itself.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/run/flock/agent.sock"
#define FAST_MAX (1 << 20)          /* stdin handled natively up to this; above, Python */
#define STDIN_MAX (16 << 20)        /* the plugin's own limit (it reports the excess) */
#define REPLY_MAX (1 << 20)
#define ENV_MAX (256 << 10)
#define TIMEOUT_S 60                /* the plugin's default agentTimeout */
#define STATUS_TIMEOUT_S 5

extern char **environ;
static char dir[PATH_MAX];
static char in[FAST_MAX + 1], reply[REPLY_MAX + 1], envbuf[ENV_MAX];

static int fail(const char *what, const char *path, int err) {
    /* Paths come from readlink of our own executable: JSON-escape the few risky bytes. */
    printf("{\"cniVersion\":\"1.1.0\",\"code\":999,\"msg\":\"flock launcher: %s\",\"details\":\"",
           what);
    for (const char *p = path; *p; p++) {
        if (*p == '"' || *p == '\\') putchar('\\');
        if ((unsigned char)*p < 0x20) continue;
        putchar(*p);
    }
    printf(": %s; reinstall with flock install-cni\"}\n", strerror(err));
    fflush(stdout);
    return 1;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Exec the Python plugin. `len` bytes of stdin were already read (`more`: and not all
 * of it): they are put back in front of the rest through a memfd that becomes fd 0. */
static int python(size_t len, int more) {
    if (len > 0 || more) {
        int fd = memfd_create("flock-stdin", 0);
        if (fd < 0 || write_all(fd, in, len) < 0) return fail("cannot replay stdin", "memfd", errno);
        size_t total = len;
        while (more && total <= STDIN_MAX) { /* the plugin reports anything over its limit */
            ssize_t r = read(0, reply, sizeof reply);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;
            if (write_all(fd, reply, (size_t)r) < 0) return fail("cannot replay stdin", "memfd", errno);
            total += (size_t)r;
        }
        if (lseek(fd, 0, SEEK_SET) != 0 || dup2(fd, 0) < 0)
            return fail("cannot replay stdin", "memfd", errno);
        close(fd);
    }
    char script[PATH_MAX], loader[PATH_MAX], libdir[PATH_MAX], py[PATH_MAX], pyc[PATH_MAX];
    if (snprintf(script, sizeof script, "%s/flock.d/plugin", dir) >= (int)sizeof script ||
        snprintf(loader, sizeof loader, "%s/flock.d/ld.so", dir) >= (int)sizeof loader ||
        snprintf(libdir, sizeof libdir, "%s/flock.d/lib", dir) >= (int)sizeof libdir ||
        snprintf(py, sizeof py, "%s/flock.d/bin/python3", dir) >= (int)sizeof py ||
        snprintf(pyc, sizeof pyc, "%s/flock.d/plugin.pyc", dir) >= (int)sizeof pyc)
        return fail("install path too long", dir, ENAMETOOLONG);
    char *sargs[] = {script, NULL};
    execv(script, sargs);
    if (errno != ENOENT) return fail("cannot start the Python plugin", script, errno);
    char *bargs[] = {loader, "--inhibit-cache", "--library-path", libdir, py, "-I", "-S", pyc, NULL};
    execv(loader, bargs);
    return fail("cannot start the bundled interpreter", loader, errno);
}

/* Parse "FLOCK/1 <0|1> <digits> <digits>\n" at the start of reply[0..got): 1 whole (the
 * header's length and the two sizes set), 0 not all there yet, -1 malformed. */
static int parse_header(size_t got, size_t *hdr, size_t *outlen, size_t *errlen) {
    size_t i = 0, *sizes[2] = {outlen, errlen};
    for (; i < 8; i++) {
        if (i >= got) return 0;
        if (reply[i] != "FLOCK/1 "[i]) return -1;
    }
    if (i >= got) return 0;
    if (reply[i] != '0' && reply[i] != '1') return -1;
    i++;
    for (int k = 0; k < 2; k++) {
        if (i >= got) return 0;
        if (reply[i++] != ' ') return -1;
        size_t start = i;
        *sizes[k] = 0;
        while (i < got && reply[i] >= '0' && reply[i] <= '9') {
            if (i - start >= 7) return -1;
            *sizes[k] = *sizes[k] * 10 + (size_t)(reply[i++] - '0');
        }
        if (i >= got) return 0;
        if (i == start) return -1;
    }
    if (reply[i] != '\n') return -1;
    *hdr = i + 1;
    return 1;
}

static size_t skip_ws(const char *b, size_t i, size_t n) {
    while (i < n && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r')) i++;
    return i;
}

/* The top-level string member "agentSocket" of the config, by a lexical scan (strings
 * and nesting only): 1 found (*val, *vlen), 0 absent, -1 not certain (any backslash,
 * an unterminated string, a duplicate, a non-string value, text after the object). */
static int agent_socket(const char *b, size_t n, const char **val, size_t *vlen) {
    static const char key[] = "agentSocket";
    if (memchr(b, '\\', n)) return -1;
    int depth = 0, found = 0;
    for (size_t i = 0; i < n; i++) {
        if (b[i] == '"') {
            const char *end = memchr(b + i + 1, '"', n - i - 1);
            if (!end) return -1;
            size_t j = (size_t)(end - b), k = skip_ws(b, j + 1, n);
            if (depth == 1 && j - i - 1 == sizeof key - 1 && !memcmp(b + i + 1, key, j - i - 1) &&
                k < n && b[k] == ':') {
                k = skip_ws(b, k + 1, n);
                const char *vend = k < n && b[k] == '"' ? memchr(b + k + 1, '"', n - k - 1) : NULL;
                if (found || !vend) return -1;
                *val = b + k + 1;
                *vlen = (size_t)(vend - b) - k - 1;
                found = 1;
                j = (size_t)(vend - b);
            }
            i = j;
        } else if (b[i] == '{' || b[i] == '[') {
            depth++;
        } else if (b[i] == '}' || b[i] == ']') {
            if (--depth < 0) return -1;
            if (depth == 0) return skip_ws(b, i + 1, n) == n ? found : -1;
        }
    }
    return -1; /* never closed */
}

int main(void) {
    signal(SIGPIPE, SIG_IGN); /* a closed stdout or socket is an error return, not a kill */
    ssize_t n = readlink("/proc/self/exe", dir, sizeof dir - 1);
    if (n <= 0) return fail("cannot resolve /proc/self/exe", "/proc/self/exe", errno);
    dir[n] = '\0';
    char *slash = strrchr(dir, '/');
    if (slash == NULL) return fail("unexpected executable path", dir, EINVAL);
    *slash = '\0';

    const char *cmd = getenv("CNI_COMMAND");
    if (!cmd || (strcmp(cmd, "ADD") && strcmp(cmd, "DEL") && strcmp(cmd, "CHECK") &&
                 strcmp(cmd, "GC") && strcmp(cmd, "STATUS")))
        return python(0, 0); /* VERSION, or an error the plugin explains */
    if (isatty(0)) return python(0, 0); /* a person at a terminal: the plugin reads no stdin */

    size_t len = 0;
    for (;;) {
        ssize_t r = read(0, in + len, sizeof in - len);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return python(len, 1); /* the plugin reports the read error */
        if (r == 0) break;
        len += (size_t)r;
        if (len == sizeof in) return python(len, 1); /* oversized for the fast path */
    }
    if (memmem(in, len, "agentTimeout", 12)) return python(len, 0);
    const char *sock_path = DEFAULT_SOCKET;
    size_t sock_len = strlen(DEFAULT_SOCKET);
    int found = agent_socket(in, len, &sock_path, &sock_len);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (found < 0 || sock_len == 0 || sock_len >= sizeof addr.sun_path || sock_path[0] != '/')
        return python(len, 0);
    memcpy(addr.sun_path, sock_path, sock_len);
    for (size_t i = 0; i < sock_len; i++)
        if ((unsigned char)addr.sun_path[i] < 0x20) return python(len, 0);

    /* The request frame: magic line, CNI_* variables NUL-terminated (environ order,
     * first of a name wins: what Python's os.environ holds), an empty entry, stdin. */
    size_t elen = 0;
    memcpy(envbuf, "FLOCK/1\n", 8);
    elen = 8;
    for (char **e = environ; *e; e++) {
        const char *eq = strchr(*e, '=');
        if (strncmp(*e, "CNI_", 4) || !eq) continue;
        size_t nl = (size_t)(eq - *e) + 1, el = strlen(*e) + 1;
        int dup = 0;
        for (char **p = environ; p < e && !dup; p++) dup = !strncmp(*p, *e, nl);
        if (dup) continue;
        if (elen + el + 1 > sizeof envbuf) return python(len, 0);
        memcpy(envbuf + elen, *e, el);
        elen += el;
    }
    envbuf[elen++] = '\0';

    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return python(len, 0);
    struct timeval tv = {.tv_sec = strcmp(cmd, "STATUS") ? TIMEOUT_S : STATUS_TIMEOUT_S};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    /* One writev, so that the agent wakes once for the whole request (and its EOF). */
    struct iovec iov[2] = {{envbuf, elen}, {in, len}};
    ssize_t w = connect(s, (struct sockaddr *)&addr, sizeof addr) < 0 ? -1 : writev(s, iov, 2);
    size_t sent = w < 0 ? 0 : (size_t)w;
    if (w < 0 || (sent < elen && write_all(s, envbuf + sent, elen - sent) < 0) ||
        write_all(s, in + (sent > elen ? sent - elen : 0), len - (sent > elen ? sent - elen : 0)) < 0 ||
        shutdown(s, SHUT_WR) < 0) {
        close(s);
        return python(len, 0);
    }
    /* The reply frame: "FLOCK/1 <status> <stdout bytes> <stderr bytes>\n", stdout,
     * stderr. Read until it is whole (not until EOF: the agent's close is not awaited). */
    size_t got = 0, hdr = 0, outlen = 0, errlen = 0;
    int header = 0; /* 0: not yet whole, 1: parsed, -1: malformed */
    while (header == 0 || got < hdr + outlen + errlen) {
        ssize_t r = read(s, reply + got, sizeof reply - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0 || got + (size_t)r == sizeof reply) break; /* EOF, timeout, too big */
        got += (size_t)r;
        if (header == 0) header = parse_header(got, &hdr, &outlen, &errlen);
        if (header < 0) break;
    }
    close(s);
    if (header <= 0 || got != hdr + outlen + errlen)
        return python(len, 0); /* not one whole frame: the agent closed mid-reply */
    int bad = write_all(1, reply + hdr, outlen);
    write_all(2, reply + hdr + outlen, errlen);
    return bad ? 1 : reply[8] - '0';
}
