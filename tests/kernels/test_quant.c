/*
 * test_quant.c - Eq. 3-4 block quantization (kvq_quantize_block /
 * kvq_dequant_block) and the pinned block layout (kvq_layout_init).
 *
 * Every quantized block is checked by one independent verifier (check_block)
 * that re-derives, element by element, what the contract in kernels/kvq.h
 * promises:
 *  - outliers dequantize to exactly fp16(x) (saturated at +-65504), their
 *    dense slot holds the clamped code (0 below the grid, 15 above), lists
 *    are ascending, inside the block's tokens, at most out_cap long;
 *  - every other finite element is within s/2 * (1 + 2^-19) of x (s = the
 *    FP16 scale as f32; 2^-19 covers the f32 rounding of x/s for codes up to
 *    15 - and s itself is at most s_exact * (1 + 2^-10) since it is rounded
 *    up to FP16), or else it is clamped: its code is 0 or 15 and x lies
 *    beyond the grid on that side;
 *  - NaN dequantizes to 0, +-Inf to the grid ends, and both are clamped;
 *  - n_clamped = clamped finite values + non-finite values;
 *  - when candidates exceed the budget, every kept outlier has an excursion
 *    (clamp error in steps beyond s/2) >= that of every clamped value;
 *  - values inside the EMA range (K) or inside their channel's EMA band (V)
 *    are never outliers or clamped;
 *  - token slots >= n are all zero (codes, per-token snapshots), unused
 *    outlier slots are zero, nothing is written outside `bytes` or outside
 *    the scratch.
 * Rejected by kvq_layout_init (tested): non-positive sizes, G not dividing
 * head_dim, head_dim not dividing D, odd D, budget outside [0, 1] or NaN.
 * Threading: each Criterion test runs in its own process.
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ktypes.h"
#include "kernels/kvq.h"

_Static_assert(sizeof(kvq_block_hdr) == 16, "kvq_block_hdr is 4 x u32");

#define ERR_REL (0.5 * (1.0 + 0x1p-19)) /* |x - x^| <= ERR_REL * s (4 bits) */
/* The same bound for b-bit codes: s/2 plus the f32 rounding of x/s for
 * codes up to 2^b - 1 (ERR_REL at 4 bits). */
#define ERR_REL_B(b) (0.5 + (double)(1 << (b)) * 0x1p-24)
#define GUARD 64
#define GUARD_BYTE 0xa5

/* ---- helpers ---- */

static uint64_t rng_state = 0x243f6a8885a308d3ull;

static uint32_t rnd_u32(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}

static float rnd_unif(void) /* (0, 1) */
{
    return ((float)(rnd_u32() & 0xffffff) + 0.5f) / 16777216.0f;
}

static float rnd_gauss(void)
{
    return sqrtf(-2.0f * logf(rnd_unif())) * cosf(6.2831853f * rnd_unif());
}

static kvq_layout mk_layout_bits(int T, int D, int hd, int G, kvq_k_mode km, float budget,
                                 int kb, int vb)
{
    kvq_layout L;
    char err[128] = "";
    int rc = kvq_layout_init_bits(&L, T, D, hd, G, km, budget, kb, vb, err, sizeof err);
    cr_assert_eq(rc, 0, "layout T=%d D=%d hd=%d G=%d K%dV%d: %s", T, D, hd, G, kb, vb, err);
    return L;
}

static kvq_layout mk_layout(int T, int D, int hd, int G, kvq_k_mode km, float budget)
{
    return mk_layout_bits(T, D, hd, G, km, budget, 4, 4);
}

/* A block with GUARD guard bytes after it (and a scratch likewise). */
static uint8_t *block_alloc(const kvq_layout *L)
{
    uint8_t *b = aligned_alloc(64, (L->bytes + GUARD + 63) / 64 * 64);
    cr_assert(b);
    memset(b, 0xcd, L->bytes); /* garbage: quantize must rewrite it all */
    memset(b + L->bytes, GUARD_BYTE, GUARD);
    return b;
}

static uint8_t *scratch_alloc(const kvq_layout *L)
{
    size_t n = kvq_quantize_scratch_bytes(L);
    uint8_t *s = aligned_alloc(64, (n + GUARD + 63) / 64 * 64);
    cr_assert(s);
    memset(s, 0x77, n);
    memset(s + n, GUARD_BYTE, GUARD);
    return s;
}

static void check_guard(const uint8_t *p, size_t n, const char *what)
{
    for (int i = 0; i < GUARD; i++)
        cr_assert_eq(p[n + i], GUARD_BYTE, "%s: byte %d past the end written", what, i);
}


static float f16_sat(float x)
{
    return kt_f16_to_f32(kt_f32_to_f16(fminf(fmaxf(x, -65504.0f), 65504.0f)));
}

typedef struct {
    int n_out, n_clamped_finite, n_bad;
    double max_err_rel; /* max |x - x^| / s over in-range elements */
    double min_out_exc, max_clamp_exc;
} tensor_stats;

typedef struct {
    tensor_stats k, v;
} block_stats;

/* Checks one tensor of a quantized block against its input x [n][stride].
 * lo/hi: the per-channel range that must never produce an outlier or a
 * clamp (NULL: none known), widened by `band` steps of the channel s. */
