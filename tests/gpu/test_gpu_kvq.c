/*
 * test_gpu_kvq.c - the LiveKVQuant-P cache math on the GPU against the
 * oracle kernels/ref/kvq_ref.c, on the cases of tests/kernels/test_ema.c and
 * test_quant.c (odd and real shapes, adversarial values):
 *  - chunk quantiles (kcu_kvq_fold): a and b equal kvq_chunk_quantiles bit
 *    for bit (the math is order statistics and double interpolation), for
 *    every alpha, with NaN/Inf ignored, constant and empty channels, columns
 *    longer than the kernel's shared-memory cache;
 *  - the clipped EMA: lo, hi and the warm-up sums equal kvq_ema_update's
 *    after every chunk (warm-up W = 0..3, clipping, decode-block weights,
 *    channels without data);
 *  - block quantization (kcu_kvq_quantize): every byte of every block equals
 *    kvq_quantize_block's (header, codes, snapshots, outlier lists: the
 *    outlier sets are equal), several blocks per launch, in a layered arena
 *    whose neighbouring bytes must stay untouched; K per channel and per
 *    token, budgets 0 .. 1, ties, non-finite and huge values, partial blocks;
 *  - FP16 page store / gather round trip and the header counters.
 * Tolerance: none - equality (floats compared as values: -0 == +0, NaN ==
 * NaN; the block bytes with memcmp).
 */
#include "tests/gpu/gpu_test.h"

#include "kernels/cuda/kcu_kvq_quant.cuh"
#include "kernels/cuda/kcu_kvq_stats.cuh"
#include "kernels/cuda/kcu_kvstore.cuh"
#include "kernels/ktypes.h"
#include "kernels/kvq.h"

static int same_float(float a, float b)
{
    return a == b || (isnan(a) && isnan(b));
}

/* ---- quantiles ---------------------------------------------------------------------- */

static void quantile_case(int n, int D, size_t stride, float alpha, int kind)
{
    size_t N = (size_t)n * stride;
    float *x = malloc(N * sizeof(float) + 4);
    for (size_t i = 0; i < N; i++) {
        float v = gt_gauss() * 3.0f + (float)(i % stride) * 0.1f;
        switch (kind) {
        case 1: /* coarse values: many ties */
            v = floorf(v * 2.0f) * 0.5f;
            break;
        case 2: /* non-finite sprinkled, one empty channel, one constant */
            if (gt_u32() % 13 == 0)
                v = (gt_u32() & 1) ? NAN : ((gt_u32() & 1) ? INFINITY : -INFINITY);
            if (i % stride == 1)
                v = NAN;
            if (i % stride == 2)
                v = 4.25f;
            break;
        case 3: /* signed zeros and tiny values */
            v = (gt_u32() & 1) ? 0.0f : -0.0f;
            if (gt_u32() % 5 == 0)
                v = gt_gauss() * 1e-30f;
            break;
        }
        x[i] = v;
    }
    float *a = malloc((size_t)D * 4), *b = malloc((size_t)D * 4);
    float *scr = malloc((size_t)n * 4 + 4);
    kvq_chunk_quantiles(x, n, D, stride, alpha, a, b, scr);
    float *dx = gt_up(x, N * 4), *da = gt_up(NULL, (size_t)D * 4), *db = gt_up(NULL, (size_t)D * 4);
    size_t sb = kcu_kvq_fold_scratch_bytes(n, D);
    void *dscr = gt_up(NULL, sb);
    const float *xs[2] = {dx, NULL};
    float *as[2] = {da, NULL}, *bs[2] = {db, NULL};
    GT_OK(kcu_kvq_fold(gt_c, xs, n, D, stride, alpha, as, bs, NULL, NULL, 1.0f, dscr, sb, gt_err,
                       sizeof gt_err));
    float *ga = malloc((size_t)D * 4), *gb = malloc((size_t)D * 4);
    gt_down(ga, da, (size_t)D * 4);
    gt_down(gb, db, (size_t)D * 4);
    int bad = 0;
    for (int c = 0; c < D; c++)
        if (!same_float(ga[c], a[c]) || !same_float(gb[c], b[c])) {
            if (bad < 3)
                fprintf(stderr, "  n %d alpha %g ch %d: a %.9g/%.9g b %.9g/%.9g\n", n,
                        (double)alpha, c, (double)ga[c], (double)a[c], (double)gb[c],
                        (double)b[c]);
            bad++;
        }
    GT_CHECK(bad == 0, "quantiles n %d D %d alpha %g kind %d: %d channels differ", n, D,
             (double)alpha, kind, bad);
    kcu_free(gt_c, dx);
    kcu_free(gt_c, da);
    kcu_free(gt_c, db);
    kcu_free(gt_c, dscr);
    free(x), free(a), free(b), free(scr), free(ga), free(gb);
}

