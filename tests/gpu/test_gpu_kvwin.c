/*
 * test_gpu_kvwin.c - the GPU KV executor (engine/kv/kvcache_cuda.c) against
 * the CPU one (engine/kv/kvcache.c) on the same steps, with sliding-window
 * layers (a layer group of the pool of their own, dropping what the window
 * passed): a small 4-layer model (windows W, 0, W, W; 2 KV heads of 16),
 * chunks of 32, blocks of 16, 4 sinks, 2 warm-up chunks, a 100-token prompt
 * in chunks, then decode through several tail re-quantizations. Both caches
 * get the same random K/V at every step; checked at every step:
 *  - the committed history of every layer: the same entries (kind,
 *    positions, unit id) and the same bytes (every INT4 block byte for
 *    byte; the rows of every FP16 page): the GPU's statistics, EMA and
 *    quantizer are bit-exact with the CPU's (tests/gpu/test_gpu_kvq.c), and
 *    one planner decides for both;
 *  - the attention of every layer (its window, or none) over that history
 *    plus the step's own K/V: kcu_attn (generic kernel) against
 *    kcpu_attn_seg, within ATOL_ATT * vmax + RTOL_ATT |ref| (each is within
 *    2e-5 * vmax + 2e-4 of the double-precision oracle, tests/kernels and
 *    test_gpu_attn);
 *  - the accounting (kvc_stats: bytes by storage kind and by layer kind,
 *    positions held, the INT4 counters of the blocks held) equal field by
 *    field, and the window group's units within its bound.
 * Modes: global INT4 with window layers in FP16 (the default window_kv)
 * and in INT4 or INT8 (window blocks of 16 whatever the global blocks), and
 * FP16 everywhere; windows below the history and past it.
 */
#include "tests/gpu/gpu_test.h"

#include "engine/kv/kv_plan.h"
#include "engine/kv/kvcache.h"
#include "engine/kv/kvcache_cuda.h"
#include "kernels/cpu/kcpu.h"
#include "kernels/cuda/kcu_attn.cuh"
#include "kernels/ktypes.h"

#define ATOL_ATT 4e-5
#define RTOL_ATT 4e-4

#define NL 4
#define HD 16
#define NKV 2
#define D (NKV * HD)
#define NH 4
#define MAXN 32
#define CTX 512

static int n_fail_steps;
static int block_tokens = 16; /* 32: the FP16 window pages (16) are smaller than a block */
static int window_bits = 4;   /* window_kv = int<this> when the window layers are quantized */

static cfg_kv win_cfg(cfg_kv_mode mode, cfg_kv_mode wmode)
{
    cfg_kv c = cfg_kv_default();
    c.mode = mode;
    c.window_kv = wmode;
    c.window_bits = window_bits;
    c.chunk_size = 32;
    c.block_tokens = block_tokens;
    c.warmup_chunks = 2;
    c.sink_tokens = 4;
    c.v_group = 8;
    return c;
}

/* Layer l's history on both sides, entry by entry and byte by byte. */
static void same_history(kvc_seq *cs, const kvc_pool *cp, kvcd_seq *gs, const kvcd_pool *gp,
                         int l, int at, const char *what)
{
    static kvs_seg segs[1024];
    int ns = kvc_segments(cs, l, segs, 1024), li, gn;
    int g = kvcd_layer_group(gp, l, &li);
    const kcu_seg *gsg = kvcd_seq_host_segs(gs, g, &gn);
    GT_CHECK(ns == gn, "%s, step at %d, layer %d: %d segments on the CPU, %d on the GPU", what,
             at, l, ns, gn);
    if (ns != gn)
        return;
    const kcu_kv_arena *A = kvcd_group_arena(gp, g);
    const kvq_layout *L = kvc_layer_layout(cp, l);
    static uint8_t buf[1 << 16];
    for (int i = 0; i < ns; i++) {
        const kvs_seg *c = &segs[i];
        const kcu_seg *d = &gsg[i];
        GT_CHECK(c->kind == d->kind && c->pos0 == d->pos0 && c->n == d->n,
                 "%s, step at %d, layer %d, segment %d: cpu (%d, %d, +%d) gpu (%d, %d, +%d)",
                 what, at, l, i, c->kind, c->pos0, c->n, d->kind, d->pos0, d->n);
        if (c->kind == KVS_Q4) {
            gt_down(buf, A->qarena + (size_t)d->id * A->q_stride + (size_t)li * A->q_layer,
                    L->bytes);
            GT_CHECK(memcmp(buf, c->k, L->bytes) == 0,
                     "%s, step at %d, layer %d: INT4 block %d (positions %d +%d) differs", what,
                     at, l, d->id, d->pos0, d->n);
        } else {
            const char *pk = A->farena + (size_t)d->id * A->f_stride + (size_t)li * A->f_layer;
            size_t rows = (size_t)c->n * D * sizeof(uint16_t);
            gt_down(buf, pk, rows);
            gt_down(buf + rows, pk + (size_t)A->page_tokens * D * sizeof(uint16_t), rows);
            GT_CHECK(memcmp(buf, c->k, rows) == 0 && memcmp(buf + rows, c->v, rows) == 0,
                     "%s, step at %d, layer %d: FP16 page %d (positions %d +%d) differs", what,
                     at, l, d->id, d->pos0, d->n);
        }
    }
}

