/*
 * bench_util.h - the timing helpers every benchmark program uses: a
 * monotonic clock in seconds and the median of a sample (sorts it).
 * Header-only (static functions); no threads of its own.
 */
#ifndef LKQ_BENCH_UTIL_H
#define LKQ_BENCH_UTIL_H

#include <stdlib.h>
#include <time.h>

static inline double bu_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static inline int bu_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median of v[0..n) (n >= 1); v is sorted in place. */
static inline double bu_median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, bu_cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

#endif
