/*
 * test_kvcache.c - the paged pool and the sequence lifecycle with synthetic
 * K/V: sinks stay FP16, warm-up chunks are staged then quantized, live
 * chunks go straight to INT4, the decode tail is quantized a block at a
 * time, the history always covers every position in order (no token
 * dropped), the pool refuses cleanly when full and gets every block back,
 * and the accounting is exact.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <string.h>

#include "engine/kv/kvcache.h"
#include "kernels/ktypes.h"

static const kvc_dims dims = {2, 16, 8, NULL}; /* 2 layers, 2 kv heads of 8 */

/* Arena sizes of a pool of global layers only (valid until the next call). */
static const kvc_pool_sizes *sizes(int64_t nq, int64_t nf)
{
    static kvc_pool_sizes sz;
    sz = (kvc_pool_sizes){.n_qblocks = {nq, 0}, .n_fpages = {nf, 0}};
    return &sz;
}
static char err[512];

static cfg_kv cfg(cfg_kv_mode mode)
{
    cfg_kv c = cfg_kv_default();
    c.mode = mode;
    c.chunk_size = 32;
    c.block_tokens = 16;
    c.warmup_chunks = 2;
    c.sink_tokens = 4;
    c.v_group = 8;
    return c;
}

/* value of element (pos, channel) for tensor t (0 K, 1 V), layer l */
static float val(int pos, int c, int t, int l)
{
    return sinf(0.37f * (float)pos + 1.3f * (float)c + (float)t + 0.5f * (float)l) *
           (1.0f + 0.1f * (float)c);
}

/* Runs one step of n tokens through the protocol. */
static int step(kvc_seq *s, int n, int prefill)
{
    int pos0 = kvc_seq_n_tokens(s);
    int rc = kvc_begin(s, pos0, n, prefill, err, sizeof err);
    if (rc < 0)
        return rc;
    float k[64 * 16], v[64 * 16];
    for (int l = 0; l < dims.n_layers; l++) {
        for (int i = 0; i < n; i++)
            for (int c = 0; c < dims.kv_dim; c++) {
                k[i * dims.kv_dim + c] = val(pos0 + i, c, 0, l);
                v[i * dims.kv_dim + c] = val(pos0 + i, c, 1, l);
            }
        kvc_store(s, l, k, v);
    }
    kvc_commit(s);
    return 0;
}

/* Checks the history covers 0..n_tokens-1 in order; counts kinds. */
static void check_cover(const kvc_seq *s, int *nq, int *nf)
{
    kvs_seg segs[256];
    for (int l = 0; l < dims.n_layers; l++) {
        int ns = kvc_segments(s, l, segs, 256);
        int pos = 0;
        *nq = *nf = 0;
        for (int i = 0; i < ns; i++) {
            cr_assert_eq(segs[i].pos0, pos, "segment %d starts at %d, expected %d", i,
                         segs[i].pos0, pos);
            cr_assert_gt(segs[i].n, 0);
            pos += segs[i].n;
            if (segs[i].kind == KVS_Q4)
                (*nq)++;
            else
                (*nf)++;
            if (segs[i].kind == KVS_F16) { /* FP16 holds the exact value (as fp16) */
                const uint16_t *k = segs[i].k;
                float x = kt_f16_to_f32(k[3]);
                cr_assert_float_eq(x, kt_f16_to_f32(kt_f32_to_f16(val(segs[i].pos0, 3, 0, l))),
                                   1e-6);
            }
        }
        cr_assert_eq(pos, kvc_seq_n_tokens(s));
    }
}