static tensor_stats check_tensor(const kvq_layout *L, const uint8_t *base, int is_k,
                                 const float *x, size_t stride, int n,
                                 const float *lo, const float *hi, int band)
{
    int T = L->block_tokens, D = L->kv_dim, G = L->v_group, ng = D / G;
    const kvq_block_hdr *h = kvq_chdr(base);
    int per_ch = is_k && L->k_mode == KVQ_K_PER_CHANNEL;
    const uint8_t *q = base + (is_k ? L->off_kq : L->off_vq);
    const uint16_t *s16 = (const uint16_t *)(base + (is_k ? L->off_ks : L->off_vs));
    const uint8_t *z = base + (is_k ? L->off_kz : L->off_vz);
    uint32_t *oi = malloc(sizeof(uint32_t) * ((size_t)L->out_cap + 1));
    for (int i = 0; i < L->out_cap; i++)
        oi[i] = kvq_out_idx(L, base, !is_k, (uint32_t)i);
    const uint16_t *ov = (const uint16_t *)(base + (is_k ? L->off_kout_val : L->off_vout_val));
    uint32_t n_out = is_k ? h->n_kout : h->n_vout;
    const char *nm = is_k ? "K" : "V";
    const int bits = is_k ? L->k_bits : L->v_bits, lv = KVQ_LEVELS_OF(bits);
    const int zb = is_k ? L->k_zbits : L->v_zbits;
    cr_assert_eq(zb, bits <= 4 ? 4 : 8, "zeros of %d-bit codes in %d bits", bits, zb);
    const double err_rel = ERR_REL_B(bits);
#define code_at(q_, i_) kvq_get_code(q_, i_, bits)
    tensor_stats st = { 0, 0, 0, 0.0, INFINITY, -INFINITY };

    cr_assert_leq(n_out, (uint32_t)L->out_cap, "%s outliers over capacity", nm);
    st.n_out = (int)n_out;
    /* outlier lists: ascending, inside the stored tokens; unused slots zero */
    char *is_out = calloc((size_t)T * D, 1);
    for (uint32_t i = 0; i < n_out; i++) {
        cr_assert_lt(oi[i], (uint32_t)(n * D), "%s outlier %u index %u out of the block", nm, i, oi[i]);
        if (i)
            cr_assert_gt(oi[i], oi[i - 1], "%s outlier list not ascending", nm);
        is_out[oi[i]] = 1;
    }
    for (int i = (int)n_out; i < L->out_cap; i++)
        cr_assert(oi[i] == 0 && ov[i] == 0, "%s unused outlier slot %d not zero", nm, i);
    /* tail tokens zero */
    for (size_t i = (size_t)n * D; i < (size_t)T * D; i++)
        cr_assert_eq(code_at(q, i), 0, "%s code of unused slot %zu", nm, i);
    if (!per_ch)
        for (size_t i = (size_t)n * ng; i < (size_t)T * ng; i++)
            cr_assert(s16[i] == 0 && kvq_zero_at(z, i, zb) == 0, "%s snapshot of unused token", nm);

    float *deq = malloc((size_t)T * D * sizeof(float));
    for (size_t i = 0; i < (size_t)T * D; i++)
        deq[i] = 12345.0f;
    kvq_dequant_block(L, base, is_k ? deq : NULL, is_k ? NULL : deq, (size_t)D);
    for (size_t i = (size_t)n * D; i < (size_t)T * D; i++)
        cr_assert_eq(deq[i], 12345.0f, "dequant wrote past n_tok");

    for (int t = 0; t < n; t++) {
        for (int c = 0; c < D; c++) {
            size_t i = (size_t)t * D + c;
            size_t si = per_ch ? (size_t)c : (size_t)t * ng + c / G;
            float s = kt_f16_to_f32(s16[si]);
            int zz = kvq_zero_at(z, si, zb), code = code_at(q, i);
            float xv = x[(size_t)t * stride + c], d = deq[i];
            cr_assert(s > 0 && isfinite(s), "%s scale %g", nm, s);
            cr_assert_leq(zz, lv);
            if (!isfinite(xv)) {
                int want = isnan(xv) ? zz : (xv > 0 ? lv : 0);
                cr_assert_eq(code, want, "%s non-finite code", nm);
                cr_assert(!is_out[i], "%s non-finite value stored as outlier", nm);
                cr_assert_eq(d, s * (float)(code - zz));
                st.n_bad++;
                continue;
            }
            /* error this element has (or would have) on the grid */
            double grid = (double)s * (code - zz);
            double exc = (fabs((double)xv - grid) - 0.5 * s) / s;
            if (is_out[i]) {
                cr_assert_eq(d, f16_sat(xv), "%s outlier (%d,%d) not exact: %g vs %g", nm, t, c, d, xv);
                cr_assert(code == 0 || code == lv, "%s outlier dense slot %d", nm, code);
                cr_assert(code == lv ? xv > grid : xv < grid, "%s outlier clamp side", nm);
                cr_assert_gt(exc, -1e-5, "%s outlier inside the grid (exc %g)", nm, exc);
                st.min_out_exc = fmin(st.min_out_exc, exc);
            } else {
                cr_assert_eq(d, (float)grid, "%s dequant formula", nm);
                double e = fabs((double)xv - d) / s;
                if (e <= err_rel) {
                    st.max_err_rel = fmax(st.max_err_rel, e);
                } else {
                    cr_assert(code == 0 || code == lv, "%s (%d,%d) error %g steps but not clamped (code %d)",
                              nm, t, c, e, code);
                    cr_assert(code == lv ? xv > d : xv < d, "%s clamp side", nm);
                    st.n_clamped_finite++;
                    st.max_clamp_exc = fmax(st.max_clamp_exc, exc);
                }
            }
            if (lo && hi) {
                float sc = fmaxf(hi[c] - lo[c], KVQ_EPS) / (float)lv;
                float bl = lo[c] - band * 0.5f * sc, bh = hi[c] + band * 0.5f * sc;
                if (xv >= bl && xv <= bh) {
                    cr_assert(!is_out[i], "%s in-range value (%d,%d)=%g [%g,%g] is an outlier",
                              nm, t, c, xv, lo[c], hi[c]);
                    cr_assert_leq(fabs((double)xv - d) / s, err_rel,
                                  "%s in-range value (%d,%d) error %g steps", nm, t, c,
                                  fabs((double)xv - d) / s);
                }
            }
        }
    }
    free(deq);
    free(is_out);
    free(oi);
    return st;
#undef code_at
}

