/*
 * test_gpu_attn.c - GPU attention over a segmented KV history (kcu_attn,
 * both kernels) against the oracle kref_attn_seg, on the scenarios of
 * tests/kernels/test_attn_seg.c: FP16 sink pages, INT4 blocks quantized by
 * kvq_quantize_block from data with injected outliers (full and partial
 * blocks), FP16 staging pages, the step's own exact K/V (causal), several
 * sequences in one launch, decode (one query, the history split across
 * blocks and merged; an item alone bit-identical to the same item in a
 * batch) and prefill chunks, the FP16 cache (pages of
 * block_tokens), no history at all, and the real head layouts (SmolLM2
 * 9/3 x 64, Llama-3-8B 32/8 x 128, stories15M 6/6 x 48, stories260K 8/4 x
 * 8), and sliding windows (every layer of the history partly or wholly
 * outside the window; Gemma-3's 4/1 x 256). The history sits in layer 1 of
 * a two-layer arena.
 *
 * Tolerances per output element, |got - ref| <= ATOL * vmax + RTOL |ref|
 * (vmax: the largest |V| of the history; outputs are convex combinations
 * of V rows):
 *  - generic kernel (f32 dot products and sums vs the oracle's double):
 *    ATOL_GEN 2e-5, RTOL_GEN 2e-4;
 *  - tensor-core kernel (q * scale * s, K, V and the softmax weights as f16,
 *    f32 accumulation): ATOL_MMA 2e-3, RTOL_MMA 2e-3 - the f16 rounding of q
 *    and of P (relative 2^-11 each) on scores of a few units (measured in
 *    the emulator: at most 3.2e-4 * vmax).
 * An item alone against the same item in a batch: bit-identical (generic),
 * or within ATOL_MMA_ORDER 1e-5 * vmax + RTOL_MMA_ORDER 1e-5 (tensor cores:
 * the order of the float atomics that add outlier corrections is not
 * fixed, so a few f32 sums may round differently).
 */
#include "tests/gpu/gpu_test.h"

#include "kernels/cuda/kcu_attn.cuh"
#include "kernels/ktypes.h"
#include "kernels/kvq.h"
#include "kernels/ref/kref.h"

#define ATOL_GEN 2e-5
#define RTOL_GEN 2e-4
#define ATOL_MMA 2e-3
#define RTOL_MMA 2e-3
#define ATOL_MMA_ORDER 1e-5
#define RTOL_MMA_ORDER 1e-5

typedef struct {
    int n_head, n_kv, hd;
    int T, G;
    kvq_k_mode km;
    float budget, out_frac;
    int fp16_mode; /* no INT4 blocks; pages of T tokens */
    int n_items;
    int n_sink, n_q4, n_stage, n_q; /* per item (item i adds 37*i INT4 positions) */
    int window; /* sliding window W (0: none): a query at p sees [p - W + 1, p] */
    int kb, vb; /* code widths of K / V (0: 4) */
} scen;

#define MAX_ITEMS 4
#define MAX_SEGS 256

/* One launch's worth of histories in host and device form. */
typedef struct {
    kvq_layout L;
    int has_L, D, P, layers;
    kcu_kv_arena A;
    uint8_t *qhost, *fhost; /* host images of the arenas */
    int nq, nf;
    kcu_seg segs[MAX_SEGS];
    int n_segs;
    kcu_attn_item items[MAX_ITEMS];
    kvs_seg hsegs[MAX_ITEMS][MAX_SEGS]; /* oracle segments per item (history + step) */
    int n_hsegs[MAX_ITEMS];
    float *q, *ks, *vs; /* [rows][n_head*hd], [rows][D] x2 */
    int rows;
    double vmax;
} batch;

static float gen_val(float mu, float a, float out_frac)
{
    if (gt_unif(0.0f, 1.0f) < out_frac) {
        float e = gt_unif(3.0f, 8.0f) * a;
        return (gt_u32() & 1) ? mu + e : mu - e;
    }
    return mu + gt_unif(-a, a);
}

