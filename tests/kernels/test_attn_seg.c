/*
 * test_attn_seg.c - attention over a segmented KV history: kcpu_attn_seg
 * (the AVX2 path chosen at run time and the forced scalar path, pools of
 * 1, 2 and 3 threads) against the oracle kref_attn_seg (dequantize with
 * kvq_dequant_block, then exact softmax in double).
 *
 * Each scenario lays out one layer's history the way the engine does:
 * FP16 sink tokens, INT4 blocks built with kvq_quantize_block from random
 * data with injected outliers (full and partial blocks), FP16 staging, the
 * chunk's own exact K/V as an F32 segment starting at pos0 (queries at
 * pos0 .. pos0 + n_q - 1, causal inside it), and optionally FP16 positions
 * after the last query (invisible to all) and segments in shuffled order.
 *
 * Tolerance per output element: |got - ref| <= SEG_ATOL*vmax + SEG_RTOL*|ref|
 * with vmax the largest |V| of the history (outputs are convex combinations
 * of V rows). The fused INT4 path rounds q * scale * s to int16 against the
 * query's max per block and the softmax weights p * s to int16 against
 * their max per tile (relative error 2^-16 of the largest term each), and
 * sums in f32: a few 1e-5 of vmax where the terms cancel. FP16 segments
 * through kcpu_attn_seg must
 * match kcpu_attn_f16 on the same contiguous cache up to f32 rounding
 * (EQ_ATOL / EQ_RTOL).
 * Threading: each Criterion test runs in its own process.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/kcpu.h"
#include "kernels/kvq.h"
#include "kernels/ref/kref.h"

#define SEG_ATOL 2e-5 /* times the largest |V| */
#define SEG_RTOL 2e-4
#define EQ_ATOL 2e-6
#define EQ_RTOL 2e-5

/* ---- helpers ---- */

static uint64_t rng_state = 0x6a09e667f3bcc909ull;

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

/* Elementwise check; reports the worst element. */
static void check_close(const char *what, const float *got, const float *ref, size_t n,
                        double atol, double rtol)
{
    size_t worst = 0;
    double worst_ex = -1.0;
    for (size_t i = 0; i < n; i++) {
        double err = fabs((double)got[i] - (double)ref[i]);
        double ex = err - (atol + rtol * fabs((double)ref[i]));
        if (isnan(got[i]) || ex > worst_ex) {
            worst_ex = isnan(got[i]) ? INFINITY : ex;
            worst = i;
        }
    }
    if (getenv("SEG_VERBOSE")) {
        double me = 0.0;
        for (size_t i = 0; i < n; i++)
            me = fmax(me, fabs((double)got[i] - (double)ref[i]));
        fprintf(stderr, "max abs err %.3g  %s\n", me, what);
    }
    cr_assert(worst_ex <= 0.0, "%s: element %zu got %.8g want %.8g (tol %.3g + %.3g*|ref|)",
              what, worst, (double)got[worst], (double)ref[worst], atol, rtol);
}

/* ---- scenarios ---- */

enum { SG_SINK, SG_Q4, SG_STAGE, SG_CHUNK, SG_FUTURE };

typedef struct {
    int n_head, n_kv, hd;
    int T, G;
    kvq_k_mode km;
    float budget;    /* outlier budget (fraction of a block's elements) */
    float out_frac;  /* fraction of elements made outliers */
    int n_sink;      /* FP16 positions at the start */
    int n_q4;        /* INT4 positions after them (blocks of T, last partial) */
    int n_stage;     /* FP16 positions after those */
    int n_q;         /* queries; the chunk [pos0, pos0 + n_q) */
    int chunk_f16;   /* the chunk is FP16 (decode tail) instead of F32 */
    int n_future;    /* FP16 positions after the chunk, seen by no query */
    int shuffle;     /* segments in random order */
    int pad;         /* extra elements per row of F32 / F16 segments */
    int qpos0;       /* > 0: the queries sit at qpos0 .. instead of the
                        chunk's positions (inside the history) */
    int window;      /* sliding window W (0: none): query p sees [p-W+1, p] */
    int kb, vb;      /* code widths of K / V (0: 4) */
} scen;

/* A built history: the segments and everything they point to. */
typedef struct {
    kvq_layout L;
    int D, n_pos, pos0, n_segs;
    kvs_seg *segs;
    float *k, *v;        /* [n_pos][D + pad] exact values */
    uint16_t *kh, *vh;   /* their fp16 copies */
    uint8_t *blocks;     /* n_blocks * L.bytes */
} hist;

/* Channel c of the generator: uniform in mu_c +- a_c, and with probability
 * out_frac an outlier at 3..8 a_c beyond the range (either side). */
static float gen_val(float mu, float a, float out_frac)
{
    if (rnd_f(0.0f, 1.0f) < out_frac) {
        float e = rnd_f(3.0f, 8.0f) * a;
        return rnd_u32() & 1 ? mu + e : mu - e;
    }
    return mu + rnd_f(-a, a);
}