Test(kvcache, lifecycle_warmup_live_tail)
{
    cfg_kv c = cfg(CFG_KV_INT4);
    kvc_pool *p = NULL;
    kvc_seq *s = NULL;
    cr_assert_eq(kvc_pool_create(&c, &dims, sizes(64, 64), &p, err, sizeof err), 0, "%s", err);
    cr_assert_eq(kvc_seq_create(p, 512, &s, err, sizeof err), 0, "%s", err);
    int nq, nf;
    /* chunk 0: 4 sinks (FP16) + 28 staged */
    cr_assert_eq(step(s, 32, 1), 0, "%s", err);
    cr_assert(kvc_seq_warming(s));
    check_cover(s, &nq, &nf);
    cr_assert_eq(nq, 0);
    /* chunk 1 ends warm-up: everything but the sinks becomes INT4 */
    cr_assert_eq(step(s, 32, 1), 0, "%s", err);
    cr_assert(!kvc_seq_warming(s));
    check_cover(s, &nq, &nf);
    cr_assert_eq(nq, 4, "60 staged tokens -> 4 blocks of 16 (got %d)", nq);
    cr_assert_eq(nf, 1, "the sink page stays FP16");
    /* chunk 2: live */
    cr_assert_eq(step(s, 20, 1), 0, "%s", err);
    check_cover(s, &nq, &nf);
    cr_assert_eq(nq, 6);
    /* decode: 15 tokens stay in the FP16 tail, the 16th quantizes it */
    for (int i = 0; i < 15; i++)
        cr_assert_eq(step(s, 1, 0), 0, "%s", err);
    check_cover(s, &nq, &nf);
    cr_assert_eq(nq, 6);
    cr_assert_gt(nf, 1);
    cr_assert_eq(step(s, 1, 0), 0, "%s", err);
    check_cover(s, &nq, &nf);
    cr_assert_eq(nq, 7);
    cr_assert_eq(nf, 1);
    cr_assert_eq(kvc_seq_n_tokens(s), 100);
    float lo, hi;
    cr_assert_eq(kvc_seq_ema(s, 1, 0, &lo, &hi), 0);
    cr_assert(lo < hi && lo > -3 && hi < 3, "EMA range [%g, %g]", lo, hi);
    kvc_stats st;
    kvc_seq_stats(s, &st);
    cr_assert_eq(st.tokens, 100);
    cr_assert_eq(st.elements, 100 * 2 * 16 * 2);
    cr_assert_eq(st.bytes_fp16_equiv, st.elements * 2);
    cr_assert_eq(st.bytes_total, st.bytes_int4 + st.bytes_scales + st.bytes_outliers +
                                     st.bytes_fp16 + st.bytes_other);
    cr_assert_eq(st.n_quantized, 96 * 2 * 16 * 2, "every non-sink element is INT4");
    kvc_seq_destroy(s);
    kvc_stats ps;
    kvc_pool_stats(p, &ps);
    cr_assert_eq(ps.qblocks_used, 0, "blocks return to the pool");
    cr_assert_eq(ps.fpages_used, 0);
    kvc_pool_destroy(p);
}

Test(kvcache, short_prompt_ends_during_warmup)
{
    cfg_kv c = cfg(CFG_KV_INT4);
    kvc_pool *p = NULL;
    kvc_seq *s = NULL;
    cr_assert_eq(kvc_pool_create(&c, &dims, sizes(64, 64), &p, err, sizeof err), 0);
    cr_assert_eq(kvc_seq_create(p, 512, &s, err, sizeof err), 0);
    cr_assert_eq(step(s, 24, 1), 0, "%s", err);
    int nq, nf;
    check_cover(s, &nq, &nf);
    cr_assert_eq(nq, 0);
    /* the first decode step ends the prefill: staged tokens are quantized */
    cr_assert_eq(step(s, 1, 0), 0, "%s", err);
    check_cover(s, &nq, &nf);
    cr_assert_eq(nq, 2, "20 staged tokens -> 2 blocks");
    cr_assert_eq(kvc_finish_prefill(s, err, sizeof err), 0); /* idempotent */
    kvc_seq_destroy(s);
    /* keep_warmup_fp16: staged chunks stay FP16 */
    c.keep_warmup_fp16 = 1;
    kvc_pool_destroy(p);
    cr_assert_eq(kvc_pool_create(&c, &dims, sizes(64, 64), &p, err, sizeof err), 0);
    cr_assert_eq(kvc_seq_create(p, 512, &s, err, sizeof err), 0);
    cr_assert_eq(step(s, 32, 1), 0);
    cr_assert_eq(step(s, 32, 1), 0);
    cr_assert_eq(step(s, 32, 1), 0);
    check_cover(s, &nq, &nf);
    cr_assert_eq(nq, 2, "only the live chunk is INT4");
    kvc_seq_destroy(s);
    kvc_pool_destroy(p);
}

Test(kvcache, fp16_mode_and_accounting)
{
    cfg_kv c = cfg(CFG_KV_FP16);
    kvc_pool *p = NULL;
    kvc_seq *s = NULL;
    cr_assert_eq(kvc_pool_create(&c, &dims, sizes(0, 16), &p, err, sizeof err), 0, "%s", err);
    cr_assert_null(kvc_pool_layout(p));
    cr_assert_eq(kvc_seq_create(p, 256, &s, err, sizeof err), 0);
    cr_assert_eq(step(s, 32, 1), 0);
    cr_assert_eq(step(s, 5, 1), 0);
    for (int i = 0; i < 20; i++)
        cr_assert_eq(step(s, 1, 0), 0);
    int nq, nf;
    check_cover(s, &nq, &nf);
    cr_assert_eq(nq, 0);
    cr_assert_eq(nf, 4, "57 tokens in pages of 16");
    kvc_stats st;
    kvc_seq_stats(s, &st);
    cr_assert_eq(st.bytes_total, 4 * 16 * 2 * 16 * 2 * 2);
    cr_assert_float_eq(kvc_stats_bits(&st), 8.0 * (double)st.bytes_total / (57 * 2 * 16 * 2),
                       1e-9);
    kvc_seq_destroy(s);
    kvc_pool_destroy(p);
}