/* Fills rows x [n][D] of K (is_k) or V around per-channel centers. */
static void gen(float *x, int n, int D, const float *mu, const float *a, float out_frac)
{
    for (int t = 0; t < n; t++)
        for (int c = 0; c < D; c++)
            x[(size_t)t * D + c] = gen_val(mu[c], a[c], out_frac);
}

static void build(const scen *s, batch *b)
{
    memset(b, 0, sizeof *b);
    int D = s->n_kv * s->hd;
    b->D = D;
    b->layers = 2;
    b->P = s->fp16_mode ? s->T : 16;
    if (!s->fp16_mode) {
        char err[128];
        GT_CHECK(kvq_layout_init_bits(&b->L, s->T, D, s->hd, s->G, s->km, s->budget,
                                      s->kb ? s->kb : 4, s->vb ? s->vb : 4, err,
                                      sizeof err) == 0, "layout: %s", err);
        b->has_L = 1;
    }
    size_t f_layer = (size_t)b->P * D * 2 * 2;
    size_t q_layer = b->has_L ? b->L.bytes : 0;
    /* generous host images; counted as used */
    int cap_q = 64, cap_f = 256;
    b->qhost = calloc((size_t)cap_q * b->layers * (q_layer + 8), 1);
    b->fhost = calloc((size_t)cap_f * b->layers * f_layer, 1);
    float *mu = malloc((size_t)D * 4 * 4), *a = mu + D, *mv = a + D, *av = mv + D;
    for (int c = 0; c < D; c++) {
        mu[c] = gt_unif(-1.0f, 1.0f);
        a[c] = gt_unif(0.2f, 1.0f);
        mv[c] = gt_unif(-0.5f, 0.5f);
        av[c] = gt_unif(0.3f, 1.0f);
    }
    float *lo = malloc((size_t)D * 4 * 4), *hi = lo + D, *vlo = hi + D, *vhi = vlo + D;
    for (int c = 0; c < D; c++) {
        lo[c] = mu[c] - a[c];
        hi[c] = mu[c] + a[c];
        vlo[c] = mv[c] - av[c];
        vhi[c] = mv[c] + av[c];
    }
    void *qscr = b->has_L ? malloc(kvq_quantize_scratch_bytes(&b->L) + 8) : NULL;
    int total_q = 0;
    for (int i = 0; i < s->n_items; i++)
        total_q += s->n_q;
    b->rows = total_q;
    size_t Qw = (size_t)s->n_head * s->hd;
    b->q = malloc((size_t)total_q * Qw * 4);
    b->ks = malloc((size_t)total_q * D * 4);
    b->vs = malloc((size_t)total_q * D * 4);
    for (size_t i = 0; i < (size_t)total_q * Qw; i++)
        b->q[i] = gt_gauss();
    float *tk = malloc((size_t)4096 * D * 4), *tv = malloc((size_t)4096 * D * 4);
    int row = 0;
    for (int it = 0; it < s->n_items; it++) {
        kcu_attn_item *item = &b->items[it];
        int n_q4 = s->n_q4 + (s->n_q4 ? 37 * it : 0);
        int runs[3] = {s->n_sink, n_q4, s->n_stage};
        item->seg0 = b->n_segs;
        int pos = 0, nh = 0;
        for (int r = 0; r < 3; r++) {
            int left = runs[r];
            int as_q4 = r == 1 && b->has_L;
            int unit = as_q4 ? s->T : b->P;
            while (left > 0) {
                int n = left < unit ? left : unit;
                GT_CHECK(n <= 4096, "segment too long");
                gen(tk, n, D, mu, a, s->out_frac);
                gen(tv, n, D, mv, av, s->out_frac);
                kcu_seg *sg = &b->segs[b->n_segs++];
                kvs_seg *hs = &b->hsegs[it][nh++];
                if (as_q4) {
                    int id = b->nq++;
                    uint8_t *blk = b->qhost + ((size_t)id * b->layers + 1) * q_layer;
                    kvq_quantize_block(&b->L, blk, tk, tv, (size_t)D, n, lo, hi,
                                       s->budget > 0 ? vlo : NULL, s->budget > 0 ? vhi : NULL,
                                       qscr);
                    *sg = (kcu_seg){KVS_Q4, pos, n, id};
                    *hs = (kvs_seg){KVS_Q4, pos, n, blk, NULL, 0};
                    float *dk = malloc((size_t)s->T * D * 4), *dv = malloc((size_t)s->T * D * 4);
                    kvq_dequant_block(&b->L, blk, dk, dv, (size_t)D);
                    for (size_t e = 0; e < (size_t)n * D; e++)
                        b->vmax = fmax(b->vmax, fabs(dv[e]));
                    free(dk);
                    free(dv);
                } else {
                    int id = b->nf++;
                    uint16_t *pk = (uint16_t *)(b->fhost + ((size_t)id * b->layers + 1) * f_layer);
                    uint16_t *pv = pk + (size_t)b->P * D;
                    for (size_t e = 0; e < (size_t)n * D; e++) {
                        pk[e] = kt_f32_to_f16(tk[e]);
                        pv[e] = kt_f32_to_f16(tv[e]);
                        b->vmax = fmax(b->vmax, fabs(kt_f16_to_f32(pv[e])));
                    }
                    *sg = (kcu_seg){KVS_F16, pos, n, id};
                    *hs = (kvs_seg){KVS_F16, pos, n, pk, pv, (size_t)D};
                }
                pos += n;
                left -= n;
            }
        }
        item->n_segs = b->n_segs - item->seg0;
        item->pos0 = pos;
        item->n_q = s->n_q;
        item->q_row0 = row;
        item->step_row0 = row;
        gen(b->ks + (size_t)row * D, s->n_q, D, mu, a, s->out_frac);
        gen(b->vs + (size_t)row * D, s->n_q, D, mv, av, s->out_frac);
        for (size_t e = 0; e < (size_t)s->n_q * D; e++)
            b->vmax = fmax(b->vmax, fabs(b->vs[(size_t)row * D + e]));
        b->hsegs[it][nh++] = (kvs_seg){KVS_F32, pos, s->n_q, b->ks + (size_t)row * D,
                                       b->vs + (size_t)row * D, (size_t)D};
        b->n_hsegs[it] = nh;
        row += s->n_q;
    }
    /* device arenas */
    b->A.q_layer = q_layer;
    b->A.q_stride = q_layer * b->layers;
    b->A.f_layer = f_layer;
    b->A.f_stride = f_layer * b->layers;
    b->A.page_tokens = b->P;
    b->A.kv_dim = D;
    if (b->nq)
        b->A.qarena = gt_up(b->qhost, (size_t)b->nq * b->A.q_stride);
    b->A.farena = gt_up(b->fhost, (size_t)(b->nf ? b->nf : 1) * b->A.f_stride);
    free(mu), free(lo), free(qscr), free(tk), free(tv);
}

