/*
 * test_gpu_ops.c - the element-wise and GEMM ops of kernels/cuda against the
 * oracle kernels/ref on the cases of tests/kernels/test_kernels.c (odd and
 * real shapes, adversarial values): RMSNorm, RoPE (adjacent pairs, and
 * kcu_rope_ex: NEOX halves, rope_freqs divisors, one position per row),
 * SwiGLU, GeGLU, soft-capping, bias add over rows, scaling, residual add,
 * f32 -> f16 / bf16 conversion (bit-exact), embedding rows, the
 * Walsh-Hadamard rotation of kv_rotate, and the cuBLAS weight GEMM in F32,
 * F16 and BF16.
 *
 * Tolerances (|got - ref| <= ATOL + RTOL |ref|, or as stated):
 *  - RMSNorm, RoPE, RoPE-ex (vs kref_rope_ex), SwiGLU, soft-capping (vs
 *    kref_softcap): both sides compute in double and round once to f32;
 *    GPU libm (sqrt, sincos, exp, pow, tanh) is within a few double ulps,
 *    so ATOL_DBL 1e-6 relative to the row's scale (x4 for RoPE, whose
 *    angles reach 1e5 rad) and RTOL_DBL 2e-7;
 *  - GeGLU (vs kref_geglu): as above, but 1 + tanh(.) cancels for gates
 *    below about -5, where a double ulp of tanh is a large relative error
 *    of a tiny result: ATOL_GEGLU 1e-12 absolute (|gate| <= 100, |up| ~ 4:
 *    the cancelled term's error is below 1e-13), RTOL_DBL;
 *  - bias add, scaling: exact (one f32 operation per element, as the CPU
 *    backend's loops);
 *  - add: exact; conversions: bit-exact for every finite value and inf (NaN
 *    only has to stay NaN); embedding: exact;
 *  - GEMM: f32 accumulation vs the oracle's double: |err| <= RTOL_GEMM *
 *    sum_j |w_j x_j| with RTOL_GEMM 2e-6 * sqrt(n_cols) + 1e-6 (F32), on the
 *    same f16 / bf16-rounded inputs for F16 / BF16 weights.
 */
#include "tests/gpu/gpu_test.h"

#include "kernels/cuda/kcu_bias.cuh"
#include "kernels/cuda/kcu_elem.cuh"
#include "kernels/cuda/kcu_geglu.cuh"
#include "kernels/cuda/kcu_hadamard.cuh"
#include "kernels/cuda/kcu_rmsnorm.cuh"
#include "kernels/cuda/kcu_rope.cuh"
#include "kernels/cuda/kcu_scale.cuh"
#include "kernels/cuda/kcu_softcap.cuh"
#include "kernels/cuda/kcu_swiglu.cuh"
#include "kernels/cpu/kcpu.h"
#include "kernels/ktypes.h"
#include "kernels/ref/kref.h"

#define ATOL_DBL 1e-6
#define RTOL_DBL 2e-7
#define ATOL_GEGLU 1e-12

static float *rand_vec(size_t n, float scale)
{
    float *x = malloc(n * sizeof(float) + 1);
    for (size_t i = 0; i < n; i++)
        x[i] = gt_gauss() * scale;
    return x;
}

static void case_rmsnorm(void)
{
    const int shapes[][2] = {{1, 1}, {1, 7}, {3, 64}, {5, 288}, {2, 4096}, {1, 576}};
    const float scales[] = {1.0f, 1e-3f, 300.0f};
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
        for (size_t sc = 0; sc < 3; sc++) {
            int rows = shapes[si][0], n = shapes[si][1];
            size_t N = (size_t)rows * n;
            float *x = rand_vec(N, scales[sc]), *w = rand_vec((size_t)n, 1.0f);
            float *ref = malloc(N * sizeof(float)), *got = malloc(N * sizeof(float));
            for (int r = 0; r < rows; r++)
                kref_rmsnorm(ref + (size_t)r * n, x + (size_t)r * n, w, n, 1e-5f);
            float *dx = gt_up(x, N * 4), *dw = gt_up(w, (size_t)n * 4);
            GT_OK(kcu_rmsnorm(gt_c, dx, dx, dw, rows, n, 1e-5f, gt_err, sizeof gt_err));
            gt_down(got, dx, N * 4);
            char what[64];
            snprintf(what, sizeof what, "rmsnorm %dx%d scale %g", rows, n, scales[sc]);
            gt_close(what, got, ref, N, ATOL_DBL, RTOL_DBL);
            kcu_free(gt_c, dx);
            kcu_free(gt_c, dw);
            free(x), free(w), free(ref), free(got);
        }
}

