/*
 * echo_client: baseline SOCK_SEQPACKET client for the vmemd benchmark.
 *
 *   echo_client SOCKET_PATH rtt  N
 *   echo_client SOCKET_PATH pipe N [INFLIGHT]     (INFLIGHT default 32)
 *
 * Every request is the MessagePack of {"BalloonTargetReached":{"size":1}}
 * (one packet, no descriptors); the server must answer each request with one
 * packet. Answers other than "Ok" (a2 4f 6b) are counted and reported on
 * stderr, but do not fail the run.
 *
 * rtt:  N requests one at a time, each round trip timed with CLOCK_MONOTONIC.
 *       Prints {"n":N,"median_ns":..,"p99_ns":..,"p999_ns":..,"mean_ns":..}
 *       (percentiles: nearest rank over the N samples).
 * pipe: keeps up to INFLIGHT requests outstanding on a non-blocking socket,
 *       polling for POLLIN|POLLOUT when stuck; timed from the first send to
 *       the last answer. Prints {"n":N,"seconds":..,"per_second":..}.
 *
 * A server silent for 10 s is an error. Errors: stderr, exit 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

#define TIMEOUT_MS 10000
#define MAX_BODY 65536

/* {"BalloonTargetReached":{"size":1}} */
static const unsigned char REQUEST[] = {
    0x81, 0xb4, 'B', 'a', 'l', 'l', 'o', 'o', 'n', 'T', 'a', 'r', 'g', 'e', 't',
    'R', 'e', 'a', 'c', 'h', 'e', 'd', 0x81, 0xa4, 's', 'i', 'z', 'e', 0x01,
};
static const unsigned char OK[3] = {0xa2, 'O', 'k'};

static unsigned char rbuf[MAX_BODY + 1];
static uint64_t not_ok;
static int first_bad_len = -1;
static unsigned char first_bad[16];

static void die(const char *what) {
    fprintf(stderr, "echo_client: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void fail(const char *msg) {
    fprintf(stderr, "echo_client: %s\n", msg);
    exit(1);
}

static uint64_t parse_count(const char *s, const char *name) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || v == 0 || s[0] == '-') {
        fprintf(stderr, "echo_client: bad %s: %s (want a positive integer)\n", name, s);
        exit(2);
    }
    return v;
}

static void check_answer(ssize_t n) {
    if (n == (ssize_t)sizeof OK && memcmp(rbuf, OK, sizeof OK) == 0) return;
    if (not_ok++ == 0) {
        first_bad_len = (int)n;
        memcpy(first_bad, rbuf, n < 16 ? (size_t)n : 16);
    }
}

static void run_rtt(int fd, uint64_t n) {
    struct timeval tv = {.tv_sec = TIMEOUT_MS / 1000};
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0) die("SO_RCVTIMEO");
    if (setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0) die("SO_SNDTIMEO");
    uint64_t *lat = malloc(n * sizeof *lat);
    if (!lat) die("malloc");
    long double sum = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t t0 = now_ns();
        ssize_t s;
        do s = send(fd, REQUEST, sizeof REQUEST, MSG_NOSIGNAL);
        while (s < 0 && errno == EINTR);
        if (s < 0) die(errno == EAGAIN ? "send (timed out)" : "send");
        ssize_t r;
        do r = recv(fd, rbuf, sizeof rbuf, 0);
        while (r < 0 && errno == EINTR);
        uint64_t t1 = now_ns();
        if (r < 0) die(errno == EAGAIN ? "recv (no answer within 10 s)" : "recv");
        if (r == 0) fail("server closed the connection");
        check_answer(r);
        lat[i] = t1 - t0;
        sum += (long double)lat[i];
    }
    qsort(lat, n, sizeof *lat, cmp_u64);
    printf("{\"n\":%llu,\"median_ns\":%llu,\"p99_ns\":%llu,\"p999_ns\":%llu,\"mean_ns\":%.1f}\n",
           (unsigned long long)n, (unsigned long long)pct(lat, n, 0.5),
           (unsigned long long)pct(lat, n, 0.99), (unsigned long long)pct(lat, n, 0.999),
           (double)(sum / (long double)n));
    free(lat);
}

static void run_pipe(int fd, uint64_t n, uint64_t inflight) {
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) die("fcntl O_NONBLOCK");
    uint64_t sent = 0, got = 0;
    uint64_t t0 = now_ns();
    while (got < n) {
        int progress = 0, send_blocked = 0;
        while (sent < n && sent - got < inflight) {
            ssize_t s = send(fd, REQUEST, sizeof REQUEST, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (s < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK) {
                    send_blocked = 1;
                    break;
                }
                die("send");
            }
            sent++;
            progress = 1;
        }
        while (got < sent) {
            ssize_t r = recv(fd, rbuf, sizeof rbuf, MSG_DONTWAIT);
            if (r < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK) break;
                die("recv");
            }
            if (r == 0) fail("server closed the connection");
            check_answer(r);
            got++;
            progress = 1;
        }
        if (progress) continue;
        /* Stuck: wait for an answer, or for room to send if we want to. */
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (send_blocked) p.events |= POLLOUT;
        int pr = poll(&p, 1, TIMEOUT_MS);
        if (pr < 0) {
            if (errno == EINTR) continue;
            die("poll");
        }
        if (pr == 0) fail("no progress within 10 s (server not answering?)");
        if ((p.revents & (POLLERR | POLLNVAL)) || ((p.revents & POLLHUP) && !(p.revents & POLLIN)))
            fail("connection error or hang-up");
    }
    uint64_t t1 = now_ns();
    double secs = (double)(t1 - t0) / 1e9;
    printf("{\"n\":%llu,\"seconds\":%.6f,\"per_second\":%.1f}\n", (unsigned long long)n, secs,
           (double)n / secs);
}

int main(int argc, char **argv) {
    if (argc < 4 || argc > 5) {
        fprintf(stderr, "usage: echo_client SOCKET_PATH rtt N\n"
                        "       echo_client SOCKET_PATH pipe N [INFLIGHT]\n");
        return 2;
    }
    const char *path = argv[1], *mode = argv[2];
    int pipe_mode;
    if (strcmp(mode, "rtt") == 0 && argc == 4) pipe_mode = 0;
    else if (strcmp(mode, "pipe") == 0) pipe_mode = 1;
    else {
        fprintf(stderr, "echo_client: MODE must be rtt (no INFLIGHT) or pipe\n");
        return 2;
    }
    uint64_t n = parse_count(argv[3], "N");
    uint64_t inflight = argc == 5 ? parse_count(argv[4], "INFLIGHT") : 32;

    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) {
        fprintf(stderr, "echo_client: socket path too long\n");
        return 2;
    }
    memcpy(addr.sun_path, path, strlen(path) + 1);
    signal(SIGPIPE, SIG_IGN);
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");

    if (pipe_mode) run_pipe(fd, n, inflight);
    else run_rtt(fd, n);
    fflush(stdout);

    if (not_ok) {
        fprintf(stderr, "echo_client: warning: %llu answers were not \"Ok\"; first (%d bytes):",
                (unsigned long long)not_ok, first_bad_len);
        for (int i = 0; i < first_bad_len && i < 16; i++) fprintf(stderr, " %02x", first_bad[i]);
        fprintf(stderr, "\n");
    }
    close(fd);
    return 0;
}