static void hist_build(const scen *s, hist *h)
{
    memset(h, 0, sizeof *h);
    int D = s->n_kv * s->hd;
    char err[128] = "";
    cr_assert(kvq_layout_init_bits(&h->L, s->T, D, s->hd, s->G, s->km, s->budget,
                                   s->kb ? s->kb : 4, s->vb ? s->vb : 4, err, sizeof err) == 0,
              "layout: %s", err);
    h->D = D;
    h->pos0 = s->n_sink + s->n_q4 + s->n_stage;
    h->n_pos = h->pos0 + s->n_q + s->n_future;
    size_t st = (size_t)D + (size_t)s->pad, np = (size_t)h->n_pos + 1;
    h->k = malloc(np * st * sizeof(float));
    h->v = malloc(np * st * sizeof(float));
    h->kh = malloc(np * st * sizeof(uint16_t));
    h->vh = malloc(np * st * sizeof(uint16_t));
    cr_assert(h->k && h->v && h->kh && h->vh);
    float *kmu = malloc((size_t)D * 4 * sizeof(float));
    cr_assert(kmu);
    float *ka = kmu + D, *vmu = ka + D, *va = vmu + D;
    for (int c = 0; c < D; c++) {
        kmu[c] = rnd_f(-1.0f, 1.0f);
        ka[c] = rnd_f(0.2f, 1.0f);
        vmu[c] = rnd_f(-0.5f, 0.5f);
        va[c] = rnd_f(0.3f, 1.0f);
    }
    for (int p = 0; p < h->n_pos; p++)
        for (size_t c = 0; c < st; c++) {
            size_t i = (size_t)p * st + c;
            int cc = (int)c < D ? (int)c : 0;
            h->k[i] = gen_val(kmu[cc], ka[cc], s->out_frac);
            h->v[i] = gen_val(vmu[cc], va[cc], s->out_frac);
            h->kh[i] = kt_f32_to_f16(h->k[i]);
            h->vh[i] = kt_f32_to_f16(h->v[i]);
        }
    /* the EMA ranges the blocks are quantized with: the generator's range */
    float *klo = malloc((size_t)D * 4 * sizeof(float));
    cr_assert(klo);
    float *khi = klo + D, *vlo = khi + D, *vhi = vlo + D;
    for (int c = 0; c < D; c++) {
        klo[c] = kmu[c] - ka[c];
        khi[c] = kmu[c] + ka[c];
        vlo[c] = vmu[c] - va[c];
        vhi[c] = vmu[c] + va[c];
    }
    int n_blocks = (s->n_q4 + s->T - 1) / s->T;
    h->segs = malloc((size_t)(n_blocks + 8) * sizeof(kvs_seg));
    h->blocks = aligned_alloc(64, ((size_t)n_blocks * h->L.bytes + 64) / 64 * 64);
    void *qscr = malloc(kvq_quantize_scratch_bytes(&h->L) + 1);
    cr_assert(h->segs && h->blocks && qscr);
    int ns = 0, p = 0;
    /* f32 / f16 segment over [p, p + n) */
    #define ADD_FLOAT(n_, f16_)                                                   \
        do {                                                                      \
            if ((n_) > 0) {                                                       \
                kvs_seg *sg = &h->segs[ns++];                                     \
                sg->kind = (f16_) ? KVS_F16 : KVS_F32;                            \
                sg->pos0 = p;                                                     \
                sg->n = (n_);                                                     \
                sg->stride = st;                                                  \
                sg->k = (f16_) ? (const void *)(h->kh + (size_t)p * st)           \
                               : (const void *)(h->k + (size_t)p * st);           \
                sg->v = (f16_) ? (const void *)(h->vh + (size_t)p * st)           \
                               : (const void *)(h->v + (size_t)p * st);           \
                p += (n_);                                                        \
            }                                                                     \
        } while (0)
    ADD_FLOAT(s->n_sink, 1);
    for (int b = 0; b < n_blocks; b++) {
        int n = s->n_q4 - b * s->T < s->T ? s->n_q4 - b * s->T : s->T;
        void *base = h->blocks + (size_t)b * h->L.bytes;
        kvq_quantize_block(&h->L, base, h->k + (size_t)p * st, h->v + (size_t)p * st, st, n,
                           klo, khi, vlo, vhi, qscr);
        /* the oracle and the kernels read the stored values, so the exact
         * arrays are no longer needed for these positions */
        kvs_seg *sg = &h->segs[ns++];
        *sg = (kvs_seg){ .kind = KVS_Q4, .pos0 = p, .n = n, .k = base, .v = NULL, .stride = 0 };
        p += n;
    }
    ADD_FLOAT(s->n_stage, 1);
    ADD_FLOAT(s->n_q, s->chunk_f16);
    ADD_FLOAT(s->n_future, 1);
    #undef ADD_FLOAT
    h->n_segs = ns;
    if (s->shuffle)
        for (int i = ns - 1; i > 0; i--) {
            int j = (int)(rnd_u32() % (uint32_t)(i + 1));
            kvs_seg t = h->segs[i];
            h->segs[i] = h->segs[j];
            h->segs[j] = t;
        }
    free(kmu);
    free(klo);
    free(qscr);
}