static void case_quantiles(void)
{
    const float alphas[] = {0.0f, 0.005f, 0.01f, 0.25f, 0.5f, 0.7f, NAN};
    const int ns[] = {1, 2, 3, 17, 101, 512, 513};
    for (size_t ai = 0; ai < sizeof alphas / sizeof alphas[0]; ai++)
        for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++)
            quantile_case(ns[ni], 5, 7, alphas[ai], (int)(ni % 4));
    quantile_case(512, 192, 192, 0.005f, 0); /* SmolLM2 K of one chunk */
    quantile_case(128, 1024, 1024, 0.005f, 1);
    quantile_case(4100, 3, 3, 0.005f, 0); /* past the shared-memory cache */
    quantile_case(4100, 3, 3, 0.3f, 2);
}

/* ---- EMA ---------------------------------------------------------------------------- */

static void ema_case(int W, int D, int n, int n_chunks, float decay, float clip)
{
    kvq_ema_params p = {decay, clip, 0.01f, W};
    float *mem = calloc((size_t)D * 4, sizeof(float));
    kvq_ema e = {mem, mem + D, mem + 2 * D, mem + 3 * D, 0};
    float *dmem = gt_up(mem, (size_t)D * 4 * 4);
    kcu_ema_dev de = {dmem, dmem + D, dmem + 2 * D, dmem + 3 * D, 0};
    float *x = malloc((size_t)n * D * 4), *a = malloc((size_t)D * 4), *b = malloc((size_t)D * 4);
    float *scr = malloc((size_t)n * 4), *got = malloc((size_t)D * 4 * 4);
    float *dx = gt_up(NULL, (size_t)n * D * 4);
    size_t sb = kcu_kvq_fold_scratch_bytes(n, D);
    void *dscr = gt_up(NULL, sb);
    for (int t = 0; t < n_chunks; t++) {
        float shift = t == n_chunks - 2 ? 50.0f : 0.0f; /* one far chunk: clipped */
        for (int i = 0; i < n * D; i++) {
            int c = i % D;
            float v = gt_gauss() * (1.0f + 0.1f * c) + shift;
            if (c == 0 && t < 2)
                v = NAN; /* a channel without data at first */
            if (c == 1)
                v = 2.5f; /* constant */
            x[i] = v;
        }
        float weight = (t % 3 == 2) ? 0.25f : 1.0f; /* decode blocks weigh block / C */
        kvq_chunk_quantiles(x, n, D, (size_t)D, p.clip_quantile, a, b, scr);
        kvq_ema_update(&e, &p, a, b, D, weight);
        GT_OK(kcu_h2d(gt_c, dx, x, (size_t)n * D * 4, gt_err, sizeof gt_err));
        const float *xs[2] = {NULL, dx};
        kcu_ema_dev es[2] = {de, de};
        GT_OK(kcu_kvq_fold(gt_c, xs, n, D, (size_t)D, p.clip_quantile, NULL, NULL, es, &p,
                           weight, dscr, sb, gt_err, sizeof gt_err));
        de.n_chunks++;
        gt_down(got, dmem, (size_t)D * 4 * 4);
        int bad = 0;
        for (int i = 0; i < 4 * D; i++) {
            /* the warm-up sums are only defined while warming */
            if (i >= 2 * D && t >= W)
                continue;
            if (!same_float(got[i], mem[i])) {
                if (!bad)
                    fprintf(stderr, "  W %d chunk %d: array %d ch %d got %.9g want %.9g\n", W,
                            t, i / D, i % D, (double)got[i], (double)mem[i]);
                bad++;
            }
        }
        GT_CHECK(bad == 0, "EMA W %d decay %g clip %g after chunk %d: %d values differ", W,
                 (double)decay, (double)clip, t, bad);
    }
    kcu_free(gt_c, dmem);
    kcu_free(gt_c, dx);
    kcu_free(gt_c, dscr);
    free(mem), free(x), free(a), free(b), free(scr), free(got);
}