static void case_rope(void)
{
    struct {
        int n_heads, hd, n_rot, n_tok, pos0;
        float theta, fs;
    } cs[] = {
        {8, 8, 8, 3, 0, 10000.0f, 1.0f},      /* stories260K */
        {6, 48, 48, 5, 250, 10000.0f, 1.0f},  /* stories15M */
        {9, 64, 64, 4, 8189, 100000.0f, 1.0f}, /* SmolLM2 */
        {32, 128, 128, 2, 32766, 500000.0f, 1.0f},
        {4, 64, 32, 3, 100000, 10000.0f, 0.25f}, /* partial rotation, scaled */
    };
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++) {
        int row = cs[i].n_heads * cs[i].hd + 3; /* padded rows */
        size_t N = (size_t)cs[i].n_tok * (size_t)row;
        float *x = rand_vec(N, 2.0f), *ref = malloc(N * 4), *got = malloc(N * 4);
        memcpy(ref, x, N * 4);
        for (int t = 0; t < cs[i].n_tok; t++)
            kref_rope(ref + (size_t)t * row, cs[i].n_heads, cs[i].hd, cs[i].n_rot,
                      cs[i].pos0 + t, cs[i].theta, cs[i].fs);
        float *dx = gt_up(x, N * 4);
        GT_OK(kcu_rope(gt_c, dx, cs[i].n_tok, (size_t)row, cs[i].n_heads, cs[i].hd, cs[i].n_rot,
                       cs[i].pos0, cs[i].theta, cs[i].fs, gt_err, sizeof gt_err));
        gt_down(got, dx, N * 4);
        char what[64];
        snprintf(what, sizeof what, "rope hd %d pos %d", cs[i].hd, cs[i].pos0);
        gt_close(what, got, ref, N, ATOL_DBL * 4, RTOL_DBL);
        kcu_free(gt_c, dx);
        free(x), free(ref), free(got);
    }
    /* a bad n_rot is an error, not a crash */
    float *dx = gt_up(NULL, 64);
    gt_err[0] = '\0';
    GT_CHECK(kcu_rope(gt_c, dx, 1, 8, 1, 8, 7, 0, 10000.0f, 1.0f, gt_err, sizeof gt_err) < 0 &&
                 gt_err[0],
             "odd n_rot accepted");
    kcu_free(gt_c, dx);
}

/* kcu_rope_at: one position per token (a batched step of several
 * sequences), against kref_rope row by row. */
static void case_rope_at(void)
{
    const int32_t pos[] = {0, 7, 8, 9, 250, 3, 8191, 32766, 1};
    const int n_tok = (int)(sizeof pos / sizeof pos[0]);
    const int hs[][3] = {{8, 8, 8}, {6, 48, 48}, {8, 128, 128}, {4, 64, 32}};
    for (size_t i = 0; i < sizeof hs / sizeof hs[0]; i++) {
        int n_heads = hs[i][0], hd = hs[i][1], n_rot = hs[i][2];
        int row = n_heads * hd + 1;
        size_t N = (size_t)n_tok * (size_t)row;
        float *x = rand_vec(N, 2.0f), *ref = malloc(N * 4), *got = malloc(N * 4);
        memcpy(ref, x, N * 4);
        for (int t = 0; t < n_tok; t++)
            kref_rope(ref + (size_t)t * row, n_heads, hd, n_rot, pos[t], 500000.0f, 1.0f);
        float *dx = gt_up(x, N * 4);
        int32_t *dp = gt_up(pos, sizeof pos);
        GT_OK(kcu_rope_at(gt_c, dx, n_tok, (size_t)row, n_heads, hd, n_rot, dp, 500000.0f, 1.0f,
                          gt_err, sizeof gt_err));
        gt_down(got, dx, N * 4);
        char what[64];
        snprintf(what, sizeof what, "rope_at hd %d", hd);
        gt_close(what, got, ref, N, ATOL_DBL * 4, RTOL_DBL);
        kcu_free(gt_c, dx);
        kcu_free(gt_c, dp);
        free(x), free(ref), free(got);
    }
}