static void hist_free(hist *h)
{
    free(h->k); free(h->v); free(h->kh); free(h->vh);
    free(h->segs); free(h->blocks);
}

/* Block statistics of a history, to make sure the scenario has what it
 * claims (outliers or none). */
static uint32_t hist_outliers(const hist *h)
{
    uint32_t n = 0;
    for (int i = 0; i < h->n_segs; i++)
        if (h->segs[i].kind == KVS_Q4)
            n += kvq_chdr(h->segs[i].k)->n_kout + kvq_chdr(h->segs[i].k)->n_vout;
    return n;
}

static kcpu_pool *g_pools[3];

static void pools_up(void)
{
    g_pools[0] = NULL;
    cr_assert(kcpu_pool_create(2, &g_pools[1]) == 0);
    cr_assert(kcpu_pool_create(3, &g_pools[2]) == 0);
}

static void pools_down(void)
{
    kcpu_pool_destroy(g_pools[1]);
    kcpu_pool_destroy(g_pools[2]);
}

/* Runs one scenario through the oracle and every kcpu configuration. */
static void run_scen(const scen *s, const char *name)
{
    hist h;
    hist_build(s, &h);
    int qpos0 = s->qpos0 > 0 ? s->qpos0 : h.pos0;
    if (s->out_frac * (float)s->n_q4 * (float)h.D >= 20.0f && s->budget > 0.0f)
        cr_assert(hist_outliers(&h) > 0, "%s: no outliers stored", name);
    size_t qs = (size_t)s->n_head * (size_t)s->hd, nq = (size_t)s->n_q * qs;
    float *q = malloc(nq * sizeof(float)), *ref = malloc(nq * sizeof(float));
    float *got = malloc(nq * sizeof(float));
    float *rs = malloc(kref_attn_seg_scratch_floats(h.segs, h.n_segs, &h.L) * sizeof(float));
    void *ws = malloc(kcpu_attn_seg_scratch_bytes(3, &h.L, s->hd));
    cr_assert(q && ref && got && rs && ws);
    for (size_t i = 0; i < nq; i++)
        q[i] = rnd_f(-2.0f, 2.0f);
    float scale = 1.0f / sqrtf((float)s->hd), vmax = 0.0f;
    for (size_t i = 0; i < (size_t)h.n_pos * ((size_t)h.D + (size_t)s->pad); i++)
        vmax = fmaxf(vmax, fabsf(h.v[i]));
    for (int j = 0; j < s->n_q; j++)
        kref_attn_seg(ref + (size_t)j * qs, q + (size_t)j * qs, qpos0 + j, s->window, h.segs,
                      h.n_segs, &h.L, s->n_head, s->n_kv, s->hd, scale, rs);
    char what[256];
    for (int scalar = 0; scalar < 2; scalar++) {
        kcpu_force_scalar(scalar);
        for (int pi = 0; pi < 3; pi++) {
            for (size_t i = 0; i < nq; i++)
                got[i] = NAN;
            kcpu_attn_seg(g_pools[pi], got, q, qpos0, s->n_q, s->window, h.segs, h.n_segs,
                          &h.L, s->n_head, s->n_kv, s->hd, scale, ws);
            snprintf(what, sizeof what,
                     "%s [%s, %d threads, heads %d/%d x %d, T %d G %d k_mode %d, pos0 %d n_q %d, "
                     "n_q4 %d, budget %g, outliers %g, window %d, K%dV%d]",
                     name, kcpu_simd_name(), kcpu_pool_size(g_pools[pi]), s->n_head, s->n_kv,
                     s->hd, s->T, s->G, (int)s->km, qpos0, s->n_q, s->n_q4, (double)s->budget,
                     (double)s->out_frac, s->window, h.L.k_bits, h.L.v_bits);
            check_close(what, got, ref, nq, SEG_ATOL * vmax, SEG_RTOL);
        }
    }
    kcpu_force_scalar(0);
    free(q); free(ref); free(got); free(rs); free(ws);
    hist_free(&h);
}

/* SmolLM2-like defaults: 9/3 x 64, T 128, G 64, 0.5% budget, 0.3% outliers. */
static scen base_scen(void)
{
    return (scen){ .n_head = 9, .n_kv = 3, .hd = 64, .T = 128, .G = 64,
                   .km = KVQ_K_PER_CHANNEL, .budget = 0.005f, .out_frac = 0.003f,
                   .n_sink = 4, .n_q4 = 300, .n_stage = 20, .n_q = 1 };
}