static void same_stats(const kvc_stats *a, const kvc_stats *b, int at, const char *what)
{
    GT_CHECK(a->tokens == b->tokens && a->elements == b->elements &&
                 a->bytes_total == b->bytes_total && a->bytes_int4 == b->bytes_int4 &&
                 a->bytes_fp16 == b->bytes_fp16 && a->bytes_scales == b->bytes_scales &&
                 a->bytes_outliers == b->bytes_outliers && a->bytes_other == b->bytes_other &&
                 a->qblocks_used == b->qblocks_used && a->fpages_used == b->fpages_used,
             "%s, after the step at %d: cpu %lld tokens %lld bytes %lld blocks, gpu %lld "
             "tokens %lld bytes %lld blocks", what, at, (long long)a->tokens,
             (long long)a->bytes_total, (long long)a->qblocks_used, (long long)b->tokens,
             (long long)b->bytes_total, (long long)b->qblocks_used);
    GT_CHECK(a->n_quantized == b->n_quantized && a->n_outliers == b->n_outliers &&
                 a->n_clamped == b->n_clamped,
             "%s, after the step at %d: INT4 counters cpu %lld/%lld/%lld gpu %lld/%lld/%lld",
             what, at, (long long)a->n_quantized, (long long)a->n_outliers,
             (long long)a->n_clamped, (long long)b->n_quantized, (long long)b->n_outliers,
             (long long)b->n_clamped);
    for (int k = 0; k < KVC_LAYER_KINDS; k++)
        GT_CHECK(memcmp(&a->layer_kind[k], &b->layer_kind[k], sizeof a->layer_kind[k]) == 0,
                 "%s, after the step at %d: layer kind %d accounting differs (cpu %lld bytes "
                 "%lld positions, gpu %lld bytes %lld positions)", what, at, k,
                 (long long)a->layer_kind[k].bytes_total, (long long)a->layer_kind[k].tokens,
                 (long long)b->layer_kind[k].bytes_total, (long long)b->layer_kind[k].tokens);
}