Test(kvcache, pool_exhaustion_is_an_error_not_a_crash)
{
    cfg_kv c = cfg(CFG_KV_INT4);
    kvc_pool *p = NULL;
    kvc_seq *a = NULL, *b = NULL;
    cr_assert_eq(kvc_pool_create(&c, &dims, sizes(5, 8), &p, err, sizeof err), 0);
    cr_assert_eq(kvc_seq_create(p, 4096, &a, err, sizeof err), 0);
    cr_assert_eq(kvc_seq_create(p, 4096, &b, err, sizeof err), 0);
    int rc = 0, steps = 0;
    while ((rc = step(a, 32, 1)) == 0)
        steps++;
    cr_assert_eq(rc, -ENOSPC, "%s", err);
    cr_assert(strstr(err, "exhausted") != NULL, "%s", err);
    int held = kvc_seq_n_tokens(a);
    cr_assert_eq(held, steps * 32, "a refused step leaves nothing behind");
    int nq, nf;
    check_cover(a, &nq, &nf);
    /* b may still stage a warm-up chunk in FP16 pages, but soon hits the
     * same wall, cleanly */
    int nb = 0;
    while ((rc = step(b, 32, 1)) == 0)
        nb++;
    cr_assert_eq(rc, -ENOSPC, "%s", err);
    cr_assert_eq(kvc_seq_n_tokens(b), nb * 32);
    check_cover(b, &nq, &nf);
    kvc_seq_reset(a);
    kvc_seq_reset(b);
    cr_assert_eq(step(b, 32, 1), 0, "freed blocks are reusable: %s", err);
    cr_assert_eq(kvc_begin(b, 7, 1, 0, err, sizeof err), -EINVAL); /* wrong position */
    cr_assert_eq(kvc_begin(b, 32, 33, 1, err, sizeof err), -EINVAL); /* > chunk */
    kvc_seq_destroy(a);
    kvc_seq_destroy(b);
    kvc_seq_destroy(NULL);
    kvc_pool_destroy(p);
    kvc_pool_destroy(NULL);
}

Test(kvcache, budget_planning)
{
    cfg_kv c = cfg(CFG_KV_INT4);
    kvc_pool_sizes sz;
    c.kv_budget_bytes = 1 << 20;
    cr_assert_eq(kvc_pool_plan(&c, &dims, 1024, 4, &sz, err, sizeof err), 0, "%s", err);
    cr_assert_gt(sz.n_qblocks[KVC_LAYER_GLOBAL], 0);
    cr_assert_eq(sz.n_qblocks[KVC_LAYER_WINDOW] + sz.n_fpages[KVC_LAYER_WINDOW], 0,
                 "no window layers, no window group");
    c.kv_budget_bytes = 100;
    cr_assert_lt(kvc_pool_plan(&c, &dims, 1024, 4, &sz, err, sizeof err), 0);
    cr_assert(strstr(err, "too small") != NULL, "%s", err);
    c = cfg(CFG_KV_FP16);
    c.kv_budget_tokens = 1000;
    cr_assert_eq(kvc_pool_plan(&c, &dims, 1024, 4, &sz, err, sizeof err), 0);
    cr_assert_eq(sz.n_fpages[KVC_LAYER_GLOBAL], (1000 + 15) / 16);
    c = cfg(CFG_KV_INT4);
    c.v_group = 3;
    cr_assert_lt(kvc_pool_plan(&c, &dims, 1024, 1, &sz, err, sizeof err), 0);
}

/* ---- window layers ---- */

#include "engine/kv/kv_plan.h"
#include "kernels/cpu/kcpu.h"

/* 3 layers: 0 a window layer, 1 a global layer holding the very same K/V
 * as layer 0, 2 a window layer with data of its own. */
#define WL 3
#define WD 16 /* kv_dim: 2 KV heads of 8 */
#define WH 4  /* query heads */

/* element (pos, c) of tensor t of layer l: layers 0 and 1 agree */
static float wval(int pos, int c, int t, int l)
{
    return val(pos, c, t, l == 1 ? 0 : l);
}

/* The attention of layer `layer` for the step's n queries at pos0 over the
 * sequence's segments plus the step's own K/V (as backend_cpu does), with
 * window W, by kcpu_attn_seg. */