/* kcu_rope_ex: NEOX pairing and rope_freqs divisors, one position per row,
 * against kref_rope_ex row by row (the real layouts: Qwen2 NEOX 64,
 * Gemma-3 NEOX 256 with a local base, Llama-3.1 128 with divisors, a
 * partial rotation). */
static void case_rope_ex(void)
{
    const int32_t pos[] = {0, 1, 8, 9, 511, 3, 8191, 32766, 131000};
    const int n_tok = (int)(sizeof pos / sizeof pos[0]);
    struct {
        int n_heads, hd, n_rot, neox, with_freqs;
        float theta, fs;
    } cs[] = {
        {14, 64, 64, 1, 0, 1000000.0f, 1.0f},  /* Qwen2 */
        {4, 256, 256, 1, 0, 10000.0f, 1.0f},   /* Gemma-3 window layer */
        {4, 256, 256, 1, 0, 1000000.0f, 0.125f}, /* Gemma-3 global layer, scaled */
        {8, 128, 128, 0, 1, 500000.0f, 1.0f},  /* Llama-3.1 rope_freqs */
        {8, 128, 128, 1, 1, 500000.0f, 1.0f},
        {4, 64, 32, 1, 1, 10000.0f, 0.25f},    /* partial rotation */
        {6, 48, 48, 0, 0, 10000.0f, 1.0f},     /* = kcu_rope_at */
    };
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++) {
        int row = cs[i].n_heads * cs[i].hd + 5; /* padded rows (Q beside K in one row) */
        size_t N = (size_t)n_tok * (size_t)row;
        int half = cs[i].n_rot / 2;
        float *x = rand_vec(N, 2.0f), *ref = malloc(N * 4), *got = malloc(N * 4);
        float *fr = malloc((size_t)half * 4);
        for (int j = 0; j < half; j++) /* Llama-3 style: 1 for high, 8 for low frequencies */
            fr[j] = j < half / 4 ? 1.0f : j < half / 2 ? 1.0f + 7.0f * (float)j / half : 8.0f;
        const float *freqs = cs[i].with_freqs ? fr : NULL;
        memcpy(ref, x, N * 4);
        for (int t = 0; t < n_tok; t++)
            kref_rope_ex(ref + (size_t)t * row, cs[i].n_heads, cs[i].hd, cs[i].n_rot, pos[t],
                         cs[i].theta, cs[i].fs, freqs, cs[i].neox);
        float *dx = gt_up(x, N * 4), *dfr = gt_up(fr, (size_t)half * 4);
        int32_t *dp = gt_up(pos, sizeof pos);
        GT_OK(kcu_rope_ex(gt_c, dx, n_tok, (size_t)row, cs[i].n_heads, cs[i].hd, cs[i].n_rot,
                          dp, cs[i].theta, cs[i].fs, freqs ? dfr : NULL, cs[i].neox, gt_err,
                          sizeof gt_err));
        gt_down(got, dx, N * 4);
        char what[96];
        snprintf(what, sizeof what, "rope_ex hd %d neox %d freqs %d", cs[i].hd, cs[i].neox,
                 cs[i].with_freqs);
        gt_close(what, got, ref, N, ATOL_DBL * 4, RTOL_DBL);
        /* the columns past the rotated heads are untouched */
        size_t moved = 0;
        for (int t = 0; t < n_tok; t++)
            for (int k = cs[i].n_heads * cs[i].hd; k < row; k++)
                moved += got[(size_t)t * row + k] != x[(size_t)t * row + k];
        GT_CHECK(moved == 0, "%s: %zu padding values changed", what, moved);
        kcu_free(gt_c, dx);
        kcu_free(gt_c, dfr);
        kcu_free(gt_c, dp);
        free(x), free(ref), free(got), free(fr);
    }
}

