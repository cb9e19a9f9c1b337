/* Helpers shared by the bench's C baselines (each program still builds from its one .c:
 * cc -O2 -o X X.c finds this header beside it). */
#ifndef VMEMD_BENCH_COMMON_H
#define VMEMD_BENCH_COMMON_H

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define UNUSED __attribute__((unused))

UNUSED static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Decimal, optional K/M/G (powers of 1024) suffix. 0 on error. */
UNUSED static uint64_t parse_size(const char *s) {
    char *end;
    errno = 0;
    if (s[0] == '-') return 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s) return 0;
    unsigned shift = 0;
    if (*end == 'K' || *end == 'k') shift = 10, end++;
    else if (*end == 'M' || *end == 'm') shift = 20, end++;
    else if (*end == 'G' || *end == 'g') shift = 30, end++;
    if (*end) return 0;
    if (shift && v > (UINT64_MAX >> shift)) return 0;
    return (uint64_t)v << shift;
}

UNUSED static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest rank: the smallest sample with at least p of all samples <= it. */
UNUSED static uint64_t pct(const uint64_t *sorted, uint64_t n, double p) {
    double r = p * (double)n;
    uint64_t k = (uint64_t)r;
    if ((double)k < r) k++;
    if (k < 1) k = 1;
    if (k > n) k = n;
    return sorted[k - 1];
}

/*
 * The servers' common start: a non-blocking SOCK_SEQPACKET listener at `path` (a stale file
 * there is unlinked first), SIGTERM and SIGINT blocked and read from a signalfd, SIGPIPE
 * ignored, and an epoll set holding both, tagged `listen_tag` and `signal_tag`. Returns the
 * epoll descriptor and puts the listener in *lfd. Errors: a message naming `prog` on
 * stderr, exit 2 for a path too long, 1 for the rest.
 */
UNUSED static int serve_setup(const char *prog, const char *path, void *listen_tag, void *signal_tag, int *lfd) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) {
        fprintf(stderr, "%s: socket path too long (max %zu bytes)\n", prog, sizeof addr.sun_path - 1);
        exit(2);
    }
    memcpy(addr.sun_path, path, strlen(path) + 1);
    const char *what;
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    signal(SIGPIPE, SIG_IGN);
    int sfd = -1, ep = -1;
    if ((what = "sigprocmask", sigprocmask(SIG_BLOCK, &mask, NULL) < 0) ||
        (what = "signalfd", (sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC)) < 0) ||
        (what = "unlink stale socket", unlink(path) < 0 && errno != ENOENT) ||
        (what = "socket", (*lfd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)) < 0) ||
        (what = "bind", bind(*lfd, (struct sockaddr *)&addr, sizeof addr) < 0) ||
        (what = "listen", listen(*lfd, SOMAXCONN) < 0) ||
        (what = "epoll_create1", (ep = epoll_create1(EPOLL_CLOEXEC)) < 0))
        goto fail;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = listen_tag};
    what = "epoll_ctl";
    if (epoll_ctl(ep, EPOLL_CTL_ADD, *lfd, &ev) < 0) goto fail;
    ev.data.ptr = signal_tag;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, sfd, &ev) < 0) goto fail;
    return ep;
fail:
    fprintf(stderr, "%s: %s: %s\n", prog, what, strerror(errno));
    exit(1);
}

/* epoll_wait without a timeout, again after EINTR; any other failure ends the program. */
UNUSED static int wait_events(const char *prog, int ep, struct epoll_event *events, int max) {
    for (;;) {
        int n = epoll_wait(ep, events, max, -1);
        if (n >= 0) return n;
        if (errno != EINTR) {
            fprintf(stderr, "%s: epoll_wait: %s\n", prog, strerror(errno));
            exit(1);
        }
    }
}

#endif