/* ---- tests ---- */

Test(attn_seg, mixed_segments_decode_and_chunk, .timeout = 240)
{
    pools_up();
    scen s = base_scen();
    run_scen(&s, "decode over sink+q4+stage+f32");
    s.n_q = 7;
    run_scen(&s, "chunk of 7");
    s.n_q = 40;
    s.n_future = 5;
    run_scen(&s, "chunk of 40 with future positions");
    s = base_scen();
    s.chunk_f16 = 1;
    run_scen(&s, "decode with an f16 tail");
    s.n_q = 3;
    s.pad = 8;
    run_scen(&s, "padded rows");
    pools_down();
}

Test(attn_seg, shuffled_order, .timeout = 240)
{
    pools_up();
    for (int rep = 0; rep < 4; rep++) {
        scen s = base_scen();
        s.shuffle = 1;
        s.n_q = rep % 2 ? 1 : 13;
        s.n_future = rep == 3 ? 9 : 0;
        s.T = rep >= 2 ? 32 : 128;
        run_scen(&s, "shuffled segments");
    }
    pools_down();
}

Test(attn_seg, outliers_and_partial_blocks, .timeout = 240)
{
    pools_up();
    static const struct { float budget, frac; } o[] = {
        { 0.0f, 0.0f },    /* no outlier list */
        { 0.005f, 0.0f },  /* lists empty */
        { 0.01f, 0.005f }, /* all fit */
        { 0.02f, 0.05f },  /* many, more than fit: some clamped */
        { 1.0f, 0.2f },    /* a fifth of the block exact */
    };
    static const int n_q4[] = { 1, 5, 127, 128, 129, 200 };
    for (int i = 0; i < 5; i++)
        for (int j = 0; j < 6; j++) {
            scen s = base_scen();
            s.budget = o[i].budget;
            s.out_frac = o[i].frac;
            s.n_q4 = n_q4[j];
            s.n_q = j % 2 ? 1 : 5;
            run_scen(&s, "outliers / partial blocks");
        }
    pools_down();
}

Test(attn_seg, k_modes_groups_shapes, .timeout = 300)
{
    pools_up();
    static const struct { int n_head, n_kv, hd; } sh[] = {
        { 9, 3, 64 }, { 8, 4, 8 }, { 6, 6, 48 }, { 32, 8, 128 },
    };
    static const int groups[] = { 16, 32, 64, 8, 4 };
    for (int si = 0; si < 4; si++)
        for (int km = 0; km < 2; km++)
            for (int gi = 0; gi < 5; gi++) {
                if (sh[si].hd % groups[gi])
                    continue;
                if (groups[gi] < 16 && sh[si].hd > 8)
                    continue; /* small groups: the hd 8 shape covers them */
                scen s = base_scen();
                s.n_head = sh[si].n_head;
                s.n_kv = sh[si].n_kv;
                s.hd = sh[si].hd;
                s.G = groups[gi];
                s.km = (kvq_k_mode)km;
                s.n_q4 = sh[si].hd == 128 ? 150 : 260;
                s.n_q = (si + gi) % 2 ? 1 : 6;
                s.T = si == 1 ? 16 : 64;
                run_scen(&s, "k mode / group / shape");
            }
    pools_down();
}

Test(attn_seg, single_positions, .timeout = 120)
{
    pools_up();
    scen s = base_scen();
    s.n_sink = s.n_q4 = s.n_stage = 0;
    run_scen(&s, "only the query's own position");
    s.n_q4 = 1;
    run_scen(&s, "one quantized token");
    s.n_q4 = 0;
    s.n_sink = 1;
    s.n_q = 2;
    run_scen(&s, "one sink and a chunk of 2");
    pools_down();
}

/* Long contexts: decode splits the history over the threads and merges the
 * partial results; a prefill chunk late in a 4K context. */
Test(attn_seg, long_context, .timeout = 300)
{
    pools_up();
    scen s = base_scen();
    s.n_q4 = 4096 - 4 - 60;
    s.n_stage = 60;
    run_scen(&s, "4K decode");
    s.km = KVQ_K_PER_TOKEN;
    s.G = 32;
    run_scen(&s, "4K decode, per-token K, G 32");
    s = base_scen();
    s.n_q4 = 1536;
    s.n_stage = 0;
    s.n_q = 64;
    s.shuffle = 1;
    run_scen(&s, "chunk of 64 at 1.5K, shuffled");
    pools_down();
}

/* Queries inside the quantized range: INT4 blocks partly visible (causal
 * masking inside a block), later blocks and the chunk not at all. */
