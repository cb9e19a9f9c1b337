/*
 * madvise_free: baseline for vmemd's DynamicallyFreeMemoryRanges, which gives
 * guest RAM back with madvise(MADV_REMOVE) on the memfd mapping.
 *
 *   madvise_free [TOTAL_BYTES [RANGE_BYTES]]   (defaults 1G and 2M)
 *
 * Sizes are decimal with an optional K/M/G suffix (binary); both must be
 * multiples of 4096 and RANGE <= TOTAL (a last, shorter range is allowed).
 * memfd of TOTAL bytes, mmap(MAP_SHARED), one byte written per 4 KiB page,
 * then madvise(MADV_REMOVE) over everything in RANGE-byte pieces, timed with
 * CLOCK_MONOTONIC. fstat's st_blocks (512-byte units) before and after checks
 * that the memory really went back: more than 1% left is an error (exit 1,
 * after the JSON line).
 * Prints {"total":..,"range":..,"ranges":..,"seconds":..,"ns_per_range":..,
 *         "blocks_before":..,"blocks_after":..}
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

#define PAGE 4096ull

static void die(const char *what) {
    fprintf(stderr, "madvise_free: %s: %s\n", what, strerror(errno));
    exit(1);
}

int main(int argc, char **argv) {
    if (argc > 3) {
        fprintf(stderr, "usage: madvise_free [TOTAL_BYTES [RANGE_BYTES]]\n");
        return 2;
    }
    uint64_t total = argc > 1 ? parse_size(argv[1]) : 1ull << 30;
    uint64_t range = argc > 2 ? parse_size(argv[2]) : 2ull << 20;
    if (total == 0 || total % PAGE || range == 0 || range % PAGE || range > total) {
        fprintf(stderr, "madvise_free: TOTAL and RANGE must be positive multiples of 4096, "
                        "RANGE <= TOTAL\n");
        return 2;
    }

    int mfd = memfd_create("madvise_free", MFD_CLOEXEC);
    if (mfd < 0) die("memfd_create");
    if (ftruncate(mfd, (off_t)total) < 0) die("ftruncate");
    unsigned char *p = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (p == MAP_FAILED) die("mmap");
    for (uint64_t off = 0; off < total; off += PAGE) p[off] = 1;

    struct stat st;
    if (fstat(mfd, &st) < 0) die("fstat");
    long long before = (long long)st.st_blocks;

    uint64_t ranges = 0;
    uint64_t t0 = now_ns();
    for (uint64_t off = 0; off < total; off += range) {
        uint64_t len = total - off < range ? total - off : range;
        if (madvise(p + off, len, MADV_REMOVE) < 0) die("madvise(MADV_REMOVE)");
        ranges++;
    }
    uint64_t t1 = now_ns();

    if (fstat(mfd, &st) < 0) die("fstat");
    long long after = (long long)st.st_blocks;
    double secs = (double)(t1 - t0) / 1e9;
    printf("{\"total\":%llu,\"range\":%llu,\"ranges\":%llu,\"seconds\":%.6f,"
           "\"ns_per_range\":%.1f,\"blocks_before\":%lld,\"blocks_after\":%lld}\n",
           (unsigned long long)total, (unsigned long long)range, (unsigned long long)ranges,
           secs, (double)(t1 - t0) / (double)ranges, before, after);
    fflush(stdout);

    munmap(p, total);
    close(mfd);
    if (before < (long long)(total / 512)) {
        fprintf(stderr, "madvise_free: only %lld of %llu blocks allocated after touching\n",
                before, (unsigned long long)(total / 512));
        return 1;
    }
    if (after * 100 > before) {
        fprintf(stderr, "madvise_free: %lld of %lld blocks still allocated after MADV_REMOVE\n",
                after, before);
        return 1;
    }
    return 0;
}