static void case_ema(void)
{
    for (int W = 0; W <= 3; W++)
        ema_case(W, 19, 64, 8, 0.3f, 4.0f);
    ema_case(2, 64, 128, 6, 0.9f, 0.5f);
    ema_case(1, 7, 5, 6, 0.0f, 0.0f);
}

/* ---- block quantization --------------------------------------------------------------- */

typedef struct {
    int T, D, hd, G;
    kvq_k_mode km;
    float budget;
    int with_k_range, with_v_range;
    float out_frac; /* injected outliers */
    int nonfinite;  /* inject NaN / Inf / huge values */
    int ties;       /* many outliers of equal excursion */
    int kb, vb;     /* code widths of K / V (0: 4) */
} qcase;

/* Fills x [rows][D] around per-channel centers, with outliers. */
static void gen_rows(float *x, int rows, int D, const float *mu, const float *amp,
                     const qcase *q)
{
    for (int t = 0; t < rows; t++)
        for (int c = 0; c < D; c++) {
            float v = mu[c] + amp[c] * gt_unif(-1.0f, 1.0f);
            if (gt_unif(0.0f, 1.0f) < q->out_frac) {
                float e = gt_unif(2.0f, 9.0f);
                v = (gt_u32() & 1) ? mu[c] + e * amp[c] : mu[c] - e * amp[c];
            }
            if (q->ties && c % 7 == 3) /* the same outlier in every row: equal excursions */
                v = mu[c] + 6.0f * amp[c];
            if (q->nonfinite && gt_u32() % 97 == 0) {
                uint32_t r = gt_u32() % 4;
                v = r == 0 ? NAN : r == 1 ? INFINITY : r == 2 ? -INFINITY : 1e30f;
            }
            x[(size_t)t * D + c] = v;
        }
}

