/*
 * echo_server: baseline SOCK_SEQPACKET server for the vmemd benchmark.
 *
 *   echo_server SOCKET_PATH
 *
 * Listens on SOCKET_PATH (a stale file there is unlinked first) and answers
 * every packet it receives with the MessagePack string "Ok" (a2 4f 6b), which
 * is what vmemd answers to e.g. BalloonTargetReached. Any descriptors that
 * arrive in SCM_RIGHTS (up to 253 per packet) are closed. One epoll loop,
 * level triggered, non-blocking sockets, every readable client drained per
 * wakeup (up to a fairness cap). If a client stops reading and its receive
 * queue fills, the owed replies are counted and the client is not read again
 * until they have all been sent (EPOLLOUT), so no reply is ever dropped.
 *
 * Prints {"ready":true} on stdout (flushed) once listening. Exits 0 on
 * SIGTERM/SIGINT, removing the socket file. Errors: stderr, exit 1.
 */
#define _GNU_SOURCE
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
#include <unistd.h>

#include "common.h"

#define MAX_BODY 65536
#define MAX_FDS 253            /* SCM_MAX_FD */
#define MAX_EVENTS 64
#define DRAIN_CAP 1024         /* packets per client per wakeup, for fairness */

static const unsigned char REPLY[3] = {0xa2, 'O', 'k'};

struct client {
    int fd;
    uint64_t owed;             /* replies that could not be sent yet (EAGAIN) */
};

/* epoll data: pointer to a struct client, or one of these two markers. */
static char LISTEN_TAG, SIGNAL_TAG;

static unsigned char body[MAX_BODY + 1];
static union {
    struct cmsghdr align;
    char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
} control;

static const char *sock_path;

static void die(const char *what) {
    int e = errno;
    fprintf(stderr, "echo_server: %s: %s\n", what, strerror(e));
    if (sock_path) unlink(sock_path);
    exit(1);
}

static void close_client(int ep, struct client *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c);
}

static void close_passed_fds(struct msghdr *mh) {
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(mh); cm; cm = CMSG_NXTHDR(mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
        size_t n = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *fds = (int *)CMSG_DATA(cm);
        for (size_t i = 0; i < n; i++) {
            int fd;
            memcpy(&fd, fds + i, sizeof fd);
            close(fd);
        }
    }
}

/* Sends the owed replies. Returns 1 if all sent, 0 on EAGAIN, -1 on error. */
static int flush_owed(struct client *c) {
    while (c->owed > 0) {
        ssize_t r = send(c->fd, REPLY, sizeof REPLY, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            return -1;
        }
        c->owed--;
    }
    return 1;
}

static int set_interest(int ep, struct client *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    return epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Reads and answers packets. Returns -1 if the client must be closed. */
static int serve_client(int ep, struct client *c) {
    for (int i = 0; i < DRAIN_CAP; i++) {
        struct iovec iov = {.iov_base = body, .iov_len = sizeof body};
        struct msghdr mh = {
            .msg_iov = &iov,
            .msg_iovlen = 1,
            .msg_control = control.buf,
            .msg_controllen = sizeof control.buf,
        };
        ssize_t n = recvmsg(c->fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            return -1; /* ECONNRESET etc. */
        }
        if (mh.msg_controllen > 0) close_passed_fds(&mh);
        if (n == 0) return -1; /* EOF (an empty packet is not a valid message) */
        /* Oversized (MSG_TRUNC) or fd-truncated (MSG_CTRUNC) packets still get
         * one reply each: the point is one answer per packet. */
        c->owed++;
        int f = flush_owed(c);
        if (f < 0) return -1;
        if (f == 0) {
            /* Peer's queue is full: stop reading until it drains. */
            if (set_interest(ep, c, EPOLLOUT) < 0) return -1;
            return 0;
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: echo_server SOCKET_PATH\n");
        return 2;
    }
    const char *path = argv[1];
    int lfd;
    int ep = serve_setup("echo_server", path, &LISTEN_TAG, &SIGNAL_TAG, &lfd);
    sock_path = path;

    printf("{\"ready\":true}\n");
    fflush(stdout);

    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = wait_events("echo_server", ep, events, MAX_EVENTS);
        for (int i = 0; i < n; i++) {
            void *tag = events[i].data.ptr;
            if (tag == &SIGNAL_TAG) {
                unlink(path);
                close(lfd);
                return 0;
            }
            if (tag == &LISTEN_TAG) {
                for (;;) {
                    int cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (cfd < 0) {
                        if (errno == EINTR || errno == ECONNABORTED) continue;
                        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
                        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS ||
                            errno == ENOMEM) {
                            fprintf(stderr, "echo_server: accept4: %s\n", strerror(errno));
                            break;
                        }
                        die("accept4");
                    }
                    struct client *c = calloc(1, sizeof *c);
                    if (!c) die("calloc");
                    c->fd = cfd;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                    if (epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &cev) < 0) die("epoll_ctl client");
                }
                continue;
            }
            struct client *c = tag;
            uint32_t e = events[i].events;
            if (c->owed > 0) {
                /* Waiting for EPOLLOUT with replies owed. */
                int f = flush_owed(c);
                if (f < 0 || (f == 0 && (e & (EPOLLHUP | EPOLLERR)))) {
                    close_client(ep, c);
                    continue;
                }
                if (f == 0) continue;
                if (set_interest(ep, c, EPOLLIN) < 0) {
                    close_client(ep, c);
                    continue;
                }
                /* fall through: read what queued up meanwhile */
            }
            if (serve_client(ep, c) < 0) close_client(ep, c);
        }
    }
}