static void release(batch *b)
{
    kcu_free(gt_c, b->A.qarena);
    kcu_free(gt_c, b->A.farena);
    free(b->qhost), free(b->fhost), free(b->q), free(b->ks), free(b->vs);
}

static void run_path(const scen *s, batch *b, int path, const char *name)
{
    kcu_attn_shape sh = {s->n_head, s->n_kv, s->hd, 1.0f / sqrtf((float)s->hd),
                         b->has_L ? &b->L : NULL, s->window};
    if (path == KCU_ATTN_MMA && !kcu_attn_mma_supported(&sh)) {
        gt_err[0] = '\0';
        GT_CHECK(kcu_attn(gt_c, &sh, &b->A, 1, b->items, NULL, s->n_items, NULL, NULL, NULL, NULL,
                          NULL, KCU_ATTN_MMA, NULL, 0, gt_err, sizeof gt_err) < 0 && gt_err[0],
                 "%s: the tensor-core path accepted an unsupported shape", name);
        return;
    }
    size_t Qw = (size_t)s->n_head * s->hd;
    float *ref = malloc((size_t)b->rows * Qw * 4), *got = malloc((size_t)b->rows * Qw * 4);
    size_t scr_floats = 0;
    for (int it = 0; it < s->n_items; it++) {
        size_t f = kref_attn_seg_scratch_floats(b->hsegs[it], b->n_hsegs[it],
                                                b->has_L ? &b->L : NULL);
        scr_floats = f > scr_floats ? f : scr_floats;
    }
    float *scr = malloc(scr_floats * 4);
    for (int it = 0; it < s->n_items; it++) {
        const kcu_attn_item *item = &b->items[it];
        for (int j = 0; j < item->n_q; j++)
            kref_attn_seg(ref + ((size_t)item->q_row0 + j) * Qw,
                          b->q + ((size_t)item->q_row0 + j) * Qw, item->pos0 + j, s->window,
                          b->hsegs[it],
                          b->n_hsegs[it], b->has_L ? &b->L : NULL, s->n_head, s->n_kv, s->hd,
                          sh.scale, scr);
    }
    kcu_attn_item *ditems = gt_up(b->items, sizeof(kcu_attn_item) * (size_t)s->n_items);
    kcu_seg *dsegs = gt_up(b->segs, sizeof(kcu_seg) * (size_t)(b->n_segs ? b->n_segs : 1));
    float *dq = gt_up(b->q, (size_t)b->rows * Qw * 4);
    float *dout = gt_up(NULL, (size_t)b->rows * Qw * 4);
    float *dk = gt_up(b->ks, (size_t)b->rows * b->D * 4), *dv = gt_up(b->vs, (size_t)b->rows * b->D * 4);
    int max_q = s->n_q;
    size_t sb = kcu_attn_scratch_bytes(&sh, s->n_items, b->rows, max_q);
    void *dscr = gt_up(NULL, sb);
    GT_OK(kcu_attn(gt_c, &sh, &b->A, 1, b->items, ditems, s->n_items, dsegs, dq, dout, dk, dv,
                   path, dscr, sb, gt_err, sizeof gt_err));
    gt_down(got, dout, (size_t)b->rows * Qw * 4);
    char what[160];
    snprintf(what, sizeof what, "%s %s heads %d/%d hd %d window %d", name,
             path == KCU_ATTN_MMA ? "mma" : "generic", s->n_head, s->n_kv, s->hd, s->window);
    if (path == KCU_ATTN_MMA)
        gt_close(what, got, ref, (size_t)b->rows * Qw, ATOL_MMA * b->vmax, RTOL_MMA);
    else
        gt_close(what, got, ref, (size_t)b->rows * Qw, ATOL_GEN * b->vmax, RTOL_GEN);
    /* each item alone gives the same rows: the split of its history is
     * planned from the item alone, never from the rest of the batch (bit for
     * bit with the generic kernel; the tensor-core kernel adds outlier
     * corrections with shared-memory float atomics, whose order is not
     * fixed: last-bit differences, ATOL_MMA_ORDER) */
    for (int it = 0; s->n_items > 1 && it < s->n_items; it++) {
        kcu_attn_item one = b->items[it];
        size_t r0 = (size_t)one.q_row0, nq = (size_t)one.n_q;
        one.q_row0 = one.step_row0 = 0;
        kcu_attn_item *d1 = gt_up(&one, sizeof one);
        float *dout1 = gt_up(NULL, nq * Qw * 4), *got1 = malloc(nq * Qw * 4);
        GT_OK(kcu_attn(gt_c, &sh, &b->A, 1, &one, d1, 1, dsegs, dq + r0 * Qw, dout1,
                       dk + r0 * b->D, dv + r0 * b->D, path, dscr, sb, gt_err, sizeof gt_err));
        gt_down(got1, dout1, nq * Qw * 4);
        if (path == KCU_ATTN_GENERIC) {
            GT_CHECK(memcmp(got1, got + r0 * Qw, nq * Qw * 4) == 0,
                     "%s: item %d alone differs from the same item in the batch", what, it);
        } else {
            char w2[200];
            snprintf(w2, sizeof w2, "%s item %d alone vs batched", what, it);
            gt_close(w2, got1, got + r0 * Qw, nq * Qw, ATOL_MMA_ORDER * b->vmax, RTOL_MMA_ORDER);
        }
        kcu_free(gt_c, d1);
        kcu_free(gt_c, dout1);
        free(got1);
    }
    kcu_free(gt_c, ditems);
    kcu_free(gt_c, dsegs);
    kcu_free(gt_c, dq);
    kcu_free(gt_c, dout);
    kcu_free(gt_c, dk);
    kcu_free(gt_c, dv);
    kcu_free(gt_c, dscr);
    free(ref), free(got), free(scr);
}