static void quant_case(const qcase *q)
{
    kvq_layout L;
    char lerr[128];
    if (kvq_layout_init_bits(&L, q->T, q->D, q->hd, q->G, q->km, q->budget, q->kb ? q->kb : 4,
                             q->vb ? q->vb : 4, lerr, sizeof lerr) < 0) {
        GT_CHECK(0, "layout: %s", lerr);
        return;
    }
    const int T = q->T, D = q->D, NT = 4, LAYERS = 3, LAYER = 1;
    /* four blocks from one source of 2T+? rows: full, partial, one token, empty */
    int ns[4] = {T, T > 1 ? T - 1 : 1, 1, 0};
    int rows = 0, row0[4];
    for (int j = 0; j < NT; j++) {
        row0[j] = rows;
        rows += ns[j];
    }
    size_t stride = (size_t)D + 3;
    float *k = malloc((size_t)(rows + 1) * stride * 4), *v = malloc((size_t)(rows + 1) * stride * 4);
    float *mu = malloc((size_t)D * 4 * 4), *amp = mu + D, *mv = amp + D, *av = mv + D;
    for (int c = 0; c < D; c++) {
        mu[c] = gt_unif(-2.0f, 2.0f);
        amp[c] = gt_unif(0.1f, 1.5f);
        mv[c] = gt_unif(-0.5f, 0.5f);
        av[c] = gt_unif(0.2f, 1.0f);
    }
    float *kt = malloc((size_t)rows * D * 4 + 4), *vt = malloc((size_t)rows * D * 4 + 4);
    gen_rows(kt, rows, D, mu, amp, q);
    gen_rows(vt, rows, D, mv, av, q);
    for (int t = 0; t < rows; t++)
        for (size_t c = 0; c < stride; c++) {
            k[(size_t)t * stride + c] = c < (size_t)D ? kt[(size_t)t * D + c] : 77.0f;
            v[(size_t)t * stride + c] = c < (size_t)D ? vt[(size_t)t * D + c] : -77.0f;
        }
    /* the EMA ranges: the generator's (so that outliers lie outside) */
    float *r = malloc((size_t)D * 4 * 4), *klo = r, *khi = r + D, *vlo = r + 2 * D, *vhi = r + 3 * D;
    for (int c = 0; c < D; c++) {
        klo[c] = mu[c] - amp[c];
        khi[c] = mu[c] + amp[c];
        vlo[c] = mv[c] - av[c];
        vhi[c] = mv[c] + av[c];
    }
    if (D > 2) {
        vlo[2] = vhi[2] = NAN; /* a V channel without a range flags nothing */
        klo[1] = khi[1] = NAN; /* K channel without a range: [0, 0] grid */
    }
    /* reference blocks */
    uint8_t *want = malloc((size_t)NT * L.bytes);
    void *qscr = malloc(kvq_quantize_scratch_bytes(&L) + 8);
    for (int j = 0; j < NT; j++)
        kvq_quantize_block(&L, want + (size_t)j * L.bytes, k + (size_t)row0[j] * stride,
                           v + (size_t)row0[j] * stride, stride, ns[j],
                           q->with_k_range ? klo : NULL, q->with_k_range ? khi : NULL,
                           q->with_v_range ? vlo : NULL, q->with_v_range ? vhi : NULL, qscr);
    /* the GPU: an arena of NT blocks x 3 layers, filled with a pattern;
     * block j of the launch goes to pool block id NT-1-j, layer 1 */
    size_t arena_bytes = (size_t)NT * LAYERS * L.bytes;
    uint8_t *pat = malloc(arena_bytes);
    for (size_t i = 0; i < arena_bytes; i++)
        pat[i] = (uint8_t)(0xa5 ^ i);
    kcu_kv_arena A;
    memset(&A, 0, sizeof A);
    A.qarena = gt_up(pat, arena_bytes);
    A.q_stride = (size_t)LAYERS * L.bytes;
    A.q_layer = L.bytes;
    A.kv_dim = D;
    kcu_q_tgt tg[4];
    for (int j = 0; j < NT; j++)
        tg[j] = (kcu_q_tgt){NT - 1 - j, row0[j], ns[j], 0};
    kcu_q_tgt *dtg = gt_up(tg, sizeof tg);
    float *dk = gt_up(k, (size_t)rows * stride * 4), *dv = gt_up(v, (size_t)rows * stride * 4);
    float *dr = gt_up(r, (size_t)D * 4 * 4);
    int max_tgts = 3; /* forces two batches */
    size_t sb = kcu_kvq_quant_scratch_bytes(&L, max_tgts);
    void *dscr = gt_up(NULL, sb);
    GT_OK(kcu_kvq_quantize(gt_c, &L, &A, LAYER, dtg, NT, max_tgts, dk, dv, stride,
                           q->with_k_range ? dr : NULL, q->with_k_range ? dr + D : NULL,
                           q->with_v_range ? dr + 2 * D : NULL,
                           q->with_v_range ? dr + 3 * D : NULL, dscr, sb, gt_err,
                           sizeof gt_err));
    uint8_t *got = malloc(arena_bytes);
    gt_down(got, A.qarena, arena_bytes);
    for (int j = 0; j < NT; j++) {
        size_t off = (size_t)(NT - 1 - j) * A.q_stride + (size_t)LAYER * L.bytes;
        const uint8_t *g = got + off, *w = want + (size_t)j * L.bytes;
        size_t first = L.bytes;
        for (size_t i = 0; i < L.bytes; i++)
            if (g[i] != w[i]) {
                first = i;
                break;
            }
        const kvq_block_hdr *gh = (const kvq_block_hdr *)g, *wh = (const kvq_block_hdr *)w;
        GT_CHECK(first == L.bytes,
                 "block T %d D %d G %d %s budget %g n %d: byte %zu differs (regions: kq %zu vq "
                 "%zu ks %zu vs %zu kout %zu vout %zu); hdr got %u/%u/%u/%u want %u/%u/%u/%u",
                 T, D, q->G, q->km == KVQ_K_PER_CHANNEL ? "K/ch" : "K/tok", (double)q->budget,
                 ns[j], first, L.off_kq, L.off_vq, L.off_ks, L.off_vs, L.off_kout_idx,
                 L.off_vout_idx, gh->n_tok, gh->n_kout, gh->n_vout, gh->n_clamped, wh->n_tok,
                 wh->n_kout, wh->n_vout, wh->n_clamped);
    }
    /* nothing outside the four target layer-blocks changed */
    size_t outside = 0;
    for (size_t i = 0; i < arena_bytes; i++) {
        size_t blk = i / A.q_stride, lay = (i % A.q_stride) / L.bytes;
        if (lay != LAYER || blk >= (size_t)NT)
            outside += got[i] != pat[i];
    }
    GT_CHECK(outside == 0, "%zu bytes written outside the target blocks", outside);
    /* header sums, as the cache's accounting reads them */
    int32_t ids[4] = {0, 1, 2, 3};
    int32_t *dids = gt_up(ids, sizeof ids);
    int64_t zero[4] = {0, 0, 0, 0}, sums[4];
    int64_t *dsum = gt_up(zero, sizeof zero);
    kcu_kv_arena A1 = A;
    A1.qarena += (size_t)LAYER * L.bytes; /* only layer 1 is defined */
    GT_OK(kcu_kvq_count_blocks(gt_c, &A1, 1, dids, 4, dsum, gt_err, sizeof gt_err));
    gt_down(sums, dsum, sizeof sums);
    int64_t wt = 0, wo = 0, wc = 0;
    for (int j = 0; j < NT; j++) {
        const kvq_block_hdr *h = (const kvq_block_hdr *)(want + (size_t)j * L.bytes);
        wt += h->n_tok;
        wo += h->n_kout + h->n_vout;
        wc += h->n_clamped;
    }
    GT_CHECK(sums[0] == wt && sums[1] == wo && sums[2] == wc,
             "header sums %lld/%lld/%lld want %lld/%lld/%lld", (long long)sums[0],
             (long long)sums[1], (long long)sums[2], (long long)wt, (long long)wo, (long long)wc);
    kcu_free(gt_c, A.qarena);
    kcu_free(gt_c, dtg);
    kcu_free(gt_c, dk);
    kcu_free(gt_c, dv);
    kcu_free(gt_c, dr);
    kcu_free(gt_c, dscr);
    kcu_free(gt_c, dids);
    kcu_free(gt_c, dsum);
    free(k), free(v), free(mu), free(kt), free(vt), free(r), free(want), free(qscr), free(pat);
    free(got);
}