/* Quantizes (k, v) into a fresh block with guards and checks everything. */
static block_stats quant_check(const kvq_layout *L, const float *k, const float *v,
                               size_t stride, int n, const float *klo, const float *khi,
                               const float *vlo, const float *vhi, uint8_t **keep)
{
    uint8_t *b = block_alloc(L), *scr = scratch_alloc(L);
    kvq_quantize_block(L, b, k, v, stride, n, klo, khi, vlo, vhi, scr);
    check_guard(b, L->bytes, "block");
    check_guard(scr, kvq_quantize_scratch_bytes(L), "scratch");
    const kvq_block_hdr *h = kvq_chdr(b);
    cr_assert_eq(h->n_tok, (uint32_t)n);
    if (L->k_mode == KVQ_K_PER_CHANNEL && klo)
        for (int c = 0; c < L->kv_dim; c++) {
            uint16_t s;
            uint8_t z;
            kvq_scale_zero_bits(klo[c], khi[c], L->k_bits, &s, &z);
            cr_assert(KVQ_CAT(b, L->off_ks, uint16_t *)[c] == s &&
                          kvq_zero_at(KVQ_CAT(b, L->off_kz, uint8_t *), (size_t)c, L->k_zbits) == z,
                      "K snapshot of channel %d is not kvq_scale_zero(lo, hi)", c);
        }
    block_stats bs;
    bs.k = check_tensor(L, b, 1, k, stride, n, klo, khi, 0);
    /* V: values inside their channel band (1 step = s_c/2 each side) */
    bs.v = check_tensor(L, b, 0, v, stride, n, vlo, vhi, 1);
    cr_assert_eq(h->n_clamped,
                 (uint32_t)(bs.k.n_clamped_finite + bs.k.n_bad + bs.v.n_clamped_finite + bs.v.n_bad),
                 "n_clamped %u: K %d+%d, V %d+%d", h->n_clamped, bs.k.n_clamped_finite, bs.k.n_bad,
                 bs.v.n_clamped_finite, bs.v.n_bad);
    /* the budget keeps the largest excursions */
    const tensor_stats *ts[2] = { &bs.k, &bs.v };
    for (int j = 0; j < 2; j++) {
        if (ts[j]->n_clamped_finite > 0)
            cr_assert_eq(ts[j]->n_out, L->out_cap, "clamped while outlier slots were free");
        if (ts[j]->n_out > 0 && ts[j]->n_clamped_finite > 0)
            cr_assert_geq(ts[j]->min_out_exc, ts[j]->max_clamp_exc - 1e-4,
                          "a kept outlier (%g steps) is smaller than a clamped one (%g)",
                          ts[j]->min_out_exc, ts[j]->max_clamp_exc);
    }
    free(scr);
    if (keep)
        *keep = b;
    else
        free(b);
    return bs;
}

/* Per-channel min/max of x [n][stride] (the range that fits everything). */
static void minmax(const float *x, int n, int D, size_t stride, float *lo, float *hi)
{
    for (int c = 0; c < D; c++) {
        lo[c] = INFINITY;
        hi[c] = -INFINITY;
        for (int t = 0; t < n; t++) {
            lo[c] = fminf(lo[c], x[(size_t)t * stride + c]);
            hi[c] = fmaxf(hi[c], x[(size_t)t * stride + c]);
        }
    }
}

/* Activations with per-channel offsets and scales, some channels one-signed
 * (offset > 3 sigma), like real K after RoPE. */
static void fill_acts(float *x, int n, int D, size_t stride)
{
    for (int c = 0; c < D; c++) {
        float sc = 0.05f + 2.0f * rnd_unif();
        float off = (c % 5 == 0) ? 8.0f * (rnd_unif() - 0.5f) * sc : 0.3f * rnd_gauss() * sc;
        for (int t = 0; t < n; t++)
            x[(size_t)t * stride + c] = off + sc * rnd_gauss();
    }
}

/* ---- layout ---- */

typedef struct {
    int T, D, hd, G;
    kvq_k_mode km;
    float budget;
    int cap; /* expected out_cap */
} layout_case;

static const layout_case layout_cases[] = {
    { 128, 192, 64, 64, KVQ_K_PER_CHANNEL, 0.005f, 123 },
    { 128, 192, 64, 32, KVQ_K_PER_TOKEN, 0.005f, 123 },
    { 10, 10, 10, 5, KVQ_K_PER_CHANNEL, 0.01f, 1 },
    { 7, 96, 48, 16, KVQ_K_PER_CHANNEL, 0.0f, 0 },
    { 1, 40, 40, 8, KVQ_K_PER_TOKEN, 1.0f, 40 },
    { 3, 2, 2, 1, KVQ_K_PER_CHANNEL, 0.5f, 3 },
    { 16, 576, 64, 64, KVQ_K_PER_CHANNEL, 0.002f, 19 },
    { 128, 1024, 128, 128, KVQ_K_PER_CHANNEL, 0.005f, 656 }, /* 32-bit outlier indices */
};

Test(kvq_layout, regions_aligned_disjoint_and_formulas)
{
    for (size_t ci = 0; ci < sizeof layout_cases / sizeof layout_cases[0]; ci++) {
        const layout_case *lc = &layout_cases[ci];
        kvq_layout L = mk_layout(lc->T, lc->D, lc->hd, lc->G, lc->km, lc->budget);
        size_t td = (size_t)lc->T * lc->D, nv = td / lc->G;
        size_t nk = lc->km == KVQ_K_PER_CHANNEL ? (size_t)lc->D : nv;
        size_t cap = (size_t)lc->cap;
        cr_assert_eq(L.out_cap, lc->cap, "case %zu: out_cap %d, want %d", ci, L.out_cap, lc->cap);
        cr_assert_eq((size_t)L.n_ksnap, nk);
        cr_assert_eq(L.bytes_dense, td);
        cr_assert_eq(L.bytes_scales, 2 * nk + (nk + 1) / 2 + 2 * nv + (nv + 1) / 2,
                     "FP16 scales and 4-bit zeros");
        cr_assert_eq(L.idx_bytes, td <= 65536 ? 2 : 4, "16-bit outlier indices up to 65536 elements");
        cr_assert_eq(L.bytes_outliers, 2 * cap * (size_t)(L.idx_bytes + 2));
        cr_assert_eq(L.bytes % 8, 0);
        struct { size_t off, len; } r[] = {
            { L.off_kq, td / 2 }, { L.off_vq, td / 2 },
            { L.off_ks, 2 * nk }, { L.off_kz, (nk + 1) / 2 },
            { L.off_vs, 2 * nv }, { L.off_vz, (nv + 1) / 2 },
            { L.off_kout_idx, (size_t)L.idx_bytes * cap }, { L.off_kout_val, 2 * cap },
            { L.off_vout_idx, (size_t)L.idx_bytes * cap }, { L.off_vout_val, 2 * cap },
        };
        size_t end = sizeof(kvq_block_hdr), sum = sizeof(kvq_block_hdr);
        for (size_t j = 0; j < sizeof r / sizeof r[0]; j++) {
            cr_assert_eq(r[j].off % 8, 0, "case %zu region %zu not 8-aligned", ci, j);
            cr_assert_geq(r[j].off, end, "case %zu region %zu overlaps", ci, j);
            end = r[j].off + r[j].len;
            cr_assert_leq(end, L.bytes, "case %zu region %zu past bytes", ci, j);
            sum += r[j].len;
        }
        cr_assert_eq(sum, sizeof(kvq_block_hdr) + L.bytes_dense + L.bytes_scales + L.bytes_outliers);
        cr_assert_lt(L.bytes - sum, 8 * 11, "more padding than alignment needs");
    }
}