Test(attn_seg, queries_inside_int4_blocks, .timeout = 120)
{
    pools_up();
    scen s = base_scen();
    s.n_q4 = 700;
    s.qpos0 = 4 + 200;
    s.n_q = 9;
    run_scen(&s, "queries at 204..212");
    s.qpos0 = 4 + 127;
    s.n_q = 1;
    s.shuffle = 1;
    run_scen(&s, "query at the last token of a block, shuffled");
    s.qpos0 = 2;
    s.n_q = 3;
    run_scen(&s, "queries among the sinks");
    pools_down();
}

/* Prefill chunks take the AVX2 path that unpacks INT4 tiles once per item
 * (many queries per KV head): items over two KV heads (a chunk of 2
 * tokens; with a long history, also split over the threads), blocks whose
 * length is no multiple of 8 (partial 8-row groups in the transposed K
 * tile), per-token K with several groups per head, and a chunk whose items
 * end inside a tile. */
Test(attn_seg, prefill_tiles, .timeout = 240)
{
    static const struct {
        const char *name;
        int n_head, n_kv, hd, T, G, km, n_q4, n_q, shuffle;
        float budget, out_frac;
    } c[] = {
        { "chunk of 2: two KV heads per item", 9, 3, 64, 128, 64, 0, 300, 2, 0, 0.005f, 0.003f },
        { "chunk of 2 at 1.2K: history split", 9, 3, 64, 128, 64, 0, 1200, 2, 0, 0.005f, 0.003f },
        { "T 100, outliers", 9, 3, 64, 100, 64, 0, 250, 5, 0, 0.01f, 0.005f },
        { "T 100, per-token K, G 16", 9, 3, 64, 100, 16, 1, 250, 7, 0, 0.01f, 0.005f },
        { "16/4 x 32, T 36, shuffled", 16, 4, 32, 36, 16, 0, 83, 11, 1, 0.005f, 0.003f },
    };
    pools_up();
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
        scen s = base_scen();
        s.n_head = c[i].n_head;
        s.n_kv = c[i].n_kv;
        s.hd = c[i].hd;
        s.T = c[i].T;
        s.G = c[i].G;
        s.km = (kvq_k_mode)c[i].km;
        s.n_q4 = c[i].n_q4;
        s.n_q = c[i].n_q;
        s.shuffle = c[i].shuffle;
        s.budget = c[i].budget;
        s.out_frac = c[i].out_frac;
        run_scen(&s, c[i].name);
    }
    pools_down();
}

/* Head layouts the fused INT4 path hands to the scalar item (head_dim >
 * 512), query groups larger than a work item, and tiny heads. */
Test(attn_seg, odd_head_layouts, .timeout = 240)
{
    pools_up();
    static const struct { int n_head, n_kv, hd, G; } sh[] = {
        { 2, 1, 528, 16 }, { 17, 1, 32, 32 }, { 40, 2, 16, 16 }, { 3, 3, 12, 4 },
    };
    for (int i = 0; i < 4; i++) {
        scen s = base_scen();
        s.n_head = sh[i].n_head;
        s.n_kv = sh[i].n_kv;
        s.hd = sh[i].hd;
        s.G = sh[i].G;
        s.T = 32;
        s.n_q4 = 100;
        s.n_q = i % 2 ? 1 : 4;
        run_scen(&s, "odd head layout");
    }
    pools_down();
}

/* Every code width, K and V apart (kvq.h): decode (the SIMD back end's
 * fused code path, few queries per KV head), decode in a sliding window,
 * and a prefill chunk (dequantized tiles, many queries per KV head),
 * per-channel and per-token K, against the dequantize-then-attend oracle,
 * on the SIMD and the scalar back ends. */
Test(attn_seg, every_width, .timeout = 240)
{
    pools_up();
    static const int wd[][2] = { { 2, 2 }, { 3, 2 }, { 3, 3 }, { 8, 8 }, { 4, 2 }, { 8, 4 } };
    for (int i = 0; i < 6; i++) {
        scen s = base_scen();
        s.kb = wd[i][0];
        s.vb = wd[i][1];
        s.n_q4 = 200;
        run_scen(&s, "decode");
        s.window = 77 + 40 * i;
        run_scen(&s, "decode, window");
        s.n_q = 24;
        s.window = i % 2 ? 0 : 150;
        run_scen(&s, "chunk");
        s.km = KVQ_K_PER_TOKEN;
        s.n_q = 3;
        s.window = 0;
        run_scen(&s, "per-token K");
    }
    pools_down();
}

/* Odd head dims and group sizes at every width, K and V apart: the first
 * four the scalar item takes (head_dim or G not a multiple of 16; int3
 * needs groups of 8), the others the SIMD one (head dims that are not a
 * multiple of 64, several V groups per head, 1 to 4 queries per KV head in
 * decode, 16 or 256 channels), in decode (fused) and in a chunk. */
