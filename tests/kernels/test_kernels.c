/*
 * test_kernels.c - every kcpu op against the kref oracle, on odd and real
 * (SmolLM2-135M) shapes, random and adversarial values, through both the
 * SIMD path chosen at run time and the forced scalar path, single-threaded
 * and on pools of 2 and 3 threads.
 *
 * Tolerances are per element: |got - ref| <= ATOL + RTOL*|ref| + MTOL*mag,
 * where mag = sum_j |w_j| |x_j| is the size of the terms being summed (an f32
 * sum of n terms can be off by ~n*eps*mag however small the result is). For
 * Q4_0/Q4_1 the kernels sum d*q*x and the offset (-8d or m) times x as
 * separate terms, so there |w_j| is |d| q + |offset| (see term_abs_row).
 * Likewise Q5_0 (offset -16d), Q5_1 (m) and Q4_K / Q5_K, whose sub-block
 * mins -dmin*m_j are a separate term: |w_j| is |d sc_j| q + |dmin m_j|.
 * Quantized weight types are checked twice: tightly against kref run on the
 * activations quantized the same way the kernels do (int8 per 32-block), and
 * against kref on the exact activations with the bound that quantization
 * implies, sum_b (amax_b / 254) * sum_{j in b} |w_j| (the int8 rounding of
 * x moves each x_j by at most half a step, amax_b / 254).
 * Every back end this CPU runs is checked (kcpu_force_path: scalar, avx2,
 * avx512, avx512vnni); for types whose AVX-512 matmul is the AVX2 one
 * (F32/F16/BF16, Q4_0, Q4_1, Q8_0) only scalar and the run-time choice.
 * Threading: each Criterion test runs in its own process.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/kcpu.h"
#include "kernels/cpu/kcpu_impl.h"
#include "kernels/ref/kref.h"

/* f32 accumulation of products (float weights; int8 activations) */
#define MM_ATOL 1e-6
#define MM_RTOL 1e-5
#define MM_MTOL 2e-5
/* elementwise ops */
#define EW_ATOL 1e-6
#define EW_RTOL 2e-6
/* attention outputs (convex combinations of V rows, |v| <= 1) */
#define AT_ATOL 2e-6
#define AT_RTOL 2e-5

/* ---- helpers ---- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint32_t rnd_u32(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}

/* uniform in [lo, hi) */
static float rnd_f(float lo, float hi)
{
    return lo + (hi - lo) * (float)(rnd_u32() & 0xffffff) / 16777216.0f;
}

static void fill(float *x, size_t n, float lo, float hi)
{
    for (size_t i = 0; i < n; i++)
        x[i] = rnd_f(lo, hi);
}

/* Activations with adversarial content: whole zero blocks, single large
 * spikes, tiny values, exact halves (rounding ties after quantization). */
static void fill_adversarial(float *x, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        switch (rnd_u32() % 8) {
        case 0: x[i] = 0.0f; break;
        case 1: x[i] = rnd_f(-1e4f, 1e4f); break;
        case 2: x[i] = rnd_f(-1e-6f, 1e-6f); break;
        case 3: x[i] = (float)((int)(rnd_u32() % 255) - 127) * 0.5f; break;
        default: x[i] = rnd_f(-2.0f, 2.0f); break;
        }
    }
    for (size_t b = 0; b + 32 <= n; b += 96) /* every third block zero */
        memset(x + b, 0, 32 * sizeof(float));
}

/* The back ends to check for type t, those this CPU runs (see header);
 * returns how many were written to out. */
static int test_paths(kt_type t, kcpu_path out[4])
{
    int all = t == KT_Q5_0 || t == KT_Q5_1 || t == KT_Q4_K || t == KT_Q5_K || t == KT_Q6_K;
    int n = 0;
    out[n++] = KCPU_PATH_SCALAR;
    if (!all) {
        out[n++] = KCPU_PATH_AUTO;
        return n;
    }
    static const kcpu_path simd[] = { KCPU_PATH_AVX2, KCPU_PATH_AVX512, KCPU_PATH_AVX512VNNI };
    for (int i = 0; i < 3; i++)
        if (kcpu_force_path(simd[i]) == 0)
            out[n++] = simd[i];
    kcpu_force_path(KCPU_PATH_AUTO);
    return n;
}

static uint16_t rnd_scale_f16(int adversarial)
{
    if (adversarial) {
        switch (rnd_u32() % 4) {
        case 0: return (uint16_t)(1 + rnd_u32() % 0x3ff);      /* subnormal */
        case 1: return 0;                                        /* zero */
        case 2: return kt_f32_to_f16(rnd_f(100.0f, 3000.0f));   /* large */
        default: break;
        }
    }
    return kt_f32_to_f16(rnd_f(0.001f, 0.05f));
}

/* Random weight matrix of type t, n_rows x n_cols; caller frees. */
static void *make_weights(kt_type t, int n_rows, int n_cols, int adversarial)
{
    size_t rb = kt_row_bytes(t, n_cols);
    uint8_t *w = malloc(rb * (size_t)n_rows + 1);
    cr_assert(w);
    for (int r = 0; r < n_rows; r++) {
        uint8_t *row = w + (size_t)r * rb;
        for (int b = 0; b < n_cols / (int)kt_block_elems(t); b++) {
            switch (t) {
            case KT_F32: {
                float v = adversarial && rnd_u32() % 8 == 0 ? rnd_f(-3e4f, 3e4f)
                                                            : rnd_f(-1.0f, 1.0f);
                memcpy(row + 4 * (size_t)b, &v, 4);
                break;
            }
            case KT_F16: {
                float v = adversarial && rnd_u32() % 8 == 0 ? rnd_f(-6e4f, 6e4f)
                                                            : rnd_f(-1.0f, 1.0f);
                uint16_t h = adversarial && rnd_u32() % 8 == 0
                                 ? (uint16_t)(rnd_u32() % 0x3ff) /* subnormal */
                                 : kt_f32_to_f16(v);
                memcpy(row + 2 * (size_t)b, &h, 2);
                break;
            }
            case KT_BF16: {
                float v = adversarial && rnd_u32() % 8 == 0 ? rnd_f(-1e6f, 1e6f)
                                                            : rnd_f(-1.0f, 1.0f);
                uint32_t bits;
                memcpy(&bits, &v, 4);
                uint16_t h = (uint16_t)(bits >> 16);
                memcpy(row + 2 * (size_t)b, &h, 2);
                break;
            }
            case KT_Q4_0: {
                kt_block_q4_0 *blk = (kt_block_q4_0 *)row + b;
                blk->d = rnd_scale_f16(adversarial);
                for (int j = 0; j < 16; j++)
                    blk->qs[j] = (uint8_t)rnd_u32();
                break;
            }
            case KT_Q4_1: {
                kt_block_q4_1 *blk = (kt_block_q4_1 *)row + b;
                blk->d = rnd_scale_f16(adversarial);
                blk->m = kt_f32_to_f16(-rnd_f(0.0f, 0.4f));
                if (adversarial && rnd_u32() % 4 == 0)
                    blk->m = (uint16_t)(0x8000u | (rnd_u32() % 0x3ff));
                for (int j = 0; j < 16; j++)
                    blk->qs[j] = (uint8_t)rnd_u32();
                break;
            }
            case KT_Q8_0: {
                kt_block_q8_0 *blk = (kt_block_q8_0 *)row + b;
                blk->d = rnd_scale_f16(adversarial);
                for (int j = 0; j < 32; j++) /* -128 is legal on disk */
                    blk->qs[j] = (int8_t)(adversarial ? (int)(rnd_u32() % 256) - 128
                                                      : (int)(rnd_u32() % 255) - 127);
                break;
            }
            case KT_Q5_0: {
                kt_block_q5_0 *blk = (kt_block_q5_0 *)row + b;
                blk->d = rnd_scale_f16(adversarial) ^ (adversarial && rnd_u32() % 4 == 0 ? 0x8000 : 0);
                for (int j = 0; j < 4; j++)
                    blk->qh[j] = (uint8_t)rnd_u32();
                for (int j = 0; j < 16; j++)
                    blk->qs[j] = (uint8_t)rnd_u32();
                break;
            }
            case KT_Q5_1: {
                kt_block_q5_1 *blk = (kt_block_q5_1 *)row + b;
                blk->d = rnd_scale_f16(adversarial);
                blk->m = kt_f32_to_f16(-rnd_f(0.0f, 0.8f));
                if (adversarial && rnd_u32() % 4 == 0)
                    blk->m = (uint16_t)(0x8000u | (rnd_u32() % 0x3ff));
                for (int j = 0; j < 4; j++)
                    blk->qh[j] = (uint8_t)rnd_u32();
                for (int j = 0; j < 16; j++)
                    blk->qs[j] = (uint8_t)rnd_u32();
                break;
            }
            case KT_Q4_K: case KT_Q5_K: {
                /* d, dmin: small (the 6-bit scales and mins reach 63); all
                 * other bytes random, so every scale/min/code pattern occurs */
                uint8_t *blk = row + (size_t)b * kt_block_bytes(t);
                for (size_t j = 4; j < kt_block_bytes(t); j++)
                    blk[j] = (uint8_t)rnd_u32();
                uint16_t d = adversarial ? rnd_scale_f16(1) : kt_f32_to_f16(rnd_f(0.0002f, 0.002f));
                uint16_t dmin = kt_f32_to_f16(rnd_f(0.0f, 0.004f));
                if (adversarial && rnd_u32() % 4 == 0)
                    dmin = (uint16_t)(rnd_u32() % 0x3ff) | (rnd_u32() % 2 ? 0x8000 : 0);
                memcpy(blk, &d, 2);
                memcpy(blk + 2, &dmin, 2);
                break;
            }
            case KT_Q6_K: {
                kt_block_q6_k *blk = (kt_block_q6_k *)row + b;
                for (size_t j = 0; j < offsetof(kt_block_q6_k, d); j++)
                    ((uint8_t *)blk)[j] = (uint8_t)rnd_u32(); /* scales -128..127 */
                blk->d = adversarial ? rnd_scale_f16(1) : kt_f32_to_f16(rnd_f(0.0001f, 0.001f));
                break;
            }
            }
        }
    }
    return w;
}

