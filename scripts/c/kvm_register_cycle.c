/*
 * kvm_register_cycle: in-process baseline for vmemd's RegisterMemory +
 * UnregisterMemory of a SharedMemory source.
 *
 *   kvm_register_cycle SIZE_BYTES N
 *
 * SIZE_BYTES: a multiple of 4096; a K/M/G suffix (binary) is accepted.
 * Once: open /dev/kvm, KVM_CREATE_VM, memfd_create + ftruncate(SIZE).
 * Then N cycles, each timed with CLOCK_MONOTONIC:
 *   fstat(memfd) (size check, as vmemd does), mmap(MAP_SHARED, RW),
 *   KVM_SET_USER_MEMORY_REGION slot 1 at guest 0x1_0000_0000,
 *   KVM_SET_USER_MEMORY_REGION slot 1 with memory_size 0 (removal), munmap.
 * Prints {"size":..,"n":..,"median_ns":..,"p99_ns":..,"mean_ns":..}
 * (percentiles: nearest rank). Errors: stderr, exit 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

#define GUEST_ADDR 0x100000000ull
#define SLOT 1

static void die(const char *what) {
    fprintf(stderr, "kvm_register_cycle: %s: %s\n", what, strerror(errno));
    exit(1);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: kvm_register_cycle SIZE_BYTES N\n");
        return 2;
    }
    uint64_t size = parse_size(argv[1]);
    uint64_t n = parse_size(argv[2]);
    if (size == 0 || size % 4096) {
        fprintf(stderr, "kvm_register_cycle: bad SIZE_BYTES %s (a positive multiple of 4096)\n",
                argv[1]);
        return 2;
    }
    if (n == 0) {
        fprintf(stderr, "kvm_register_cycle: bad N %s\n", argv[2]);
        return 2;
    }

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("open /dev/kvm");
    int api = ioctl(kvm, KVM_GET_API_VERSION, 0);
    if (api != KVM_API_VERSION) {
        fprintf(stderr, "kvm_register_cycle: KVM API version %d, want %d\n", api,
                KVM_API_VERSION);
        return 1;
    }
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    int mfd = memfd_create("kvm_register_cycle", MFD_CLOEXEC);
    if (mfd < 0) die("memfd_create");
    if (ftruncate(mfd, (off_t)size) < 0) die("ftruncate");

    uint64_t *lat = malloc(n * sizeof *lat);
    if (!lat) die("malloc");
    long double sum = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t t0 = now_ns();
        struct stat st;
        if (fstat(mfd, &st) < 0) die("fstat");
        if ((uint64_t)st.st_size < size) {
            fprintf(stderr, "kvm_register_cycle: memfd shrank to %lld\n", (long long)st.st_size);
            return 1;
        }
        void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
        if (p == MAP_FAILED) die("mmap");
        struct kvm_userspace_memory_region r = {
            .slot = SLOT,
            .flags = 0,
            .guest_phys_addr = GUEST_ADDR,
            .memory_size = size,
            .userspace_addr = (uint64_t)(uintptr_t)p,
        };
        if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) < 0) die("KVM_SET_USER_MEMORY_REGION add");
        r.memory_size = 0;
        if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) < 0)
            die("KVM_SET_USER_MEMORY_REGION remove");
        if (munmap(p, size) < 0) die("munmap");
        uint64_t t1 = now_ns();
        lat[i] = t1 - t0;
        sum += (long double)lat[i];
    }
    qsort(lat, n, sizeof *lat, cmp_u64);
    printf("{\"size\":%llu,\"n\":%llu,\"median_ns\":%llu,\"p99_ns\":%llu,\"mean_ns\":%.1f}\n",
           (unsigned long long)size, (unsigned long long)n,
           (unsigned long long)pct(lat, n, 0.5), (unsigned long long)pct(lat, n, 0.99),
           (double)(sum / (long double)n));
    free(lat);
    close(mfd);
    close(vm);
    close(kvm);
    return 0;
}