static void run(cfg_kv_mode mode, cfg_kv_mode wmode, int W, int n_prompt, int n_dec)
{
    char what[96], err[512] = "";
    snprintf(what, sizeof what, "kv_cache %s, window_kv %s, blocks %d, W %d",
             mode ? "int4" : "fp16", wmode ? (window_bits == 8 ? "int8" : "int4") : "fp16",
             block_tokens, W);
    cfg_kv c = win_cfg(mode, wmode);
    const int32_t win[NL] = {W, 0, W, W};
    kvc_dims d = {NL, D, HD, win};
    kvc_pool_sizes sz;
    GT_OK(kvc_pool_plan(&c, &d, CTX, 1, &sz, err, sizeof err));
    kvc_pool *cp = NULL;
    kvc_seq *cs = NULL;
    kvcd_pool *gp = NULL;
    kvcd_seq *gs = NULL;
    GT_OK(kvc_pool_create(&c, &d, &sz, &cp, err, sizeof err));
    GT_OK(kvcd_pool_create(gt_c, &c, &d, &sz, &gp, err, sizeof err));
    if (!cp || !gp)
        return;
    GT_OK(kvc_seq_create(cp, CTX, &cs, err, sizeof err));
    GT_OK(kvcd_seq_create(gp, CTX, &gs, err, sizeof err));
    if (!cs || !gs)
        return;
    kvp_groups gr;
    kvp_layer_groups(&c, &d, &gr, NULL, NULL);
    int64_t hq, hf, pq, pf;
    kvp_window_need(&gr.cfg[KVC_LAYER_WINDOW], W, CTX, &hq, &hf, &pq, &pf);
    /* K/V around per-channel centres with a few outliers; the queries */
    static float k[NL][MAXN * D], v[NL][MAXN * D], q[MAXN * NH * HD];
    static float oc[MAXN * NH * HD], og[MAXN * NH * HD];
    static kvs_seg segs[1024];
    float mu[D];
    for (int ch = 0; ch < D; ch++)
        mu[ch] = gt_unif(-1.0f, 1.0f);
    float *dk = gt_up(NULL, sizeof k[0]), *dv = gt_up(NULL, sizeof v[0]);
    float *dq = gt_up(NULL, sizeof q), *dout = gt_up(NULL, sizeof og);
    kcu_seg *dsegs = gt_up(NULL, 1024 * sizeof(kcu_seg));
    kcu_attn_item *ditem = gt_up(NULL, sizeof(kcu_attn_item));
    kcu_attn_shape sh0 = {NH, NKV, HD, 0.25f, NULL, 0};
    size_t scr_bytes = kcu_attn_scratch_bytes(&sh0, 1, MAXN, MAXN);
    void *dscr = gt_up(NULL, scr_bytes);
    void *ws = malloc(kcpu_attn_seg_scratch_bytes(1, kvc_pool_layout(cp) ? kvc_pool_layout(cp)
                                                                        : kvc_layer_layout(cp, 0),
                                                  HD) +
                      kcpu_attn_seg_scratch_bytes(1, kvc_layer_layout(cp, 0), HD));
    int total = n_prompt + n_dec, fails0 = gt_fails;
    for (int at = 0; at < total && gt_fails == fails0;) {
        int prefill = at < n_prompt;
        int n = prefill ? n_prompt - at : 1;
        int tb = c.chunk_size - at % c.chunk_size;
        n = n < tb ? n : tb;
        int rc1 = kvc_begin(cs, at, n, prefill, err, sizeof err);
        GT_CHECK(rc1 == 0, "%s: cpu begin at %d: %s", what, at, err);
        int rc2 = kvcd_begin(gs, at, n, prefill, err, sizeof err);
        GT_CHECK(rc2 == 0, "%s: gpu begin at %d: %s", what, at, err);
        if (rc1 || rc2)
            break;
        int64_t fq, ff, tq, tf;
        kvcd_pool_kind_units(gp, KVC_LAYER_WINDOW, &fq, &ff, &tq, &tf);
        GT_CHECK(tq - fq <= (prefill ? pq : hq) && tf - ff <= (prefill ? pf : hf),
                 "%s: at %d the window layers hold %lld blocks / %lld pages", what, at,
                 (long long)(tq - fq), (long long)(tf - ff));
        for (int i = 0; i < n * NH * HD; i++)
            q[i] = gt_unif(-2.0f, 2.0f);
        float vmax = 0.0f;
        for (int l = 0; l < NL; l++)
            for (int i = 0; i < n * D; i++) {
                float o = gt_u32() % 97 == 0 ? 6.0f : 1.0f;
                k[l][i] = mu[i % D] + o * gt_unif(-0.8f, 0.8f);
                v[l][i] = -mu[i % D] + o * gt_unif(-0.8f, 0.8f);
                vmax = fmaxf(vmax, fabsf(v[l][i]));
            }
        GT_OK(kcu_h2d(gt_c, dq, q, (size_t)n * NH * HD * sizeof(float), gt_err, sizeof gt_err));
        for (int l = 0; l < NL; l++) {
            same_history(cs, cp, gs, gp, l, at, what);
            /* attention of layer l: CPU kernels vs the GPU's generic kernel */
            int ns = kvc_segments(cs, l, segs, 1023);
            segs[ns++] = (kvs_seg){KVS_F32, at, n, k[l], v[l], D};
            kcpu_attn_seg(NULL, oc, q, at, n, win[l], segs, ns, kvc_layer_layout(cp, l), NH, NKV,
                          HD, 0.25f, ws);
            int li, g = kvcd_layer_group(gp, l, &li), gn;
            const kcu_seg *hs = kvcd_seq_host_segs(gs, g, &gn);
            if (gn > 0)
                GT_OK(kcu_h2d(gt_c, dsegs, hs, (size_t)gn * sizeof *hs, gt_err, sizeof gt_err));
            kcu_attn_item it = {0, gn, at, n, 0, 0, {0, 0}};
            GT_OK(kcu_h2d(gt_c, ditem, &it, sizeof it, gt_err, sizeof gt_err));
            GT_OK(kcu_h2d(gt_c, dk, k[l], (size_t)n * D * sizeof(float), gt_err, sizeof gt_err));
            GT_OK(kcu_h2d(gt_c, dv, v[l], (size_t)n * D * sizeof(float), gt_err, sizeof gt_err));
            kcu_attn_shape sh = {NH, NKV, HD, 0.25f, kvcd_group_layout(gp, g), win[l]};
            GT_OK(kcu_attn(gt_c, &sh, kvcd_group_arena(gp, g), li, &it, ditem, 1, dsegs, dq,
                           dout, dk, dv, KCU_ATTN_GENERIC, dscr, scr_bytes, gt_err,
                           sizeof gt_err));
            gt_down(og, dout, (size_t)n * NH * HD * sizeof(float));
            char w2[160];
            snprintf(w2, sizeof w2, "%s: attention of layer %d (window %d) at %d", what, l,
                     win[l], at);
            gt_close(w2, og, oc, (size_t)n * NH * HD, ATOL_ATT * vmax, RTOL_ATT);
            /* the step's K/V into both caches */
            kvc_store(cs, l, k[l], v[l]);
            GT_OK(kvcd_store(gs, l, dk, dv, err, sizeof err));
        }
        kvc_commit(cs);
        kvcd_commit(gs);
        kvc_stats a, b;
        kvc_seq_stats(cs, &a);
        GT_OK(kvcd_seq_stats(gs, &b, err, sizeof err));
        same_stats(&a, &b, at, what);
        for (int l = 0; l < NL; l++) {
            float lo1, hi1, lo2, hi2;
            int e1 = kvc_seq_ema(cs, l, 1, &lo1, &hi1);
            int e2 = kvcd_seq_ema_mean(gs, l, 1, &lo2, &hi2);
            GT_CHECK(e1 == e2 && (e1 < 0 || (lo1 == lo2 && hi1 == hi2)),
                     "%s: after the step at %d, layer %d's V range: cpu [%g, %g] gpu [%g, %g]",
                     what, at, l, (double)lo1, (double)hi1, (double)lo2, (double)hi2);
        }
        at += n;
    }
    if (gt_fails != fails0)
        n_fail_steps++;
    kvc_stats a;
    kvc_seq_stats(cs, &a);
    if (W < total - 64)
        GT_CHECK(a.layer_kind[KVC_LAYER_WINDOW].tokens < total,
                 "%s: the window layers hold %lld of %d positions", what,
                 (long long)a.layer_kind[KVC_LAYER_WINDOW].tokens, total);
    kvcd_seq_destroy(gs);
    kvc_seq_destroy(cs);
    kvc_stats ps;
    GT_OK(kvcd_pool_stats(gp, &ps, err, sizeof err));
    GT_CHECK(ps.qblocks_used + ps.fpages_used == 0, "%s: units left in the GPU pool", what);
    kvcd_pool_destroy(gp);
    kvc_pool_destroy(cp);
    kcu_free(gt_c, dk);
    kcu_free(gt_c, dv);
    kcu_free(gt_c, dq);
    kcu_free(gt_c, dout);
    kcu_free(gt_c, dsegs);
    kcu_free(gt_c, ditem);
    kcu_free(gt_c, dscr);
    free(ws);
}