Test(attn_seg, every_width_odd_heads, .timeout = 300)
{
    pools_up();
    static const struct { int n_head, n_kv, hd, G; } sh[] = {
        { 3, 3, 12, 4 }, { 4, 2, 24, 8 }, { 2, 1, 40, 8 }, { 6, 3, 7, 7 },
        { 16, 4, 32, 16 }, { 4, 2, 48, 16 }, { 4, 1, 80, 16 }, { 2, 2, 16, 16 },
        { 4, 1, 256, 32 }, { 6, 2, 112, 112 },
    };
    static const int bits[][2] = { { 2, 2 }, { 3, 3 }, { 4, 4 }, { 8, 8 }, { 3, 2 }, { 2, 8 } };
    for (int b = 0; b < 6; b++)
        for (int i = 0; i < 10; i++) {
            int kb = bits[b][0], vb = bits[b][1];
            if ((kb == 3 || vb == 3) && sh[i].G % 8)
                continue;
            if ((kb == 4 || vb == 4) && sh[i].n_kv * sh[i].hd % 2)
                continue;
            scen s = base_scen();
            s.n_head = sh[i].n_head;
            s.n_kv = sh[i].n_kv;
            s.hd = sh[i].hd;
            s.G = sh[i].G;
            s.T = i < 4 ? 16 : 64;
            s.n_q4 = i < 4 ? 50 : 150;
            s.n_q = i % 2 ? 1 : 9;
            s.kb = kb;
            s.vb = vb;
            run_scen(&s, "odd head layout");
            if (i < 4)
                continue;
            s.n_q = i % 2 ? 9 : 1;
            s.window = 23;
            run_scen(&s, "odd head layout, window");
        }
    pools_down();
}

/* A query that sees no position at all (every segment lies after it) gets
 * zeros, in the oracle and in the kernels. */
Test(attn_seg, nothing_visible)
{
    pools_up();
    scen s = base_scen();
    s.n_sink = s.n_q4 = s.n_stage = 0;
    s.n_q = 2;
    hist h;
    hist_build(&s, &h);
    for (int i = 0; i < h.n_segs; i++)
        h.segs[i].pos0 += 10; /* now after both queries */
    size_t nq = 2 * 9 * 64;
    float q[2 * 9 * 64], ref[2 * 9 * 64], got[2 * 9 * 64];
    for (size_t i = 0; i < nq; i++)
        q[i] = rnd_f(-1.0f, 1.0f);
    float *rs = malloc(kref_attn_seg_scratch_floats(h.segs, h.n_segs, &h.L) * sizeof(float));
    void *ws = malloc(kcpu_attn_seg_scratch_bytes(3, &h.L, 64));
    cr_assert(rs && ws);
    for (int j = 0; j < 2; j++)
        kref_attn_seg(ref + j * 9 * 64, q + j * 9 * 64, j, 0, h.segs, h.n_segs, &h.L, 9, 3, 64,
                      0.125f, rs);
    for (int pi = 0; pi < 3; pi++) {
        kcpu_attn_seg(g_pools[pi], got, q, 0, 2, 0, h.segs, h.n_segs, &h.L, 9, 3, 64, 0.125f,
                      ws);
        for (size_t i = 0; i < nq; i++)
            cr_assert(got[i] == 0.0f && ref[i] == 0.0f, "element %zu: %g / %g", i,
                      (double)got[i], (double)ref[i]);
    }
    free(rs);
    free(ws);
    hist_free(&h);
    pools_down();
}

/* FP16 segments cut from one contiguous cache give what kcpu_attn_f16 gives
 * on the cache itself (same tiles where the cuts allow; f32 rounding). */
