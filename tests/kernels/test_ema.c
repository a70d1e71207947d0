/*
 * test_ema.c - Eq. 3-2 (chunk quantiles and clipping) and Eq. 3-3 (EMA with
 * warm-up) of kernels/kvq.h against hand-computed values, plus the s/z of
 * Eq. 3-4 for degenerate ranges, and an end-to-end pass (quantiles -> EMA ->
 * quantize) on Gaussian chunks.
 *
 * What is rejected or handled, and checked here:
 *  - quantiles ignore NaN and +-Inf; a channel with no finite value gets
 *    a = b = NaN; alpha is clamped to [0, 0.5];
 *  - kvq_ema_update treats non-finite stats as "no data": lo/hi keep their
 *    exact values (in warm-up the missing chunk counts as the current mean);
 *    a channel that has never had data holds NaN and takes its first finite
 *    stats as its range; n_chunks counts every call;
 *  - a chunk wholly beyond one end of the range cannot invert it (both stats
 *    are kept inside [lo - gamma*w, hi + gamma*w]);
 *  - a constant channel (w = 0) uses w = eps in the clip band, as in s;
 *  - kvq_scale_zero on [x, x]: the grid is widened to include 0, and for
 *    [0, 0] s is the smallest FP16 >= eps/15 (2^-23), z = 0; NaN ranges are
 *    treated as [0, 0].
 * Exact comparisons are used where the arithmetic is exact in f32 (dyadic
 * values); elsewhere the tolerance is named at the assertion.
 * Threading: each Criterion test runs in its own process.
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ktypes.h"
#include "kernels/kvq.h"

static uint64_t rng_state = 0x13198a2e03707344ull;

static uint32_t rnd_u32(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}

static float rnd_unif(void)
{
    return ((float)(rnd_u32() & 0xffffff) + 0.5f) / 16777216.0f;
}

static float rnd_gauss(void)
{
    return sqrtf(-2.0f * logf(rnd_unif())) * cosf(6.2831853f * rnd_unif());
}

static void shuffle(float *x, int n)
{
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(rnd_u32() % (uint32_t)(i + 1));
        float t = x[i];
        x[i] = x[j];
        x[j] = t;
    }
}

/* Quantiles of one channel given as a plain array. */
static void q1(const float *vals, int n, float alpha, float *a, float *b)
{
    float *scr = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    kvq_chunk_quantiles(vals, n, 1, 1, alpha, a, b, scr);
    free(scr);
}

static int cmp_f(const void *x, const void *y)
{
    float a = *(const float *)x, b = *(const float *)y;
    return (a > b) - (a < b);
}

/* numpy's default (linear) quantile by sorting, in double: the oracle. */
static double np_quantile(const float *v, int n, double q)
{
    float *s = malloc(sizeof(float) * (size_t)n);
    memcpy(s, v, sizeof(float) * (size_t)n);
    qsort(s, (size_t)n, sizeof(float), cmp_f);
    double h = q * (n - 1);
    int k = (int)floor(h);
    double r = k + 1 < n ? s[k] + (h - k) * ((double)s[k + 1] - s[k]) : s[k];
    free(s);
    return r;
}

/* ---- Eq. 3-2: quantiles ---- */

Test(kvq_quantiles, hand_values)
{
    float x5[] = { 4, 1, 5, 3, 2 }, a, b;
    q1(x5, 5, 0.25f, &a, &b); /* ranks 1 and 3 exactly */
    cr_assert_eq(a, 2.0f);
    cr_assert_eq(b, 4.0f);
    float x4[] = { 3, 1, 4, 2 };
    q1(x4, 4, 0.25f, &a, &b); /* ranks 0.75 and 2.25 */
    cr_assert_eq(a, 1.75f);
    cr_assert_eq(b, 3.25f);
    q1(x4, 4, 0.0f, &a, &b); /* alpha 0: min and max */
    cr_assert(a == 1.0f && b == 4.0f);
    q1(x4, 4, 0.5f, &a, &b); /* median */
    cr_assert(a == 2.5f && b == 2.5f);
    q1(x4, 4, 0.9f, &a, &b); /* clamped to 0.5 */
    cr_assert(a == 2.5f && b == 2.5f);
    float x1[] = { -7.25f };
    q1(x1, 1, 0.01f, &a, &b); /* n = 1 */
    cr_assert(a == -7.25f && b == -7.25f);
    float x101[101];
    for (int i = 0; i < 101; i++)
        x101[i] = (float)i;
    shuffle(x101, 101);
    q1(x101, 101, 0.01f, &a, &b); /* rank 1 and 99 (alpha*(m-1) = 1) */
    cr_assert_eq(a, 1.0f);
    cr_assert_eq(b, 99.0f);
    q1(x101, 101, 0.001f, &a, &b); /* rank 0.1: 0.1 and 99.9 */
    cr_assert_float_eq(a, 0.1f, 1e-6f);
    cr_assert_float_eq(b, 99.9f, 1e-5f);
}