Test(kvq_layout, rejects_bad_shapes)
{
    kvq_layout L;
    char err[128];
    struct { int T, D, hd, G, km; float b; } bad[] = {
        { 0, 64, 64, 64, 0, 0.01f },   { 16, 0, 64, 64, 0, 0.01f },
        { 16, 64, 0, 64, 0, 0.01f },   { 16, 64, 64, 0, 0, 0.01f },
        { 16, 64, 64, 48, 0, 0.01f },  /* G does not divide head_dim */
        { 16, 96, 64, 32, 0, 0.01f },  /* head_dim does not divide D */
        { 16, 3, 3, 1, 0, 0.01f },     /* odd D */
        { 16, 64, 64, 64, 2, 0.01f },  /* unknown k_mode */
        { 16, 64, 64, 64, 0, -0.1f },  { 16, 64, 64, 64, 0, 1.5f },
        { 16, 64, 64, 64, 0, NAN },
        { 1 << 20, 1 << 10, 64, 64, 0, 0.0f }, /* too large for u32 indices */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = 0;
        int rc = kvq_layout_init(&L, bad[i].T, bad[i].D, bad[i].hd, bad[i].G,
                                 (kvq_k_mode)bad[i].km, bad[i].b, err, sizeof err);
        cr_assert_lt(rc, 0, "case %zu accepted", i);
        cr_assert_gt(strlen(err), 0, "case %zu: no reason given", i);
    }
}

Test(kvq_layout, bits_per_element_smollm2)
{
    kvq_layout L = mk_layout(128, 192, 64, 64, KVQ_K_PER_CHANNEL, 0.005f);
    double bpe = 8.0 * (double)L.bytes / (2.0 * 128 * 192);
    double dense = 8.0 * L.bytes_dense / (2.0 * 128 * 192);
    double scales = 8.0 * L.bytes_scales / (2.0 * 128 * 192);
    double outl = 8.0 * L.bytes_outliers / (2.0 * 128 * 192);
    cr_log_info("T=128 D=192 hd=64 G=64 budget=0.005: %zu bytes/block = %.4f bits/element "
                "(dense %.3f + scales %.4f + outliers %.4f + header/padding %.4f)",
                L.bytes, bpe, dense, scales, outl, bpe - dense - scales - outl);
    fprintf(stderr, "bits/element all-in: %.4f (%zu bytes per layer-block)\n", bpe, L.bytes);
    cr_assert_eq(L.bytes, 27024); /* 16-bit outlier indices, 4-bit zeros (was 27808) */
    cr_assert_leq(bpe, 4.6);
}

/* ---- scale / zero ---- */

Test(kvq_scale_zero, widened_to_zero_and_rounded_up)
{
    uint16_t s;
    uint8_t z;
    kvq_scale_zero(0, 0, &s, &z); /* zero width: eps/15 rounded up to FP16 */
    cr_assert_eq(kt_f16_to_f32(s), 0x1p-23f);
    cr_assert_eq(z, 0);
    kvq_scale_zero(-0.5f, 0.4375f, &s, &z); /* exact: s = 1/16, z = 8 */
    cr_assert_eq(kt_f16_to_f32(s), 0.0625f);
    cr_assert_eq(z, 8);
    kvq_scale_zero(5, 6, &s, &z); /* one-signed: grid [0, 6] */
    cr_assert_geq(15 * kt_f16_to_f32(s), 6.0f);
    cr_assert_eq(z, 0);
    kvq_scale_zero(-6, -5, &s, &z); /* grid [-6, 0] */
    cr_assert_eq(z, 15);
    kvq_scale_zero(NAN, NAN, &s, &z); /* no data: [0, 0] */
    cr_assert_eq(kt_f16_to_f32(s), 0x1p-23f);
    kvq_scale_zero(-1e9f, 1e9f, &s, &z); /* beyond FP16: saturates */
    cr_assert_eq(s, 0x7bff);
    for (int i = 0; i < 20000; i++) {
        float lo = -expf(8 * rnd_gauss()) * rnd_unif(), hi = expf(8 * rnd_gauss()) * rnd_unif();
        if (hi - lo > 15 * 65504.0f || hi - lo < 1e-3f)
            continue;
        kvq_scale_zero(lo, hi, &s, &z);
        float sf = kt_f16_to_f32(s), se = (hi - lo) / 15;
        cr_assert_geq(sf, se, "s rounded down");
        cr_assert_leq(sf, se * (1 + 0x1p-10f), "s more than one FP16 ulp up");
        cr_assert_leq(z, 15);
        /* the grid covers [lo, hi] to half a step */
        cr_assert_leq(sf * (-(float)z - 0.5f), lo);
        cr_assert_geq(sf * (15.0f - z + 0.5f), hi);
    }
}

/* ---- quantization ---- */

