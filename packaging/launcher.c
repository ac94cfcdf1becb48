/*
 * /opt/cni/bin/flock on hosts without Python: a static launcher for the bundle
 * built by build_plugin_bundle.py.
 *
 * Why C: the container runtime execs the plugin directly, so the entry must be
 * a native executable that needs nothing from the host (not even /bin/sh, which
 * some Kubernetes host OSes lack). It only works out where it lives and execs
 *
 *   <dir>/flock.d/ld.so --inhibit-cache --library-path <dir>/flock.d/lib
 *       <dir>/flock.d/bin/python3 -I -S <dir>/flock.d/plugin.pyc
 *
 * with the environment and stdin/stdout untouched. Running the bundled glibc
 * loader makes the bundle independent of the host's glibc version; -I -S keeps
 * the host's PYTHON* variables and site-packages out.
 *
 * If the exec fails, it prints a CNI error object, as the spec asks of a plugin.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

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

int main(int argc, char **argv) {
    (void)argc;
    (void)argv;
    char dir[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", dir, sizeof dir - 1);
    if (n <= 0) return fail("cannot resolve /proc/self/exe", "/proc/self/exe", errno);
    dir[n] = '\0';
    char *slash = strrchr(dir, '/');
    if (slash == NULL) return fail("unexpected executable path", dir, EINVAL);
    *slash = '\0';

    char loader[PATH_MAX], libdir[PATH_MAX], python[PATH_MAX], plugin[PATH_MAX];
    if (snprintf(loader, sizeof loader, "%s/flock.d/ld.so", dir) >= (int)sizeof loader ||
        snprintf(libdir, sizeof libdir, "%s/flock.d/lib", dir) >= (int)sizeof libdir ||
        snprintf(python, sizeof python, "%s/flock.d/bin/python3", dir) >= (int)sizeof python ||
        snprintf(plugin, sizeof plugin, "%s/flock.d/plugin.pyc", dir) >= (int)sizeof plugin)
        return fail("install path too long", dir, ENAMETOOLONG);

    char *args[] = {loader, "--inhibit-cache", "--library-path", libdir, python,
                    "-I", "-S", plugin, NULL};
    execv(loader, args);
    return fail("cannot start the bundled interpreter", loader, errno);
}