static void case_window_fp16(void)
{
    run(CFG_KV_INT4, CFG_KV_FP16, 24, 100, 60);
    run(CFG_KV_FP16, CFG_KV_FP16, 24, 100, 40);
    run(CFG_KV_INT4, CFG_KV_FP16, 1000, 70, 20);
    /* blocks of 32: the window layers' FP16 pages stay 16 positions */
    block_tokens = 32;
    run(CFG_KV_INT4, CFG_KV_FP16, 40, 100, 40);
    run(CFG_KV_FP16, CFG_KV_FP16, 40, 100, 40);
    block_tokens = 16;
}

static void case_window_int4(void)
{
    run(CFG_KV_INT4, CFG_KV_INT4, 24, 100, 60);
    run(CFG_KV_INT4, CFG_KV_INT4, 5, 40, 40);    /* a window shorter than a block */
    run(CFG_KV_INT4, CFG_KV_INT4, 24, 20, 40);   /* the prompt ends during warm-up */
    /* blocks of 32: the quantized window layers' blocks stay 16 positions
     * (two of them a chunk: the GPU's quantizer scratch is the window
     * group's) */
    block_tokens = 32;
    run(CFG_KV_INT4, CFG_KV_INT4, 40, 100, 60);
    block_tokens = 16;
}

/* window_kv = int8: the window layers' blocks hold 8-bit codes (the
 * generic attention kernel; the global layers keep 4 bits), the same on
 * both sides. */
static void case_window_int8(void)
{
    window_bits = 8;
    run(CFG_KV_INT4, CFG_KV_INT4, 24, 100, 60);
    run(CFG_KV_INT4, CFG_KV_INT4, 24, 20, 40);
    block_tokens = 32;
    run(CFG_KV_INT4, CFG_KV_INT4, 40, 100, 60);
    block_tokens = 16;
    window_bits = 4;
}

int main(void)
{
    gt_begin("test_gpu_kvwin");
    gt_case("window_fp16", case_window_fp16);
    gt_case("window_int4", case_window_int4);
    gt_case("window_int8", case_window_int8);
    return gt_end();
}