Test(attn_seg, f16_segments_match_attn_f16, .timeout = 240)
{
    pools_up();
    static const struct { int n_head, n_kv, hd, pos0, n_q; } cs[] = {
        { 9, 3, 64, 4095, 1 }, { 9, 3, 64, 1000, 37 }, { 8, 4, 8, 300, 5 },
        { 6, 6, 48, 77, 1 }, { 32, 8, 128, 700, 3 },
    };
    for (int ci = 0; ci < 5; ci++) {
        int H = cs[ci].n_head, KV = cs[ci].n_kv, hd = cs[ci].hd;
        int n_ctx = cs[ci].pos0 + cs[ci].n_q;
        size_t st = (size_t)KV * (size_t)hd, nq = (size_t)cs[ci].n_q * (size_t)H * (size_t)hd;
        uint16_t *k = malloc((size_t)n_ctx * st * 2), *v = malloc((size_t)n_ctx * st * 2);
        float *q = malloc(nq * 4), *a = malloc(nq * 4), *b = malloc(nq * 4);
        void *ws1 = malloc(kcpu_attn_scratch_bytes(3, n_ctx));
        void *ws2 = malloc(kcpu_attn_seg_scratch_bytes(3, NULL, hd));
        kvs_seg segs[16];
        cr_assert(k && v && q && a && b && ws1 && ws2);
        for (size_t i = 0; i < (size_t)n_ctx * st; i++) {
            k[i] = kt_f32_to_f16(rnd_f(-1.0f, 1.0f));
            v[i] = kt_f32_to_f16(rnd_f(-1.0f, 1.0f));
        }
        for (size_t i = 0; i < nq; i++)
            q[i] = rnd_f(-2.0f, 2.0f);
        /* cuts at random places, the last segment holding the queries */
        int ns = 0, p = 0;
        while (p < n_ctx) {
            int n = ns == 15 ? n_ctx - p : 1 + (int)(rnd_u32() % (uint32_t)(n_ctx / 4 + 1));
            n = n < n_ctx - p ? n : n_ctx - p;
            segs[ns++] = (kvs_seg){ .kind = KVS_F16, .pos0 = p, .n = n,
                                    .k = k + (size_t)p * st, .v = v + (size_t)p * st,
                                    .stride = st };
            p += n;
        }
        for (int scalar = 0; scalar < 2; scalar++) {
            kcpu_force_scalar(scalar);
            for (int pi = 0; pi < 3; pi++) {
                kcpu_attn_f16(g_pools[pi], a, q, k, v, st, cs[ci].pos0, cs[ci].n_q, H, KV, hd,
                              0.125f, ws1);
                kcpu_attn_seg(g_pools[pi], b, q, cs[ci].pos0, cs[ci].n_q, 0, segs, ns, NULL, H,
                              KV, hd, 0.125f, ws2);
                char what[160];
                snprintf(what, sizeof what, "f16 segs vs attn_f16 [%s, %d threads, %d/%d x %d, %d segs]",
                         kcpu_simd_name(), kcpu_pool_size(g_pools[pi]), H, KV, hd, ns);
                check_close(what, b, a, nq, EQ_ATOL, EQ_RTOL);
            }
        }
        kcpu_force_scalar(0);
        free(k); free(v); free(q); free(a); free(b); free(ws1); free(ws2);
    }
    pools_down();
}

/* ---- sliding windows ---- */

/* Sliding-window layers (Gemma-3: W = 512 on 5 of every 6 layers): query p
 * sees positions [p - W + 1, p]. Windows below, at and past the history,
 * in decode and in chunks whose queries span the window's bound (each
 * query masked on its own), over INT4 blocks (fused decode path, dense
 * prefill-tile path, per-token K, outliers), FP16 sinks / staging / tail,
 * shuffled segments, long histories (decode splits start at the window)
 * and Gemma-3-270M's head layout (4/1 x 256). */
Test(attn_seg, windows, .timeout = 300)
{
    pools_up();
    static const int wins[] = { 1, 2, 17, 64, 127, 128, 129, 300, 324, 325, 326, 2000 };
    for (size_t i = 0; i < sizeof wins / sizeof wins[0]; i++) {
        scen s = base_scen(); /* 4 sinks + 300 INT4 + 20 staged, queries at 324.. */
        s.window = wins[i];
        s.n_q = 1;
        run_scen(&s, "window, decode");
        s.n_q = 40;
        s.n_future = i % 3 == 0 ? 5 : 0;
        run_scen(&s, "window, chunk of 40 spanning the bound");
        s.n_q = 3;
        s.chunk_f16 = 1;
        s.shuffle = i % 2;
        run_scen(&s, "window, f16 tail, shuffled");
    }
    static const struct {
        const char *name;
        int n_head, n_kv, hd, T, G, km, n_q4, n_q, window, qpos0;
        float budget, out_frac;
    } c[] = {
        { "per-token K, G 32", 9, 3, 64, 64, 32, 1, 260, 6, 100, 0, 0.01f, 0.005f },
        { "many outliers", 9, 3, 64, 128, 64, 0, 300, 9, 150, 0, 0.02f, 0.05f },
        { "queries inside the INT4 range", 9, 3, 64, 128, 64, 0, 700, 9, 77, 4 + 200, 0.005f, 0.003f },
        { "dense tiles: 16/4 x 32", 16, 4, 32, 36, 16, 0, 183, 24, 50, 0, 0.005f, 0.003f },
        { "gemma-3 4/1 x 256, decode", 4, 1, 256, 128, 256, 0, 600, 1, 512, 0, 0.005f, 0.003f },
        { "gemma-3 4/1 x 256, chunk", 4, 1, 256, 128, 256, 0, 600, 33, 64, 0, 0.005f, 0.003f },
        { "head_dim > 512 (scalar item)", 2, 1, 528, 32, 16, 0, 100, 4, 30, 0, 0.005f, 0.003f },
    };
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
        scen s = base_scen();
        s.n_head = c[i].n_head;
        s.n_kv = c[i].n_kv;
        s.hd = c[i].hd;
        s.T = c[i].T;
        s.G = c[i].G;
        s.km = (kvq_k_mode)c[i].km;
        s.n_q4 = c[i].n_q4;
        s.n_q = c[i].n_q;
        s.window = c[i].window;
        s.qpos0 = c[i].qpos0;
        s.budget = c[i].budget;
        s.out_frac = c[i].out_frac;
        run_scen(&s, c[i].name);
    }
    /* a long history: decode splits over the threads start at the window */
    scen s = base_scen();
    s.n_q4 = 4096 - 4 - 60;
    s.n_stage = 60;
    s.window = 512;
    run_scen(&s, "4K decode, window 512");
    s.n_q = 2;
    s.window = 1500;
    run_scen(&s, "4K, chunk of 2, window 1500");
    pools_down();
}