static void win_attn(kvc_seq *s, const kvc_pool *p, kcpu_pool *tp, int layer, int W, int pos0,
                     int n, const float *q, const float *k, const float *v, float *out,
                     kvs_seg *segs, void *ws)
{
    int ns = kvc_segments(s, layer, segs, kvc_max_segments(s));
    segs[ns++] = (kvs_seg){KVS_F32, pos0, n, k, v, WD};
    kcpu_attn_seg(tp, out, q, pos0, n, W, segs, ns, kvc_layer_layout(p, layer), WH, WD / 8, 8,
                  0.35f, ws);
}

/* Brute-force reference over exactly positions [p - W + 1, p] of the
 * values as the segments store them (FP16 rounded, INT4 dequantized, the
 * step's own exact), or with `exact` of the values as they were before the
 * cache: every one of those positions must be there. */
static void win_ref(kvc_seq *s, const kvc_pool *p, int layer, int W, int pos0, int n,
                    const float *q, const float *k, const float *v, float *out, kvs_seg *segs,
                    int exact)
{
    static float dk[2048 * WD], dv[2048 * WD];
    static char have[2048];
    memset(have, 0, sizeof have);
    int ns = kvc_segments(s, layer, segs, kvc_max_segments(s));
    const kvq_layout *L = kvc_layer_layout(p, layer);
    for (int i = 0; i < ns; i++) {
        const kvs_seg *g = &segs[i];
        cr_assert_leq(g->pos0 + g->n, 2048);
        if (g->kind == KVS_Q4) {
            kvq_dequant_block(L, g->k, dk + (size_t)g->pos0 * WD, dv + (size_t)g->pos0 * WD,
                              WD);
        } else {
            for (int r = 0; r < g->n; r++)
                for (int c = 0; c < WD; c++) {
                    dk[(g->pos0 + r) * WD + c] = kt_f16_to_f32(((const uint16_t *)g->k)[r * WD + c]);
                    dv[(g->pos0 + r) * WD + c] = kt_f16_to_f32(((const uint16_t *)g->v)[r * WD + c]);
                }
        }
        memset(have + g->pos0, 1, (size_t)g->n);
    }
    memcpy(dk + (size_t)pos0 * WD, k, (size_t)n * WD * sizeof(float));
    memcpy(dv + (size_t)pos0 * WD, v, (size_t)n * WD * sizeof(float));
    memset(have + pos0, 1, (size_t)n);
    if (exact) /* the values before the cache: what quantization is measured against */
        for (int t = 0; t < pos0; t++)
            for (int c = 0; c < WD; c++) {
                dk[t * WD + c] = wval(t, c, 0, layer);
                dv[t * WD + c] = wval(t, c, 1, layer);
            }
    for (int j = 0; j < n; j++) {
        int pq = pos0 + j, lo = pq - W + 1 > 0 ? pq - W + 1 : 0;
        for (int t = lo; t <= pq; t++)
            cr_assert(have[t], "layer %d, query %d (window %d): position %d is not held", layer,
                      pq, W, t);
        for (int h = 0; h < WH; h++) {
            const float *qh = q + ((size_t)j * WH + h) * 8;
            int c0 = h / 2 * 8;
            double mx = -INFINITY, sum = 0, acc[8] = {0}, sc[2048];
            for (int t = lo; t <= pq; t++) {
                double d = 0;
                for (int c = 0; c < 8; c++)
                    d += (double)qh[c] * dk[t * WD + c0 + c];
                sc[t - lo] = d * 0.35;
                mx = fmax(mx, sc[t - lo]);
            }
            for (int t = lo; t <= pq; t++) {
                double w = exp(sc[t - lo] - mx);
                sum += w;
                for (int c = 0; c < 8; c++)
                    acc[c] += w * dv[t * WD + c0 + c];
            }
            for (int c = 0; c < 8; c++)
                out[((size_t)j * WH + h) * 8 + c] = (float)(acc[c] / sum);
        }
    }
}

/* Drives a pool with window layers through chunked prefill (queries that
 * span the window's bound) and decode: at every step the window layers'
 * attention over what the pool holds equals the reference over exactly
 * their last W positions (and, in FP16 mode, the global layer that holds
 * the same data gives the same output bit for bit); the window group's
 * units stay within kvp_window_need; the accounting by layer kind adds
 * up. Returns the window group's largest use. */
/* The window layers' code width (window_kv int2 .. int8) and, when not 0,
 * the block size (chunks of 2 blocks) window_drive uses; each Test runs in
 * a process of its own. */
static int g_wbits = 4, g_block = 0;
/* 1: no range clipping (clip_quantile 0, ema_clip 1e6), so that the error
 * against the exact values is the code width's, not the clamping's */