static void case_swiglu(void)
{
    const size_t ns[] = {1, 7, 172, 768, 100003};
    for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++) {
        size_t n = ns[i];
        float *g = rand_vec(n, 4.0f), *u = rand_vec(n, 1.0f);
        if (n > 4) {
            g[0] = -100.0f, g[1] = 100.0f, g[2] = 0.0f, g[3] = -1e-30f;
        }
        float *ref = malloc(n * 4), *got = malloc(n * 4);
        memcpy(ref, g, n * 4);
        kref_swiglu(ref, u, (int)n);
        float *dg = gt_up(g, n * 4), *du = gt_up(u, n * 4);
        GT_OK(kcu_swiglu(gt_c, dg, du, n, gt_err, sizeof gt_err));
        gt_down(got, dg, n * 4);
        gt_close("swiglu", got, ref, n, 1e-30, RTOL_DBL);
        kcu_free(gt_c, dg);
        kcu_free(gt_c, du);
        free(g), free(u), free(ref), free(got);
    }
}

static void case_geglu(void)
{
    const size_t ns[] = {1, 7, 172, 2048, 100003};
    for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++) {
        size_t n = ns[i];
        float *g = rand_vec(n, 4.0f), *u = rand_vec(n, 4.0f);
        if (n > 8) {
            g[0] = -100.0f, g[1] = 100.0f, g[2] = 0.0f, g[3] = -1e-30f;
            g[4] = -5.5f, g[5] = -7.0f, g[6] = 1e-20f, g[7] = -3.0f;
        }
        float *ref = malloc(n * 4), *got = malloc(n * 4);
        memcpy(ref, g, n * 4);
        kref_geglu(ref, u, (int)n);
        float *dg = gt_up(g, n * 4), *du = gt_up(u, n * 4);
        GT_OK(kcu_geglu(gt_c, dg, du, n, gt_err, sizeof gt_err));
        gt_down(got, dg, n * 4);
        char what[64];
        snprintf(what, sizeof what, "geglu n %zu", n);
        gt_close(what, got, ref, n, ATOL_GEGLU, RTOL_DBL);
        kcu_free(gt_c, dg);
        kcu_free(gt_c, du);
        free(g), free(u), free(ref), free(got);
    }
}

static void case_softcap(void)
{
    const float caps[] = {30.0f, 50.0f, 1.0f};
    const size_t ns[] = {1, 257, 262144 + 3}; /* Gemma-3's vocabulary, and some */
    for (size_t ci = 0; ci < sizeof caps / sizeof caps[0]; ci++)
        for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++) {
            size_t n = ns[i];
            float *x = rand_vec(n, 40.0f);
            if (n > 6) {
                x[0] = 0.0f, x[1] = -0.0f, x[2] = 1e4f, x[3] = -1e4f, x[4] = 1e-30f;
                x[5] = caps[ci];
            }
            float *ref = malloc(n * 4), *got = malloc(n * 4);
            memcpy(ref, x, n * 4);
            kref_softcap(ref, (int)n, caps[ci]);
            float *dx = gt_up(x, n * 4);
            GT_OK(kcu_softcap(gt_c, dx, n, caps[ci], gt_err, sizeof gt_err));
            gt_down(got, dx, n * 4);
            char what[64];
            snprintf(what, sizeof what, "softcap %g n %zu", caps[ci], n);
            gt_close(what, got, ref, n, 1e-30, RTOL_DBL);
            kcu_free(gt_c, dx);
            free(x), free(ref), free(got);
        }
    float *dx = gt_up(NULL, 16);
    gt_err[0] = '\0';
    GT_CHECK(kcu_softcap(gt_c, dx, 4, 0.0f, gt_err, sizeof gt_err) < 0 && gt_err[0],
             "cap 0 accepted");
    kcu_free(gt_c, dx);
}

/* Walsh-Hadamard rotation (kv_rotate): against the oracle (its double sums
 * vs log2(dim) f32 passes: |err| <= 1e-6 * log2(dim) * the row's L2 norm,
 * the butterfly's bound), bit-exact against kcpu_hadamard (same pairs, same
 * order, no contraction), and a dim that is not a power of two refused. */