/* Fails the test at the first element outside atol + rtol*|ref| + extra[i]
 * (extra may be NULL). */
static void check_close(const char *what, const float *got, const float *ref,
                        const double *extra, size_t n, double atol, double rtol)
{
    for (size_t i = 0; i < n; i++) {
        double tol = atol + rtol * fabs((double)ref[i]) + (extra ? extra[i] : 0.0);
        double err = fabs((double)got[i] - (double)ref[i]);
        if (!(err <= tol))
            cr_assert_fail("%s: element %zu got %.9g ref %.9g err %.3g tol %.3g",
                           what, i, (double)got[i], (double)ref[i], err, tol);
    }
}

/* Largest share of its tolerance an element used (err / tol), for the
 * summary the matmul suites log per back end. */
static double used_share(const float *got, const float *ref, const double *extra, size_t n,
                         double atol, double rtol)
{
    double worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        double tol = atol + rtol * fabs((double)ref[i]) + (extra ? extra[i] : 0.0);
        double e = fabs((double)got[i] - (double)ref[i]) / tol;
        worst = e > worst ? e : worst;
    }
    return worst;
}

/* Per back end (kcpu_path): the worst shares of the tight tolerance (vs
 * kref on the int8 activations) and of the int8 rounding bound (vs kref on
 * the exact activations), and the largest |kcpu - kref| / sum_j |w_j x_j|
 * (random, non-adversarial cases). */
static double g_share_q[8], g_share_x[8], g_rel[8];

/* The split's rule (kcpu_impl.h), written out again: the column of block
 * xb's lone outlier at ratio r (the only int8 code, as the kernels round
 * them, of magnitude >= ceil(127 / r)), or -1. */
static int lone_outlier(const float *xb, float r)
{
    float amax = 0.0f;
    for (int j = 0; j < 32; j++)
        amax = fmaxf(amax, fabsf(xb[j]));
    if (!(r > 1.0f))
        return -1;
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    const int tc = (int)ceilf(127.0f / r);
    int at = -1, n = 0;
    for (int j = 0; j < 32; j++)
        if (fabsf(nearbyintf(xb[j] * id)) >= (float)tc) {
            n++;
            at = j;
        }
    return n == 1 ? at : -1;
}

/* The kernels' activation quantization, mirrored (kcpu_impl.h):
 * d = amax/127, id = d ? 1/d : 0, q = round-half-even(x*id). xq = d*q, and
 * amax/254 per element (half a step) into half_step. With the split (the
 * ratio in force) a lone outlier stays exact (half step 0) and amax is the
 * block's largest other |x|. */
static void quantize_like_kernels(const float *x, float *xq, float *half_step, size_t n)
{
    const float ratio = kcpu_xsplit_ratio();
    for (size_t b = 0; b < n; b += 32) {
        const int o = lone_outlier(x + b, ratio);
        float amax = 0.0f;
        for (int j = 0; j < 32; j++)
            if (j != o)
                amax = fmaxf(amax, fabsf(x[b + j]));
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        for (int j = 0; j < 32; j++) {
            xq[b + j] = j == o ? x[b + j] : d * nearbyintf(x[b + j] * id);
            half_step[b + j] = j == o ? 0.0f : amax / 254.0f;
        }
    }
}

/* Per element of a weight row, the magnitude of the terms the kernels add
 * up: |w| for F32/F16/BF16/Q8_0/Q6_K; |d| q + 8|d| for Q4_0 (q unsigned
 * nibble), |d| q + 16|d| for Q5_0, |d| q + |m| for Q4_1 / Q5_1, and
 * |d sc_j| q + |dmin m_j| for Q4_K / Q5_K. */