/* Several channels of a strided [n][stride] matrix, one call. */
Test(kvq_quantiles, strided_channels)
{
    enum { N = 9, D = 3, STRIDE = 5 };
    float x[N * STRIDE], a[D], b[D], scr[N];
    for (int t = 0; t < N; t++) {
        x[t * STRIDE + 0] = (float)t;         /* 0..8 */
        x[t * STRIDE + 1] = -(float)t * 2;    /* 0..-16 */
        x[t * STRIDE + 2] = 5.0f;             /* constant */
        x[t * STRIDE + 3] = x[t * STRIDE + 4] = NAN; /* beyond D: unread */
    }
    kvq_chunk_quantiles(x, N, D, STRIDE, 0.25f, a, b, scr); /* ranks 2, 6 */
    cr_assert(a[0] == 2 && b[0] == 6);
    cr_assert(a[1] == -12 && b[1] == -4);
    cr_assert(a[2] == 5 && b[2] == 5);
}

/* Against sorting, over sizes, duplicates, adversarial orders. */
Test(kvq_quantiles, matches_sorting_oracle)
{
    const float alphas[] = { 0.0f, 0.001f, 0.01f, 0.1f, 0.37f, 0.5f };
    float *v = malloc(sizeof(float) * 2000), a, b;
    for (int it = 0; it < 600; it++) {
        int n = 1 + (int)(rnd_u32() % (it < 300 ? 40u : 2000u));
        int pattern = it % 6;
        for (int i = 0; i < n; i++) {
            switch (pattern) {
            case 0: v[i] = rnd_gauss(); break;
            case 1: v[i] = (float)(rnd_u32() % 4); break; /* many ties */
            case 2: v[i] = (float)i; break;               /* sorted */
            case 3: v[i] = (float)(n - i); break;         /* reversed */
            case 4: v[i] = 1.5f; break;                   /* constant */
            default: v[i] = (float)(i < n / 2 ? i : n - i); break; /* organ pipe */
            }
        }
        float alpha = alphas[it % 6];
        q1(v, n, alpha, &a, &b);
        double ea = np_quantile(v, n, alpha), eb = np_quantile(v, n, 1.0 - (double)alpha);
        /* rank snapping moves the rank by < 1e-6; values are O(n) */
        double tol = 1e-6 * (1 + fabs(ea)) + 2e-6 * n;
        cr_assert(fabs(a - ea) <= tol, "n=%d pattern %d alpha %g: a %g want %g", n, pattern, alpha, a, ea);
        tol = 1e-6 * (1 + fabs(eb)) + 2e-6 * n;
        cr_assert(fabs(b - eb) <= tol, "n=%d pattern %d alpha %g: b %g want %g", n, pattern, alpha, b, eb);
    }
    free(v);
}

/* Many channels at once (tiles of 16 channels, a partial last tile), with
 * NaN/Inf mixed in, columns sorted either way, constant and tied columns,
 * small and large ranks (both code paths), against sorting per channel. */