static void case_hadamard(void)
{
    const int shapes[][2] = {{1, 1}, {3, 2}, {5, 64}, {7, 128}, {4, 256}, {2, 512}};
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        int rows = shapes[si][0], dim = shapes[si][1];
        size_t N = (size_t)rows * dim;
        float *x = rand_vec(N, 3.0f);
        x[0] = 1e4f; /* an outlier channel, what the rotation spreads */
        float *ref = malloc(N * 4), *cpu = malloc(N * 4), *got = malloc(N * 4);
        memcpy(ref, x, N * 4);
        memcpy(cpu, x, N * 4);
        kref_hadamard(ref, rows, dim);
        kcpu_hadamard(cpu, rows, dim);
        float *dx = gt_up(x, N * 4);
        GT_OK(kcu_hadamard(gt_c, dx, rows, dim, gt_err, sizeof gt_err));
        gt_down(got, dx, N * 4);
        int lg = 0;
        while ((1 << lg) < dim)
            lg++;
        for (int r = 0; r < rows; r++) {
            double l2 = 0;
            for (int i = 0; i < dim; i++)
                l2 += (double)x[(size_t)r * dim + i] * x[(size_t)r * dim + i];
            char what[64];
            snprintf(what, sizeof what, "hadamard %dx%d row %d", rows, dim, r);
            gt_close(what, got + (size_t)r * dim, ref + (size_t)r * dim, (size_t)dim,
                     1e-6 * (lg + 1) * sqrt(l2), 0.0);
        }
        GT_CHECK(memcmp(got, cpu, N * 4) == 0, "hadamard %dx%d: not bit-exact vs kcpu", rows,
                 dim);
        kcu_free(gt_c, dx);
        free(x), free(ref), free(cpu), free(got);
    }
    float *dx = gt_up(NULL, 96 * 4);
    gt_err[0] = '\0';
    GT_CHECK(kcu_hadamard(gt_c, dx, 1, 96, gt_err, sizeof gt_err) < 0 && gt_err[0],
             "dim 96 accepted");
    kcu_free(gt_c, dx);
}

/* Bias over rows and scaling: one f32 operation per element, exact. */
static void case_bias_scale(void)
{
    const int shapes[][2] = {{1, 1}, {3, 7}, {5, 896}, {64, 128}, {257, 576}};
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        int rows = shapes[si][0], cols = shapes[si][1];
        size_t N = (size_t)rows * cols;
        float *y = rand_vec(N, 3.0f), *b = rand_vec((size_t)cols, 0.5f);
        float *got = malloc(N * 4);
        float *dy = gt_up(y, N * 4), *db = gt_up(b, (size_t)cols * 4);
        GT_OK(kcu_add_bias(gt_c, dy, db, rows, cols, gt_err, sizeof gt_err));
        gt_down(got, dy, N * 4);
        size_t bad = 0;
        for (size_t i = 0; i < N; i++)
            bad += got[i] != y[i] + b[i % (size_t)cols];
        GT_CHECK(bad == 0, "bias %dx%d: %zu elements differ", rows, cols, bad);
        const float s = sqrtf((float)cols); /* Gemma's embedding scale */
        GT_OK(kcu_scale(gt_c, dy, N, s, gt_err, sizeof gt_err));
        float *got2 = malloc(N * 4);
        gt_down(got2, dy, N * 4);
        bad = 0;
        for (size_t i = 0; i < N; i++)
            bad += got2[i] != got[i] * s;
        GT_CHECK(bad == 0, "scale %dx%d by %g: %zu elements differ", rows, cols, (double)s, bad);
        kcu_free(gt_c, dy);
        kcu_free(gt_c, db);
        free(y), free(b), free(got), free(got2);
    }
}