static void term_abs_row(kt_type t, const void *row, float *out, int n)
{
    kref_dequant_row(t, row, out, n);
    for (int i = 0; i < n; i++)
        out[i] = fabsf(out[i]);
    if (t == KT_Q5_0 || t == KT_Q5_1) {
        for (int b = 0; b < n / 32; b++) {
            const uint8_t *qs, *qh;
            float d, off;
            if (t == KT_Q5_0) {
                const kt_block_q5_0 *blk = (const kt_block_q5_0 *)row + b;
                qs = blk->qs, qh = blk->qh;
                d = fabsf(kt_f16_to_f32(blk->d));
                off = 16.0f * d;
            } else {
                const kt_block_q5_1 *blk = (const kt_block_q5_1 *)row + b;
                qs = blk->qs, qh = blk->qh;
                d = fabsf(kt_f16_to_f32(blk->d));
                off = fabsf(kt_f16_to_f32(blk->m));
            }
            for (int j = 0; j < 16; j++) {
                int lo = (qs[j] & 15) | ((qh[j / 8] >> (j % 8)) & 1) << 4;
                int hi = (qs[j] >> 4) | ((qh[(j + 16) / 8] >> ((j + 16) % 8)) & 1) << 4;
                out[b * 32 + j] = d * (float)lo + off;
                out[b * 32 + j + 16] = d * (float)hi + off;
            }
        }
        return;
    }
    if (t == KT_Q4_K || t == KT_Q5_K) {
        /* |w| + 2 |dmin m_j| >= |d sc_j| q + |dmin m_j| (w = d sc q - dmin m) */
        for (int sb = 0; sb < n / 256; sb++) {
            const uint8_t *blk = (const uint8_t *)row + (size_t)sb * kt_block_bytes(t);
            uint16_t dmin16;
            memcpy(&dmin16, blk + 2, 2);
            float dmin = fabsf(kt_f16_to_f32(dmin16));
            for (int j = 0; j < 8; j++) {
                uint8_t sc, m;
                kt_kq_scale_min(blk + 4, j, &sc, &m);
                for (int l = 0; l < 32; l++)
                    out[sb * 256 + j * 32 + l] += 2.0f * dmin * (float)m;
            }
        }
        return;
    }
    if (t != KT_Q4_0 && t != KT_Q4_1)
        return;
    for (int b = 0; b < n / 32; b++) {
        const uint8_t *qs;
        float d, off;
        if (t == KT_Q4_0) {
            const kt_block_q4_0 *blk = (const kt_block_q4_0 *)row + b;
            qs = blk->qs;
            d = fabsf(kt_f16_to_f32(blk->d));
            off = 8.0f * d;
        } else {
            const kt_block_q4_1 *blk = (const kt_block_q4_1 *)row + b;
            qs = blk->qs;
            d = fabsf(kt_f16_to_f32(blk->d));
            off = fabsf(kt_f16_to_f32(blk->m));
        }
        for (int j = 0; j < 16; j++) {
            out[b * 32 + j] = d * (float)(qs[j] & 15) + off;
            out[b * 32 + j + 16] = d * (float)(qs[j] >> 4) + off;
        }
    }
}

typedef struct { int n_rows, n_cols, n_tok; } mm_shape;

/* Runs one matmul case on every path and pool size and checks it. */
static void check_matmul(kt_type t, mm_shape s, int adversarial, kcpu_pool **pools, int n_pools)
{
    int quant = kt_is_quant(t);
    size_t nx = (size_t)s.n_tok * (size_t)s.n_cols, ny = (size_t)s.n_tok * (size_t)s.n_rows;
    void *W = make_weights(t, s.n_rows, s.n_cols, adversarial);
    float *x = malloc(nx * sizeof(float)), *xq = malloc(nx * sizeof(float));
    float *hs = malloc(nx * sizeof(float)), *wrow = malloc((size_t)s.n_cols * sizeof(float));
    float *wabs = malloc((size_t)s.n_cols * sizeof(float));
    float *ref = malloc(ny * sizeof(float)), *refq = malloc(ny * sizeof(float));
    float *got = malloc(ny * sizeof(float));
    double *mag = malloc(ny * sizeof(double)), *qb = malloc(ny * sizeof(double));
    void *ws = malloc(kcpu_matmul_scratch_bytes(t, s.n_cols, s.n_tok) + 1);
    cr_assert(x && xq && hs && wrow && wabs && ref && refq && got && mag && qb && ws);
    if (adversarial)
        fill_adversarial(x, nx);
    else
        fill(x, nx, -2.0f, 2.0f);
    kref_matmul(t, W, x, ref, s.n_rows, s.n_cols, s.n_tok);
    if (quant) {
        quantize_like_kernels(x, xq, hs, nx);
        kref_matmul(t, W, xq, refq, s.n_rows, s.n_cols, s.n_tok);
    }
    size_t rb = kt_row_bytes(t, s.n_cols);
    for (int r = 0; r < s.n_rows; r++) {
        kref_dequant_row(t, (const char *)W + (size_t)r * rb, wrow, s.n_cols);
        term_abs_row(t, (const char *)W + (size_t)r * rb, wabs, s.n_cols);
        for (int k = 0; k < s.n_tok; k++) {
            double m = 0.0, b = 0.0;
            for (int j = 0; j < s.n_cols; j++) {
                size_t xi = (size_t)k * (size_t)s.n_cols + (size_t)j;
                m += (double)wabs[j] * fabs((double)x[xi]);
                if (quant)
                    b += fabs((double)wrow[j]) * (double)hs[xi];
            }
            size_t yi = (size_t)k * (size_t)s.n_rows + (size_t)r;
            mag[yi] = MM_MTOL * m;
            qb[yi] = MM_MTOL * m + 1.001 * b;
        }
    }
    char what[160];
    kcpu_path paths[4];
    int n_paths = test_paths(t, paths);
    for (int pa = 0; pa < n_paths; pa++) {
        cr_assert_eq(kcpu_force_path(paths[pa]), 0);
        for (int pi = 0; pi < n_pools; pi++) {
            for (size_t i = 0; i < ny; i++)
                got[i] = NAN;
            kcpu_matmul(pools[pi], t, W, x, got, s.n_rows, s.n_cols, s.n_tok, ws);
            snprintf(what, sizeof what, "matmul %s %s%s rows %d cols %d tok %d threads %d",
                     kt_name(t), kcpu_simd_name(), adversarial ? " adversarial" : "",
                     s.n_rows, s.n_cols, s.n_tok, kcpu_pool_size(pools[pi]));
            if (quant) {
                check_close(what, got, refq, mag, ny, MM_ATOL, MM_RTOL);
                check_close(what, got, ref, qb, ny, MM_ATOL, MM_RTOL);
                int pk = (int)paths[pa];
                double sq = used_share(got, refq, mag, ny, MM_ATOL, MM_RTOL);
                double sx = used_share(got, ref, qb, ny, MM_ATOL, MM_RTOL);
                g_share_q[pk] = fmax(g_share_q[pk], sq);
                g_share_x[pk] = fmax(g_share_x[pk], sx);
                for (size_t i = 0; !adversarial && i < ny; i++)
                    if (mag[i] > 0.0)
                        g_rel[pk] = fmax(g_rel[pk], fabs((double)got[i] - (double)ref[i]) /
                                                        (mag[i] / MM_MTOL));
            } else {
                check_close(what, got, ref, mag, ny, MM_ATOL, MM_RTOL);
            }
        }
    }
    /* the repacked weight (kcpu_matmul_rp): its portable loop and, where
     * the CPU has it, the AVX-512 VNNI kernel, against the same bounds */
    if (quant) {
        kcpu_rp *rp = kcpu_rp_create(t, W, s.n_rows, s.n_cols);
        cr_assert(rp, "kcpu_rp_create %s", kt_name(t));
        void *wsr = malloc(kcpu_rp_scratch_bytes(s.n_cols, s.n_tok) + 1);
        cr_assert(wsr);
        kcpu_path rpaths[2] = { KCPU_PATH_SCALAR, KCPU_PATH_AUTO };
        for (int pa = 0; pa < 2; pa++) {
            cr_assert_eq(kcpu_force_path(rpaths[pa]), 0);
            for (int pi = 0; pi < n_pools; pi++) {
                for (size_t i = 0; i < ny; i++)
                    got[i] = NAN;
                kcpu_matmul_rp(pools[pi], rp, x, got, s.n_tok, wsr);
                snprintf(what, sizeof what, "matmul_rp %s %s%s rows %d cols %d tok %d threads %d",
                         kt_name(t), kcpu_rp_wanted() ? "vnni" : "portable",
                         adversarial ? " adversarial" : "", s.n_rows, s.n_cols, s.n_tok,
                         kcpu_pool_size(pools[pi]));
                check_close(what, got, refq, mag, ny, MM_ATOL, MM_RTOL);
                check_close(what, got, ref, qb, ny, MM_ATOL, MM_RTOL);
            }
        }
        kcpu_rp_destroy(rp);
        free(wsr);
    }
    kcpu_force_scalar(0);
    free(W); free(x); free(xq); free(hs); free(wrow); free(wabs); free(ref); free(refq);
    free(got); free(mag); free(qb); free(ws);
}