static void run_scen(const scen *s, const char *name)
{
    batch *b = calloc(1, sizeof *b);
    build(s, b);
    run_path(s, b, KCU_ATTN_GENERIC, name);
    if ((s->kb ? s->kb : 4) == 4 && (s->vb ? s->vb : 4) == 4) /* the MMA kernel: 4 bits */
        run_path(s, b, KCU_ATTN_MMA, name);
    release(b);
    free(b);
}

/* n_head, n_kv, hd, T, G, k mode, budget, outliers, fp16, items, sink, q4, stage, n_q */
static void case_decode_smollm2(void)
{
    scen s = {9, 3, 64, 128, 64, KVQ_K_PER_CHANNEL, 0.005f, 0.004f, 0, 2, 4, 300, 20, 1, 0, 0, 0};
    run_scen(&s, "decode smollm2");
}

static void case_decode_llama3(void)
{
    scen s = {32, 8, 128, 128, 128, KVQ_K_PER_CHANNEL, 0.005f, 0.004f, 0, 3, 4, 520, 9, 1, 0, 0, 0};
    run_scen(&s, "decode llama3-8b");
}

static void case_prefill_chunk(void)
{
    scen s = {9, 3, 64, 128, 64, KVQ_K_PER_CHANNEL, 0.005f, 0.004f, 0, 1, 4, 200, 16, 40, 0, 0, 0};
    run_scen(&s, "prefill smollm2");
    scen s2 = {32, 8, 128, 64, 32, KVQ_K_PER_CHANNEL, 0.02f, 0.02f, 0, 2, 3, 100, 0, 9, 0, 0, 0};
    run_scen(&s2, "prefill llama3 G32 outliers");
}