static void case_add_convert(void)
{
    size_t n = 70001;
    float *x = rand_vec(n, 3.0f), *y = rand_vec(n, 3.0f), *got = malloc(n * 4);
    float *dx = gt_up(x, n * 4), *dy = gt_up(y, n * 4);
    GT_OK(kcu_add(gt_c, dy, dx, n, gt_err, sizeof gt_err));
    gt_down(got, dy, n * 4);
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        bad += got[i] != y[i] + x[i];
    GT_CHECK(bad == 0, "add: %zu elements differ", bad);

    /* adversarial values for the conversions: ties, subnormals, overflow */
    const float special[] = {0.0f, -0.0f, 1.0f, 65504.0f, 65519.99f, 65520.0f, -65520.0f,
                             1e-8f, -5.96e-8f, 2.98e-8f, 2.9802322e-8f, 6.1e-5f, 1.0009765625f,
                             1.00048828125f, 1.00146484375f, 3.4e38f, INFINITY, -INFINITY,
                             0x1p-24f, 0x1.8p-25f, 0x1p-25f, 1.0f + 0x1p-11f};
    size_t ns = sizeof special / sizeof special[0];
    for (size_t i = 0; i < ns; i++)
        x[i] = special[i];
    for (size_t i = ns; i < n; i++) {
        uint32_t u = gt_u32();
        memcpy(&x[i], &u, 4);
        if (!isfinite(x[i]))
            x[i] = (float)i;
    }
    GT_OK(kcu_h2d(gt_c, dx, x, n * 4, gt_err, sizeof gt_err));
    uint16_t *h = malloc(n * 2), *dh = gt_up(NULL, n * 2);
    GT_OK(kcu_convert(gt_c, KT_F16, dh, dx, n, gt_err, sizeof gt_err));
    gt_down(h, dh, n * 2);
    bad = 0;
    for (size_t i = 0; i < n; i++)
        if (h[i] != kt_f32_to_f16(x[i])) {
            if (!bad)
                fprintf(stderr, "  f16 of %a: got %04x want %04x\n", (double)x[i], h[i],
                        kt_f32_to_f16(x[i]));
            bad++;
        }
    GT_CHECK(bad == 0, "f32 -> f16: %zu of %zu differ from kt_f32_to_f16", bad, n);
    GT_OK(kcu_convert(gt_c, KT_BF16, dh, dx, n, gt_err, sizeof gt_err));
    gt_down(h, dh, n * 2);
    bad = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], 4);
        uint16_t want = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        if (isinf(x[i]))
            want = (uint16_t)(u >> 16);
        bad += h[i] != want;
    }
    GT_CHECK(bad == 0, "f32 -> bf16: %zu differ from round-to-nearest-even", bad);
    float nanv = NAN;
    GT_OK(kcu_h2d(gt_c, dx, &nanv, 4, gt_err, sizeof gt_err));
    GT_OK(kcu_convert(gt_c, KT_F16, dh, dx, 1, gt_err, sizeof gt_err));
    gt_down(h, dh, 2);
    GT_CHECK(isnan(kt_f16_to_f32(h[0])), "f16 of NaN is %04x", h[0]);
    kcu_free(gt_c, dx);
    kcu_free(gt_c, dy);
    kcu_free(gt_c, dh);
    free(x), free(y), free(got), free(h);
}

static void case_embed(void)
{
    const kt_type types[] = {KT_F32, KT_F16, KT_BF16};
    int V = 517, dim = 288, nt = 6;
    int32_t tok[6] = {0, 516, 3, 3, 100, 255};
    for (int ti = 0; ti < 3; ti++) {
        kt_type t = types[ti];
        size_t rb = kt_row_bytes(t, dim);
        uint8_t *tab = malloc((size_t)V * rb);
        for (size_t i = 0; i < (size_t)V * dim; i++) {
            float v = gt_gauss();
            if (t == KT_F32)
                ((float *)tab)[i] = v;
            else if (t == KT_F16)
                ((uint16_t *)tab)[i] = kt_f32_to_f16(v);
            else {
                uint32_t u;
                memcpy(&u, &v, 4);
                ((uint16_t *)tab)[i] = (uint16_t)(u >> 16);
            }
        }
        float *ref = malloc((size_t)nt * dim * 4), *got = malloc((size_t)nt * dim * 4);
        for (int i = 0; i < nt; i++)
            kref_dequant_row(t, tab + (size_t)tok[i] * rb, ref + (size_t)i * dim, dim);
        void *dt = gt_up(tab, (size_t)V * rb);
        int32_t *dk = gt_up(tok, sizeof tok);
        float *dout = gt_up(NULL, (size_t)nt * dim * 4);
        GT_OK(kcu_embed(gt_c, t, dt, dk, nt, dim, dout, gt_err, sizeof gt_err));
        gt_down(got, dout, (size_t)nt * dim * 4);
        GT_CHECK(memcmp(got, ref, (size_t)nt * dim * 4) == 0, "embed %s differs", kt_name(t));
        kcu_free(gt_c, dt);
        kcu_free(gt_c, dk);
        kcu_free(gt_c, dout);
        free(tab), free(ref), free(got);
    }
}