Test(kvq_quantiles, multi_channel_matches_oracle)
{
    enum { D = 37, STRIDE = 40, NMAX = 700 };
    const float alphas[] = { 0.0f, 0.001f, 0.005f, 0.01f, 0.03f, 0.2f };
    const int ns[] = { 1, 2, 5, 17, 128, 512, 700 };
    float *x = malloc(sizeof(float) * NMAX * STRIDE), *col = malloc(sizeof(float) * NMAX);
    float a[D], b[D], *scr = malloc(sizeof(float) * NMAX);
    for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++) {
        for (size_t ai = 0; ai < sizeof alphas / sizeof alphas[0]; ai++) {
            int n = ns[ni];
            for (int i = 0; i < NMAX * STRIDE; i++) /* channels >= D: never read */
                x[i] = NAN;
            for (int c = 0; c < D; c++) {
                for (int t = 0; t < n; t++) {
                    float v;
                    switch (c % 6) {
                    case 0: v = (float)t; break;                      /* ascending */
                    case 1: v = (float)(n - t); break;                /* descending */
                    case 2: v = (float)(rnd_u32() % 3); break;        /* ties */
                    case 3: v = 2.5f; break;                          /* constant */
                    default: v = (1.0f + (float)c) * rnd_gauss(); break;
                    }
                    if (c % 4 == 1 && rnd_u32() % 10 == 0) /* non-finite sprinkled */
                        v = rnd_u32() % 3 == 0 ? NAN : (rnd_u32() & 1 ? INFINITY : -INFINITY);
                    if (c == D - 1) /* a channel with nothing finite */
                        v = NAN;
                    x[(size_t)t * STRIDE + c] = v;
                }
            }
            float alpha = alphas[ai];
            kvq_chunk_quantiles(x, n, D, STRIDE, alpha, a, b, scr);
            for (int c = 0; c < D; c++) {
                int m = 0;
                for (int t = 0; t < n; t++) {
                    float v = x[(size_t)t * STRIDE + c];
                    if (isfinite(v))
                        col[m++] = v;
                }
                if (m == 0) {
                    cr_assert(isnan(a[c]) && isnan(b[c]), "n=%d c=%d: empty channel not NaN", n, c);
                    continue;
                }
                double ea = np_quantile(col, m, alpha), eb = np_quantile(col, m, 1.0 - (double)alpha);
                double tol = 1e-6 * (1 + fabs(ea)) + 2e-6 * m;
                cr_assert(fabs(a[c] - ea) <= tol, "n=%d alpha %g c=%d: a %g want %g", n, alpha, c, a[c], ea);
                tol = 1e-6 * (1 + fabs(eb)) + 2e-6 * m;
                cr_assert(fabs(b[c] - eb) <= tol, "n=%d alpha %g c=%d: b %g want %g", n, alpha, c, b[c], eb);
            }
        }
    }
    free(x);
    free(col);
    free(scr);
}

Test(kvq_quantiles, non_finite_ignored)
{
    float x[] = { NAN, 1, INFINITY, 2, 3, -INFINITY, 4, 5, NAN }, a, b;
    q1(x, 9, 0.25f, &a, &b); /* as {1..5} */
    cr_assert(a == 2.0f && b == 4.0f);
    float y[] = { NAN, INFINITY, -INFINITY };
    q1(y, 3, 0.25f, &a, &b);
    cr_assert(isnan(a) && isnan(b), "no finite value: NaN");
    q1(y, 0, 0.25f, &a, &b); /* n = 0 */
    cr_assert(isnan(a) && isnan(b));
}

/* ---- Eq. 3-3: EMA ---- */

typedef struct {
    float lo[4], hi[4], sa[4], sb[4];
    kvq_ema e;
} ema_box;

static void ema_init(ema_box *bx)
{
    memset(bx, 0, sizeof *bx);
    for (int i = 0; i < 4; i++) /* garbage: chunk 0 must overwrite it */
        bx->lo[i] = bx->hi[i] = bx->sa[i] = bx->sb[i] = 1e30f;
    bx->e.lo = bx->lo;
    bx->e.hi = bx->hi;
    bx->e.sum_a = bx->sa;
    bx->e.sum_b = bx->sb;
}

static void upd1(ema_box *bx, const kvq_ema_params *p, float a, float b, float w)
{
    kvq_ema_update(&bx->e, p, &a, &b, 1, w);
}

Test(kvq_ema, warmup_mean_then_clipped_ema)
{
    kvq_ema_params p = { .ema_decay = 0.75f, .ema_clip = 0.125f, .clip_quantile = 0.01f, .warmup_chunks = 2 };
    ema_box bx;
    ema_init(&bx);
    cr_assert(kvq_ema_warming(&bx.e, &p));
    upd1(&bx, &p, -1, 1, 1);
    cr_assert(bx.lo[0] == -1 && bx.hi[0] == 1 && bx.e.n_chunks == 1);
    upd1(&bx, &p, -7, 9, 1); /* warm-up: no clipping, plain mean */
    cr_assert(bx.lo[0] == -4 && bx.hi[0] == 5, "warm-up mean [%g, %g]", bx.lo[0], bx.hi[0]);
    cr_assert(!kvq_ema_warming(&bx.e, &p));
    /* w = 9, band [-4 - 1.125, 5 + 1.125]; a = -100 clips to -5.125,
     * b = 5.5 stays: lo = -4 + 0.25 * (-1.125), hi = 5 + 0.25 * 0.5 */
    upd1(&bx, &p, -100, 5.5f, 1);
    cr_assert_eq(bx.lo[0], -4.28125f);
    cr_assert_eq(bx.hi[0], 5.125f);
    cr_assert_eq(bx.e.n_chunks, 3);
}