static int g_noclip = 0;
/* The largest |window attention - attention over the exact values| the
 * last window_drive saw. */
static double g_exact_err;

static void window_drive(cfg_kv_mode mode, cfg_kv_mode wmode, int W, int n_prompt, int piece,
                         int n_dec)
{
    cfg_kv c = cfg(mode);
    c.window_kv = wmode;
    c.window_bits = g_wbits;
    if (g_block) {
        c.block_tokens = g_block;
        c.chunk_size = 2 * g_block;
    }
    if (g_noclip) {
        c.clip_quantile = 0.0f;
        c.ema_clip = 1e6f;
    }
    g_exact_err = 0;
    int32_t win[WL] = {W, 0, W};
    kvc_dims d = {WL, WD, 8, win};
    kvc_pool_sizes sz;
    cr_assert_eq(kvc_pool_plan(&c, &d, 2048, 1, &sz, err, sizeof err), 0, "%s", err);
    kvc_pool *p = NULL;
    kvc_seq *s = NULL;
    cr_assert_eq(kvc_pool_create(&c, &d, &sz, &p, err, sizeof err), 0, "%s", err);
    cr_assert_eq(kvc_seq_create(p, 2048, &s, err, sizeof err), 0, "%s", err);
    kcpu_pool *tp = NULL;
    cr_assert_eq(kcpu_pool_create(2, &tp), 0);
    kvs_seg *segs = malloc((size_t)(kvc_max_segments(s) + 1) * sizeof *segs);
    void *ws = malloc(kcpu_attn_seg_scratch_bytes(2, kvc_layer_layout(p, 1), 8) +
                      kcpu_attn_seg_scratch_bytes(2, kvc_layer_layout(p, 0), 8));
    cr_assert(segs && ws);
    kvp_groups gr;
    kvp_layer_groups(&c, &d, &gr, NULL, NULL);
    int64_t hq, hf, pq, pf;
    kvp_window_need(&gr.cfg[KVC_LAYER_WINDOW], W, 2048, &hq, &hf, &pq, &pf);
    static float k[WL][64 * WD], v[WL][64 * WD], q[64 * WH * 8];
    static float got[64 * WH * 8], ref[64 * WH * 8], glob[64 * WH * 8];
    int total = n_prompt + n_dec, maxw = 0;
    for (int pos0 = 0; pos0 < total;) {
        int prefill = pos0 < n_prompt;
        int n = prefill ? n_prompt - pos0 : 1;
        int tb = c.chunk_size - pos0 % c.chunk_size;
        n = n < piece ? n : piece;
        n = n < tb ? n : tb;
        cr_assert_eq(kvc_begin(s, pos0, n, prefill, err, sizeof err), 0, "at %d: %s", pos0, err);
        int64_t fq, ff, tq, tf;
        kvc_pool_kind_units(p, KVC_LAYER_WINDOW, &fq, &ff, &tq, &tf);
        cr_assert(tq - fq <= (prefill ? pq : hq) && tf - ff <= (prefill ? pf : hf),
                  "at %d: the window layers hold %lld blocks / %lld pages (bound %lld / %lld)",
                  pos0, (long long)(tq - fq), (long long)(tf - ff),
                  (long long)(prefill ? pq : hq), (long long)(prefill ? pf : hf));
        for (int l = 0; l < WL; l++)
            for (int i = 0; i < n; i++)
                for (int ch = 0; ch < WD; ch++) {
                    k[l][i * WD + ch] = wval(pos0 + i, ch, 0, l);
                    v[l][i * WD + ch] = wval(pos0 + i, ch, 1, l);
                }
        for (int i = 0; i < n * WH * 8; i++)
            q[i] = sinf(0.71f * (float)(pos0 * 131 + i)) * 1.5f;
        for (int l = 0; l < WL; l += 2) { /* the window layers */
            win_attn(s, p, tp, l, W, pos0, n, q, k[l], v[l], got, segs, ws);
            win_ref(s, p, l, W, pos0, n, q, k[l], v[l], ref, segs, 0);
            for (int i = 0; i < n * WH * 8; i++)
                cr_assert(fabsf(got[i] - ref[i]) <= 2e-5f + 2e-4f * fabsf(ref[i]),
                          "layer %d at %d (+%d of %d), element %d: %g vs %g", l, pos0,
                          i / (WH * 8), n, i % (WH * 8), (double)got[i], (double)ref[i]);
            win_ref(s, p, l, W, pos0, n, q, k[l], v[l], ref, segs, 1);
            for (int i = 0; i < n * WH * 8; i++)
                g_exact_err = fmax(g_exact_err, fabs((double)got[i] - (double)ref[i]));
        }
        if (wmode == CFG_KV_FP16 && mode == CFG_KV_FP16) {
            /* the global layer holds everything: with the window it must
             * give what the window layer gives */
            win_attn(s, p, tp, 0, W, pos0, n, q, k[0], v[0], got, segs, ws);
            win_attn(s, p, tp, 1, W, pos0, n, q, k[1], v[1], glob, segs, ws);
            cr_assert_eq(memcmp(got, glob, (size_t)n * WH * 8 * sizeof(float)), 0,
                         "at %d: window layer vs the global layer with the same data", pos0);
        }
        for (int l = 0; l < WL; l++)
            kvc_store(s, l, k[l], v[l]);
        kvc_commit(s);
        pos0 += n;
        kvc_pool_kind_units(p, KVC_LAYER_WINDOW, &fq, &ff, &tq, &tf);
        maxw = (int)(tq - fq + tf - ff) > maxw ? (int)(tq - fq + tf - ff) : maxw;
    }
    /* accounting: kinds add up; the global layer holds every position, the
     * window layers about their window */
    kvc_stats st, ps;
    kvc_seq_stats(s, &st);
    const kvc_kind_stats *g = &st.layer_kind[KVC_LAYER_GLOBAL];
    const kvc_kind_stats *w = &st.layer_kind[KVC_LAYER_WINDOW];
    cr_assert_eq(st.tokens, total);
    cr_assert_eq(g->layers, 1);
    cr_assert_eq(w->layers, 2);
    cr_assert_eq(g->tokens, total);
    cr_assert_leq(w->tokens, total);
    if (W < total - 64)
        cr_assert_lt(w->tokens, total, "the window layers dropped what they no longer see");
    cr_assert_eq(g->elements, (int64_t)total * 1 * WD * 2);
    cr_assert_eq(w->elements, w->tokens * 2 * WD * 2);
    cr_assert_eq(st.elements, g->elements + w->elements);
    cr_assert_eq(st.bytes_total, g->bytes_total + w->bytes_total);
    cr_assert_eq(st.bytes_fp16, g->bytes_fp16 + w->bytes_fp16);
    cr_assert_eq(st.bytes_int4, g->bytes_int4 + w->bytes_int4);
    cr_assert_eq(st.qblocks_used, g->qblocks_used + w->qblocks_used);
    cr_assert_eq(st.fpages_used, g->fpages_used + w->fpages_used);
    cr_assert_eq(st.bytes_fp16_equiv, st.elements * 2);
    if (wmode == CFG_KV_FP16 || mode == CFG_KV_FP16)
        cr_assert_eq(w->qblocks_used + w->bytes_int4, 0, "window layers in FP16 pages");
    cr_assert_float_eq(kvc_stats_kind_bits(&st, KVC_LAYER_GLOBAL),
                       8.0 * (double)g->bytes_total / (double)g->elements, 1e-12);
    kvc_pool_stats(p, &ps);
    cr_assert_eq(ps.bytes_total, st.bytes_total, "one sequence: the pool's bytes are its");
    cr_assert_eq(ps.layer_kind[KVC_LAYER_WINDOW].bytes_total, w->bytes_total);
    cr_assert_eq(ps.layer_kind[KVC_LAYER_WINDOW].qblocks_total, sz.n_qblocks[KVC_LAYER_WINDOW]);
    cr_assert_eq(ps.n_quantized, st.n_quantized);
    if (mode == CFG_KV_INT4) { /* the INT4 elements held, by the block headers */
        int64_t nq = 0;
        for (int l = 0; l < WL; l++) {
            kvc_layer_counts lc;
            cr_assert_eq(kvc_seq_layer_counts(s, l, &lc), 0);
            nq += lc.n_quantized;
        }
        cr_assert_eq(st.n_quantized, nq, "counters of the blocks held: %lld vs %lld",
                     (long long)st.n_quantized, (long long)nq);
    }
    kvc_seq_destroy(s);
    kvc_pool_stats(p, &ps);
    cr_assert_eq(ps.qblocks_used + ps.fpages_used, 0, "every unit back in the pool");
    kvc_pool_destroy(p);
    kcpu_pool_destroy(tp);
    free(segs);
    free(ws);
    (void)maxw;
}