static void matmul_suite(kt_type t)
{
    static const int cols_q[] = { 32, 64, 576, 1536 };
    static const int cols_q5[] = { 32, 96, 576, 1504 }; /* odd block counts too */
    static const int cols_k[] = { 256, 768, 1536 };
    static const int cols_f[] = { 7, 37, 64, 576, 1536 };
    static const int rows[] = { 1, 3, 7, 192, 576 };
    static const int toks[] = { 1, 2, 7, 17 }; /* tails of 1, 2, 3 tokens */
    int quant = kt_is_quant(t);
    const int *cols = !quant ? cols_f : kt_block_elems(t) == KT_QK_K ? cols_k
                    : t == KT_Q5_0 || t == KT_Q5_1 ? cols_q5 : cols_q;
    int n_cols = !quant ? 5 : kt_block_elems(t) == KT_QK_K ? 3 : 4;
    kcpu_pool *pools[3] = { NULL, NULL, NULL };
    cr_assert(kcpu_pool_create(2, &pools[1]) == 0);
    cr_assert(kcpu_pool_create(3, &pools[2]) == 0);
    for (int ci = 0; ci < n_cols; ci++)
        for (int ri = 0; ri < 5; ri++)
            for (int ti = 0; ti < 4; ti++) {
                mm_shape s = { rows[ri], cols[ci], toks[ti] };
                if ((double)s.n_rows * s.n_cols * s.n_tok > 3e6)
                    continue; /* the biggest ones are covered below */
                check_matmul(t, s, 0, pools, 3);
                if ((ri + ti) % 2 == 0)
                    check_matmul(t, s, 1, pools, 3);
            }
    if (kt_block_elems(t) == KT_QK_K) {
        /* real Gemma-3-270M shapes (attn_output, ffn_down), prompt-sized */
        check_matmul(t, (mm_shape){ 640, 1024, 17 }, 0, pools, 3);
        check_matmul(t, (mm_shape){ 643, 2048, 9 }, 1, pools, 3);
    } else {
        /* real SmolLM2 shapes, prompt-sized batch */
        check_matmul(t, (mm_shape){ 576, 1536, 17 }, 0, pools, 3);
        check_matmul(t, (mm_shape){ 1536, 576, 9 }, 1, pools, 3);
    }
    kcpu_pool_destroy(pools[1]);
    kcpu_pool_destroy(pools[2]);
    for (int pk = 0; quant && pk < 8; pk++)
        if (g_share_q[pk] > 0.0 || g_share_x[pk] > 0.0)
            cr_log_info("matmul %s %s: worst share of tolerance %.3f (vs kref on int8 x), "
                        "%.3f of the int8 bound (vs kref on exact x); max |kcpu - kref| / "
                        "sum |w x| %.2e (random, non-adversarial cases)", kt_name(t),
                        kcpu_path_name((kcpu_path)pk), g_share_q[pk], g_share_x[pk], g_rel[pk]);
}

Test(matmul, f32, .timeout = 240) { matmul_suite(KT_F32); }
Test(matmul, f16, .timeout = 240) { matmul_suite(KT_F16); }
Test(matmul, bf16, .timeout = 240) { matmul_suite(KT_BF16); }
Test(matmul, q4_0, .timeout = 240) { matmul_suite(KT_Q4_0); }
Test(matmul, q4_1, .timeout = 240) { matmul_suite(KT_Q4_1); }
Test(matmul, q8_0, .timeout = 240) { matmul_suite(KT_Q8_0); }
Test(matmul, q5_0, .timeout = 240) { matmul_suite(KT_Q5_0); }
Test(matmul, q5_1, .timeout = 240) { matmul_suite(KT_Q5_1); }
Test(matmul, q4_k, .timeout = 240) { matmul_suite(KT_Q4_K); }
Test(matmul, q5_k, .timeout = 240) { matmul_suite(KT_Q5_K); }
Test(matmul, q6_k, .timeout = 240) { matmul_suite(KT_Q6_K); }

/* The output-head shape with Q8_0 weights, 2 tokens (the vocab dimension
 * exercises many work items per thread). */
Test(matmul, q8_0_vocab_rows, .timeout = 240)
{
    kcpu_pool *pools[2] = { NULL, NULL };
    cr_assert(kcpu_pool_create(2, &pools[1]) == 0);
    check_matmul(KT_Q8_0, (mm_shape){ 4099, 576, 2 }, 0, pools, 2);
    kcpu_pool_destroy(pools[1]);
}

/* ---- the split of activation outliers (kcpu.h) ---- */

/* The rule on crafted blocks, through kcpu_xsplit_token itself (the codes
 * as quantize_x writes them). */
Test(split, rule)
{
    enum { NB = 6 };
    float x[NB * 32];
    for (int i = 0; i < NB * 32; i++)
        x[i] = (float)((i * 7) % 13 - 6) * 0.125f; /* |x| <= 0.75 */
    x[0 * 32 + 5] = 40.0f;                         /* 0: lone outlier */
    x[1 * 32 + 3] = 40.0f;                         /* 1: a tie - none */
    x[1 * 32 + 9] = -40.0f;
    x[2 * 32 + 7] = 3.0f;                          /* 2: 4x the next (0.75 -> */
                                                   /*    code 32 = ceil(127/4)): none */
    for (int j = 0; j < 32; j++)                   /* 3: one nonzero: split */
        x[3 * 32 + j] = 0.0f;
    x[3 * 32 + 31] = -2.5f;
    for (int j = 0; j < 32; j++)
        x[4 * 32 + j] = 0.0f;                      /* 4: all zero: none */
    x[5 * 32 + 20] = 3.1f;                         /* 5: 4.13x the next: split */
    cr_assert_eq(kcpu_xsplit_code(4.0f), 32);
    cr_assert_eq(kcpu_xsplit_code(0.0f), 128);
    int8_t qs[NB * 4 * 32];
    float d[NB * 4], sm[NB * 4], ov[NB];
    uint8_t oj[NB];
    for (int b = 0; b < NB; b++) { /* what quantize_x writes (kcpu_impl.h) */
        float amax = 0.0f;
        int sum = 0;
        for (int j = 0; j < 32; j++)
            amax = fmaxf(amax, fabsf(x[b * 32 + j]));
        d[b * 4] = amax / 127.0f;
        float id = d[b * 4] != 0.0f ? 1.0f / d[b * 4] : 0.0f;
        for (int j = 0; j < 32; j++) {
            qs[b * 4 * 32 + j] = (int8_t)nearbyintf(x[b * 32 + j] * id);
            sum += qs[b * 4 * 32 + j];
        }
        sm[b * 4] = d[b * 4] * (float)sum;
    }
    float d_before[NB * 4];
    memcpy(d_before, d, sizeof d);
    int hits = kcpu_xsplit_token(x, NB, 1.0f, 4.0f, qs, d, sm, oj, ov);
    cr_assert_eq(hits, 3);
    for (int b = 0; b < NB; b++)
        cr_assert_eq(oj[b] == 0xff ? -1 : (int)oj[b], lone_outlier(x + b * 32, 4.0f),
                     "block %d: the test's rule and the kernel's agree", b);
    cr_assert_eq(oj[0], 5);
    cr_assert_eq(ov[0], 40.0f);
    cr_assert_eq(qs[5], 0, "the outlier's code is 0");
    float m2 = 0.0f;
    int sum = 0;
    for (int j = 0; j < 32; j++)
        if (j != 5)
            m2 = fmaxf(m2, fabsf(x[j]));
    cr_assert_eq(d[0], m2 / 127.0f);
    for (int j = 0; j < 32; j++) {
        sum += qs[j];
        if (j != 5)
            cr_assert_leq(fabsf(x[j] - d[0] * (float)qs[j]), d[0] / 2 * 1.0001f, "col %d", j);
    }
    cr_assert_eq(sm[0], d[0] * (float)sum);
    for (int b = 1; b <= 4; b++)
        if (b != 3) {
            cr_assert_eq(oj[b], 0xff, "block %d must not split", b);
            cr_assert_eq(d[b * 4], d_before[b * 4], "block %d left as quantize_x wrote it", b);
        }
    cr_assert_eq(oj[3], 31);
    cr_assert_eq(ov[3], -2.5f);
    cr_assert_eq(d[3 * 4], 0.0f);
    for (int j = 0; j < 32; j++)
        cr_assert_eq(qs[3 * 4 * 32 + j], 0);
    cr_assert_eq(oj[5], 20);
    /* ratio <= 1 (or 0: off) splits nothing */
    cr_assert_eq(kcpu_xsplit_token(x, NB, 1.0f, 0.0f, qs, d, sm, oj, ov), 0);
    for (int b = 0; b < NB; b++)
        cr_assert_eq(oj[b], 0xff);
}