/* One GEMM case: W (rows x cols) of type t, x [tok][cols]. */
static void gemm_case(kt_type t, int rows, int cols, int tok)
{
    size_t nw = (size_t)rows * cols, nx = (size_t)tok * cols, ny = (size_t)tok * rows;
    size_t es = t == KT_F32 ? 4 : 2;
    uint8_t *W = malloc(nw * es), *X = malloc(nx * es);
    float *wf = malloc(nw * 4), *xf = malloc(nx * 4), *ref = malloc(ny * 4), *got = malloc(ny * 4);
    for (size_t i = 0; i < nw + nx; i++) {
        int isw = i < nw;
        size_t k = isw ? i : i - nw;
        float v = gt_gauss() * (isw ? 0.05f : 2.0f);
        uint8_t *dst = isw ? W : X;
        float *f = isw ? wf : xf;
        if (t == KT_F32) {
            ((float *)dst)[k] = v;
            f[k] = v;
        } else if (t == KT_F16) {
            uint16_t h = kt_f32_to_f16(v);
            ((uint16_t *)dst)[k] = h;
            f[k] = kt_f16_to_f32(h);
        } else {
            uint32_t u;
            memcpy(&u, &v, 4);
            uint16_t h = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
            ((uint16_t *)dst)[k] = h;
            f[k] = kt_bf16_to_f32(h);
        }
    }
    kref_matmul(KT_F32, wf, xf, ref, rows, cols, tok);
    void *dW = gt_up(W, nw * es), *dX = gt_up(X, nx * es);
    float *dY = gt_up(NULL, ny * 4);
    GT_OK(kcu_gemm(gt_c, t, dW, dX, dY, rows, cols, tok, gt_err, sizeof gt_err));
    gt_down(got, dY, ny * 4);
    double rt = 2e-6 * sqrt((double)cols) + 1e-6;
    size_t bad = 0, worst = 0;
    double wex = -1;
    for (int i = 0; i < tok; i++)
        for (int r = 0; r < rows; r++) {
            double mag = 0;
            for (int c = 0; c < cols; c++)
                mag += fabs((double)wf[(size_t)r * cols + c] * xf[(size_t)i * cols + c]);
            size_t k = (size_t)i * rows + r;
            double ex = fabs((double)got[k] - ref[k]) - rt * mag - 1e-30;
            if (ex > 0)
                bad++;
            if (ex > wex) {
                wex = ex;
                worst = k;
            }
        }
    GT_CHECK(bad == 0, "gemm %s %dx%dx%d: %zu outputs off (worst %zu: %.8g vs %.8g)", kt_name(t),
             rows, cols, tok, bad, worst, (double)got[worst], (double)ref[worst]);
    kcu_free(gt_c, dW);
    kcu_free(gt_c, dX);
    kcu_free(gt_c, dY);
    free(W), free(X), free(wf), free(xf), free(ref), free(got);
}

static void case_gemm(void)
{
    const kt_type types[] = {KT_F32, KT_F16, KT_BF16};
    const int shapes[][3] = {{1, 1, 1}, {7, 33, 3}, {288, 288, 5}, {768, 288, 1},
                             {64, 172, 9}, {192, 576, 2}};
    for (int ti = 0; ti < 3; ti++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
            gemm_case(types[ti], shapes[s][0], shapes[s][1], shapes[s][2]);
    gemm_case(KT_F16, 32000, 288, 1); /* the vocabulary head of stories15M */
    /* a quantized type is refused with a message */
    gt_err[0] = '\0';
    GT_CHECK(kcu_gemm(gt_c, KT_Q4_0, NULL, NULL, NULL, 1, 32, 1, gt_err, sizeof gt_err) < 0 &&
                 strstr(gt_err, "Q4_0"),
             "Q4_0 GEMM accepted: %s", gt_err);
}

int main(void)
{
    gt_begin("test_gpu_ops");
    gt_case("rmsnorm", case_rmsnorm);
    gt_case("rope", case_rope);
    gt_case("rope_at", case_rope_at);
    gt_case("rope_ex", case_rope_ex);
    gt_case("swiglu", case_swiglu);
    gt_case("geglu", case_geglu);
    gt_case("softcap", case_softcap);
    gt_case("hadamard", case_hadamard);
    gt_case("bias_scale", case_bias_scale);
    gt_case("add_convert", case_add_convert);
    gt_case("embed", case_embed);
    gt_case("gemm", case_gemm);
    return gt_end();
}
