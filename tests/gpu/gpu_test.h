/*
 * gpu_test.h - the small harness of the GPU tests (plain C: the GPU machines
 * have no Criterion). A test program lists its cases; main() calls
 * gt_begin(), which exits with 77 (meson's "skipped") and prints why when
 * there is no CUDA device, then gt_case() per case, then gt_end().
 *
 * The same programs link either the nvcc-built kernels (suite gpu, a real
 * device) or the CPU emulator (suite gpu-emu, see kernels/cuda/emu).
 * Tolerances are named per op in each test file as ATOL_* / RTOL_*:
 * |got - ref| <= ATOL + RTOL * |ref| per element.
 * Threading: single-threaded.
 */
#ifndef LKQ_GPU_TEST_H
#define LKQ_GPU_TEST_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/cuda/kcu_rt.cuh"

static int gt_fails, gt_checks, gt_case_fails;
static kcu_ctx *gt_c;
static char gt_err[1024];

#define GT_CHECK(cond, ...)                                                               \
    do {                                                                                  \
        gt_checks++;                                                                      \
        if (!(cond)) {                                                                    \
            gt_fails++;                                                                   \
            gt_case_fails++;                                                              \
            fprintf(stderr, "  FAIL %s:%d: ", __FILE__, __LINE__);                        \
            fprintf(stderr, __VA_ARGS__);                                                 \
            fputc('\n', stderr);                                                          \
        }                                                                                 \
    } while (0)

/* A kcu_* call that must succeed (its error message is printed). */
#define GT_OK(call)                                                                       \
    do {                                                                                  \
        gt_err[0] = '\0';                                                                 \
        int rc_ = (call);                                                                 \
        GT_CHECK(rc_ == 0, "%s -> %d: %s", #call, rc_, gt_err);                           \
    } while (0)

static inline double gt_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Opens device 0, or exits with 77 after saying why there is none. */
static inline void gt_begin(const char *prog)
{
    char why[256] = "";
    int n = kcu_device_count(why, sizeof why);
    if (n <= 0) {
        printf("SKIP %s: no CUDA device (%s)\n", prog, why[0] ? why : "none found");
        exit(77);
    }
    if (kcu_ctx_create(0, &gt_c, gt_err, sizeof gt_err) < 0) {
        fprintf(stderr, "%s: %s\n", prog, gt_err);
        exit(1);
    }
    printf("%s on %s\n", prog, kcu_ctx_name(gt_c));
}

/* 1 when the "device" is the CPU emulator (tests may shrink their sizes). */
static inline int gt_emulated(void)
{
    return strstr(kcu_ctx_name(gt_c), "kemu") != NULL;
}

static inline void gt_case(const char *name, void (*fn)(void))
{
    double t0 = gt_now();
    gt_case_fails = 0;
    fn();
    printf("%-4s %s (%.2f s)\n", gt_case_fails ? "FAIL" : "ok", name, gt_now() - t0);
    fflush(stdout);
}

static inline int gt_end(void)
{
    kcu_ctx_destroy(gt_c);
    printf("%d checks, %d failed\n", gt_checks, gt_fails);
    return gt_fails ? 1 : 0;
}

/* Worst element of |got - ref| - (atol + rtol |ref|); reports it. */
static inline int gt_close(const char *what, const float *got, const float *ref, size_t n, double atol,
                    double rtol)
{
    size_t worst = 0;
    double wex = -INFINITY, maxerr = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - (double)ref[i]);
        double ex = (isnan(got[i]) != isnan(ref[i])) ? INFINITY : e - (atol + rtol * fabs(ref[i]));
        if (isnan(got[i]) && isnan(ref[i]))
            ex = -1, e = 0;
        if (ex > wex) {
            wex = ex;
            worst = i;
        }
        if (e > maxerr)
            maxerr = e;
    }
    if (getenv("GT_VERBOSE"))
        fprintf(stderr, "  %s: max abs err %.3g over %zu\n", what, maxerr, n);
    GT_CHECK(wex <= 0, "%s: element %zu got %.8g want %.8g (atol %.3g rtol %.3g)", what, worst,
             n ? (double)got[worst] : 0.0, n ? (double)ref[worst] : 0.0, atol, rtol);
    return wex <= 0;
}

/* Device buffer helpers: allocate + upload, download. */
static inline void *gt_up(const void *src, size_t bytes)
{
    void *d = NULL;
    GT_OK(kcu_malloc(gt_c, &d, bytes, gt_err, sizeof gt_err));
    if (d && src)
        GT_OK(kcu_h2d(gt_c, d, src, bytes, gt_err, sizeof gt_err));
    return d;
}

static inline void gt_down(void *dst, const void *src, size_t bytes)
{
    GT_OK(kcu_d2h(gt_c, dst, src, bytes, gt_err, sizeof gt_err));
}

static uint64_t gt_rng = 0x9e3779b97f4a7c15ull;
static inline uint32_t gt_u32(void)
{
    gt_rng ^= gt_rng << 13;
    gt_rng ^= gt_rng >> 7;
    gt_rng ^= gt_rng << 17;
    return (uint32_t)(gt_rng >> 16);
}
/* uniform in [lo, hi) */
static inline float gt_unif(float lo, float hi)
{
    return lo + (hi - lo) * (float)(gt_u32() & 0xffffff) / 16777216.0f;
}
static inline float gt_gauss(void)
{
    float u = ((float)(gt_u32() & 0xffffff) + 0.5f) / 16777216.0f;
    return sqrtf(-2.0f * logf(u)) * cosf(6.2831853f * gt_unif(0.0f, 1.0f));
}

#endif