/* Every position of a history as the segments store it (F32 exact, FP16
 * rounded, INT4 dequantized): k, v [n_pos][D]. */
static void hist_dense(const hist *h, float *k, float *v)
{
    const size_t D = (size_t)h->D;
    for (int i = 0; i < h->n_segs; i++) {
        const kvs_seg *sg = &h->segs[i];
        if (sg->kind == KVS_Q4) {
            kvq_dequant_block(&h->L, sg->k, k + (size_t)sg->pos0 * D, v + (size_t)sg->pos0 * D,
                              D);
            continue;
        }
        for (int p = 0; p < sg->n; p++)
            for (size_t c = 0; c < D; c++) {
                size_t src = (size_t)p * sg->stride + c, dst = ((size_t)sg->pos0 + p) * D + c;
                if (sg->kind == KVS_F16) {
                    k[dst] = kt_f16_to_f32(((const uint16_t *)sg->k)[src]);
                    v[dst] = kt_f16_to_f32(((const uint16_t *)sg->v)[src]);
                } else {
                    k[dst] = ((const float *)sg->k)[src];
                    v[dst] = ((const float *)sg->v)[src];
                }
            }
    }
}

/* The oracle itself against a brute-force dense attention over exactly
 * positions [p - W + 1, p] (and [0, p] without a window) of the stored
 * values, in double: agreement to float rounding (the oracle keeps its
 * scores as float). */
Test(attn_seg, ref_window_is_dense_over_last_w, .timeout = 120)
{
    static const int wins[] = { 0, 1, 5, 100, 323, 324, 325, 400 };
    for (size_t wi = 0; wi < sizeof wins / sizeof wins[0]; wi++) {
        scen s = base_scen();
        s.n_q = 12;
        s.n_future = 3;
        s.shuffle = (int)wi % 2;
        s.window = wins[wi];
        hist h;
        hist_build(&s, &h);
        const int D = h.D, hd = s.hd, H = s.n_head, group = s.n_head / s.n_kv;
        float *k = calloc((size_t)h.n_pos * D, sizeof(float));
        float *v = calloc((size_t)h.n_pos * D, sizeof(float));
        size_t qs = (size_t)H * hd;
        float *q = malloc(qs * sizeof(float)), *ref = malloc(qs * sizeof(float));
        float *rs = malloc(kref_attn_seg_scratch_floats(h.segs, h.n_segs, &h.L) * sizeof(float));
        cr_assert(k && v && q && ref && rs);
        hist_dense(&h, k, v);
        for (int j = 0; j < s.n_q; j++) {
            int p = h.pos0 + j, lo = s.window > 0 ? p - s.window + 1 : 0;
            lo = lo > 0 ? lo : 0;
            for (size_t i = 0; i < qs; i++)
                q[i] = rnd_f(-2.0f, 2.0f);
            float scale = 1.0f / sqrtf((float)hd);
            kref_attn_seg(ref, q, p, s.window, h.segs, h.n_segs, &h.L, H, s.n_kv, hd, scale, rs);
            for (int hh = 0; hh < H; hh++) {
                const float *qh = q + (size_t)hh * hd;
                int c0 = hh / group * hd;
                double mx = -INFINITY, sum = 0.0, acc[64] = { 0 }, sc[400];
                for (int t = lo; t <= p; t++) {
                    double dot = 0.0;
                    for (int d = 0; d < hd; d++)
                        dot += (double)qh[d] * (double)k[(size_t)t * D + c0 + d];
                    sc[t - lo] = dot * scale;
                    mx = fmax(mx, sc[t - lo]);
                }
                for (int t = lo; t <= p; t++) {
                    double w = exp(sc[t - lo] - mx);
                    sum += w;
                    for (int d = 0; d < hd; d++)
                        acc[d] += w * (double)v[(size_t)t * D + c0 + d];
                }
                for (int d = 0; d < hd; d++) {
                    double want = acc[d] / sum, got = ref[(size_t)hh * hd + d];
                    cr_assert(fabs(got - want) <= 1e-6 + 1e-5 * fabs(want),
                              "window %d query %d head %d dim %d: oracle %.9g, dense %.9g",
                              s.window, p, hh, d, got, want);
                }
            }
        }
        free(k); free(v); free(q); free(ref); free(rs);
        hist_free(&h);
    }
}