Test(kvcache, window_layers_fp16, .timeout = 120)
{
    /* windows below, at and past the history; whole chunks, pieces of 7
     * (queries spanning the bound), decode */
    static const int wins[] = {5, 24, 40, 100, 2000};
    for (size_t i = 0; i < sizeof wins / sizeof wins[0]; i++) {
        window_drive(CFG_KV_FP16, CFG_KV_FP16, wins[i], 96, 32, 60);
        window_drive(CFG_KV_INT4, CFG_KV_FP16, wins[i], 96, 7, 60);
    }
}

Test(kvcache, window_layers_int4, .timeout = 120)
{
    static const int wins[] = {5, 24, 40, 100, 2000};
    for (size_t i = 0; i < sizeof wins / sizeof wins[0]; i++) {
        window_drive(CFG_KV_INT4, CFG_KV_INT4, wins[i], 96, 32, 60);
        window_drive(CFG_KV_INT4, CFG_KV_INT4, wins[i], 20, 32, 40); /* prompt ends in warm-up */
    }
}

/* window_kv = int8 (and int2, int3): the window layers' blocks hold codes
 * of that width (the global layer keeps 4 bits), attention over them
 * equals the reference over the dequantized values, and against the exact
 * values an 8-bit window is far closer than a 4-bit one. With blocks of 64
 * the window group's blocks are 16 (kvp_layer_groups): its re-quantization
 * and decode tail fold at its own block size. */