/* Codes written and read back exactly: values on a known grid. */
Test(kvq_quant, pack_unpack_round_trip)
{
    int T = 16, D = 128, n = 13;
    kvq_layout L = mk_layout(T, D, 64, 32, KVQ_K_PER_CHANNEL, 0.01f);
    float *k = malloc(sizeof(float) * T * D), *v = malloc(sizeof(float) * T * D);
    int *qk = malloc(sizeof(int) * T * D), *qv = malloc(sizeof(int) * T * D);
    float klo[128], khi[128];
    for (int c = 0; c < D; c++) {
        klo[c] = -0.5f;
        khi[c] = 0.4375f; /* s = 1/16 exactly, z = 8 */
    }
    for (int i = 0; i < T * D; i++) {
        qk[i] = (int)(rnd_u32() % 16);
        qv[i] = (int)(rnd_u32() % 16);
        if (i % 32 == 0) /* every V group spans the whole grid */
            qv[i] = 0;
        if (i % 32 == 1)
            qv[i] = 15;
        k[i] = 0.0625f * (float)(qk[i] - 8);
        v[i] = 0.0625f * (float)(qv[i] - 8);
    }
    uint8_t *b;
    block_stats bs = quant_check(&L, k, v, D, n, klo, khi, NULL, NULL, &b);
    cr_assert_eq(bs.k.n_out + bs.v.n_out + bs.k.n_clamped_finite + bs.v.n_clamped_finite, 0);
    const uint8_t *kq = b + L.off_kq, *vq = b + L.off_vq;
    cr_assert_eq(kq[0] & 0xf, qk[0], "element 0 is the low nibble");
    cr_assert_eq(kq[0] >> 4, qk[1], "element 1 is the high nibble");
    for (int i = 0; i < n * D; i++) {
        cr_assert_eq(kvq_get_code(kq, (size_t)i, 4), qk[i]);
        cr_assert_eq(kvq_get_code(vq, (size_t)i, 4), qv[i]);
    }
    float *out = malloc(sizeof(float) * T * D * 2);
    kvq_dequant_block(&L, b, out, out + T * D, D);
    for (int i = 0; i < n * D; i++) {
        cr_assert_eq(out[i], k[i]);
        cr_assert_eq(out[T * D + i], v[i]);
    }
    free(out);
    free(b);
    free(k);
    free(v);
    free(qk);
    free(qv);
}

typedef struct {
    int T, D, hd, G;
    kvq_k_mode km;
    int n;
} shape_case;

static const shape_case shapes[] = {
    { 128, 192, 64, 64, KVQ_K_PER_CHANNEL, 128 }, /* SmolLM2 */
    { 128, 192, 64, 64, KVQ_K_PER_CHANNEL, 77 },
    { 7, 96, 48, 16, KVQ_K_PER_CHANNEL, 7 },
    { 7, 96, 48, 16, KVQ_K_PER_TOKEN, 4 },
    { 1, 40, 40, 8, KVQ_K_PER_CHANNEL, 1 },
    { 128, 120, 40, 8, KVQ_K_PER_CHANNEL, 128 },
    { 128, 64, 64, 64, KVQ_K_PER_TOKEN, 100 },
    { 16, 192, 64, 32, KVQ_K_PER_CHANNEL, 3 },
};

/* 1 when the widths kb / vb take the shape (int3: groups of 8; 4 bits:
 * kv_dim even). */
static int shape_fits(const shape_case *sc, int kb, int vb)
{
    if ((kb == 3 || vb == 3) && sc->G % 8)
        return 0;
    return !((kb == 4 || vb == 4) && sc->D % 2);
}

/* The EMA range covers the data: no outlier, no clamp, error <= s/2. */
static void in_range_error_bound(int kb, int vb)
{
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        const shape_case *sc = &shapes[si];
        if (!shape_fits(sc, kb, vb))
            continue;
        kvq_layout L = mk_layout_bits(sc->T, sc->D, sc->hd, sc->G, sc->km, 0.005f, kb, vb);
        size_t stride = (size_t)sc->D + 5; /* a strided source */
        float *k = malloc(sizeof(float) * stride * sc->T), *v = malloc(sizeof(float) * stride * sc->T);
        float *lo = malloc(sizeof(float) * sc->D * 4), *hi = lo + sc->D;
        float *vlo = hi + sc->D, *vhi = vlo + sc->D;
        fill_acts(k, sc->T, sc->D, stride);
        fill_acts(v, sc->T, sc->D, stride);
        minmax(k, sc->n, sc->D, stride, lo, hi);
        minmax(v, sc->n, sc->D, stride, vlo, vhi);
        const float *pl = sc->km == KVQ_K_PER_CHANNEL ? lo : NULL;
        const float *ph = sc->km == KVQ_K_PER_CHANNEL ? hi : NULL;
        block_stats bs = quant_check(&L, k, v, stride, sc->n, pl, ph, vlo, vhi, NULL);
        cr_assert_eq(bs.k.n_out + bs.v.n_out + bs.k.n_clamped_finite + bs.v.n_clamped_finite, 0,
                     "shape %zu: outliers in an in-range block", si);
        cr_assert_leq(bs.k.max_err_rel, ERR_REL_B(kb));
        cr_assert_leq(bs.v.max_err_rel, ERR_REL_B(vb));
        cr_log_info("K%dV%d shape %zu (T=%d D=%d hd=%d G=%d n=%d): max error K %.6f, V %.6f steps",
                    kb, vb, si, sc->T, sc->D, sc->hd, sc->G, sc->n, bs.k.max_err_rel,
                    bs.v.max_err_rel);
        /* the same with no V band and (K per channel) no K range */
        bs = quant_check(&L, k, v, stride, sc->n, NULL, NULL, NULL, NULL, NULL);
        cr_assert_eq(bs.k.n_out + bs.v.n_out + bs.k.n_clamped_finite + bs.v.n_clamped_finite, 0);
        free(k);
        free(v);
        free(lo);
    }
}

Test(kvq_quant, in_range_error_bound_all_shapes)
{
    in_range_error_bound(4, 4);
}

/* Real-looking data against a narrower EMA range: outliers stored exactly,
 * the budget respected, everything else within s/2. */