/* Activations with one massive channel per block (the SmolLM2 / Gemma
 * pattern): with the split the error against the exact product is within
 * the int8 bound of the other 31 values - several times below the error
 * without it - for the GGUF-layout kernels (columns from the GGUF row or
 * from the repacked weight) and the repacked GEMM, on 1 and 2 threads. */
static void split_case(kt_type t, int n_rows, int n_cols, int n_tok)
{
    size_t nx = (size_t)n_tok * (size_t)n_cols, ny = (size_t)n_tok * (size_t)n_rows;
    void *W = make_weights(t, n_rows, n_cols, 0);
    float *x = malloc(nx * sizeof(float)), *ref = malloc(ny * sizeof(float));
    float *got = malloc(ny * sizeof(float)), *wrow = malloc((size_t)n_cols * sizeof(float));
    double *bound = calloc(ny, sizeof(double));
    void *ws = malloc(kcpu_rp_scratch_bytes(n_cols, n_tok) +
                      kcpu_matmul_scratch_bytes(t, n_cols, n_tok) + 1);
    kcpu_rp *rp = kcpu_rp_create(t, W, n_rows, n_cols);
    kcpu_pool *pool2 = NULL;
    cr_assert(x && ref && got && wrow && bound && ws && rp);
    cr_assert_eq(kcpu_pool_create(2, &pool2), 0);
    fill(x, nx, -1.0f, 1.0f);
    for (size_t b = 0; b < nx / 32; b++) /* columns 3 and 17 of the blocks */
        x[b * 32 + (b % 2 ? 3 : 17)] = (b % 3 ? 1.0f : -1.0f) * rnd_f(20.0f, 400.0f);
    kref_matmul(t, W, x, ref, n_rows, n_cols, n_tok);
    const size_t rb = kt_row_bytes(t, n_cols);
    for (int r = 0; r < n_rows; r++) {
        kref_dequant_row(t, (const char *)W + (size_t)r * rb, wrow, n_cols);
        for (int k = 0; k < n_tok; k++)
            for (int b = 0; b < n_cols / 32; b++) {
                const float *xb = x + (size_t)k * n_cols + (size_t)b * 32;
                float m2 = 0.0f, m1 = 0.0f;
                for (int j = 0; j < 32; j++) {
                    float a = fabsf(xb[j]);
                    m2 = a > m1 ? m1 : fmaxf(m2, a);
                    m1 = fmaxf(m1, a);
                }
                double sw = 0.0, mag = 0.0;
                for (int j = 0; j < 32; j++) {
                    sw += fabs((double)wrow[b * 32 + j]);
                    mag += fabs((double)wrow[b * 32 + j] * xb[j]);
                }
                bound[(size_t)k * n_rows + r] += 1.001 * m2 / 254.0 * sw + 4e-5 * mag;
            }
    }
    double err_on = 0.0, err_off = 0.0;
    for (int mode = 0; mode < 3; mode++)
        for (int pi = 0; pi < 2; pi++) {
            kcpu_pool *p = pi ? pool2 : NULL;
            for (int on = 1; on >= 0; on--) {
                kcpu_set_xsplit_ratio(on ? 4.0f : 0.0f);
                if (mode == 0)
                    kcpu_matmul(p, t, W, x, got, n_rows, n_cols, n_tok, ws);
                else if (mode == 1)
                    kcpu_matmul_ex(p, t, W, rp, -1.0f, x, got, n_rows, n_cols, n_tok, ws);
                else
                    kcpu_matmul_rp(p, rp, x, got, n_tok, ws);
                for (size_t i = 0; i < ny; i++) {
                    double e = fabs((double)got[i] - (double)ref[i]);
                    if (on) {
                        cr_assert_leq(e, bound[i], "%s mode %d threads %d: |%g - %g| > %g",
                                      kt_name(t), mode, pi + 1, got[i], ref[i], bound[i]);
                        err_on = fmax(err_on, e);
                    } else {
                        err_off = fmax(err_off, e);
                    }
                }
            }
        }
    kcpu_set_xsplit_ratio(-1.0f);
    cr_log_info("split %s %dx%d x %d tokens: max error %.3g with, %.3g without", kt_name(t),
                n_rows, n_cols, n_tok, err_on, err_off);
    cr_assert_gt(err_off, 5.0 * err_on, "the split must cut the error (%g vs %g)", err_on,
                 err_off);
    kcpu_rp_destroy(rp);
    kcpu_pool_destroy(pool2);
    free(W); free(x); free(ref); free(got); free(wrow); free(bound); free(ws);
}

Test(split, massive_channels, .timeout = 240)
{
    split_case(KT_Q4_1, 576, 576, 9);
    split_case(KT_Q8_0, 1031, 576, 2); /* head-like: many rows, GGUF columns */
    split_case(KT_Q5_0, 200, 640, 5);
    split_case(KT_Q4_K, 64, 1024, 3);
    split_case(KT_Q6_K, 70, 512, 17);
}

/* A row's result is the same alone and among others (each token's
 * outliers are added in column order, whatever else is in the call). */
Test(split, row_independent_of_batch)
{
    const int rows = 300, cols = 576, ntok = 13, pick = 6;
    void *W = make_weights(KT_Q4_1, rows, cols, 0);
    float *x = malloc((size_t)ntok * cols * sizeof(float));
    float *y = malloc((size_t)ntok * rows * sizeof(float)), *y1 = malloc(rows * sizeof(float));
    void *ws = malloc(kcpu_rp_scratch_bytes(cols, ntok) + 1);
    kcpu_rp *rp = kcpu_rp_create(KT_Q4_1, W, rows, cols);
    kcpu_pool *pool = NULL;
    cr_assert(W && x && y && y1 && ws && rp && kcpu_pool_create(2, &pool) == 0);
    fill(x, (size_t)ntok * cols, -1.0f, 1.0f);
    for (int k = 0; k < ntok; k++) /* outliers in shared and in own columns */
        for (int b = 0; b < cols / 32; b += 1 + k % 3)
            x[(size_t)k * cols + b * 32 + (k + b) % 32] = 60.0f + (float)k;
    kcpu_set_xsplit_ratio(4.0f);
    for (int mode = 0; mode < 2; mode++) {
        const float *xr = x + (size_t)pick * cols;
        if (mode == 0) {
            kcpu_matmul_ex(pool, KT_Q4_1, W, rp, -1.0f, x, y, rows, cols, ntok, ws);
            kcpu_matmul_ex(pool, KT_Q4_1, W, rp, -1.0f, xr, y1, rows, cols, 1, ws);
        } else {
            kcpu_matmul_rp(pool, rp, x, y, ntok, ws);
            kcpu_matmul_rp(NULL, rp, xr, y1, 1, ws);
        }
        for (int r = 0; r < rows; r++)
            cr_assert_eq(y[(size_t)pick * rows + r], y1[r], "mode %d row %d", mode, r);
    }
    kcpu_set_xsplit_ratio(-1.0f);
    kcpu_rp_destroy(rp);
    kcpu_pool_destroy(pool);
    free(W); free(x); free(y); free(y1); free(ws);
}