Test(kvcache, window_layers_int8, .timeout = 120)
{
    static const int wins[] = {5, 24, 40, 100, 2000};
    static const int blocks[] = {0, 64};
    for (size_t b = 0; b < 2; b++) {
        g_block = blocks[b];
        double e8 = 0, e4 = 0;
        for (size_t i = 0; i < sizeof wins / sizeof wins[0]; i++) {
            g_wbits = 8;
            g_noclip = 0; /* the defaults: equal to the dequantized reference */
            window_drive(CFG_KV_INT4, CFG_KV_INT4, wins[i], 96 + 3 * g_block, 32, 60);
            g_noclip = 1; /* and against the exact values, the width's error */
            window_drive(CFG_KV_INT4, CFG_KV_INT4, wins[i], 96 + 3 * g_block, 32, 60);
            e8 = fmax(e8, g_exact_err);
            g_wbits = 4;
            window_drive(CFG_KV_INT4, CFG_KV_INT4, wins[i], 96 + 3 * g_block, 32, 60);
            e4 = fmax(e4, g_exact_err);
        }
        g_noclip = 0;
        g_wbits = 8;
        window_drive(CFG_KV_INT4, CFG_KV_INT4, 40, 20, 32, 40); /* prompt ends in warm-up */
        fprintf(stderr, "window layers vs exact values (blocks %d): int8 %.3g, int4 %.3g\n",
                g_block ? g_block : 16, e8, e4);
        /* attention outputs up to ~2; measured int8 0.011 / 0.007, int4
         * 0.14 / 0.17 (with the default clipping both are ~0.04-0.16: the
         * clamping of this synthetic data bounds them, not the width) */
        cr_assert_lt(e8, 0.02, "int8 window attention within 0.02 of exact: %g", e8);
        cr_assert_lt(e8 * 8, e4, "int8 (%g) well below int4 (%g)", e8, e4);
    }
    g_block = 0;
    g_wbits = 2;
    window_drive(CFG_KV_INT4, CFG_KV_INT4, 24, 96, 7, 20);
    g_wbits = 3;
    window_drive(CFG_KV_INT4, CFG_KV_INT4, 24, 96, 7, 20);
    /* the window group's layout has the window width, the global layer 4 */
    cfg_kv c = cfg(CFG_KV_INT4);
    c.window_kv = CFG_KV_INT4;
    c.window_bits = 8;
    c.block_tokens = 64;
    c.chunk_size = 128;
    int32_t win[WL] = {40, 0, 40};
    kvc_dims d = {WL, WD, 8, win};
    kvc_pool_sizes sz;
    cr_assert_eq(kvc_pool_plan(&c, &d, 2048, 1, &sz, err, sizeof err), 0, "%s", err);
    kvc_pool *p = NULL;
    cr_assert_eq(kvc_pool_create(&c, &d, &sz, &p, err, sizeof err), 0, "%s", err);
    const kvq_layout *lw = kvc_layer_layout(p, 0), *lg = kvc_layer_layout(p, 1);
    cr_assert(lw && lg);
    cr_assert_eq(lw->k_bits, 8);
    cr_assert_eq(lw->v_bits, 8);
    cr_assert_eq(lw->block_tokens, 16);
    cr_assert_eq(lg->k_bits, 4);
    cr_assert_eq(lg->block_tokens, 64);
    kvc_pool_destroy(p);
}

/* Bounded: 20 chunks and 300 decode steps; the window layers' units never
 * exceed their bound (window_drive checks at every step). */
Test(kvcache, window_layers_bounded_long, .timeout = 120)
{
    window_drive(CFG_KV_INT4, CFG_KV_FP16, 40, 20 * 32, 32, 300);
    window_drive(CFG_KV_INT4, CFG_KV_INT4, 40, 20 * 32, 32, 300);
}