/* Every code width (the generic kernel), decode and a prefill chunk, odd
 * heads, against the dequantize-then-attend oracle. */
static void case_every_width(void)
{
    static const int wd[][2] = { { 2, 2 }, { 3, 2 }, { 3, 3 }, { 8, 8 } };
    for (int i = 0; i < 4; i++) {
        scen d = {9, 3, 64, 128, 64, KVQ_K_PER_CHANNEL, 0.005f, 0.004f, 0, 2, 4, 150, 20, 1, 0,
                  wd[i][0], wd[i][1]};
        run_scen(&d, "decode smollm2");
        scen p = {9, 3, 64, 64, 64, KVQ_K_PER_CHANNEL, 0.005f, 0.004f, 0, 1, 4, 100, 16, 12, 0,
                  wd[i][0], wd[i][1]};
        run_scen(&p, "prefill smollm2");
        scen o = {6, 3, 24, 32, 8, KVQ_K_PER_TOKEN, 0.01f, 0.01f, 0, 2, 4, 70, 9, 2, 0,
                  wd[i][0], wd[i][1]};
        run_scen(&o, "odd heads, K per token");
    }
}

static void case_small_models(void)
{
    scen a = {6, 6, 48, 32, 48, KVQ_K_PER_CHANNEL, 0.005f, 0.004f, 0, 2, 4, 70, 5, 3, 0, 0, 0};
    run_scen(&a, "stories15M");
    scen b = {8, 4, 8, 32, 8, KVQ_K_PER_CHANNEL, 0.01f, 0.01f, 0, 2, 4, 70, 9, 2, 0, 0, 0};
    run_scen(&b, "stories260K");
    scen c = {4, 2, 64, 32, 16, KVQ_K_PER_TOKEN, 0.01f, 0.01f, 0, 1, 0, 64, 0, 2, 0, 0, 0};
    run_scen(&c, "K per token");
}