Test(kvq_ema, warmup_three_chunks_unclipped)
{
    kvq_ema_params p = { .ema_decay = 0.9f, .ema_clip = 0.0f, .clip_quantile = 0.01f, .warmup_chunks = 3 };
    ema_box bx;
    ema_init(&bx);
    upd1(&bx, &p, -1, 1, 1);
    upd1(&bx, &p, -100, 100, 1); /* gamma = 0 but warm-up: taken whole */
    upd1(&bx, &p, -4, 4, 0.25f); /* weight is ignored in warm-up */
    cr_assert_eq(bx.lo[0], -35.0f);
    cr_assert_eq(bx.hi[0], 35.0f);
}

Test(kvq_ema, w0_first_chunk_then_decay)
{
    kvq_ema_params p = { .ema_decay = 0.75f, .ema_clip = 1.0f, .clip_quantile = 0.01f, .warmup_chunks = 0 };
    ema_box bx;
    ema_init(&bx);
    cr_assert(!kvq_ema_warming(&bx.e, &p));
    upd1(&bx, &p, -1, 1, 1); /* W = 0: the first chunk sets the range */
    cr_assert(bx.lo[0] == -1 && bx.hi[0] == 1);
    upd1(&bx, &p, -1.5f, 0.5f, 1); /* inside the band: plain EMA */
    cr_assert_eq(bx.lo[0], -1.125f);  /* 0.75 * -1 + 0.25 * -1.5 */
    cr_assert_eq(bx.hi[0], 0.875f);   /* 0.75 * 1 + 0.25 * 0.5 */
}

Test(kvq_ema, decode_block_weight)
{
    kvq_ema_params p = { .ema_decay = 0.75f, .ema_clip = 1.0f, .clip_quantile = 0.01f, .warmup_chunks = 0 };
    ema_box bx;
    ema_init(&bx);
    upd1(&bx, &p, -1, 1, 1);
    upd1(&bx, &p, -1.5f, 0.5f, 0.25f); /* a 128-token block of a 512 chunk */
    cr_assert_eq(bx.lo[0], -1.03125f); /* -1 + 0.25 * 0.25 * -0.5 */
    cr_assert_eq(bx.hi[0], 0.96875f);
}

/* A chunk far outside on both sides moves each end by gamma * w * (1 - beta). */
Test(kvq_ema, far_chunk_moves_at_most_gamma_w)
{
    kvq_ema_params p = { .ema_decay = 0.875f, .ema_clip = 0.25f, .clip_quantile = 0.01f, .warmup_chunks = 0 };
    ema_box bx;
    ema_init(&bx);
    upd1(&bx, &p, -1, 1, 1);
    upd1(&bx, &p, -1e6f, 1e6f, 1); /* w = 2: each end moves 0.5 * 0.125 */
    cr_assert_eq(bx.lo[0], -1.0625f);
    cr_assert_eq(bx.hi[0], 1.0625f);
}

/* A chunk wholly above the range: hi moves out by at most gamma * w * (1 -
 * beta), lo follows inside the band, the range stays ordered (the literal
 * Eq. 3-2 would give lo = 0.875 * -1 + 0.125 * 100 > hi). */
Test(kvq_ema, chunk_beyond_one_end_keeps_order)
{
    kvq_ema_params p = { .ema_decay = 0.875f, .ema_clip = 0.25f, .clip_quantile = 0.01f, .warmup_chunks = 0 };
    ema_box bx;
    ema_init(&bx);
    upd1(&bx, &p, -1, 1, 1);
    upd1(&bx, &p, 100, 200, 1); /* both stats clip to hi + 0.5 = 1.5 */
    cr_assert_eq(bx.hi[0], 1.0625f);
    cr_assert_eq(bx.lo[0], -0.6875f); /* -1 + 0.125 * 2.5 */
    cr_assert_lt(bx.lo[0], bx.hi[0]);
}

/* Constant channel: w = 0 becomes eps in the band (as in s), so the range
 * may move, by gamma * eps * (1 - beta) per chunk. */