static void case_quantize(void)
{
    const qcase cs[] = {
        /* T, D, hd, G, k mode, budget, K range, V range, outliers, non-finite, ties */
        {128, 192, 64, 64, KVQ_K_PER_CHANNEL, 0.005f, 1, 1, 0.004f, 0, 0, 0, 0}, /* SmolLM2 */
        {128, 192, 64, 64, KVQ_K_PER_CHANNEL, 0.005f, 1, 1, 0.03f, 0, 0, 0, 0},  /* over budget */
        {32, 32, 8, 8, KVQ_K_PER_CHANNEL, 0.01f, 1, 1, 0.05f, 1, 0, 0, 0},       /* stories260K */
        {16, 288, 48, 48, KVQ_K_PER_CHANNEL, 0.005f, 1, 1, 0.0f, 0, 1, 0, 0},    /* ties */
        {16, 288, 48, 48, KVQ_K_PER_CHANNEL, 0.02f, 1, 1, 0.001f, 0, 1, 0, 0},  /* ties */
        {5, 6, 2, 1, KVQ_K_PER_TOKEN, 0.2f, 1, 1, 0.2f, 1, 0, 0, 0},             /* odd */
        {17, 48, 48, 16, KVQ_K_PER_CHANNEL, 1.0f, 1, 1, 0.3f, 0, 0, 0, 0},       /* budget 1 */
        {64, 288, 48, 48, KVQ_K_PER_CHANNEL, 0.0f, 1, 1, 0.02f, 0, 0, 0, 0},     /* no budget */
        {64, 256, 64, 32, KVQ_K_PER_TOKEN, 0.05f, 1, 1, 0.05f, 0, 0, 0, 0},
        {32, 128, 64, 64, KVQ_K_PER_CHANNEL, 0.01f, 0, 0, 0.02f, 1, 0, 0, 0},    /* no ranges */
        {128, 1024, 128, 128, KVQ_K_PER_CHANNEL, 0.005f, 1, 1, 0.006f, 0, 0, 0, 0}, /* Llama-3-8B */
    };
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++)
        quant_case(&cs[i]);
}

/* Every code width, K and V apart (kvq.h's bit streams; 3 bits share
 * bytes and 32-bit words between threads): the same blocks as the
 * reference, on SmolLM2's shape, odd shapes and K per token. */
