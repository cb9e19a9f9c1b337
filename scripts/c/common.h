/* Helpers shared by the bench's C baselines (each program still builds from its one .c:
 * cc -O2 -o X X.c finds this header beside it). */
#ifndef VMEMD_BENCH_COMMON_H
#define VMEMD_BENCH_COMMON_H

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

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

#endif