static void outliers_exact(int kb, int vb)
{
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        const shape_case *sc = &shapes[si];
        if (!shape_fits(sc, kb, vb))
            continue;
        for (int bi = 0; bi < 3; bi++) {
            float budget = bi == 0 ? 0.0f : bi == 1 ? 0.005f : 0.05f;
            kvq_layout L = mk_layout_bits(sc->T, sc->D, sc->hd, sc->G, sc->km, budget, kb, vb);
            size_t stride = (size_t)sc->D;
            float *k = malloc(sizeof(float) * stride * sc->T), *v = malloc(sizeof(float) * stride * sc->T);
            float *lo = malloc(sizeof(float) * sc->D * 4), *hi = lo + sc->D;
            float *vlo = hi + sc->D, *vhi = vlo + sc->D;
            fill_acts(k, sc->T, sc->D, stride);
            fill_acts(v, sc->T, sc->D, stride);
            minmax(k, sc->n, sc->D, stride, lo, hi);
            minmax(v, sc->n, sc->D, stride, vlo, vhi);
            for (int c = 0; c < sc->D; c++) { /* shrink the ranges by 30% */
                float m = 0.5f * (lo[c] + hi[c]), w = 0.35f * (hi[c] - lo[c]);
                lo[c] = m - w;
                hi[c] = m + w;
                m = 0.5f * (vlo[c] + vhi[c]);
                w = 0.35f * (vhi[c] - vlo[c]);
                vlo[c] = m - w;
                vhi[c] = m + w;
            }
            /* a few planted spikes */
            for (int j = 0; j < 3; j++) {
                size_t i = (size_t)(rnd_u32() % (uint32_t)sc->n) * stride + rnd_u32() % (uint32_t)sc->D;
                k[i] = (j & 1 ? -1 : 1) * (40.0f + 10 * j);
                i = (size_t)(rnd_u32() % (uint32_t)sc->n) * stride + rnd_u32() % (uint32_t)sc->D;
                v[i] = (j & 1 ? -1 : 1) * (30.0f + 10 * j);
            }
            const float *pl = sc->km == KVQ_K_PER_CHANNEL ? lo : NULL;
            const float *ph = sc->km == KVQ_K_PER_CHANNEL ? hi : NULL;
            block_stats bs = quant_check(&L, k, v, stride, sc->n, pl, ph, vlo, vhi, NULL);
            if (sc->km == KVQ_K_PER_TOKEN)
                cr_assert_eq(bs.k.n_out + bs.k.n_clamped_finite, 0, "per-token K has no outliers");
            else if (budget > 0.01f)
                cr_assert_gt(bs.k.n_out, 0, "shape %zu: no K outliers found", si);
            if (budget > 0.01f)
                cr_assert_gt(bs.v.n_out, 0, "shape %zu: no V outliers found", si);
            free(k);
            free(v);
            free(lo);
        }
    }
}

Test(kvq_quant, outliers_exact_all_shapes)
{
    outliers_exact(4, 4);
}

/* Every code width, K and V apart: round trip within s/2 in range (up to
 * the f32 rounding of x/s), outliers exact, clamps counted, on every shape
 * the width takes (odd head dims and group sizes included). */
Test(kvq_quant, every_width_error_bound_and_outliers)
{
    static const int wd[][2] = { { 2, 2 }, { 3, 3 }, { 8, 8 }, { 3, 2 }, { 2, 8 }, { 8, 3 } };
    for (int i = 0; i < 6; i++) {
        in_range_error_bound(wd[i][0], wd[i][1]);
        outliers_exact(wd[i][0], wd[i][1]);
    }
}

/* The bit stream of each width, pinned: element i at bits [i*b, i*b + b),
 * low bits first (8 codes of 3 bits in 3 bytes). */
Test(kvq_quant, code_streams_pinned)
{
    uint8_t q[8] = { 0 };
    for (int i = 0; i < 8; i++)
        kvq_put_code(q, (size_t)i, 3, i);
    cr_assert(q[0] == 0x88 && q[1] == 0xc6 && q[2] == 0xfa && q[3] == 0, "3-bit %02x %02x %02x",
              q[0], q[1], q[2]);
    memset(q, 0, sizeof q);
    for (int i = 0; i < 8; i++)
        kvq_put_code(q, (size_t)i, 2, i & 3);
    cr_assert(q[0] == 0xe4 && q[1] == 0xe4 && q[2] == 0);
    memset(q, 0, sizeof q);
    kvq_put_code(q, 1, 4, 9);
    kvq_put_code(q, 2, 8, 200);
    cr_assert(q[0] == 0x90 && q[2] == 200);
    for (int b = 2; b <= 8; b++) {
        if (!KVQ_BITS_OK(b))
            continue;
        uint8_t st[64] = { 0 };
        for (int i = 0; i < 60; i++)
            kvq_put_code(st, (size_t)i, b, (i * 7 + 3) & KVQ_LEVELS_OF(b));
        for (int i = 0; i < 60; i++)
            cr_assert_eq(kvq_get_code(st, (size_t)i, b), (i * 7 + 3) & KVQ_LEVELS_OF(b));
    }
}

/* Widths outside {2, 3, 4, 8} and int3 with groups that are not whole
 * 3-byte units are refused with a reason. */
Test(kvq_layout, refuses_bad_widths)
{
    kvq_layout L;
    char err[128];
    static const int bad[] = { 0, 1, 5, 6, 7, 9, 16, -4 };
    for (int i = 0; i < 8; i++) {
        err[0] = 0;
        cr_assert_lt(kvq_layout_init_bits(&L, 16, 64, 64, 64, KVQ_K_PER_CHANNEL, 0.01f, bad[i], 4,
                                          err, sizeof err), 0, "k_bits %d", bad[i]);
        cr_assert(strstr(err, "2, 3, 4 or 8"), "%s", err);
        cr_assert_lt(kvq_layout_init_bits(&L, 16, 64, 64, 64, KVQ_K_PER_CHANNEL, 0.01f, 4, bad[i],
                                          err, sizeof err), 0, "v_bits %d", bad[i]);
    }
    err[0] = 0;
    cr_assert_lt(kvq_layout_init_bits(&L, 16, 60, 12, 12, KVQ_K_PER_CHANNEL, 0.01f, 3, 3, err,
                                      sizeof err), 0);
    cr_assert(strstr(err, "multiple of 8"), "%s", err);
    cr_assert_eq(kvq_layout_init_bits(&L, 16, 63, 21, 7, KVQ_K_PER_CHANNEL, 0.01f, 2, 8, err,
                                      sizeof err), 0, "%s", err);
    cr_assert_eq(L.bytes_dense, (16 * 63 * 2 + 7) / 8 + 16 * 63);
}