static void case_quantize_widths(void)
{
    static const int wd[][2] = { { 2, 2 }, { 3, 3 }, { 8, 8 }, { 3, 2 }, { 4, 8 } };
    for (int i = 0; i < 5; i++) {
        int kb = wd[i][0], vb = wd[i][1];
        const qcase cs[] = {
            {128, 192, 64, 64, KVQ_K_PER_CHANNEL, 0.005f, 1, 1, 0.004f, 0, 0, kb, vb},
            {32, 32, 8, 8, KVQ_K_PER_CHANNEL, 0.01f, 1, 1, 0.05f, 1, 0, kb, vb},
            {17, 48, 24, 8, KVQ_K_PER_TOKEN, 0.05f, 1, 1, 0.05f, 0, 0, kb, vb},
            {7, 40, 40, 8, KVQ_K_PER_CHANNEL, 0.02f, 1, 1, 0.02f, 0, 1, kb, vb},
        };
        for (size_t j = 0; j < sizeof cs / sizeof cs[0]; j++)
            quant_case(&cs[j]);
    }
}

/* ---- FP16 pages ------------------------------------------------------------------------ */

static void case_pages(void)
{
    const int D = 48, P = 16, LAYERS = 2, NP = 3, rows = 20;
    size_t f_layer = (size_t)P * D * 2 * 2, f_stride = f_layer * LAYERS;
    kcu_kv_arena A;
    memset(&A, 0, sizeof A);
    A.farena = gt_up(NULL, f_stride * NP);
    GT_OK(kcu_memset(gt_c, A.farena, 0, f_stride * NP, gt_err, sizeof gt_err));
    A.f_stride = f_stride;
    A.f_layer = f_layer;
    A.page_tokens = P;
    A.kv_dim = D;
    float *k = malloc((size_t)rows * D * 4), *v = malloc((size_t)rows * D * 4);
    for (int i = 0; i < rows * D; i++) {
        k[i] = gt_gauss() * 10.0f;
        v[i] = gt_gauss() * 1e-4f;
    }
    /* rows 0..3 -> page 2 slots 5..8; rows 4..19 -> page 0 slots 0..15 */
    kcu_page_tgt tg[2] = {{2, 5, 0, 4}, {0, 0, 4, 16}};
    kcu_page_tgt *dtg = gt_up(tg, sizeof tg);
    float *dk = gt_up(k, (size_t)rows * D * 4), *dv = gt_up(v, (size_t)rows * D * 4);
    GT_OK(kcu_kv_store_pages(gt_c, &A, 1, dtg, 2, 16, dk, dv, gt_err, sizeof gt_err));
    kcu_page_row rw[20];
    for (int i = 0; i < 4; i++)
        rw[i] = (kcu_page_row){2, 5 + i};
    for (int i = 4; i < rows; i++)
        rw[i] = (kcu_page_row){0, i - 4};
    kcu_page_row *drw = gt_up(rw, sizeof rw);
    float *gk = gt_up(NULL, (size_t)rows * D * 4), *gv = gt_up(NULL, (size_t)rows * D * 4);
    GT_OK(kcu_kv_gather_pages(gt_c, &A, 1, drw, rows, gk, gv, gt_err, sizeof gt_err));
    float *ok = malloc((size_t)rows * D * 4), *ov = malloc((size_t)rows * D * 4);
    gt_down(ok, gk, (size_t)rows * D * 4);
    gt_down(ov, gv, (size_t)rows * D * 4);
    int bad = 0;
    for (int i = 0; i < rows * D; i++)
        bad += ok[i] != kt_f16_to_f32(kt_f32_to_f16(k[i])) ||
               ov[i] != kt_f16_to_f32(kt_f32_to_f16(v[i]));
    GT_CHECK(bad == 0, "page round trip: %d values differ from fp16 rounding", bad);
    /* layer 0 untouched */
    uint16_t *raw = malloc(f_stride * NP);
    gt_down(raw, A.farena, f_stride * NP);
    size_t nz = 0;
    for (int pg = 0; pg < NP; pg++)
        for (size_t i = 0; i < f_layer / 2; i++)
            nz += raw[(size_t)pg * f_stride / 2 + i] != 0;
    GT_CHECK(nz == 0, "%zu halves written into layer 0", nz);
    kcu_free(gt_c, A.farena);
    kcu_free(gt_c, dtg);
    kcu_free(gt_c, dk);
    kcu_free(gt_c, dv);
    kcu_free(gt_c, drw);
    kcu_free(gt_c, gk);
    kcu_free(gt_c, gv);
    free(k), free(v), free(ok), free(ov), free(raw);
}

int main(void)
{
    gt_begin("test_gpu_kvq");
    gt_case("quantiles", case_quantiles);
    gt_case("ema", case_ema);
    gt_case("quantize", case_quantize);
    gt_case("quantize_widths", case_quantize_widths);
    gt_case("pages", case_pages);
    return gt_end();
}
