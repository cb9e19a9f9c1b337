/*
 * kvm_register_server: what a C server pays for vmemd's RegisterMemory +
 * UnregisterMemory over the wire, with no MessagePack and no checks beyond
 * vmemd's system calls. A reference figure for the benchmark, next to the
 * issue's baseline (the same work in-process plus two echo round trips),
 * which leaves out what serving costs: the server sleeps inside
 * KVM_SET_USER_MEMORY_REGION while its client waits, and both are scheduled.
 *
 *   kvm_register_server SOCKET_PATH
 *
 * Creates a VM, listens on SOCKET_PATH (a stale file there is unlinked
 * first), and serves clients from one epoll loop, level triggered, reading
 * each ready client until EAGAIN, as vmemd does:
 *   - a packet carrying a descriptor is a RegisterMemory: F_ADD_SEALS
 *     (F_SEAL_SHRINK; a failure is ignored, as in vmemd), fstat, mmap of
 *     st_size bytes MAP_SHARED read-write, KVM_SET_USER_MEMORY_REGION in the
 *     client's slot at 0x40_0000_0000 + 4 GiB * slot, close of the descriptor;
 *   - a packet without one is an UnregisterMemory: the same ioctl with
 *     memory_size 0, munmap.
 * Either is answered with the MessagePack string "Ok" (a2 4f 6b). One live
 * region per client: a second RegisterMemory maps nothing (still "Ok": the
 * figure times the success path only). Any further descriptors in a packet
 * are closed. A client is dropped at end of stream (a zero-length packet
 * without descriptors reads as one), on an error, or when its socket is too
 * full to take an answer: a reference for one synchronous client, not a
 * general server.
 *
 * Prints {"ready":true} on stdout (flushed) once listening. Exits 0 on
 * SIGTERM/SIGINT, removing the socket file. Errors: stderr, exit 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "common.h"

#define MAX_CLIENTS 64
#define GUEST_BASE 0x4000000000ull
#define GUEST_STRIDE 0x100000000ull

static const unsigned char REPLY[3] = {0xa2, 'O', 'k'};

struct client {
    int fd;
    unsigned slot;
    void *addr; /* the live region's mapping, or NULL */
    size_t size;
};

static char LISTEN_TAG, SIGNAL_TAG;
static const char *sock_path;
static int vm_fd;

static void die(const char *what) {
    int e = errno;
    fprintf(stderr, "kvm_register_server: %s: %s\n", what, strerror(e));
    if (sock_path) unlink(sock_path);
    exit(1);
}

static int set_region(struct client *c, uint64_t size, void *addr) {
    struct kvm_userspace_memory_region r = {
        .slot = c->slot,
        .guest_phys_addr = GUEST_BASE + GUEST_STRIDE * c->slot,
        .memory_size = size,
        .userspace_addr = (uint64_t)(uintptr_t)addr,
    };
    return ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &r);
}

static void drop_region(struct client *c) {
    if (!c->addr) return;
    if (set_region(c, 0, NULL) < 0) die("KVM_SET_USER_MEMORY_REGION remove");
    munmap(c->addr, c->size);
    c->addr = NULL;
}

/* One packet of a client: 1 if answered, 0 if none was pending, -1 when it is gone. */
static int serve(struct client *c) {
    unsigned char body[4096];
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * 4)];
    } control;
    struct iovec iov = {body, sizeof body};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf, .msg_controllen = sizeof control.buf};
    ssize_t n = recvmsg(c->fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0) return errno == EAGAIN || errno == EINTR ? 0 : -1;
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    if (n == 0 && !cm) return -1; /* end of stream */
    if (cm && cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
        int mfd;
        size_t nfds = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        memcpy(&mfd, CMSG_DATA(cm), sizeof mfd);
        for (size_t i = 1; i < nfds; i++) {
            int extra;
            memcpy(&extra, CMSG_DATA(cm) + i * sizeof(int), sizeof extra);
            close(extra);
        }
        struct stat st;
        fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK);
        /* A refusal (a region already live, an empty file) is still answered "Ok": the
         * figure times the success path only. */
        if (!c->addr && fstat(mfd, &st) == 0 && st.st_size > 0) {
            void *p = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
            if (p == MAP_FAILED) die("mmap");
            if (set_region(c, (uint64_t)st.st_size, p) < 0) die("KVM_SET_USER_MEMORY_REGION add");
            c->addr = p;
            c->size = (size_t)st.st_size;
        }
        close(mfd);
    } else {
        drop_region(c);
    }
    if (send(c->fd, REPLY, sizeof REPLY, MSG_NOSIGNAL) < 0) return -1;
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: kvm_register_server SOCKET_PATH\n");
        return 2;
    }
    sock_path = argv[1];
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("open /dev/kvm");
    vm_fd = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm_fd < 0) die("KVM_CREATE_VM");

    int lfd;
    int ep = serve_setup("kvm_register_server", sock_path, &LISTEN_TAG, &SIGNAL_TAG, &lfd);

    struct client clients[MAX_CLIENTS] = {0};
    for (unsigned i = 0; i < MAX_CLIENTS; i++) clients[i].fd = -1, clients[i].slot = i;
    printf("{\"ready\":true}\n");
    fflush(stdout);

    for (;;) {
        struct epoll_event events[16];
        int n = wait_events("kvm_register_server", ep, events, 16);
        for (int i = 0; i < n; i++) {
            void *tag = events[i].data.ptr;
            if (tag == &SIGNAL_TAG) {
                unlink(sock_path);
                return 0;
            }
            if (tag == &LISTEN_TAG) {
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0 || errno == EINTR) {
                    if (fd < 0) continue;
                    struct client *c = NULL;
                    for (unsigned k = 0; k < MAX_CLIENTS && !c; k++)
                        if (clients[k].fd < 0) c = &clients[k];
                    if (!c) {
                        close(fd);
                        continue;
                    }
                    c->fd = fd;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev) < 0) die("epoll_ctl client");
                }
                if (errno != EAGAIN) die("accept4"); /* EMFILE and the like: no spinning */
                continue;
            }
            struct client *c = tag;
            int r;
            while ((r = serve(c)) > 0) {
            }
            if (r < 0) {
                drop_region(c);
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                close(c->fd);
                c->fd = -1;
            }
        }
    }
}