Test(kvq_ema, constant_channel)
{
    kvq_ema_params p = { .ema_decay = 0.5f, .ema_clip = 1.0f, .clip_quantile = 0.01f, .warmup_chunks = 1 };
    ema_box bx;
    ema_init(&bx);
    upd1(&bx, &p, 3, 3, 1);
    cr_assert(bx.lo[0] == 3 && bx.hi[0] == 3);
    upd1(&bx, &p, 2, 4, 1);
    cr_assert_float_eq(bx.lo[0], 3 - 0.5f * KVQ_EPS, 3e-7f);
    cr_assert_float_eq(bx.hi[0], 3 + 0.5f * KVQ_EPS, 3e-7f);
    cr_assert(bx.lo[0] < 3 && bx.hi[0] > 3, "the band is not empty");
    uint16_t s;
    uint8_t z;
    kvq_scale_zero(3, 3, &s, &z); /* [3, 3] widened to [0, 3] */
    cr_assert_geq(15 * kt_f16_to_f32(s), 3.0f);
    cr_assert_eq(z, 0);
    kvq_scale_zero(0, 0, &s, &z); /* zero width: s = eps/15 rounded up to FP16 */
    cr_assert_eq(kt_f16_to_f32(s), 0x1p-23f);
    cr_assert_geq(kt_f16_to_f32(s), KVQ_EPS / 15);
    cr_assert_eq(z, 0);
}

/* NaN stats: the channel keeps its exact range, in and after warm-up; a
 * channel with no data yet is NaN and adopts its first finite stats. */
Test(kvq_ema, nan_stats_leave_channel_unchanged)
{
    kvq_ema_params p = { .ema_decay = 0.5f, .ema_clip = 0.5f, .clip_quantile = 0.01f, .warmup_chunks = 3 };
    ema_box bx;
    ema_init(&bx);
    float a[2], b[2];
    /* chunk 0: channel 0 has data, channel 1 none */
    a[0] = -2; b[0] = 2; a[1] = NAN; b[1] = NAN;
    kvq_ema_update(&bx.e, &p, a, b, 2, 1);
    cr_assert(bx.lo[0] == -2 && bx.hi[0] == 2);
    cr_assert(isnan(bx.lo[1]) && isnan(bx.hi[1]));
    /* chunk 1: swapped */
    a[0] = NAN; b[0] = INFINITY; a[1] = -1; b[1] = 3;
    kvq_ema_update(&bx.e, &p, a, b, 2, 1);
    cr_assert(bx.lo[0] == -2 && bx.hi[0] == 2, "missing chunk changed the mean");
    cr_assert(bx.lo[1] == -1 && bx.hi[1] == 3, "first data sets the range");
    /* chunk 2: both have data; missing chunks counted as the mean */
    a[0] = -5; b[0] = 5; a[1] = -4; b[1] = 0;
    kvq_ema_update(&bx.e, &p, a, b, 2, 1);
    cr_assert(bx.lo[0] == -3 && bx.hi[0] == 3, "(-2 -2 -5)/3: [%g, %g]", bx.lo[0], bx.hi[0]);
    cr_assert(bx.lo[1] == -2 && bx.hi[1] == 2, "(-1 -1 -4)/3: [%g, %g]", bx.lo[1], bx.hi[1]);
    /* after warm-up: NaN leaves both exactly as they are */
    a[0] = NAN; b[0] = NAN; a[1] = -INFINITY; b[1] = 1;
    kvq_ema_update(&bx.e, &p, a, b, 2, 1);
    cr_assert(bx.lo[0] == -3 && bx.hi[0] == 3 && bx.lo[1] == -2 && bx.hi[1] == 2);
    cr_assert_eq(bx.e.n_chunks, 4);
}

Test(kvq_ema, channel_without_data_after_warmup)
{
    kvq_ema_params p = { .ema_decay = 0.5f, .ema_clip = 0.5f, .clip_quantile = 0.01f, .warmup_chunks = 0 };
    ema_box bx;
    ema_init(&bx);
    upd1(&bx, &p, NAN, NAN, 1);
    cr_assert(isnan(bx.lo[0]));
    uint16_t s;
    uint8_t z;
    kvq_scale_zero(bx.lo[0], bx.hi[0], &s, &z); /* no range: [0, 0] */
    cr_assert(kt_f16_to_f32(s) == 0x1p-23f && z == 0);
    upd1(&bx, &p, -1, 2, 1);
    cr_assert(bx.lo[0] == -1 && bx.hi[0] == 2);
}

/* Real chunks: warm-up on Gaussian data, one chunk 100x larger, then
 * normal chunks: the spike chunk moves the range by at most gamma * w *
 * (1 - beta) per end, and the range recovers. */