/* More candidates than slots: the largest excursions are kept, in index
 * order, the rest clamped and counted. */
Test(kvq_quant, budget_overflow_keeps_largest)
{
    int T = 16, D = 64;
    kvq_layout L = mk_layout(T, D, 64, 32, KVQ_K_PER_CHANNEL, 4.0f / (T * D)); /* cap 4 */
    cr_assert_eq(L.out_cap, 4);
    float *k = malloc(sizeof(float) * T * D), *v = malloc(sizeof(float) * T * D);
    float lo[64], hi[64];
    for (int c = 0; c < D; c++) {
        lo[c] = -1;
        hi[c] = 1;
    }
    for (int i = 0; i < T * D; i++) {
        k[i] = 2 * rnd_unif() - 1;
        v[i] = 2 * rnd_unif() - 1;
    }
    /* 10 spikes per tensor with magnitudes 10..19 at scattered places */
    int pos[10];
    for (int j = 0; j < 10; j++) {
        pos[j] = (j * 97 + 13) % (T * D);
        k[pos[j]] = (j & 1 ? -1.0f : 1.0f) * (10.0f + (float)j);
        v[pos[j]] = (j & 1 ? 1.0f : -1.0f) * (10.0f + (float)j);
    }
    uint8_t *b;
    block_stats bs = quant_check(&L, k, v, D, T, lo, hi, lo, hi, &b);
    const kvq_block_hdr *h = kvq_chdr(b);
    cr_assert_eq(h->n_kout, 4);
    cr_assert_eq(h->n_vout, 4);
    cr_assert_eq(h->n_clamped, 12);
    cr_assert_eq(bs.k.n_clamped_finite, 6);
    /* kept: the spikes 16..19 (j = 6..9), ascending by index */
    uint32_t ki[8];
    for (int i = 0; i < 8 && i < L.out_cap; i++)
        ki[i] = kvq_out_idx(&L, b, 0, (uint32_t)i);
    uint32_t vi[64];
    for (int i = 0; i < 64 && i < L.out_cap; i++)
        vi[i] = kvq_out_idx(&L, b, 1, (uint32_t)i);
    for (int j = 6; j < 10; j++) {
        int fk = 0, fv = 0;
        for (int i = 0; i < 4; i++) {
            fk |= ki[i] == (uint32_t)pos[j];
            fv |= vi[i] == (uint32_t)pos[j];
        }
        cr_assert(fk && fv, "spike %d (|x| = %d) not kept", j, 10 + j);
    }
    free(b);
    free(k);
    free(v);
}

/* Equal excursions: the lowest indices win (deterministic). */
Test(kvq_quant, budget_ties_lowest_index)
{
    int T = 4, D = 8;
    kvq_layout L = mk_layout(T, D, 8, 8, KVQ_K_PER_CHANNEL, 3.0f / 32); /* cap 3 */
    float k[32], v[32] = { 0 }, lo[8], hi[8];
    for (int c = 0; c < D; c++) {
        lo[c] = -1;
        hi[c] = 1;
    }
    for (int i = 0; i < 32; i++)
        k[i] = (i % 3 == 0) ? 5.0f : 0.25f;
    uint8_t *b;
    quant_check(&L, k, v, D, T, lo, hi, NULL, NULL, &b);
    uint32_t ki[8];
    for (int i = 0; i < 8 && i < L.out_cap; i++)
        ki[i] = kvq_out_idx(&L, b, 0, (uint32_t)i);
    cr_assert(ki[0] == 0 && ki[1] == 3 && ki[2] == 6, "ties: %u %u %u", ki[0], ki[1], ki[2]);
    cr_assert_eq(kvq_chdr(b)->n_clamped, 11 - 3);
    free(b);
}

/* Everything far outside the EMA range. K: every element a candidate, out_cap
 * kept. V: each group has no in-band value, so its grid is its own min/max
 * and nothing needs an outlier slot. */
Test(kvq_quant, all_outlier_block)
{
    int T = 32, D = 128;
    kvq_layout L = mk_layout(T, D, 64, 32, KVQ_K_PER_CHANNEL, 0.01f);
    float *k = malloc(sizeof(float) * T * D), *v = malloc(sizeof(float) * T * D);
    float lo[128], hi[128];
    for (int c = 0; c < D; c++) {
        lo[c] = -1;
        hi[c] = 1;
    }
    for (int i = 0; i < T * D; i++) {
        k[i] = 10 + 10 * rnd_unif();
        v[i] = -10 - 10 * rnd_unif();
    }
    uint8_t *b;
    block_stats bs = quant_check(&L, k, v, D, T, lo, hi, lo, hi, &b);
    const kvq_block_hdr *h = kvq_chdr(b);
    cr_assert_eq(h->n_kout, (uint32_t)L.out_cap);
    cr_assert_eq(h->n_clamped, (uint32_t)(T * D - L.out_cap));
    cr_assert_eq(h->n_vout, 0);
    cr_assert_eq(bs.v.n_clamped_finite, 0);
    free(b);
    free(k);
    free(v);
}

/* A V value outside its channel band but inside its group's grid costs no
 * slot; one outside the grid does. */