/* ---- dequant_row: bit exact ---- */

Test(dequant_row, all_types_bit_exact)
{
    static const kt_type types[] = { KT_F32, KT_F16, KT_BF16, KT_Q4_0, KT_Q4_1, KT_Q8_0,
                                     KT_Q5_0, KT_Q5_1, KT_Q4_K, KT_Q5_K, KT_Q6_K };
    static const int ns[] = { 32, 64, 96, 576, 1536 };
    static const int ns_k[] = { 256, 512, 768, 1536, 2048 };
    for (int ti = 0; ti < (int)(sizeof types / sizeof types[0]); ti++) {
        kt_type t = types[ti];
        kcpu_path paths[4];
        int n_paths = test_paths(t, paths);
        for (int pa = 0; pa < n_paths; pa++) {
            cr_assert_eq(kcpu_force_path(paths[pa]), 0);
            for (int ni = 0; ni < 5; ni++)
                for (int adv = 0; adv < 2; adv++) {
                    int n = kt_block_elems(t) == KT_QK_K ? ns_k[ni]
                                                         : ns[ni] + (kt_block_elems(t) == 1 ? ni : 0);
                    /* odd n for floats */
                    void *w = make_weights(t, 1, n, adv);
                    float *a = malloc((size_t)n * sizeof(float));
                    float *b = malloc((size_t)n * sizeof(float));
                    kref_dequant_row(t, w, a, n);
                    kcpu_dequant_row(t, w, b, n);
                    for (int i = 0; i < n; i++)
                        cr_assert(memcmp(&a[i], &b[i], 4) == 0,
                                  "dequant %s %s n %d elem %d: %.9g vs %.9g", kt_name(t),
                                  kcpu_simd_name(), n, i, (double)b[i], (double)a[i]);
                    free(w); free(a); free(b);
                }
        }
    }
    kcpu_force_scalar(0);
}

/* ---- elementwise ops ---- */

static const int ew_sizes[] = { 1, 5, 7, 8, 9, 16, 64, 100, 576, 1536, 4097 };
#define N_EW (int)(sizeof ew_sizes / sizeof ew_sizes[0])

Test(ops, rmsnorm)
{
    for (int scalar = 0; scalar < 2; scalar++) {
        kcpu_force_scalar(scalar);
        for (int si = 0; si < N_EW; si++)
            for (int adv = 0; adv < 2; adv++) {
                int n = ew_sizes[si];
                float *x = malloc((size_t)n * 4), *w = malloc((size_t)n * 4);
                float *a = malloc((size_t)n * 4), *b = malloc((size_t)n * 4);
                if (adv)
                    fill_adversarial(x, (size_t)n);
                else
                    fill(x, (size_t)n, -3.0f, 3.0f);
                fill(w, (size_t)n, 0.5f, 1.5f);
                kref_rmsnorm(a, x, w, n, 1e-5f);
                kcpu_rmsnorm(b, x, w, n, 1e-5f);
                check_close("rmsnorm", b, a, NULL, (size_t)n, EW_ATOL, 1e-5);
                memcpy(b, x, (size_t)n * 4); /* in place */
                kcpu_rmsnorm(b, b, w, n, 1e-5f);
                check_close("rmsnorm in place", b, a, NULL, (size_t)n, EW_ATOL, 1e-5);
                free(x); free(w); free(a); free(b);
            }
    }
    kcpu_force_scalar(0);
}

Test(ops, softmax)
{
    for (int scalar = 0; scalar < 2; scalar++) {
        kcpu_force_scalar(scalar);
        for (int si = 0; si < N_EW; si++)
            for (int mode = 0; mode < 3; mode++) {
                int n = ew_sizes[si];
                float *a = malloc((size_t)n * 4), *b = malloc((size_t)n * 4);
                if (mode == 0)
                    fill(a, (size_t)n, -5.0f, 5.0f);
                else if (mode == 1)
                    fill(a, (size_t)n, -200.0f, 50.0f); /* many underflow to 0 */
                else
                    for (int i = 0; i < n; i++)    /* all equal, huge offset */
                        a[i] = 1e4f;
                memcpy(b, a, (size_t)n * 4);
                kref_softmax(a, n);
                kcpu_softmax(b, n);
                check_close("softmax", b, a, NULL, (size_t)n, EW_ATOL, 1e-5);
                free(a); free(b);
            }
    }
    kcpu_force_scalar(0);
}

Test(ops, swiglu)
{
    for (int scalar = 0; scalar < 2; scalar++) {
        kcpu_force_scalar(scalar);
        for (int si = 0; si < N_EW; si++) {
            int n = ew_sizes[si];
            float *g = malloc((size_t)n * 4), *u = malloc((size_t)n * 4);
            float *a = malloc((size_t)n * 4);
            fill(g, (size_t)n, -120.0f, 120.0f);
            for (int i = 0; i < n; i += 3)
                g[i] = rnd_f(-4.0f, 4.0f);
            if (n > 2)
                g[1] = 0.0f;
            fill(u, (size_t)n, -3.0f, 3.0f);
            memcpy(a, g, (size_t)n * 4);
            kref_swiglu(a, u, n);
            kcpu_swiglu(g, u, n);
            check_close("swiglu", g, a, NULL, (size_t)n, EW_ATOL, 1e-5);
            free(g); free(u); free(a);
        }
    }
    kcpu_force_scalar(0);
}

Test(ops, rope)
{
    static const int pos[] = { 0, 1, 17, 1000, 8191, 100000 };
    static const struct { int n_heads, head_dim, n_rot; } shapes[] = {
        { 9, 64, 64 }, { 3, 64, 64 }, { 4, 128, 64 }, { 2, 8, 8 }, { 1, 48, 32 },
    };
    static const float thetas[] = { 10000.0f, 100000.0f, 500000.0f };
    for (int si = 0; si < 5; si++)
        for (int pi = 0; pi < 6; pi++)
            for (int th = 0; th < 3; th++)
                for (int fs = 0; fs < 2; fs++) {
                    int n = shapes[si].n_heads * shapes[si].head_dim;
                    float *a = malloc((size_t)n * 4), *b = malloc((size_t)n * 4);
                    fill(a, (size_t)n, -4.0f, 4.0f);
                    memcpy(b, a, (size_t)n * 4);
                    float fscale = fs ? 0.25f : 1.0f;
                    kref_rope(a, shapes[si].n_heads, shapes[si].head_dim, shapes[si].n_rot,
                              pos[pi], thetas[th], fscale);
                    kcpu_rope(b, shapes[si].n_heads, shapes[si].head_dim, shapes[si].n_rot,
                              pos[pi], thetas[th], fscale);
                    /* |x| <= 4; float rotation of a pair: a few ulp of 4 */
                    check_close("rope", b, a, NULL, (size_t)n, 4e-6, 1e-6);
                    free(a); free(b);
                }
}

/* The descriptor's RoPE options: NEOX pairing (halves) and per-frequency
 * divisors (Llama-3 rope_freqs), kcpu vs kref; and with neither, kref_rope_ex
 * must equal kref_rope exactly (the old contract is a special case). */