Test(kvq_ema, single_extreme_chunk_after_warmup)
{
    enum { C = 512, D = 8 };
    kvq_ema_params p = { .ema_decay = 0.9f, .ema_clip = 0.1f, .clip_quantile = 0.01f, .warmup_chunks = 2 };
    float *x = malloc(sizeof(float) * C * D), scr[C], a[D], b[D];
    float lo[D], hi[D], sa[D], sb[D], plo[D], phi[D];
    kvq_ema e = { lo, hi, sa, sb, 0 };
    for (int chunk = 0; chunk < 40; chunk++) {
        float mul = chunk == 5 ? 100.0f : 1.0f;
        for (int i = 0; i < C * D; i++)
            x[i] = mul * (1.0f + (float)(i % D)) * rnd_gauss();
        kvq_chunk_quantiles(x, C, D, D, p.clip_quantile, a, b, scr);
        memcpy(plo, lo, sizeof lo);
        memcpy(phi, hi, sizeof hi);
        kvq_ema_update(&e, &p, a, b, D, 1.0f);
        for (int c = 0; c < D; c++) {
            float sig = 1.0f + (float)c;
            if (chunk == 1) /* warm-up mean of two chunks: about +-2.33 sigma */
                cr_assert(fabsf(hi[c] / sig - 2.33f) < 0.5f && fabsf(lo[c] / sig + 2.33f) < 0.5f,
                          "warm-up range [%g, %g] sigma %g", lo[c], hi[c], sig);
            if (chunk == 5) {
                float w = phi[c] - plo[c], lim = p.ema_clip * w * (1 - p.ema_decay) * 1.0001f;
                cr_assert_leq(phi[c] - hi[c], 0);
                cr_assert_leq(hi[c] - phi[c], lim, "hi moved %g > %g", hi[c] - phi[c], lim);
                cr_assert_leq(plo[c] - lo[c], lim, "lo moved %g > %g", plo[c] - lo[c], lim);
            }
            if (chunk == 39)
                cr_assert(fabsf(hi[c] / sig - 2.33f) < 0.2f && fabsf(lo[c] / sig + 2.33f) < 0.2f,
                          "no recovery: [%g, %g] sigma %g", lo[c], hi[c], sig);
        }
    }
    free(x);
}

/* End to end: EMA from 3 chunks, then a block of the next chunk: about
 * 2 * alpha of the K values are outlier candidates. */
Test(kvq_ema, pipeline_outlier_rate)
{
    enum { C = 512, D = 192, T = 128 };
    kvq_ema_params p = { .ema_decay = 0.9f, .ema_clip = 0.1f, .clip_quantile = 0.005f, .warmup_chunks = 2 };
    float *x = malloc(sizeof(float) * C * D), *scr = malloc(sizeof(float) * C);
    float *st = malloc(sizeof(float) * D * 6);
    kvq_ema e = { st, st + D, st + 2 * D, st + 3 * D, 0 };
    float *a = st + 4 * D, *b = st + 5 * D;
    for (int chunk = 0; chunk < 4; chunk++) {
        for (int i = 0; i < C * D; i++)
            x[i] = (0.5f + (float)(i % 7)) * rnd_gauss() + (float)(i % D % 3);
        if (chunk == 3)
            break;
        kvq_chunk_quantiles(x, C, D, D, p.clip_quantile, a, b, scr);
        kvq_ema_update(&e, &p, a, b, D, 1.0f);
    }
    kvq_layout L;
    char err[64];
    cr_assert_eq(kvq_layout_init(&L, T, D, 64, 64, KVQ_K_PER_CHANNEL, 0.05f, err, sizeof err), 0);
    void *blk = aligned_alloc(64, (L.bytes + 63) / 64 * 64);
    void *qs = aligned_alloc(64, (kvq_quantize_scratch_bytes(&L) + 63) / 64 * 64);
    kvq_quantize_block(&L, blk, x, x, D, T, e.lo, e.hi, e.lo, e.hi, qs);
    const kvq_block_hdr *h = kvq_chdr(blk);
    double rk = (double)(h->n_kout + h->n_clamped) / (T * D);
    cr_log_info("alpha %.3f: K outlier rate %.4f, V %.4f (budget %.3f)", p.clip_quantile, rk,
                (double)h->n_vout / (T * D), 0.05);
    cr_assert(rk > 0.2 * p.clip_quantile && rk < 4 * p.clip_quantile, "K outlier rate %g", rk);
    cr_assert_eq(h->n_clamped, 0);
    free(blk);
    free(qs);
    free(x);
    free(scr);
    free(st);
}