static void case_fp16_cache(void)
{
    scen s = {8, 2, 128, 128, 128, KVQ_K_PER_CHANNEL, 0.0f, 0.0f, 1, 2, 0, 0, 700, 1, 0, 0, 0};
    run_scen(&s, "fp16 decode");
    scen s2 = {9, 3, 64, 128, 64, KVQ_K_PER_CHANNEL, 0.0f, 0.0f, 1, 1, 0, 0, 150, 24, 0, 0, 0};
    run_scen(&s2, "fp16 prefill");
}

static void case_no_history(void)
{
    scen s = {4, 2, 64, 128, 64, KVQ_K_PER_CHANNEL, 0.005f, 0.0f, 0, 2, 0, 0, 0, 5, 0, 0, 0};
    run_scen(&s, "no history");
}

/* Sliding windows (Gemma-3: W on 5 of every 6 layers): windows below,
 * at and past the history, in decode (the split starts at the window) and
 * in prefill chunks whose queries span the bound; INT4 and FP16 histories,
 * K per token, and Gemma-3-270M's head layout (4/1 x 256: generic kernel). */
static void case_windows(void)
{
    /* n_head, n_kv, hd, T, G, k mode, budget, outliers, fp16, items, sink, q4, stage, n_q, W */
    static const scen c[] = {
        {9, 3, 64, 128, 64, KVQ_K_PER_CHANNEL, 0.005f, 0.004f, 0, 2, 4, 300, 20, 1, 64, 0, 0},
        {9, 3, 64, 128, 64, KVQ_K_PER_CHANNEL, 0.005f, 0.004f, 0, 2, 4, 300, 20, 1, 200, 0, 0},
        {9, 3, 64, 128, 64, KVQ_K_PER_CHANNEL, 0.005f, 0.004f, 0, 1, 4, 300, 20, 1, 325, 0, 0},
        {9, 3, 64, 128, 64, KVQ_K_PER_CHANNEL, 0.005f, 0.004f, 0, 1, 4, 300, 20, 1, 1000, 0, 0},
        {9, 3, 64, 128, 64, KVQ_K_PER_CHANNEL, 0.005f, 0.004f, 0, 1, 4, 200, 16, 40, 30, 0, 0},
        {9, 3, 64, 128, 64, KVQ_K_PER_CHANNEL, 0.005f, 0.004f, 0, 2, 4, 200, 16, 40, 150, 0, 0},
        {32, 8, 128, 64, 32, KVQ_K_PER_CHANNEL, 0.02f, 0.02f, 0, 2, 3, 100, 0, 9, 5, 0, 0},
        {4, 2, 64, 32, 16, KVQ_K_PER_TOKEN, 0.01f, 0.01f, 0, 1, 0, 64, 0, 2, 1, 0, 0},
        {8, 2, 128, 128, 128, KVQ_K_PER_CHANNEL, 0.0f, 0.0f, 1, 2, 0, 0, 700, 1, 512, 0, 0},
        {9, 3, 64, 128, 64, KVQ_K_PER_CHANNEL, 0.0f, 0.0f, 1, 1, 0, 0, 150, 24, 16, 0, 0},
        {4, 1, 256, 128, 256, KVQ_K_PER_CHANNEL, 0.005f, 0.004f, 0, 2, 4, 300, 20, 1, 100, 0, 0},
        {4, 1, 256, 128, 256, KVQ_K_PER_CHANNEL, 0.005f, 0.004f, 0, 1, 4, 130, 16, 20, 64, 0, 0},
    };
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
        char name[64];
        snprintf(name, sizeof name, "window %d (%s, %d queries)", c[i].window,
                 c[i].fp16_mode ? "fp16" : "int4", c[i].n_q);
        run_scen(&c[i], name);
    }
}

int main(void)
{
    gt_begin("test_gpu_attn");
    gt_case("decode_smollm2", case_decode_smollm2);
    gt_case("decode_llama3", case_decode_llama3);
    gt_case("prefill_chunk", case_prefill_chunk);
    gt_case("small_models", case_small_models);
    gt_case("every_width", case_every_width);
    gt_case("fp16_cache", case_fp16_cache);
    gt_case("no_history", case_no_history);
    gt_case("windows", case_windows);
    return gt_end();
}