Test(ops, rope_ex)
{
    static const int pos[] = { 0, 3, 1000, 32767 };
    static const struct { int n_heads, head_dim, n_rot; } shapes[] = {
        { 6, 64, 64 }, { 2, 128, 128 }, { 1, 256, 256 }, { 4, 64, 32 }, { 1, 48, 48 },
    };
    for (int si = 0; si < 5; si++) {
        int n = shapes[si].n_heads * shapes[si].head_dim, half = shapes[si].n_rot / 2;
        float *freqs = malloc((size_t)half * 4);
        for (int i = 0; i < half; i++)
            freqs[i] = i < half / 4 ? 1.0f : i < half / 2 ? rnd_f(1.0f, 8.0f) : 8.0f;
        for (int pi = 0; pi < 4; pi++)
            for (int mode = 0; mode < 4; mode++) {
                int neox = mode & 1;
                const float *fq = mode & 2 ? freqs : NULL;
                float *a = malloc((size_t)n * 4), *b = malloc((size_t)n * 4);
                fill(a, (size_t)n, -4.0f, 4.0f);
                memcpy(b, a, (size_t)n * 4);
                kref_rope_ex(a, shapes[si].n_heads, shapes[si].head_dim, shapes[si].n_rot,
                             pos[pi], 1e6f, 1.0f, fq, neox);
                kcpu_rope_ex(b, shapes[si].n_heads, shapes[si].head_dim, shapes[si].n_rot,
                             pos[pi], 1e6f, 1.0f, fq, neox);
                check_close("rope_ex", b, a, NULL, (size_t)n, 4e-6, 1e-6);
                if (mode == 0) {
                    memcpy(b, a, (size_t)n * 4);
                    kref_rope(a, shapes[si].n_heads, shapes[si].head_dim, shapes[si].n_rot,
                              pos[pi], 1e6f, 1.0f);
                    kref_rope_ex(b, shapes[si].n_heads, shapes[si].head_dim, shapes[si].n_rot,
                                 pos[pi], 1e6f, 1.0f, NULL, 0);
                    cr_assert(memcmp(a, b, (size_t)n * 4) == 0, "kref_rope_ex != kref_rope");
                }
                free(a); free(b);
            }
        free(freqs);
    }
    /* NEOX pairs dim i with i + n_rot/2: at position 1, theta^0 = 1 rad for pair 0 */
    float x[8] = {1, 0, 0, 0, 0, 0, 0, 0};
    kref_rope_ex(x, 1, 8, 8, 1, 10000.0f, 1.0f, NULL, 1);
    cr_assert_float_eq(x[0], cosf(1.0f), 1e-6);
    cr_assert_float_eq(x[4], sinf(1.0f), 1e-6);
    cr_assert_float_eq(x[1], 0.0f, 0);
}

/* GELU-tanh GLU and soft-capping: kcpu (float; AVX2 exp form and scalar
 * tanhf form) vs kref (double). */
Test(ops, geglu_softcap)
{
    for (int scalar = 0; scalar < 2; scalar++) {
        kcpu_force_scalar(scalar);
        for (int si = 0; si < N_EW; si++) {
            int n = ew_sizes[si];
            float *g = malloc((size_t)n * 4), *u = malloc((size_t)n * 4);
            float *a = malloc((size_t)n * 4);
            fill(g, (size_t)n, -12.0f, 12.0f);
            for (int i = 0; i < n; i += 3) /* the curved part */
                g[i] = rnd_f(-4.0f, 4.0f);
            if (n > 2)
                g[1] = -200.0f; /* saturated: -0 */
            fill(u, (size_t)n, -3.0f, 3.0f);
            memcpy(a, g, (size_t)n * 4);
            kref_geglu(a, u, n);
            kcpu_geglu(g, u, n);
            check_close("geglu", g, a, NULL, (size_t)n, EW_ATOL, 1e-5);
            fill(g, (size_t)n, -200.0f, 200.0f);
            memcpy(a, g, (size_t)n * 4);
            kref_softcap(a, n, 30.0f);
            kcpu_softcap(g, n, 30.0f);
            check_close("softcap", g, a, NULL, (size_t)n, 1e-5, 1e-6);
            for (int i = 0; i < n; i++)
                cr_assert(fabsf(g[i]) <= 30.0f);
            free(g); free(u); free(a);
        }
    }
    kcpu_force_scalar(0);
    /* known values: gelu_tanh(1) = 0.841192, gelu_tanh(-1) = -0.158808 */
    float gv[2] = {1.0f, -1.0f}, uv[2] = {1.0f, 2.0f};
    kref_geglu(gv, uv, 2);
    cr_assert_float_eq(gv[0], 0.841192f, 1e-5);
    cr_assert_float_eq(gv[1], -0.317616f, 1e-5);
}

/* kcpu_glu over the pool (both activations): the same values as the
 * single-threaded kernel over the whole row, for 1..4 threads and sizes
 * around the threading threshold and the 8-element groups. */
Test(ops, glu_threaded_equals_single)
{
    static const size_t sizes[] = { 1, 7, 4095, 4096, 4097, 65543 };
    for (int nth = 1; nth <= 4; nth++) {
        kcpu_pool *p = NULL;
        cr_assert_eq(kcpu_pool_create(nth, &p), 0);
        for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++)
            for (int gelu = 0; gelu < 2; gelu++) {
                size_t n = sizes[si];
                float *g = malloc(n * 4), *u = malloc(n * 4), *a = malloc(n * 4);
                fill(g, n, -6.0f, 6.0f);
                fill(u, n, -3.0f, 3.0f);
                memcpy(a, g, n * 4);
                if (gelu)
                    kcpu_geglu(a, u, (int)n);
                else
                    kcpu_swiglu(a, u, (int)n);
                kcpu_glu(p, gelu, g, u, n);
                cr_assert_eq(memcmp(g, a, n * 4), 0, "glu gelu=%d n=%zu threads=%d", gelu, n,
                             nth);
                free(g); free(u); free(a);
            }
        kcpu_pool_destroy(p);
    }
}

Test(ops, f32_to_f16_bit_exact)
{
    enum { N = 100003 };
    float *x = malloc(N * sizeof(float));
    uint16_t *h = malloc(N * sizeof(uint16_t));
    for (int i = 0; i < N; i++) {
        uint32_t bits = rnd_u32() << 16 ^ rnd_u32();
        switch (i % 4) {
        case 0: /* any finite float */
            bits &= 0xff7fffffu;
            break;
        case 1: /* around the half range, subnormals included */
            bits = (bits & 0x807fffffu) | ((uint32_t)(100 + rnd_u32() % 45) << 23);
            break;
        case 2: { /* exact ties between two halfs */
            float f = kt_f16_to_f32((uint16_t)(rnd_u32() & 0x7bff));
            memcpy(&bits, &f, 4);
            bits |= 0x1000u;
            bits &= ~0xfffu;
            break;
        }
        default: /* ordinary activations */
            {
                float f = rnd_f(-10.0f, 10.0f);
                memcpy(&bits, &f, 4);
            }
        }
        memcpy(&x[i], &bits, 4);
    }
    x[0] = INFINITY; x[1] = -INFINITY; x[2] = 65520.0f; x[3] = 65519.0f;
    x[4] = -0.0f; x[5] = 5.96e-8f; x[6] = 2.98e-8f; x[7] = NAN;
    for (int scalar = 0; scalar < 2; scalar++) {
        kcpu_force_scalar(scalar);
        kcpu_f32_to_f16(h, x, N);
        for (int i = 0; i < N; i++) {
            uint16_t want = kt_f32_to_f16(x[i]);
            if (isnan(x[i]))
                cr_assert((h[i] & 0x7c00u) == 0x7c00u && (h[i] & 0x3ffu),
                          "%s: NaN must stay NaN", kcpu_simd_name());
            else
                cr_assert(h[i] == want, "%s: f16(%.9g) = %04x, want %04x",
                          kcpu_simd_name(), (double)x[i], h[i], want);
        }
    }
    kcpu_force_scalar(0);
    free(x); free(h);
}