Test(kvq_quant, v_candidate_inside_group_grid_is_not_outlier)
{
    int T = 2, D = 8;
    kvq_layout L = mk_layout(T, D, 8, 4, KVQ_K_PER_CHANNEL, 0.5f);
    float k[16] = { 0 }, v[16], vlo[8], vhi[8];
    for (int c = 0; c < D; c++) {
        vlo[c] = c < 4 ? -0.1f : -2.0f;
        vhi[c] = c < 4 ? 0.1f : 2.0f;
    }
    /* token 0, group 0 (channels 0-3, narrow bands): 1.5 and 9 flagged,
     * the grid is from {0.05, -0.05}; group 1 (wide bands) in range */
    float row0[8] = { 0.05f, -0.05f, 1.5f, 9.0f, 1.9f, -1.9f, 0.5f, 0.0f };
    float row1[8] = { 0.05f, -0.05f, 0.0f, 0.01f, 1.0f, -1.0f, 0.5f, 0.0f };
    memcpy(v, row0, sizeof row0);
    memcpy(v + 8, row1, sizeof row1);
    uint8_t *b;
    quant_check(&L, k, v, D, T, NULL, NULL, vlo, vhi, &b);
    const kvq_block_hdr *h = kvq_chdr(b);
    cr_assert_eq(h->n_vout, 2, "both flagged values are outside the tiny grid");
    /* channel 0 now has a wide band, so 1.6 there is in range and widens
     * the grid to [-0.05, 1.6]: 1.5 is inside it, 9 is not */
    vlo[0] = -2;
    vhi[0] = 2;
    v[0] = 1.6f;
    free(b);
    quant_check(&L, k, v, D, T, NULL, NULL, vlo, vhi, &b);
    h = kvq_chdr(b);
    cr_assert_eq(h->n_vout, 1);
    cr_assert_eq(kvq_out_idx(&L, b, 1, 0), 3u);
    free(b);
}

/* NaN -> code z (0.0), +-Inf -> grid ends; all counted as clamped, never
 * outliers. Outliers beyond the FP16 range are saturated. */
Test(kvq_quant, non_finite_and_fp16_saturation)
{
    int T = 4, D = 16;
    kvq_layout L = mk_layout(T, D, 16, 8, KVQ_K_PER_CHANNEL, 0.25f);
    float k[64], v[64], lo[16], hi[16];
    for (int c = 0; c < D; c++) {
        lo[c] = -1;
        hi[c] = 1;
    }
    for (int i = 0; i < 64; i++) {
        k[i] = 2 * rnd_unif() - 1;
        v[i] = 2 * rnd_unif() - 1;
    }
    k[3] = NAN;
    k[17] = INFINITY;
    k[18] = -INFINITY;
    k[40] = 1e6f; /* beyond FP16: stored as 65504 */
    v[5] = NAN;
    v[6] = -INFINITY;
    v[33] = -1e7f;
    uint8_t *b;
    block_stats bs = quant_check(&L, k, v, D, T, lo, hi, lo, hi, &b);
    cr_assert_eq(bs.k.n_bad, 3);
    cr_assert_eq(bs.v.n_bad, 2);
    float out[128];
    kvq_dequant_block(&L, b, out, out + 64, D);
    cr_assert_eq(out[3], 0.0f, "NaN dequantizes to 0");
    cr_assert_eq(out[64 + 5], 0.0f);
    cr_assert_eq(out[40], 65504.0f);
    cr_assert_eq(out[64 + 33], -65504.0f);
    for (int i = 0; i < 128; i++)
        cr_assert(isfinite(out[i]), "dequant %d not finite", i);
    free(b);
}

/* A block re-quantized with fewer tokens: tails zero (checked in
 * check_tensor), header reset; dequant of NULL tensors is a no-op. */
Test(kvq_quant, partial_block_rewrites_everything)
{
    int T = 128, D = 192;
    kvq_layout L = mk_layout(T, D, 64, 64, KVQ_K_PER_CHANNEL, 0.005f);
    float *k = malloc(sizeof(float) * T * D), *v = malloc(sizeof(float) * T * D);
    float lo[192], hi[192];
    fill_acts(k, T, D, D);
    fill_acts(v, T, D, D);
    minmax(k, T, D, D, lo, hi);
    uint8_t *b = block_alloc(&L), *scr = scratch_alloc(&L);
    for (int t = 0; t < 3; t++) {
        int n = t == 0 ? T : t == 1 ? 1 : 7;
        for (int c = 0; c < D; c++) /* narrow K range: outliers appear */
            hi[c] = lo[c] + 0.3f * (hi[c] - lo[c]);
        kvq_quantize_block(&L, b, k, v, D, n, lo, hi, NULL, NULL, scr);
        cr_assert_eq(kvq_chdr(b)->n_tok, (uint32_t)n);
        check_tensor(&L, b, 1, k, D, n, NULL, NULL, 0);
        check_tensor(&L, b, 0, v, D, n, NULL, NULL, 0);
    }
    kvq_dequant_block(&L, b, NULL, NULL, D);
    check_guard(b, L.bytes, "block");
    check_guard(scr, kvq_quantize_scratch_bytes(&L), "scratch");
    free(b);
    free(scr);
    free(k);
    free(v);
}

/* K per token (the naive baseline): per-(token, group) snapshots, no EMA,
 * no outliers, error <= s/2 everywhere, and the snapshot index t*(D/G)+c/G. */
Test(kvq_quant, k_per_token_mode)
{
    int T = 7, D = 96, G = 16;
    kvq_layout L = mk_layout(T, D, 48, G, KVQ_K_PER_TOKEN, 0.01f);
    cr_assert_eq(L.n_ksnap, T * D / G);
    float k[7 * 96], v[7 * 96];
    fill_acts(k, T, D, D);
    fill_acts(v, T, D, D);
    k[5 * D + 33] = 100.0f; /* a spike only widens its own group */
    uint8_t *b;
    block_stats bs = quant_check(&L, k, v, D, T, NULL, NULL, NULL, NULL, &b);
    cr_assert_eq(bs.k.n_out + bs.k.n_clamped_finite, 0);
    cr_assert_eq(kvq_chdr(b)->n_kout, 0);
    uint16_t s;
    uint8_t z;
    float mn = INFINITY, mx = -INFINITY;
    for (int c = 32; c < 48; c++) {
        mn = fminf(mn, k[5 * D + c]);
        mx = fmaxf(mx, k[5 * D + c]);
    }
    kvq_scale_zero(mn, mx, &s, &z);
    size_t si = (size_t)5 * (D / G) + 33 / G;
    cr_assert_eq(((const uint16_t *)(b + L.off_ks))[si], s);
    cr_assert_eq(kvq_zero_at(b + L.off_kz, si, L.k_zbits), z);
    free(b);
}