/* Sequences of several widths in one shared pool (kv_modes) hold exactly
 * what a pool of their mode alone holds: the same segments (kind,
 * positions) and the same bytes in every block and page, layer by layer,
 * however their steps interleave and wherever their units live. */
Test(kvcache, shared_pool_bit_identical_to_single_mode)
{
    static const char *const names[] = {"int3", "k4v2", "fp16", "int4"};
    enum { NM = 4 };
    cfg_kv sc = cfg(CFG_KV_INT4);
    int ids[NM];
    for (int i = 0; i < NM; i++) {
        cr_assert_eq(cfg_kv_mode_parse(names[i], &ids[i]), 0);
        sc.modes |= 1u << ids[i];
    }
    kvc_pool_sizes sz;
    cr_assert_eq(kvc_pool_plan(&sc, &dims, 256, NM, &sz, err, sizeof err), 0, "%s", err);
    kvc_pool *sp = NULL;
    cr_assert_eq(kvc_pool_create(&sc, &dims, &sz, &sp, err, sizeof err), 0, "%s", err);
    kvc_seq *ss[NM], *one[NM];
    kvc_pool *op[NM];
    for (int i = 0; i < NM; i++) {
        cr_assert_eq(kvc_seq_create(sp, 256, &ss[i], err, sizeof err), 0, "%s", err);
        cr_assert_eq(kvc_seq_set_mode(ss[i], ids[i], err, sizeof err), 0, "%s", err);
        cfg_kv c1 = cfg_kv_with_mode(&sc, ids[i]);
        c1.modes = 0;
        kvc_pool_sizes z1;
        cr_assert_eq(kvc_pool_plan(&c1, &dims, 256, 1, &z1, err, sizeof err), 0, "%s", err);
        cr_assert_eq(kvc_pool_create(&c1, &dims, &z1, &op[i], err, sizeof err), 0, "%s", err);
        cr_assert_eq(kvc_seq_create(op[i], 256, &one[i], err, sizeof err), 0, "%s", err);
        cr_assert_eq(kvc_seq_mode(one[i]), ids[i]);
    }
    /* interleaved: 3 prompt chunks, then 40 decode steps, mode by mode */
    for (int t = 0; t < 3 + 40; t++)
        for (int i = 0; i < NM; i++) {
            cr_assert_eq(step(ss[i], t < 3 ? 32 : 1, t < 3), 0, "%s step %d: %s", names[i], t,
                         err);
        }
    for (int i = 0; i < NM; i++)
        for (int t = 0; t < 3 + 40; t++)
            cr_assert_eq(step(one[i], t < 3 ? 32 : 1, t < 3), 0, "%s alone: %s", names[i], err);
    kvs_seg a[256], b[256];
    for (int i = 0; i < NM; i++) {
        for (int l = 0; l < dims.n_layers; l++) {
            int na = kvc_segments(ss[i], l, a, 256), nb = kvc_segments(one[i], l, b, 256);
            cr_assert_eq(na, nb, "%s layer %d: %d segments vs %d", names[i], l, na, nb);
            const kvq_layout *L = kvc_seq_layer_layout(ss[i], l);
            for (int j = 0; j < na; j++) {
                cr_assert(a[j].kind == b[j].kind && a[j].pos0 == b[j].pos0 && a[j].n == b[j].n,
                          "%s layer %d segment %d", names[i], l, j);
                if (a[j].kind == KVS_Q4) {
                    cr_assert_eq(memcmp(a[j].k, b[j].k, L->bytes), 0,
                                 "%s layer %d block %d differs", names[i], l, j);
                } else {
                    size_t nbytes = (size_t)a[j].n * (size_t)dims.kv_dim * 2;
                    cr_assert_eq(memcmp(a[j].k, b[j].k, nbytes), 0, "%s page %d K", names[i], j);
                    cr_assert_eq(memcmp(a[j].v, b[j].v, nbytes), 0, "%s page %d V", names[i], j);
                }
            }
        }
        kvc_stats x, y;
        kvc_seq_stats(ss[i], &x);
        kvc_seq_stats(one[i], &y);
        cr_assert_eq(x.bytes_total, y.bytes_total, "%s bytes %lld vs %lld", names[i],
                     (long long)x.bytes_total, (long long)y.bytes_total);
        cr_assert_eq(x.n_outliers, y.n_outliers);
    }
    for (int i = 0; i < NM; i++) {
        kvc_seq_destroy(ss[i]);
        kvc_seq_destroy(one[i]);
        kvc_pool_destroy(op[i]);
    }
    kvc_pool_destroy(sp);
}