/* ---- attention ---- */

static void check_attention(int n_head, int n_kv, int head_dim, int pos0, int n_q,
                            int pad, kcpu_pool **pools, int n_pools)
{
    int n_ctx = pos0 + n_q;
    size_t kv_stride = (size_t)n_kv * (size_t)head_dim + (size_t)pad;
    size_t nq = (size_t)n_q * (size_t)n_head * (size_t)head_dim;
    uint16_t *k = malloc((size_t)n_ctx * kv_stride * 2), *v = malloc((size_t)n_ctx * kv_stride * 2);
    float *q = malloc(nq * 4), *ref = malloc(nq * 4), *got = malloc(nq * 4);
    float *sc = malloc((size_t)n_ctx * 4);
    void *ws = malloc(kcpu_attn_scratch_bytes(4, n_ctx));
    cr_assert(k && v && q && ref && got && sc && ws);
    for (size_t i = 0; i < (size_t)n_ctx * kv_stride; i++) {
        k[i] = kt_f32_to_f16(rnd_f(-1.0f, 1.0f));
        v[i] = kt_f32_to_f16(rnd_f(-1.0f, 1.0f));
    }
    fill(q, nq, -1.5f, 1.5f);
    float scale = 1.0f / sqrtf((float)head_dim);
    size_t qs = (size_t)n_head * (size_t)head_dim;
    for (int j = 0; j < n_q; j++)
        kref_attn_f16(ref + j * qs, q + j * qs, k, v, kv_stride, pos0 + j + 1, n_head,
                      n_kv, head_dim, scale, sc);
    char what[128];
    for (int scalar = 0; scalar < 2; scalar++) {
        kcpu_force_scalar(scalar);
        for (int pi = 0; pi < n_pools; pi++) {
            for (size_t i = 0; i < nq; i++)
                got[i] = NAN;
            kcpu_attn_f16(pools[pi], got, q, k, v, kv_stride, pos0, n_q, n_head, n_kv,
                          head_dim, scale, ws);
            snprintf(what, sizeof what, "attn %s heads %d/%d dim %d pos0 %d n_q %d threads %d",
                     kcpu_simd_name(), n_head, n_kv, head_dim, pos0, n_q,
                     kcpu_pool_size(pools[pi]));
            check_close(what, got, ref, NULL, nq, AT_ATOL, AT_RTOL);
        }
    }
    kcpu_force_scalar(0);
    free(k); free(v); free(q); free(ref); free(got); free(sc); free(ws);
}

Test(attention, gqa_shapes, .timeout = 240)
{
    static const struct { int n_head, n_kv, head_dim; } shapes[] = {
        { 9, 3, 64 }, { 8, 4, 8 }, { 6, 6, 48 }, { 4, 2, 12 }, { 2, 1, 128 },
    };
    static const struct { int pos0, n_q; } spans[] = {
        { 0, 1 }, { 0, 3 }, { 5, 1 }, { 7, 17 }, { 37, 4 }, { 300, 1 }, { 0, 40 },
    };
    kcpu_pool *pools[3] = { NULL, NULL, NULL };
    cr_assert(kcpu_pool_create(2, &pools[1]) == 0);
    cr_assert(kcpu_pool_create(3, &pools[2]) == 0);
    for (int si = 0; si < 5; si++)
        for (int pi = 0; pi < 7; pi++)
            check_attention(shapes[si].n_head, shapes[si].n_kv, shapes[si].head_dim,
                            spans[pi].pos0, spans[pi].n_q, pi % 2 ? 8 : 0, pools, 3);
    kcpu_pool_destroy(pools[1]);
    kcpu_pool_destroy(pools[2]);
}

/* Long contexts: few work items, so positions are split across threads and
 * the partial softmax results merged (decode), and long prefill chunks. */
Test(attention, long_context, .timeout = 240)
{
    kcpu_pool *pools[3] = { NULL, NULL, NULL };
    cr_assert(kcpu_pool_create(2, &pools[1]) == 0);
    cr_assert(kcpu_pool_create(4, &pools[2]) == 0);
    check_attention(9, 3, 64, 4000, 1, 0, pools, 3);
    check_attention(9, 3, 64, 1000, 8, 0, pools, 3);
    check_attention(16, 1, 64, 3000, 1, 8, pools, 3);  /* a full 16-query item */
    check_attention(4, 4, 128, 2047, 2, 0, pools, 3);
    check_attention(9, 3, 64, 700, 300, 0, pools, 3);
    kcpu_pool_destroy(pools[1]);
    kcpu_pool_destroy(pools[2]);
}

/* Groups larger than one work item (heads split into subgroups) and head
 * sizes with the smallest position tiles (8 positions for head_dim > 512). */
Test(attention, odd_groups_and_big_heads, .timeout = 240)
{
    kcpu_pool *pools[2] = { NULL, NULL };
    cr_assert(kcpu_pool_create(2, &pools[1]) == 0);
    check_attention(17, 1, 32, 600, 3, 0, pools, 2);
    check_attention(40, 2, 16, 33, 5, 0, pools, 2);
    check_attention(2, 1, 520, 300, 3, 0, pools, 2);
    check_attention(3, 3, 4, 90, 7, 0, pools, 2);
    kcpu_pool_destroy(pools[1]);
}

Test(dispatch, names)
{
    kcpu_force_scalar(1);
    cr_assert_str_eq(kcpu_simd_name(), "scalar");
    kcpu_force_scalar(0);
    const char *n = kcpu_simd_name();
    cr_assert(strcmp(n, "avx2") == 0 || strcmp(n, "scalar") == 0 || strcmp(n, "avx512") == 0 ||
              strcmp(n, "avx512vnni") == 0);
    cr_log_info("kcpu back end: %s", n);
    /* every path up to the run-time choice can be forced, and names itself */
    for (kcpu_path p = KCPU_PATH_SCALAR; p <= KCPU_PATH_AVX512VNNI; p++) {
        int rc = kcpu_force_path(p);
        if (rc == 0)
            cr_assert_str_eq(kcpu_simd_name(), kcpu_path_name(p));
        else
            cr_assert_eq(rc, -ENOTSUP);
        cr_log_info("path %s: %s", kcpu_path_name(p), rc == 0 ? "available" : "not on this CPU");
    }
    cr_assert_eq(kcpu_force_path((kcpu_path)99), -ENOTSUP);
    cr_assert_eq(kcpu_force_path(KCPU_PATH_AUTO), 0);
    cr_assert_str_eq(kcpu_simd_name(), n);
}

/* LKQ_CPU_KERNELS caps the run-time choice (each Criterion test runs in its
 * own process, so the lazy choice has not been made yet here). */
Test(dispatch, env_caps_choice)
{
    cr_assert_eq(setenv("LKQ_CPU_KERNELS", "scalar", 1), 0);
    cr_assert_str_eq(kcpu_simd_name(), "scalar");
}

Test(dispatch, env_unknown_ignored)
{
    cr_assert_eq(setenv("LKQ_CPU_KERNELS", "sse9", 1), 0);
    cr_assert_str_neq(kcpu_simd_name(), "sse9");
    cr_assert_str_neq(kcpu_simd_name(), "");
}
