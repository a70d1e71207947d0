/*
 * kv_plan.c - the host-side KV planner (see kv_plan.h): free lists of INT4
 * blocks and FP16 pages, the entry lists of sequences, and every step
 * decision of the LiveKVQuant-P lifecycle (sinks, warm-up staging and its
 * re-quantization, live blocks, the decode tail), plus pool sizing and the
 * admission estimate. Owns only host bookkeeping: no arena, no EMA state,
 * no data. May call config/ and kernels/kvq.h (layout sizes).
 *
 * Invariants: the entries of a sequence cover positions [first, n_tokens)
 * in order, first = 0 in a pool without a window, else the first position
 * of the oldest entry a later query can still see (or that a pending
 * re-quantization needs); stage_first / tail_first (entry indices, -1 none)
 * open the runs of staged warm-up pages and of decode-tail pages, which
 * always run to the end of the entry list. A step writes only into units it
 * reserved or past the visible end of the last page, so the history read
 * during the step is the history as it was before it.
 * Threading: one thread at a time per pool (the executor's).
 */
#include "engine/kv/kv_plan.h"

#include "engine/util/err.h"

#include <assert.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A shared pool (several KV modes, kv_modes): one byte arena of n_slabs
 * slabs of S bytes; a slab in use holds units of one class only (class 0:
 * FP16 pages, class m > 0: blocks of quantized mode id m), as many as fit
 * (per[c], each cb[c] bytes), and goes back to the common stack of free
 * slabs when all its units are free, so the memory moves between modes.
 * A unit's id is its byte offset / U (U divides S and every cb[c]): the
 * executors address blocks and pages as arena + id * U whatever the mode. */
typedef struct {
    size_t U;                   /* bytes per id step */
    int64_t S;                  /* bytes per slab (1-8 of the largest unit) */
    size_t cb[CFG_KV_MODES];    /* bytes of a unit of class c, rounded up to U
                                   (0: the pool holds no such class) */
    int32_t per[CFG_KV_MODES];  /* units of class c per slab */
    int32_t M;                  /* the most units any slab holds */
    int n_cls;                  /* classes held */
} kvp_geo;

struct kvp_pool {
    cfg_kv cfg;
    kvc_dims d;
    int window;    /* sequences keep their last `window` positions (0: all) */
    kvq_layout L;  /* the layout of qmode's blocks */
    int has_q;     /* a quantized mode is held */
    int qmode;     /* the pool's quantized mode id: its own, else the first held */
    kvq_layout Lm[CFG_KV_MODES]; /* the block layout of each quantized mode held */
    size_t qbm[CFG_KV_MODES];    /* one block of mode m, all layers (0: not held) */
    int P;         /* tokens per FP16 page */
    size_t qbytes; /* one block (of qmode), all layers */
    size_t fbytes; /* one page, all layers */
    /* the shared pool (kvp_geo): shared = 0 for a single-mode pool */
    int shared;
    kvp_geo g;
    int32_t n_slabs;
    int32_t *scls;    /* [n_slabs]: the class of a slab in use, -1 free */
    int32_t *snfree;  /* [n_slabs]: its free units */
    int32_t *sfree;   /* [n_slabs * M]: each slab's stack of free unit indices */
    int32_t *slabs;   /* stack of free slabs (the lowest handed out first) */
    int32_t n_free_slabs;
    int64_t used_cls[CFG_KV_MODES];   /* units of each class held (by anyone) */
    int64_t cached_cls[CFG_KV_MODES]; /* of those, held by cache nodes only */
    int32_t *qfree, *ffree; /* stacks of free ids */
    int64_t nq, nf, nqfree, nffree;
    kvp_seq *seqs; /* live sequences, newest first */
    /* holders of each unit (the prefix cache shares units): sref[kind][id]
     * sequences (a step's reservation included), nref[kind][id] cache
     * nodes; a unit is free when both are 0, "cached" (evictable, counted
     * as free by admission) when only nodes hold it */
    int32_t *sref[2], *nref[2];
    int64_t ncached[2];
    struct kvp_prefix *px; /* NULL: no prefix cache */
};

struct kvp_seq {
    kvp_pool *p;
    kvp_seq *next, *prev; /* the pool's list */
    void *owner;
    int max_tokens;
    int mode;         /* cfg_kv_mode of this sequence (the pool's by default) */
    kvp_caps cap;
    kvp_ent *ents;
    int n_ents;
    int n_tokens;
    int chunk_idx;    /* prefill chunks committed */
    int prefill_done;
    int stage_first;  /* index of the first staged entry, -1 none */
    int tail_first;   /* index of the first tail entry, -1 none */
    kvp_step st;      /* its tgt/src/rq_ids point to the tables below */
    kvp_tgt *tgt;
    kvp_src *src;
    int32_t *rq_ids;
};

/* Why a plan could not be made: the pool lacks units, or (never for a
 * valid config) a step table lacks room. */
enum { NO_UNITS = -1, NO_ROOM = -2 };

/* A sequence quantizes (INT4 mode) or keeps everything in FP16 pages. */
static int is_int4(const kvp_seq *s)
{
    return s->mode != CFG_KV_FP16;
}

static int64_t cdiv(int64_t a, int64_t b)
{
    return a <= 0 ? 0 : (a + b - 1) / b;
}

static int64_t max64(int64_t a, int64_t b)
{
    return a > b ? a : b;
}

/* The quantized block layout of mode id m for configuration c. */
static int mode_layout(const cfg_kv *c, const kvc_dims *d, int m, kvq_layout *L, char *err,
                       size_t errlen);

/* The slab geometry of a pool of configuration c (dimensions d) holding
 * several modes: ids step by U = 64 bytes (every block layout is a
 * multiple of 8 bytes; 64 keeps units cache-line aligned and ids within
 * int32 up to 128 GiB); a slab is a few of the largest unit, so that a
 * slab of any class wastes at most about 3 % of itself. Returns 0, or
 * -EINVAL with a reason. */
static int geometry(const cfg_kv *c, const kvc_dims *d, kvp_geo *g, char *err, size_t errlen)
{
    memset(g, 0, sizeof *g);
    g->U = 64;
    size_t big = 0;
    for (int m = 0; m < CFG_KV_MODES; m++) {
        size_t b;
        if (!cfg_kv_has_mode(c, m))
            continue;
        if (m == CFG_KV_FP16) {
            b = (size_t)kvp_page_tokens(c) * (size_t)d->n_layers * (size_t)d->kv_dim * 4;
        } else {
            kvq_layout L;
            if (mode_layout(c, d, m, &L, err, errlen) < 0)
                return -EINVAL;
            b = L.bytes * (size_t)d->n_layers;
        }
        g->cb[m] = (b + g->U - 1) / g->U * g->U;
        big = g->cb[m] > big ? g->cb[m] : big;
        g->n_cls++;
    }
    /* pages always exist (sinks, staging, the decode tail) */
    if (!g->cb[CFG_KV_FP16]) {
        size_t b = (size_t)kvp_page_tokens(c) * (size_t)d->n_layers * (size_t)d->kv_dim * 4;
        g->cb[CFG_KV_FP16] = (b + g->U - 1) / g->U * g->U;
        big = g->cb[CFG_KV_FP16] > big ? g->cb[CFG_KV_FP16] : big;
        g->n_cls++;
    }
    /* the slab: the smallest multiple (1..8) of the largest unit where no
     * class wastes more than 3 % of it (int3 blocks are 0.78 of int4's: one
     * or two per slab of one or two int4 blocks would cost as much as int4
     * blocks), else the multiple that wastes least */
    double best = 2.0;
    for (int k = 1; k <= 8; k++) {
        int64_t S = (int64_t)big * k;
        double w = 0.0;
        for (int m = 0; m < CFG_KV_MODES; m++)
            if (g->cb[m] && (double)(S % (int64_t)g->cb[m]) / (double)S > w)
                w = (double)(S % (int64_t)g->cb[m]) / (double)S;
        if (w < best - 1e-12) {
            best = w;
            g->S = S;
        }
        if (w <= 0.03)
            break;
    }
    for (int m = 0; m < CFG_KV_MODES; m++) {
        if (!g->cb[m])
            continue;
        g->per[m] = (int32_t)(g->S / (int64_t)g->cb[m]);
        if (g->per[m] > g->M)
            g->M = g->per[m];
    }
    return 0;
}

/* What a unit of class c costs in a shared pool: its share of a slab. */
static int64_t unit_cost(const kvp_geo *g, int c)
{
    return g->per[c] > 0 ? g->S / g->per[c] : g->S;
}

/* ---- layer groups ------------------------------------------------------------------ */

/* Tokens per unit of a window group: its FP16 pages in fp16 mode, its
 * blocks (and pages) when quantized (window_kv int2 .. int8). They are not
 * the global layers' blocks, and a window sequence holds its last W - 1
 * positions plus a few units (kvp_window_need), so they are as small as
 * int4 mode's pages: the largest divisor of block_tokens up to 16 (a
 * power-of-two step down), so that every chunk still fills whole units.
 * Gemma-3-270M (W 512, 15 layers), FP16: 544 positions per sequence
 * instead of 768 with pages of 128, 7.97 MiB instead of 11.25 MiB per
 * sequence slot; quantized: 36 blocks of 16 instead of 6 of 256. */
static int window_page_tokens(int T)
{
    int P = T;
    while (P > 16 && P % 2 == 0)
        P /= 2;
    return P;
}

void kvp_layer_groups(const cfg_kv *c, const kvc_dims *d, kvp_groups *g, int32_t *group,
                      int32_t *local)
{
    memset(g, 0, sizeof *g);
    for (int l = 0; l < d->n_layers; l++) {
        int w = d->layer_window ? d->layer_window[l] : 0;
        int k = w > 0 ? KVC_LAYER_WINDOW : KVC_LAYER_GLOBAL;
        if (group)
            group[l] = k;
        if (local)
            local[l] = g->n_layers[k];
        g->n_layers[k]++;
        if (w > g->window)
            g->window = w;
    }
    for (int k = 0; k < KVC_LAYER_KINDS; k++) {
        g->cfg[k] = *c;
        g->dims[k] = (kvc_dims){g->n_layers[k], d->kv_dim, d->head_dim, NULL};
    }
    cfg_kv *wc = &g->cfg[KVC_LAYER_WINDOW];
    const int wm = kvp_group_mode(c, KVC_LAYER_WINDOW, cfg_kv_mode_id(c));
    wc->mode = wm == CFG_KV_FP16 ? CFG_KV_FP16 : CFG_KV_INT4;
    if (wm != CFG_KV_FP16) { /* window_kv = int2 .. int8: codes of window_bits */
        cfg_kv_mode_bits(wm, &wc->k_bits, &wc->v_bits);
        wc->clip_quantile = cfg_kv_window_clip(c);
    }
    if (c->modes) {
        wc->modes = 0;
        for (int m = 0; m < CFG_KV_MODES; m++)
            if (cfg_kv_has_mode(c, m))
                wc->modes |= 1u << kvp_group_mode(c, KVC_LAYER_WINDOW, m);
    }
    /* FP16 pages or quantized blocks alike, the window group's units are
     * small (see window_page_tokens): a quantized window of W positions
     * holds about W + 3 blocks' worth, not 3 blocks of block_tokens */
    wc->block_tokens = window_page_tokens(c->block_tokens);
}

int kvp_group_mode(const cfg_kv *c, int kind, int mode)
{
    if (kind != KVC_LAYER_WINDOW || mode == CFG_KV_FP16)
        return mode;
    if (c->window_kv != CFG_KV_INT4)
        return CFG_KV_FP16;
    /* every quantized mode's window layers take codes of window_bits */
    cfg_kv w = *c;
    w.mode = CFG_KV_INT4;
    w.k_bits = w.v_bits = c->window_bits;
    return cfg_kv_mode_id(&w);
}

/* A window sequence of the engine's steps (chunk-aligned prompt pieces,
 * then decode) holds, after a commit at n tokens, the entries that touch
 * its last W - 1 positions [n - W + 1, n - 1] (a query at n sees those and
 * itself), plus what is kept whatever the window: the staged warm-up run
 * until its re-quantization and the decode tail (< T tokens). In position
 * order its blocks are the re-quantized warm-up (from a page boundary;
 * full blocks of T, the last short), the live chunks (from multiples of C,
 * hence of T; the prompt's last one short) and the re-quantized tail
 * blocks (full): W - 1 positions touch at most ceil((W-1)/T) + 1 blocks of
 * T plus the two short ones. FP16 mode: pages of P tokens aligned to
 * multiples of P (every page is filled before the next one). */
void kvp_window_need(const cfg_kv *c, int window, int n_ctx, int64_t *hq, int64_t *hf,
                     int64_t *pq, int64_t *pf)
{
    const int64_t P = kvp_page_tokens(c), T = c->block_tokens, C = c->chunk_size;
    int64_t W = window;
    if (n_ctx > 0 && W > n_ctx)
        W = n_ctx; /* never more than the context */
    if (W < 1)
        W = 1;
    if (c->mode != CFG_KV_INT4) {
        int64_t held = W > 1 ? cdiv(W - 1, P) + 1 : 0;
        *hq = *pq = 0;
        *hf = held + 1;                        /* + a decode step's page */
        *pf = max64(*hf, held + cdiv(C, P));   /* + a chunk's pages */
        return;
    }
    const int64_t S = c->sink_tokens, K = c->warmup_chunks;
    const int keep = c->keep_warmup_fp16;
    int64_t bq = cdiv(W - 1, T) + 3;                 /* blocks touching the window */
    int64_t fs = cdiv(S, P);                         /* sinks, until the window passes */
    int64_t ft = cdiv(T - 1, P);                     /* the decode tail */
    int64_t fk = keep && K > 0 ? cdiv(W - 1, P) + 1 : 0; /* warm-up kept FP16 */
    int64_t stage = K > 0 ? cdiv(K * C, P) + 1 : 0;  /* the staged run, whole */
    /* the warm-up's re-quantization leaves out the pages the window has
     * passed: at most W - 1 positions plus a page */
    int64_t rq = K > 0 && !keep ? (cdiv(W - 1 + P, T) < cdiv(K * C, T) ? cdiv(W - 1 + P, T)
                                                                        : cdiv(K * C, T)) + 1
                                : 0;
    *hq = bq + 1;            /* + the block a full tail becomes */
    *hf = fs + ft + 1 + fk;  /* + a decode step's tail page */
    *pq = max64(*hq, max64(bq + cdiv(C, T), rq));
    *pf = max64(*hf, fs + stage + 1 + fk);
}

/* ---- configuration-level planning --------------------------------------------- */

int kvp_page_tokens(const cfg_kv *c)
{
    if (!cfg_kv_has_quant(c))
        return c->block_tokens;
    return c->block_tokens < 16 ? c->block_tokens : 16;
}

int kvp_unit_tokens(const cfg_kv *c)
{
    int P = kvp_page_tokens(c), W = window_page_tokens(c->block_tokens);
    int unit = P < c->block_tokens ? P : c->block_tokens;
    return W < unit ? W : unit;
}

void kvp_estimate(const cfg_kv *c, int n, int64_t *nq, int64_t *nf)
{
    const int64_t P = kvp_page_tokens(c), T = c->block_tokens, C = c->chunk_size;
    if (c->mode != CFG_KV_INT4) {
        *nq = 0;
        *nf = (n + P - 1) / P + 1;
        return;
    }
    /* sinks stay in FP16; every chunk's other tokens fill whole blocks of
     * their own (chunks are multiples of the block size); the warm-up
     * chunks are staged in pages and all held at once at warm-up end,
     * together with the blocks they become; one page of decode tail */
    int64_t sinks = c->sink_tokens < n ? c->sink_tokens : n;
    int64_t q = 0, stage = 0;
    for (int64_t at = 0, k = 0; at < n; at += C, k++) {
        int64_t len = n - at < C ? n - at : C;
        if (at < sinks)
            len -= sinks - at;
        if (len <= 0)
            continue;
        q += (len + T - 1) / T;
        if (k < c->warmup_chunks)
            stage += (len + P - 1) / P;
    }
    *nq = q;
    *nf = (sinks + P - 1) / P + stage + 1;
}

int kvp_check(const cfg_kv *c, const kvc_dims *d, char *err, size_t errlen)
{
    if (d->n_layers <= 0 || d->kv_dim <= 0 || d->head_dim <= 0 || d->kv_dim % d->head_dim)
        return lkq_err(err, errlen, -EINVAL,
                       "bad KV dimensions (%d layers, kv_dim %d, head_dim %d)",
                    d->n_layers, d->kv_dim, d->head_dim);
    if (cfg_kv_validate_model(c, d->head_dim, d->kv_dim / d->head_dim, err, errlen) < 0)
        return -EINVAL;
    return 0;
}

static int make_layout(const cfg_kv *c, const kvc_dims *d, kvq_layout *L, char *err,
                       size_t errlen)
{
    if (kvq_layout_init_bits(L, c->block_tokens, d->kv_dim, d->head_dim,
                             cfg_kv_v_group(c, d->head_dim), c->k_mode, c->outlier_budget,
                             c->k_bits, c->v_bits, err, errlen) < 0)
        return -EINVAL;
    return 0;
}

static int mode_layout(const cfg_kv *c, const kvc_dims *d, int m, kvq_layout *L, char *err,
                       size_t errlen)
{
    cfg_kv cm = cfg_kv_with_mode(c, m);
    return make_layout(&cm, d, L, err, errlen);
}

/* Sizes the global group (d: its layers) for max_seqs sequences of n_ctx,
 * or for the budget (budget_bytes, or budget_tokens tokens; both 0: none). */
static int size_global(const cfg_kv *cfg, const kvc_dims *d, int n_ctx, int max_seqs,
                       int64_t budget_bytes, int64_t budget_tokens, int64_t *n_qblocks,
                       int64_t *n_fpages, char *err, size_t errlen)
{
    const int T = cfg->block_tokens, P = kvp_page_tokens(cfg);
    const int64_t L = d->n_layers, D = d->kv_dim;
    const int64_t fbytes = (int64_t)P * L * D * 2 * 2;
    if (cfg->mode == CFG_KV_FP16) {
        int64_t per_seq = (n_ctx + P - 1) / P + 1;
        int64_t nf = per_seq * max_seqs;
        if (budget_bytes > 0)
            nf = budget_bytes / fbytes;
        else if (budget_tokens > 0)
            nf = (budget_tokens + P - 1) / P;
        if (nf < 1)
            return lkq_err(err, errlen, -EINVAL,
                           "kv_budget is smaller than one KV page (%lld bytes)",
                        (long long)fbytes);
        *n_qblocks = 0;
        *n_fpages = nf;
        return 0;
    }
    kvq_layout Lq;
    if (make_layout(cfg, d, &Lq, err, errlen) < 0)
        return -EINVAL;
    const int64_t qbytes = (int64_t)Lq.bytes * L;
    /* FP16 pages one sequence may hold at once: sinks, W staged chunks (or
     * the prompt, if shorter), the decode tail, and partial-page slack. */
    int64_t stage = (int64_t)cfg->warmup_chunks * cfg->chunk_size;
    if (stage > n_ctx)
        stage = n_ctx;
    int64_t f_seq = (cfg->sink_tokens + P - 1) / P + (stage + P - 1) / P + (T + P - 1) / P + 3;
    int64_t q_seq = (n_ctx + T - 1) / T + 2 + (n_ctx + cfg->chunk_size - 1) / cfg->chunk_size;
    if (budget_bytes > 0 || budget_tokens > 0) {
        /* A budget buys INT4 blocks; staging pages for a few sequences at a
         * time are carved out of it first. */
        int64_t budget = budget_bytes;
        if (budget_tokens > 0)
            budget = (budget_tokens + T - 1) / T * qbytes;
        /* FP16 pages are shared: warm-up staging for the sequences that
         * may prefill at once (KVC_PREFILL_SLOTS) plus, per sequence, its
         * sink page and a short decode tail (a longer tail borrows pages
         * the staging does not use; if none are left the scheduler
         * preempts). */
        int64_t slots = max_seqs < KVC_PREFILL_SLOTS ? max_seqs : KVC_PREFILL_SLOTS;
        /* sequences the budget can hold if they average half the context */
        int64_t half = (n_ctx + 1) / 2;
        int64_t q_half = (half + T - 1) / T + (half + cfg->chunk_size - 1) / cfg->chunk_size;
        int64_t held = budget_tokens > 0 ? (budget_tokens + half - 1) / half
                                         : budget / (q_half * qbytes);
        held = held < 1 ? 1 : held > max_seqs ? max_seqs : held;
        int64_t nf = slots * ((stage + P - 1) / P + cfg->warmup_chunks + 1) +
                     held * ((cfg->sink_tokens + P - 1) / P + 2);
        if (budget_tokens > 0)
            budget += nf * fbytes; /* tokens count what is quantized */
        int64_t nq = (budget - nf * fbytes) / qbytes;
        if (nq < 1)
            return lkq_err(err, errlen, -EINVAL,
                        "kv_budget too small: %lld bytes cannot hold the FP16 staging "
                        "(%lld bytes) plus one INT4 block (%lld bytes)",
                        (long long)budget, (long long)(nf * fbytes), (long long)qbytes);
        *n_qblocks = nq;
        *n_fpages = nf;
        return 0;
    }
    *n_qblocks = q_seq * max_seqs;
    *n_fpages = f_seq * max_seqs;
    return 0;
}

/* Bytes of one block / one page of a group (all its layers). */
static void unit_bytes(const cfg_kv *c, const kvc_dims *d, int64_t *qbytes, int64_t *fbytes)
{
    kvq_layout Lq;
    *qbytes = 0;
    if (cfg_kv_has_quant(c) && make_layout(c, d, &Lq, NULL, 0) == 0)
        *qbytes = (int64_t)Lq.bytes * d->n_layers;
    *fbytes = (int64_t)kvp_page_tokens(c) * d->n_layers * d->kv_dim * 2 * 2;
}

/* 1 if a pool of configuration c holds several modes: a shared pool. */
static int mixed(const cfg_kv *c)
{
    return cfg_kv_mode_count(c) > 1;
}

/* Slabs for `bytes` of units in a shared pool of geometry g: rounded up,
 * plus one per class (each class may hold one partially filled slab). */
static int64_t slabs_for(const kvp_geo *g, int64_t bytes)
{
    return cdiv(bytes, g->S) + g->n_cls;
}

/* The sizes of a shared pool of n_slabs slabs as kvp_pool_create takes
 * them: no blocks, and the pages whose bytes round up to n_slabs slabs. */
static void shared_sizes(const kvp_geo *g, int64_t n_slabs, int64_t *n_qblocks,
                         int64_t *n_fpages)
{
    *n_qblocks = 0;
    *n_fpages = n_slabs * g->S / (int64_t)g->cb[CFG_KV_FP16];
}

/* size_global for a pool of several modes (kv_modes): one shared arena of
 * slabs (kvp_geo). With no budget, max_seqs sequences of n_ctx fit in any
 * one mode (the largest of the modes' single-mode sizes, in slab shares,
 * plus a partial slab per class); a byte budget is the arena; a token
 * budget buys its tokens in the mode that needs the most bytes. */
static int size_global_modes(const cfg_kv *cfg, const kvc_dims *d, int n_ctx, int max_seqs,
                             int64_t budget_bytes, int64_t budget_tokens, int64_t *n_qblocks,
                             int64_t *n_fpages, char *err, size_t errlen)
{
    if (!mixed(cfg))
        return size_global(cfg, d, n_ctx, max_seqs, budget_bytes, budget_tokens, n_qblocks,
                           n_fpages, err, errlen);
    kvp_geo g;
    if (geometry(cfg, d, &g, err, errlen) < 0)
        return -EINVAL;
    int64_t n_slabs;
    if (budget_bytes > 0) {
        n_slabs = budget_bytes / g.S;
        if (n_slabs < g.n_cls)
            return lkq_err(err, errlen, -EINVAL,
                           "kv_budget too small: %lld bytes; a pool of %d KV modes needs at "
                           "least %d slabs of %lld bytes", (long long)budget_bytes,
                           cfg_kv_mode_count(cfg), g.n_cls, (long long)g.S);
    } else {
        int64_t need = 0;
        for (int m = 0; m < CFG_KV_MODES; m++) {
            int64_t nq, nf;
            if (!cfg_kv_has_mode(cfg, m))
                continue;
            cfg_kv cm = cfg_kv_with_mode(cfg, m);
            if (size_global(&cm, d, n_ctx, max_seqs, 0, budget_tokens, &nq, &nf, err,
                            errlen) < 0)
                return -EINVAL;
            need = max64(need, nq * unit_cost(&g, m) + nf * unit_cost(&g, CFG_KV_FP16));
        }
        n_slabs = slabs_for(&g, need);
    }
    if (n_slabs > INT32_MAX / (g.M > 0 ? g.M : 1))
        return lkq_err(err, errlen, -EINVAL, "KV pool too large (%lld slabs)",
                       (long long)n_slabs);
    shared_sizes(&g, n_slabs, n_qblocks, n_fpages);
    return 0;
}

int kvp_pool_size(const cfg_kv *cfg, const kvc_dims *d, int n_ctx, int max_seqs,
                  kvc_pool_sizes *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    if (kvp_check(cfg, d, err, errlen) < 0)
        return -EINVAL;
    if (n_ctx <= 0 || max_seqs <= 0)
        return lkq_err(err, errlen, -EINVAL, "n_ctx and max_seqs must be positive");
    kvp_groups g;
    kvp_layer_groups(cfg, d, &g, NULL, NULL);
    int64_t budget = cfg->kv_budget_bytes;
    if (g.n_layers[KVC_LAYER_WINDOW] > 0) {
        /* every sequence slot holds its window's decode bound, and the
         * sequences that may prefill at once their peak */
        const cfg_kv *wc = &g.cfg[KVC_LAYER_WINDOW];
        const kvc_dims *wd = &g.dims[KVC_LAYER_WINDOW];
        if (kvp_check(wc, wd, err, errlen) < 0)
            return -EINVAL;
        int64_t hq = 0, hf = 0, pq = 0, pf = 0, qb, fb, wneed = 0;
        int64_t slots = max_seqs < KVC_PREFILL_SLOTS ? max_seqs : KVC_PREFILL_SLOTS;
        kvp_geo wg;
        if (mixed(wc) && geometry(wc, wd, &wg, err, errlen) < 0)
            return -EINVAL;
        for (int m = 0; m < CFG_KV_MODES; m++) {
            /* each mode the group holds (kv_modes): the larger need */
            int64_t h[4];
            if (!cfg_kv_has_mode(wc, m))
                continue;
            cfg_kv cm = cfg_kv_with_mode(wc, m);
            kvp_window_need(&cm, g.window, n_ctx, &h[0], &h[1], &h[2], &h[3]);
            hq = max64(hq, h[0]);
            hf = max64(hf, h[1]);
            pq = max64(pq, h[2]);
            pf = max64(pf, h[3]);
            if (mixed(wc))
                wneed = max64(wneed, ((int64_t)max_seqs * h[0] + slots * (h[2] - h[0])) *
                                             unit_cost(&wg, m) +
                                         ((int64_t)max_seqs * h[1] + slots * (h[3] - h[1])) *
                                             unit_cost(&wg, CFG_KV_FP16));
        }
        int64_t wbytes;
        if (mixed(wc)) {
            /* a shared window group: its slabs hold any one mode's need */
            int64_t ns = slabs_for(&wg, wneed);
            shared_sizes(&wg, ns, &out->n_qblocks[KVC_LAYER_WINDOW],
                         &out->n_fpages[KVC_LAYER_WINDOW]);
            wbytes = ns * wg.S;
        } else {
            out->n_qblocks[KVC_LAYER_WINDOW] = (int64_t)max_seqs * hq + slots * (pq - hq);
            out->n_fpages[KVC_LAYER_WINDOW] = (int64_t)max_seqs * hf + slots * (pf - hf);
            unit_bytes(wc, wd, &qb, &fb);
            wbytes = out->n_qblocks[KVC_LAYER_WINDOW] * qb + out->n_fpages[KVC_LAYER_WINDOW] * fb;
        }
        if (budget > 0) {
            if (g.n_layers[KVC_LAYER_GLOBAL] > 0 && budget <= wbytes)
                return lkq_err(err, errlen, -EINVAL,
                            "kv_budget too small: %lld bytes, of which the window layers of "
                            "%d sequences take %lld", (long long)budget, max_seqs,
                            (long long)wbytes);
            budget -= wbytes; /* the window layers are paid first */
        }
    }
    if (g.n_layers[KVC_LAYER_GLOBAL] == 0)
        return 0;
    return size_global_modes(&g.cfg[KVC_LAYER_GLOBAL], &g.dims[KVC_LAYER_GLOBAL], n_ctx,
                             max_seqs, budget, cfg->kv_budget_tokens,
                             &out->n_qblocks[KVC_LAYER_GLOBAL],
                             &out->n_fpages[KVC_LAYER_GLOBAL], err, errlen);
}

int kvp_pool_fit(const cfg_kv *c, const kvc_dims *d, int n_ctx, int max_seqs, char *err,
                 size_t errlen)
{
    kvc_pool_sizes sz;
    int rc = kvp_pool_size(c, d, n_ctx, max_seqs, &sz, err, errlen);
    if (rc < 0)
        return rc;
    kvp_groups g;
    kvp_layer_groups(c, d, &g, NULL, NULL);
    if (g.n_layers[KVC_LAYER_GLOBAL] == 0)
        return max_seqs;
    const cfg_kv *gc = &g.cfg[KVC_LAYER_GLOBAL];
    int64_t nq, nf, fit;
    kvp_estimate(gc, n_ctx, &nq, &nf);
    if (mixed(gc)) {
        /* a shared pool: the whole arena in the pool's own mode */
        kvp_geo sg;
        if (geometry(gc, &g.dims[KVC_LAYER_GLOBAL], &sg, err, errlen) < 0)
            return -EINVAL;
        int64_t bytes = cdiv(sz.n_fpages[KVC_LAYER_GLOBAL] * (int64_t)sg.cb[CFG_KV_FP16],
                             sg.S) * sg.S;
        int64_t cost = nq * unit_cost(&sg, cfg_kv_mode_id(gc)) +
                       nf * unit_cost(&sg, CFG_KV_FP16);
        fit = bytes / (cost > 0 ? cost : 1);
    } else {
        fit = gc->mode == CFG_KV_INT4 ? sz.n_qblocks[KVC_LAYER_GLOBAL] / (nq > 0 ? nq : 1)
                                      : sz.n_fpages[KVC_LAYER_GLOBAL] / (nf > 0 ? nf : 1);
    }
    return fit < max_seqs ? (int)fit : max_seqs;
}

void kvp_plan_caps(const cfg_kv *c, int max_tokens, kvp_caps *out)
{
    const int T = c->block_tokens, C = c->chunk_size, P = kvp_page_tokens(c);
    const int unit = P < T ? P : T;
    /* entries: a unit per `unit` tokens plus a partial one per chunk
     * boundary, generously; a step spans at most C / unit units per run
     * (sinks, staging or tail) plus a partial one each */
    out->ents = max_tokens / unit + max_tokens / C + 16;
    out->tgt = C / unit + 8;
    out->src = (c->warmup_chunks * C) / unit + T / unit + 8;
    out->rq = (c->warmup_chunks * C) / T + 4;
}

void kvp_stats_add_counts(kvc_stats *sum, const kvc_stats *s)
{
    sum->tokens += s->tokens;
    sum->elements += s->elements;
    sum->bytes_fp16_equiv += s->bytes_fp16_equiv;
    sum->n_quantized += s->n_quantized;
    sum->n_outliers += s->n_outliers;
    sum->n_clamped += s->n_clamped;
    for (int k = 0; k < KVC_LAYER_KINDS; k++) {
        sum->layer_kind[k].tokens += s->layer_kind[k].tokens;
        sum->layer_kind[k].elements += s->layer_kind[k].elements;
    }
}

/* Adds the bytes of nq blocks of mode id m and nf pages of pool p, and
 * the units used (and total, when with_total) to *out and to its layer
 * kind k. */
static void add_units(const kvp_pool *p, int k, int m, int64_t nq, int64_t nf, int with_total,
                      kvc_stats *out)
{
    const int64_t L = p->d.n_layers;
    kvc_kind_stats *ks = &out->layer_kind[k];
    int64_t b4 = 0, bs = 0, bo = 0, bx = 0;
    if (m > 0 && m < CFG_KV_MODES && p->qbm[m]) {
        const kvq_layout *Lq = &p->Lm[m];
        b4 = nq * L * (int64_t)Lq->bytes_dense;
        bs = nq * L * (int64_t)Lq->bytes_scales;
        bo = nq * L * (int64_t)Lq->bytes_outliers;
        bx = nq * (int64_t)p->qbm[m] - b4 - bs - bo;
    }
    int64_t bf = nf * (int64_t)p->fbytes;
    ks->layers = (int32_t)L;
    ks->bytes_int4 += b4;
    ks->bytes_scales += bs;
    ks->bytes_outliers += bo;
    ks->bytes_other += bx;
    ks->bytes_fp16 += bf;
    ks->bytes_total += b4 + bs + bo + bx + bf;
    ks->qblocks_used += nq;
    ks->fpages_used += nf;
    out->bytes_int4 += b4;
    out->bytes_scales += bs;
    out->bytes_outliers += bo;
    out->bytes_other += bx;
    out->bytes_fp16 += bf;
    out->bytes_total += b4 + bs + bo + bx + bf;
    out->qblocks_used += nq;
    out->fpages_used += nf;
    if (with_total) {
        ks->qblocks_total += p->nq;
        ks->fpages_total += p->nf;
        out->qblocks_total += p->nq;
        out->fpages_total += p->nf;
    }
}

/* ---- the pool ------------------------------------------------------------------ */

/* The shared arena's bookkeeping: n_slabs slabs, all free. Returns 0 or
 * -ENOMEM. */
static int shared_init(kvp_pool *p, int64_t n_slabs)
{
    p->n_slabs = (int32_t)n_slabs;
    size_t ns = (size_t)n_slabs, nu = ns * (size_t)p->g.M;
    p->scls = malloc(ns * sizeof(int32_t));
    p->snfree = calloc(ns, sizeof(int32_t));
    p->sfree = malloc(nu * sizeof(int32_t));
    p->slabs = malloc(ns * sizeof(int32_t));
    p->sref[0] = calloc(nu, sizeof(int32_t));
    p->nref[0] = calloc(nu, sizeof(int32_t));
    if (!p->scls || !p->snfree || !p->sfree || !p->slabs || !p->sref[0] || !p->nref[0])
        return -ENOMEM;
    for (int64_t i = 0; i < n_slabs; i++) {
        p->scls[i] = -1;
        p->slabs[i] = (int32_t)(n_slabs - 1 - i); /* slab 0 is handed out first */
    }
    p->n_free_slabs = (int32_t)n_slabs;
    /* the equivalents: the whole arena in blocks of qmode, or in pages */
    p->nq = p->has_q ? n_slabs * p->g.per[p->qmode] : 0;
    p->nf = n_slabs * p->g.per[CFG_KV_FP16];
    return 0;
}

int kvp_pool_create(const cfg_kv *cfg, const kvc_dims *d, int window, int64_t n_qblocks,
                    int64_t n_fpages, kvp_pool **out, char *err, size_t errlen)
{
    *out = NULL;
    if (kvp_check(cfg, d, err, errlen) < 0)
        return -EINVAL;
    if (window < 0)
        return lkq_err(err, errlen, -EINVAL, "negative KV window %d", window);
    if (!cfg_kv_has_quant(cfg))
        n_qblocks = 0;
    if (n_qblocks < 0 || n_fpages < 0 || (n_fpages < 1 && !mixed(cfg)) ||
        n_qblocks > INT32_MAX || n_fpages > INT32_MAX)
        return lkq_err(err, errlen, -EINVAL, "bad pool size (%lld blocks, %lld pages)",
                    (long long)n_qblocks, (long long)n_fpages);
    kvp_pool *p = calloc(1, sizeof *p);
    if (!p)
        return lkq_err(err, errlen, -ENOMEM, "out of memory");
    p->cfg = *cfg;
    p->d = *d;
    p->d.layer_window = NULL; /* borrowed by the caller: not kept */
    p->window = window;
    p->P = kvp_page_tokens(cfg);
    p->has_q = cfg_kv_has_quant(cfg);
    p->qmode = -1;
    for (int m = 1; m < CFG_KV_MODES; m++) {
        if (!cfg_kv_has_mode(cfg, m))
            continue;
        if (mode_layout(cfg, d, m, &p->Lm[m], err, errlen) < 0) {
            free(p);
            return -EINVAL;
        }
        p->qbm[m] = p->Lm[m].bytes * (size_t)d->n_layers;
        if (p->qmode < 0)
            p->qmode = m;
    }
    if (cfg_kv_mode_id(cfg) != CFG_KV_FP16)
        p->qmode = cfg_kv_mode_id(cfg);
    if (p->has_q) {
        p->L = p->Lm[p->qmode];
        p->qbytes = p->qbm[p->qmode];
    }
    p->fbytes = (size_t)p->P * (size_t)d->kv_dim * 2 * sizeof(uint16_t) * (size_t)d->n_layers;
    if (mixed(cfg)) {
        /* one arena of slabs: the bytes n_qblocks blocks of the pool's
         * mode and n_fpages pages take, rounded up to whole slabs */
        p->shared = 1;
        if (geometry(cfg, d, &p->g, err, errlen) < 0) {
            free(p);
            return -EINVAL;
        }
        int64_t bytes = n_qblocks * (int64_t)p->qbytes + n_fpages * (int64_t)p->g.cb[0];
        int64_t n_slabs = cdiv(bytes, p->g.S);
        if (n_slabs < 1)
            n_slabs = 1;
        if (n_slabs * (int64_t)p->g.M > INT32_MAX ||
            n_slabs * p->g.S / (int64_t)p->g.U > INT32_MAX) {
            int64_t S = p->g.S;
            free(p);
            return lkq_err(err, errlen, -EINVAL, "KV pool too large (%lld slabs of %lld bytes)",
                           (long long)n_slabs, (long long)S);
        }
        if (shared_init(p, n_slabs) < 0) {
            kvp_pool_destroy(p);
            return lkq_err(err, errlen, -ENOMEM, "out of memory for the KV free lists");
        }
        *out = p;
        return 0;
    }
    p->nq = n_qblocks;
    p->nf = n_fpages;
    p->qfree = malloc(((size_t)n_qblocks + 1) * sizeof(int32_t));
    p->ffree = malloc((size_t)n_fpages * sizeof(int32_t));
    for (int k = 0; k < 2; k++) {
        size_t n = (size_t)(k == KVP_BLOCK ? n_qblocks : n_fpages) + 1;
        p->sref[k] = calloc(n, sizeof(int32_t));
        p->nref[k] = calloc(n, sizeof(int32_t));
    }
    if (!p->qfree || !p->ffree || !p->sref[0] || !p->sref[1] || !p->nref[0] || !p->nref[1]) {
        kvp_pool_destroy(p);
        return lkq_err(err, errlen, -ENOMEM, "out of memory for the KV free lists");
    }
    /* stacks: lowest ids handed out first */
    for (int64_t i = 0; i < n_qblocks; i++)
        p->qfree[i] = (int32_t)(n_qblocks - 1 - i);
    for (int64_t i = 0; i < n_fpages; i++)
        p->ffree[i] = (int32_t)(n_fpages - 1 - i);
    p->nqfree = n_qblocks;
    p->nffree = n_fpages;
    *out = p;
    return 0;
}

void kvp_pool_destroy(kvp_pool *p)
{
    if (!p)
        return;
    kvp_prefix_disable(p);
    free(p->qfree);
    free(p->ffree);
    for (int k = 0; k < 2; k++) {
        free(p->sref[k]);
        free(p->nref[k]);
    }
    free(p->scls);
    free(p->snfree);
    free(p->sfree);
    free(p->slabs);
    free(p);
}

const cfg_kv *kvp_pool_cfg(const kvp_pool *p)
{
    return &p->cfg;
}

const kvc_dims *kvp_pool_dims(const kvp_pool *p)
{
    return &p->d;
}

int kvp_pool_window(const kvp_pool *p)
{
    return p->window;
}

const kvq_layout *kvp_pool_layout(const kvp_pool *p)
{
    return p->has_q ? &p->L : NULL;
}

const kvq_layout *kvp_pool_mode_layout(const kvp_pool *p, int mode)
{
    return mode > 0 && mode < CFG_KV_MODES && p->qbm[mode] ? &p->Lm[mode] : NULL;
}

int kvp_pool_page_tokens(const kvp_pool *p)
{
    return p->P;
}

int kvp_pool_shared(const kvp_pool *p)
{
    return p->shared;
}

void kvp_pool_units(const kvp_pool *p, int64_t *nq, int64_t *nf)
{
    *nq = p->nq;
    *nf = p->nf;
}

void kvp_pool_unit_bytes(const kvp_pool *p, size_t *qbytes, size_t *fbytes)
{
    *qbytes = p->qbytes;
    *fbytes = p->fbytes;
}

void kvp_pool_arena(const kvp_pool *p, size_t *qarena, size_t *farena, size_t *qstride,
                    size_t *fstride)
{
    if (p->shared) {
        *qarena = (size_t)p->n_slabs * (size_t)p->g.S;
        *farena = 0;
        *qstride = *fstride = p->g.U;
        return;
    }
    *qarena = (size_t)p->nq * p->qbytes;
    *farena = (size_t)p->nf * p->fbytes;
    *qstride = p->qbytes;
    *fstride = p->fbytes;
}

/* Free bytes of a shared pool: free slabs, the free units of slabs in use
 * (at their slab share) and the units only cache nodes hold. */
static int64_t shared_free_bytes(const kvp_pool *p)
{
    int64_t b = (int64_t)p->n_free_slabs * p->g.S;
    for (int32_t i = 0; i < p->n_slabs; i++)
        if (p->scls[i] >= 0)
            b += (int64_t)p->snfree[i] * unit_cost(&p->g, p->scls[i]);
    for (int c = 0; c < CFG_KV_MODES; c++)
        b += p->cached_cls[c] * unit_cost(&p->g, c);
    return b;
}

int64_t kvp_pool_free_bytes(const kvp_pool *p)
{
    if (p->shared)
        return shared_free_bytes(p);
    return (p->nqfree + p->ncached[KVP_BLOCK]) * (int64_t)p->qbytes +
           (p->nffree + p->ncached[KVP_PAGE]) * (int64_t)p->fbytes;
}

int64_t kvp_pool_cost(const kvp_pool *p, int mode, int64_t nq, int64_t nf)
{
    if (!p->shared)
        return nq * (int64_t)p->qbytes + nf * (int64_t)p->fbytes;
    int m = mode > 0 && mode < CFG_KV_MODES && p->g.cb[mode] ? mode : p->qmode;
    return (m > 0 ? nq * unit_cost(&p->g, m) : 0) + nf * unit_cost(&p->g, CFG_KV_FP16);
}

int64_t kvp_plan_cost(const cfg_kv *c, const kvc_dims *d, int mode, int64_t nq, int64_t nf)
{
    kvp_geo g;
    if (!mixed(c) || geometry(c, d, &g, NULL, 0) < 0)
        return -1;
    return (mode > 0 && g.cb[mode] ? nq * unit_cost(&g, mode) : 0) +
           nf * unit_cost(&g, CFG_KV_FP16);
}

void kvp_pool_free_units(const kvp_pool *p, int64_t *qfree, int64_t *ffree)
{
    if (p->shared) {
        /* what the free bytes hold in blocks of the pool's mode / pages */
        int64_t b = shared_free_bytes(p);
        *qfree = p->has_q ? b / unit_cost(&p->g, p->qmode) : 0;
        *ffree = b / unit_cost(&p->g, CFG_KV_FP16);
        return;
    }
    /* cached prefix units are evicted on demand (take): free for admission */
    *qfree = p->nqfree + p->ncached[KVP_BLOCK];
    *ffree = p->nffree + p->ncached[KVP_PAGE];
}

const int32_t *kvp_pool_free_list(const kvp_pool *p, int kind, int64_t *n)
{
    if (p->shared) {
        *n = 0;
        return NULL;
    }
    *n = kind == KVP_BLOCK ? p->nqfree : p->nffree;
    return kind == KVP_BLOCK ? p->qfree : p->ffree;
}

int64_t kvp_pool_capacity_bytes(const kvp_pool *p)
{
    if (p->shared)
        return (int64_t)p->n_slabs * p->g.S;
    return p->nq * (int64_t)p->qbytes + p->nf * (int64_t)p->fbytes;
}

double kvp_pool_usage(const kvp_pool *p)
{
    if (p->shared) {
        double total = (double)kvp_pool_capacity_bytes(p);
        return total > 0 ? (total - (double)shared_free_bytes(p)) / total : 0.0;
    }
    double total = (double)p->nq * (double)p->qbytes + (double)p->nf * (double)p->fbytes;
    double used = (double)(p->nq - p->nqfree - p->ncached[KVP_BLOCK]) * (double)p->qbytes +
                  (double)(p->nf - p->nffree - p->ncached[KVP_PAGE]) * (double)p->fbytes;
    return total > 0 ? used / total : 0.0;
}

void kvp_pool_add_stats(const kvp_pool *p, int kind, kvc_stats *out)
{
    /* units held by sequences (shared ones once); cached-only units are
     * reported by kvp_prefix_get_stats */
    if (p->shared) {
        int64_t nf = p->used_cls[CFG_KV_FP16] - p->cached_cls[CFG_KV_FP16];
        add_units(p, kind, 0, 0, nf, 1, out);
        for (int m = 1; m < CFG_KV_MODES; m++)
            if (p->used_cls[m] > 0)
                add_units(p, kind, m, p->used_cls[m] - p->cached_cls[m], 0, 0, out);
        return;
    }
    add_units(p, kind, p->qmode, p->nq - p->nqfree - p->ncached[KVP_BLOCK],
              p->nf - p->nffree - p->ncached[KVP_PAGE], 1, out);
}

static int64_t *free_count(kvp_pool *p, int kind)
{
    return kind == KVP_BLOCK ? &p->nqfree : &p->nffree;
}

/* Shared pool: the slab of unit id, its class and index in the slab. */
static int32_t unit_where(const kvp_pool *p, int32_t id, int *cls, int32_t *idx)
{
    int64_t off = (int64_t)id * (int64_t)p->g.U;
    int32_t sl = (int32_t)(off / p->g.S);
    *cls = p->scls[sl];
    assert(*cls >= 0);
    *idx = (int32_t)((off - (int64_t)sl * p->g.S) / (int64_t)p->g.cb[*cls]);
    return sl;
}

/* The holder counters of unit id: sref[*k][i] / nref[*k][i]. */
static int64_t ref_index(const kvp_pool *p, int kind, int32_t id, int *k, int *cls)
{
    if (!p->shared) {
        *k = kind;
        *cls = kind == KVP_BLOCK ? p->qmode : CFG_KV_FP16;
        return id;
    }
    int32_t idx, sl = unit_where(p, id, cls, &idx);
    *k = 0;
    return (int64_t)sl * p->g.M + idx;
}

/* Shared pool: a unit of class c from the lowest slab of that class with
 * one free, else from a free slab (lowest first). Returns 0 and *id, or
 * -1 when neither exists. The choice depends only on the pool's state, so
 * giving units back in reverse order restores it exactly. */
static int slab_take(kvp_pool *p, int c, int32_t *id)
{
    int32_t sl = -1;
    for (int32_t i = 0; i < p->n_slabs; i++)
        if (p->scls[i] == c && p->snfree[i] > 0) {
            sl = i;
            break;
        }
    if (sl < 0) {
        if (p->n_free_slabs == 0)
            return -1;
        sl = p->slabs[--p->n_free_slabs];
        p->scls[sl] = c;
        p->snfree[sl] = p->g.per[c];
        for (int32_t i = 0; i < p->g.per[c]; i++)
            p->sfree[(int64_t)sl * p->g.M + i] = p->g.per[c] - 1 - i;
    }
    int32_t idx = p->sfree[(int64_t)sl * p->g.M + --p->snfree[sl]];
    *id = (int32_t)(((int64_t)sl * p->g.S + (int64_t)idx * (int64_t)p->g.cb[c]) /
                    (int64_t)p->g.U);
    p->used_cls[c]++;
    return 0;
}

/* Shared pool: unit id is free again; its slab goes back to the free
 * slabs when all its units are. */
static void slab_give(kvp_pool *p, int32_t id)
{
    int c;
    int32_t idx, sl = unit_where(p, id, &c, &idx);
    p->sfree[(int64_t)sl * p->g.M + p->snfree[sl]++] = idx;
    p->used_cls[c]--;
    if (p->snfree[sl] == p->g.per[c]) {
        p->scls[sl] = -1;
        p->slabs[p->n_free_slabs++] = sl;
    }
}

/* Changes the holders of unit id by ds sequences and dn cache nodes; a
 * unit nobody holds goes back to its free stack, and the count of cached
 * units (held by nodes only) follows. */
static void hold(kvp_pool *p, int kind, int32_t id, int ds, int dn)
{
    int k, cls;
    int64_t x = ref_index(p, kind, id, &k, &cls);
    int32_t *sr = &p->sref[k][x], *nr = &p->nref[k][x];
    int was = *sr == 0 && *nr > 0;
    *sr += ds;
    *nr += dn;
    assert(*sr >= 0 && *nr >= 0);
    int is = *sr == 0 && *nr > 0;
    p->ncached[kind] += is - was;
    if (cls >= 0 && cls < CFG_KV_MODES)
        p->cached_cls[cls] += is - was;
    if (*sr == 0 && *nr == 0) {
        if (p->shared) {
            slab_give(p, id);
            return;
        }
        int64_t *nfree = free_count(p, kind);
        (kind == KVP_BLOCK ? p->qfree : p->ffree)[(*nfree)++] = id;
    }
}

static int evict_lru(kvp_pool *p);

/* A unit of `kind` for a sequence of mode id `mode` (a shared pool takes
 * its blocks from that mode's slabs). */
static int take(kvp_pool *p, int kind, int mode, int32_t *id)
{
    if (p->shared) {
        int c = kind == KVP_BLOCK ? mode : CFG_KV_FP16;
        /* cached units count as free: evict least recently used prefixes
         * until a unit of this class (or a free slab) comes back */
        while (slab_take(p, c, id) < 0)
            if (p->ncached[KVP_BLOCK] + p->ncached[KVP_PAGE] == 0 || evict_lru(p) < 0)
                return -1;
        int k, cls;
        int64_t x = ref_index(p, kind, *id, &k, &cls);
        p->sref[k][x] = 1;
        return 0;
    }
    int64_t *nfree = free_count(p, kind);
    /* cached units count as free: evict least recently used prefixes
     * until one of this kind comes back */
    while (*nfree == 0 && p->ncached[kind] > 0 && evict_lru(p) == 0)
        ;
    if (*nfree == 0)
        return -1;
    *id = (kind == KVP_BLOCK ? p->qfree : p->ffree)[--(*nfree)];
    p->sref[kind][*id] = 1;
    return 0;
}

/* A sequence lets go of a unit. */
static void give(kvp_pool *p, int kind, int32_t id)
{
    hold(p, kind, id, -1, 0);
}

/* ---- sequences ----------------------------------------------------------------- */

int kvp_seq_create(kvp_pool *p, int max_tokens, void *owner, kvp_seq **out, char *err,
                   size_t errlen)
{
    *out = NULL;
    if (max_tokens <= 0)
        return lkq_err(err, errlen, -EINVAL, "max_tokens must be positive");
    kvp_seq *s = calloc(1, sizeof *s);
    if (!s)
        return lkq_err(err, errlen, -ENOMEM, "out of memory");
    s->p = p;
    s->owner = owner;
    s->max_tokens = max_tokens;
    s->mode = cfg_kv_mode_id(&p->cfg);
    kvp_plan_caps(&p->cfg, max_tokens, &s->cap);
    s->ents = malloc((size_t)s->cap.ents * sizeof *s->ents);
    s->tgt = malloc((size_t)s->cap.tgt * sizeof *s->tgt);
    s->src = malloc((size_t)s->cap.src * sizeof *s->src);
    s->rq_ids = malloc((size_t)s->cap.rq * sizeof *s->rq_ids);
    if (!s->ents || !s->tgt || !s->src || !s->rq_ids) {
        kvp_seq_destroy(s);
        return lkq_err(err, errlen, -ENOMEM, "out of memory for a sequence's KV tables");
    }
    s->st.tgt = s->tgt;
    s->st.src = s->src;
    s->st.rq_ids = s->rq_ids;
    s->stage_first = s->tail_first = -1;
    s->next = p->seqs;
    if (p->seqs)
        p->seqs->prev = s;
    p->seqs = s;
    *out = s;
    return 0;
}

void kvp_seq_destroy(kvp_seq *s)
{
    if (!s)
        return;
    if (s->ents && s->tgt && s->rq_ids)
        kvp_seq_reset(s);
    if (s->prev)
        s->prev->next = s->next;
    else if (s->p->seqs == s)
        s->p->seqs = s->next;
    if (s->next)
        s->next->prev = s->prev;
    free(s->ents);
    free(s->tgt);
    free(s->src);
    free(s->rq_ids);
    free(s);
}

kvp_seq *kvp_pool_next_seq(const kvp_pool *p, const kvp_seq *prev)
{
    return prev ? prev->next : p->seqs;
}

void *kvp_seq_owner(const kvp_seq *s)
{
    return s->owner;
}

void kvp_seq_reset(kvp_seq *s)
{
    kvp_abort(s);
    for (int i = 0; i < s->n_ents; i++)
        give(s->p, s->ents[i].kind, s->ents[i].id);
    s->n_ents = 0;
    s->n_tokens = 0;
    s->chunk_idx = 0;
    s->prefill_done = 0;
    s->stage_first = s->tail_first = -1;
}

int kvp_seq_set_mode(kvp_seq *s, int mode, char *err, size_t errlen)
{
    if (!cfg_kv_has_mode(&s->p->cfg, mode))
        return lkq_err(err, errlen, -EINVAL, "this KV pool holds no %s sequences",
                       cfg_kv_mode_str(mode));
    if (s->n_ents > 0 || s->n_tokens > 0 || s->st.active)
        return lkq_err(err, errlen, -EINVAL, "the KV mode of a sequence is set while it is "
                       "empty");
    s->mode = mode;
    return 0;
}

int kvp_seq_mode(const kvp_seq *s)
{
    return s->mode;
}

const kvq_layout *kvp_seq_layout(const kvp_seq *s)
{
    return kvp_pool_mode_layout(s->p, s->mode);
}

int kvp_seq_set_mode_groups(kvp_seq *const *s, int n_groups, const cfg_kv *c, int mode,
                            char *err, size_t errlen)
{
    if (!cfg_kv_has_mode(c, mode))
        return lkq_err(err, errlen, -EINVAL, "this KV pool holds no %s sequences (kv_modes)",
                       cfg_kv_mode_str(mode));
    for (int g = 0; g < n_groups; g++) {
        if (!s[g])
            continue;
        int rc = kvp_seq_set_mode(s[g], kvp_group_mode(c, g, mode), err, errlen);
        if (rc < 0) /* only a sequence that is not empty: every group is */
            return rc;
    }
    return 0;
}

int kvp_seq_n_tokens(const kvp_seq *s)
{
    return s->n_tokens;
}

int kvp_seq_chunks(const kvp_seq *s)
{
    return s->chunk_idx;
}

int kvp_seq_warming(const kvp_seq *s)
{
    return is_int4(s) && s->chunk_idx < s->p->cfg.warmup_chunks && !s->prefill_done;
}

const kvp_ent *kvp_seq_entries(const kvp_seq *s, int *n)
{
    *n = s->n_ents;
    return s->ents;
}

int kvp_seq_max_entries(const kvp_seq *s)
{
    return s->cap.ents;
}

void kvp_seq_units(const kvp_seq *s, int64_t *nq, int64_t *nf)
{
    *nq = *nf = 0;
    for (int i = 0; i < s->n_ents; i++)
        if (s->ents[i].kind == KVP_BLOCK)
            (*nq)++;
        else
            (*nf)++;
}

int kvp_seq_held_tokens(const kvp_seq *s)
{
    return s->n_ents > 0 ? s->n_tokens - s->ents[0].pos0 : 0;
}

void kvp_seq_add_stats(const kvp_seq *s, int kind, kvc_stats *out)
{
    const kvp_pool *p = s->p;
    int64_t nq, nf;
    kvp_seq_units(s, &nq, &nf);
    add_units(p, kind, s->mode, nq, nf, 1, out);
    int64_t held = kvp_seq_held_tokens(s);
    int64_t el = held * p->d.n_layers * p->d.kv_dim * 2;
    out->layer_kind[kind].tokens += held;
    out->layer_kind[kind].elements += el;
    out->elements += el;
    out->bytes_fp16_equiv += el * 2;
}

void kvp_seq_groups_stats(kvp_seq *const *s, int n_groups, kvc_stats *out)
{
    memset(out, 0, sizeof *out);
    int tokens = -1;
    for (int g = 0; g < n_groups; g++) {
        if (!s[g])
            continue;
        kvp_seq_add_stats(s[g], g, out);
        if (tokens < 0)
            tokens = kvp_seq_n_tokens(s[g]);
    }
    out->tokens = tokens > 0 ? tokens : 0;
}

const kvp_step *kvp_seq_step(const kvp_seq *s)
{
    return &s->st;
}

/* ---- the step plan --------------------------------------------------------------- */

/* Opens an empty step (the tables keep their pointers). */
static void open_step(kvp_seq *s, int pos0, int n, int prefill)
{
    kvp_step *st = &s->st;
    st->active = 1;
    st->pos0 = pos0;
    st->n = n;
    st->prefill = prefill;
    st->stats = st->row_stats = 0;
    st->n_tgt = st->n_src = st->n_rq = 0;
    st->rq = KVP_RQ_NONE;
    st->rq_tokens = 0;
    st->rq_pos0 = pos0;
}

static void close_step(kvp_seq *s)
{
    s->st.active = 0;
    s->st.n_tgt = s->st.n_rq = s->st.n_src = 0;
    s->st.rq = KVP_RQ_NONE;
}

void kvp_abort(kvp_seq *s)
{
    if (!s->st.active)
        return;
    /* in reverse order of the takes, so the stacks are exactly restored */
    for (int i = s->st.n_rq - 1; i >= 0; i--)
        give(s->p, KVP_BLOCK, s->rq_ids[i]);
    for (int i = s->st.n_tgt - 1; i >= 0; i--)
        if (!s->tgt[i].existing)
            give(s->p, s->tgt[i].kind, s->tgt[i].id);
    close_step(s);
}

/* Adds targets for rows [row, row+m) into FP16 pages, continuing the last
 * entry when it is a partially filled page of the same run that ends at
 * pos (run_first: the index of the run's first entry, or -1 when the run
 * starts now). Returns 0, NO_UNITS or NO_ROOM. */
static int plan_pages(kvp_seq *s, int row, int m, int pos, int run_first)
{
    kvp_pool *p = s->p;
    if (run_first >= 0 && s->n_ents > run_first) {
        const kvp_ent *last = &s->ents[s->n_ents - 1];
        if (last->kind == KVP_PAGE && last->n < p->P && last->pos0 + last->n == pos) {
            int k = p->P - last->n < m ? p->P - last->n : m;
            if (s->st.n_tgt >= s->cap.tgt)
                return NO_ROOM;
            s->tgt[s->st.n_tgt++] = (kvp_tgt){KVP_PAGE, last->id, last->n, row, k, 1};
            row += k;
            m -= k;
        }
    }
    while (m > 0) {
        int32_t id;
        if (s->st.n_tgt >= s->cap.tgt)
            return NO_ROOM;
        if (take(p, KVP_PAGE, s->mode, &id) < 0)
            return NO_UNITS;
        int k = m < p->P ? m : p->P;
        s->tgt[s->st.n_tgt++] = (kvp_tgt){KVP_PAGE, id, 0, row, k, 0};
        row += k;
        m -= k;
    }
    return 0;
}

/* Adds targets for rows [row, row+m) quantized live into new blocks of up
 * to block_tokens tokens. Returns 0, NO_UNITS or NO_ROOM. */
static int plan_blocks(kvp_seq *s, int row, int m)
{
    const int T = s->p->cfg.block_tokens;
    while (m > 0) {
        int32_t id;
        if (s->st.n_tgt >= s->cap.tgt)
            return NO_ROOM;
        if (take(s->p, KVP_BLOCK, s->mode, &id) < 0)
            return NO_UNITS;
        int k = m < T ? m : T;
        s->tgt[s->st.n_tgt++] = (kvp_tgt){KVP_BLOCK, id, 0, row, k, 0};
        row += k;
        m -= k;
    }
    return 0;
}

/* The first position a query after the open step can see in a window pool
 * (n_tokens after the step - W + 1), or 0. */
static int live_from(const kvp_seq *s)
{
    int w = s->p->window;
    return w > 0 ? s->st.pos0 + s->st.n - w + 1 : 0;
}

/* Reserves the INT4 blocks for re-quantizing the FP16 entries from index
 * first on (-1: none) plus the step's non-sink page targets, in position
 * order, and lists them as sources; a warm-up re-quantization in a window
 * pool leaves out the leading sources no later query can see (the commit
 * frees them with the rest of the run). Returns 0, NO_UNITS or NO_ROOM. */
static int plan_requant(kvp_seq *s, int first, int kind)
{
    const int T = s->p->cfg.block_tokens;
    int tokens = 0;
    s->st.n_src = 0;
    s->st.rq_pos0 = first >= 0 && first < s->n_ents ? s->ents[first].pos0 : s->st.pos0 +
                                                                             s->st.row_stats;
    for (int i = first; i >= 0 && i < s->n_ents; i++) {
        if (s->st.n_src >= s->cap.src)
            return NO_ROOM;
        s->src[s->st.n_src++] = (kvp_src){s->ents[i].id, s->ents[i].n};
        tokens += s->ents[i].n;
    }
    for (int i = 0; i < s->st.n_tgt; i++) {
        const kvp_tgt *t = &s->tgt[i];
        if (t->kind != KVP_PAGE || t->row0 < s->st.row_stats)
            continue; /* sinks are never re-quantized */
        if (t->existing) {
            /* the page continues the run from `first`: it is already the
             * last source and grows by t->n */
            assert(s->st.n_src > 0 && s->src[s->st.n_src - 1].id == t->id);
            s->src[s->st.n_src - 1].n += t->n;
        } else {
            if (s->st.n_src >= s->cap.src)
                return NO_ROOM;
            s->src[s->st.n_src++] = (kvp_src){t->id, t->n};
        }
        tokens += t->n;
    }
    if (kind == KVP_RQ_WARMUP && s->p->window > 0) {
        int live = live_from(s), k = 0;
        while (k < s->st.n_src && s->st.rq_pos0 + s->src[k].n - 1 < live) {
            s->st.rq_pos0 += s->src[k].n;
            tokens -= s->src[k].n;
            k++;
        }
        memmove(s->src, s->src + k, (size_t)(s->st.n_src - k) * sizeof *s->src);
        s->st.n_src -= k;
    }
    int nb = (tokens + T - 1) / T;
    if (nb > s->cap.rq)
        return NO_ROOM;
    for (int i = 0; i < nb; i++) {
        if (take(s->p, KVP_BLOCK, s->mode, &s->rq_ids[i]) < 0)
            return NO_UNITS;
        s->st.n_rq = i + 1;
    }
    s->st.rq = kind;
    s->st.rq_tokens = tokens;
    return 0;
}

/* The entry count while the open step commits (its new units appended
 * before re-quantized sources are dropped: the most it ever holds). */
static int ents_needed(const kvp_seq *s)
{
    int n = s->n_ents;
    for (int i = 0; i < s->st.n_tgt; i++)
        n += !s->tgt[i].existing;
    return n;
}

int kvp_begin(kvp_seq *s, int pos0, int n, int prefill, char *err, size_t errlen)
{
    kvp_pool *p = s->p;
    const cfg_kv *c = &p->cfg;
    if (s->st.active)
        return lkq_err(err, errlen, -EINVAL, "a KV step is already open");
    if (pos0 != s->n_tokens)
        return lkq_err(err, errlen, -EINVAL, "KV step at position %d, but the sequence holds %d",
                    pos0, s->n_tokens);
    if (n <= 0 || n > c->chunk_size)
        return lkq_err(err, errlen, -EINVAL, "KV step of %d tokens (1..chunk_size %d)", n,
                    c->chunk_size);
    if ((int64_t)pos0 + n > s->max_tokens)
        return lkq_err(err, errlen, -ENOSPC, "sequence full: %d + %d > %d tokens", pos0, n,
                    s->max_tokens);
    if (!prefill && n > 1)
        prefill = 1; /* several tokens at once are a chunk */
    if (is_int4(s) && !prefill && !s->prefill_done) {
        /* the first decode step ends the prefill */
        if (s->stage_first >= 0 && !c->keep_warmup_fp16)
            return KVP_FINISH_PREFILL; /* staged chunks to quantize first */
        s->prefill_done = 1;
    }
    open_step(s, pos0, n, prefill);
    int ok = 0;
    if (!is_int4(s)) {
        ok = plan_pages(s, 0, n, pos0, 0);
    } else {
        /* sinks first: FP16 for the whole sequence */
        int ns = c->sink_tokens - pos0;
        ns = ns < 0 ? 0 : ns > n ? n : ns;
        s->st.row_stats = ns;
        if (ns > 0)
            ok = plan_pages(s, 0, ns, pos0, 0);
        int m = n - ns, pos = pos0 + ns;
        if (ok == 0 && m > 0) {
            if (prefill) {
                /* a chunk after decode leaves the old tail FP16, in place
                 * (kvp_commit ends the tail run) */
                int warm = s->chunk_idx < c->warmup_chunks && !s->prefill_done;
                s->st.stats = 1;
                if (warm) {
                    ok = plan_pages(s, ns, m, pos, s->stage_first);
                    int last_warm = s->chunk_idx == c->warmup_chunks - 1;
                    if (ok == 0 && last_warm && !c->keep_warmup_fp16)
                        ok = plan_requant(s, s->stage_first, KVP_RQ_WARMUP);
                } else {
                    ok = plan_blocks(s, ns, m);
                }
            } else {
                int tail_n = 0;
                for (int i = s->tail_first; i >= 0 && i < s->n_ents; i++)
                    tail_n += s->ents[i].n;
                ok = plan_pages(s, ns, m, pos, s->tail_first);
                if (ok == 0 && tail_n + m >= c->block_tokens)
                    ok = plan_requant(s, s->tail_first, KVP_RQ_TAIL);
            }
        }
    }
    if (ok == 0 && ents_needed(s) > s->cap.ents)
        ok = NO_ROOM;
    if (ok == NO_ROOM) {
        /* the tables are sized for any step of a valid config: not reached */
        kvp_abort(s);
        return lkq_err(err, errlen, -ENOSPC,
                    "the KV step does not fit the sequence's tables (%d entries of %d)",
                    s->n_ents, s->cap.ents);
    }
    if (ok < 0 && p->shared) {
        kvp_abort(s);
        return lkq_err(err, errlen, -ENOSPC, "KV pool exhausted (%lld of %lld bytes free in "
                       "the shared pool, none as a %s unit)",
                       (long long)shared_free_bytes(p), (long long)kvp_pool_capacity_bytes(p),
                       cfg_kv_mode_str(s->mode));
    }
    if (ok < 0) {
        kvp_abort(s);
        return lkq_err(err, errlen, -ENOSPC,
                    "KV pool exhausted (%lld/%lld INT4 blocks and %lld/%lld FP16 pages free)",
                    (long long)p->nqfree, (long long)p->nq, (long long)p->nffree,
                    (long long)p->nf);
    }
    return 0;
}

int kvp_finish_prefill(kvp_seq *s, char *err, size_t errlen)
{
    kvp_pool *p = s->p;
    if (s->prefill_done || !is_int4(s))
        return 0;
    if (s->st.active)
        return lkq_err(err, errlen, -EINVAL, "cannot end the prefill during an open KV step");
    s->prefill_done = 1;
    if (s->stage_first < 0 || p->cfg.keep_warmup_fp16)
        return 0;
    /* The prompt ended during warm-up: quantize what was staged with the
     * statistics gathered so far (the warm-up mean). */
    open_step(s, s->n_tokens, 0, 0);
    if (plan_requant(s, s->stage_first, KVP_RQ_WARMUP) < 0) { /* staged data fit once */
        kvp_abort(s);
        s->stage_first = -1; /* staged chunks stay FP16: still exact */
        return lkq_err(err, errlen, -ENOSPC, "KV pool exhausted while quantizing the "
                    "warm-up chunks; they stay FP16");
    }
    return KVP_REQUANT;
}

/* A window pool: frees the leading entries that no later query can see
 * (their last position is before n_tokens - W + 1), up to the staged run
 * while its re-quantization is pending and up to the decode tail (both are
 * read by a later step whatever the window). */
static void drop_passed(kvp_seq *s, kvp_block_fn on_block, void *ctx)
{
    kvp_pool *p = s->p;
    const int live = s->n_tokens - p->window + 1;
    int limit = s->n_ents;
    if (s->tail_first >= 0 && s->tail_first < limit)
        limit = s->tail_first;
    if (s->stage_first >= 0 && !p->cfg.keep_warmup_fp16 && s->stage_first < limit)
        limit = s->stage_first;
    int k = 0;
    while (k < limit && s->ents[k].pos0 + s->ents[k].n - 1 < live) {
        if (s->ents[k].kind == KVP_BLOCK && on_block)
            on_block(ctx, s->ents[k].id, 0);
        give(p, s->ents[k].kind, s->ents[k].id);
        k++;
    }
    if (k == 0)
        return;
    memmove(s->ents, s->ents + k, (size_t)(s->n_ents - k) * sizeof *s->ents);
    s->n_ents -= k;
    if (s->tail_first >= 0)
        s->tail_first -= k;
    if (s->stage_first >= 0) /* kept FP16 (keep_warmup_fp16): the run may go too */
        s->stage_first = s->stage_first >= k ? s->stage_first - k : s->n_ents > 0 ? 0 : -1;
}

void kvp_commit(kvp_seq *s, kvp_block_fn on_block, void *ctx)
{
    kvp_pool *p = s->p;
    kvp_step *st = &s->st;
    if (!st->active)
        return;
    if (is_int4(s) && st->prefill && st->n > st->row_stats)
        s->tail_first = -1; /* a chunk ends the tail run; its pages stay FP16 */
    for (int i = 0; i < st->n_tgt; i++) {
        const kvp_tgt *t = &s->tgt[i];
        int is_sink = t->row0 < st->row_stats;
        if (t->existing) {
            s->ents[s->n_ents - 1].n += t->n;
            continue;
        }
        int idx = s->n_ents++;
        s->ents[idx] = (kvp_ent){t->kind, t->id, st->pos0 + t->row0, t->n};
        if (t->kind == KVP_BLOCK) {
            if (on_block)
                on_block(ctx, t->id, 1);
        } else if (!is_sink && is_int4(s)) {
            if (st->prefill && s->stage_first < 0)
                s->stage_first = idx;
            else if (!st->prefill && s->tail_first < 0)
                s->tail_first = idx;
        }
    }
    if (st->rq) {
        int first = st->rq == KVP_RQ_WARMUP ? s->stage_first : s->tail_first;
        assert(first >= 0); /* a re-quantization always has a staged / tail run */
        int pos = st->rq_pos0; /* staged pages the window passed are left out */
        for (int i = first; i < s->n_ents; i++)
            give(p, s->ents[i].kind, s->ents[i].id);
        s->n_ents = first;
        const int T = p->cfg.block_tokens;
        int left = st->rq_tokens;
        for (int i = 0; i < st->n_rq; i++) {
            int k = left < T ? left : T;
            s->ents[s->n_ents++] = (kvp_ent){KVP_BLOCK, s->rq_ids[i], pos, k};
            if (on_block)
                on_block(ctx, s->rq_ids[i], 1);
            pos += k;
            left -= k;
        }
        if (st->rq == KVP_RQ_WARMUP)
            s->stage_first = -1;
        else
            s->tail_first = -1;
    }
    s->n_tokens += st->n;
    if (st->prefill)
        s->chunk_idx++;
    if (p->window > 0)
        drop_passed(s, on_block, ctx);
    close_step(s);
}

int kvp_begin_groups(kvp_seq *const *s, int n_groups, int pos0, int n, int prefill,
                     kvp_finish_fn fin, void *ctx, char *err, size_t errlen)
{
    for (int g = 0; g < n_groups; g++) {
        if (!s[g])
            continue;
        int rc = kvp_begin(s[g], pos0, n, prefill, err, errlen);
        if (rc == KVP_FINISH_PREFILL) {
            rc = fin(ctx, g, err, errlen);
            if (rc >= 0 || rc == -ENOSPC) /* -ENOSPC: the staged chunks stay FP16 */
                rc = kvp_begin(s[g], pos0, n, prefill, err, errlen);
        }
        if (rc != 0) {
            for (int h = 0; h < g; h++)
                if (s[h])
                    kvp_abort(s[h]);
            return rc < 0 ? rc : -EINVAL; /* a second FINISH_PREFILL: not reached */
        }
    }
    return 0;
}

/* ---- the prefix cache ------------------------------------------------------------ */

/* One cached prefix: the entries of a sequence at a chunk boundary (it
 * holds each of their units once), the tokens they were computed from,
 * and the executor's snapshot at that boundary (EMA state, counters). */
typedef struct kvp_node {
    uint64_t hash;       /* prefix_hash of its tokens */
    int mode;            /* the KV mode of the sequence that stored it */
    int n_tokens;        /* a multiple of chunk_size */
    int chunk_idx;
    int32_t *toks;       /* [n_tokens] */
    kvp_ent *ents;
    int n_ents;
    uint64_t last_use;
    void *data;          /* [data_bytes], the executor's */
} kvp_node;

struct kvp_prefix {
    kvp_node **nodes;    /* [max_nodes]; n_nodes used, unordered */
    int n_nodes, max_nodes;
    size_t data_bytes;
    uint64_t clock;
    uint64_t seed;       /* the hash of the configuration (mode included) */
    int64_t queries, hits, inserts, evictions;
};

/* FNV-1a over bytes, continuing from h. */
static uint64_t fnv(uint64_t h, const void *data, size_t n)
{
    const unsigned char *b = data;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 1099511628211ull;
    }
    return h;
}

/* The key of a pool's prefixes: every knob a block's bytes depend on (the
 * KV mode first). A sequence's prefix of k chunks hashes to the chain
 * h_k = fnv(h_{k-1}, tokens of chunk k-1), h_0 = this seed. */
static uint64_t cfg_seed(const cfg_kv *c, const kvc_dims *d)
{
    int32_t iv[] = {(int32_t)c->mode, c->chunk_size, c->block_tokens, c->warmup_chunks,
                    c->v_group, c->sink_tokens, c->keep_warmup_fp16, (int32_t)c->k_mode,
                    (int32_t)c->window_kv, c->kv_rotate, d->n_layers, d->kv_dim,
                    d->head_dim, c->k_bits, c->v_bits,
                    c->window_kv == CFG_KV_FP16 ? 0 : c->window_bits};
    float fv[] = {c->ema_decay, c->ema_clip, c->clip_quantile, c->outlier_budget,
                  c->window_kv == CFG_KV_FP16 ? 0.0f : cfg_kv_window_clip(c)};
    uint64_t h = fnv(1469598103934665603ull, iv, sizeof iv);
    return fnv(h, fv, sizeof fv);
}

int kvp_prefix_enable(kvp_pool *p, int max_nodes, size_t data_bytes, char *err,
                      size_t errlen)
{
    if (p->px)
        return 0;
    if (p->window > 0)
        return lkq_err(err, errlen, -ENOTSUP, "prefix reuse is not supported for "
                       "sliding-window layers (their units leave as the window moves)");
    if (max_nodes < 1)
        return lkq_err(err, errlen, -EINVAL, "the prefix cache needs at least one node");
    struct kvp_prefix *x = calloc(1, sizeof *x);
    if (x)
        x->nodes = calloc((size_t)max_nodes, sizeof *x->nodes);
    if (!x || !x->nodes) {
        free(x);
        return lkq_err(err, errlen, -ENOMEM, "out of memory for the prefix cache");
    }
    x->max_nodes = max_nodes;
    x->data_bytes = data_bytes;
    x->seed = cfg_seed(&p->cfg, &p->d);
    p->px = x;
    return 0;
}

int kvp_prefix_enabled(const kvp_pool *p)
{
    return p->px != NULL;
}

static void node_free(kvp_pool *p, kvp_node *nd)
{
    for (int i = 0; i < nd->n_ents; i++)
        hold(p, nd->ents[i].kind, nd->ents[i].id, 0, -1);
    free(nd->toks);
    free(nd->ents);
    free(nd->data);
    free(nd);
}

/* Removes node i (its units go back unless a sequence or another node
 * holds them). */
static void node_remove(kvp_pool *p, int i)
{
    struct kvp_prefix *x = p->px;
    node_free(p, x->nodes[i]);
    x->nodes[i] = x->nodes[--x->n_nodes];
}

/* Evicts the least recently used node. Returns 0, or -1 when there is
 * none. */
static int evict_lru(kvp_pool *p)
{
    struct kvp_prefix *x = p->px;
    if (!x || x->n_nodes == 0)
        return -1;
    int best = 0;
    for (int i = 1; i < x->n_nodes; i++)
        if (x->nodes[i]->last_use < x->nodes[best]->last_use)
            best = i;
    node_remove(p, best);
    x->evictions++;
    return 0;
}

void kvp_prefix_disable(kvp_pool *p)
{
    if (!p->px)
        return;
    while (p->px->n_nodes > 0)
        node_remove(p, p->px->n_nodes - 1);
    free(p->px->nodes);
    free(p->px);
    p->px = NULL;
}

void kvp_prefix_clear(kvp_pool *p)
{
    while (p->px && p->px->n_nodes > 0) {
        node_remove(p, p->px->n_nodes - 1);
        p->px->evictions++;
    }
}

/* The start of a sequence's hash chain: the pool's seed and the
 * sequence's own KV mode (a pool of kv_modes holds prefixes of each). */
static uint64_t seq_seed(const kvp_seq *s)
{
    return fnv(s->p->px->seed, &s->mode, sizeof s->mode);
}

/* The node of KV mode `mode` holding exactly tokens[0, n) (hash h), or -1. */
static int node_find(const kvp_pool *p, int mode, uint64_t h, const int32_t *toks, int n)
{
    const struct kvp_prefix *x = p->px;
    for (int i = 0; i < x->n_nodes; i++) {
        const kvp_node *nd = x->nodes[i];
        if (nd->hash == h && nd->mode == mode && nd->n_tokens == n &&
            memcmp(nd->toks, toks, (size_t)n * sizeof *toks) == 0)
            return i;
    }
    return -1;
}

/* 1 when the sequence's entries at this point are a prefix another
 * sequence can continue from as if it had computed them: a whole number
 * of full chunks of the prompt, past warm-up (int4: nothing staged,
 * every chunk quantized with the statistics the next chunk starts from),
 * no decode tail, no open step, and no partially filled page a later
 * step would continue. */
static int shareable(const kvp_seq *s)
{
    const kvp_pool *p = s->p;
    const int C = p->cfg.chunk_size;
    if (!p->px || p->window > 0 || s->st.active || s->prefill_done || s->n_tokens <= 0 ||
        s->n_tokens % C || s->chunk_idx * C != s->n_tokens || s->stage_first >= 0 ||
        s->tail_first >= 0 || s->n_ents == 0)
        return 0;
    if (is_int4(s) && s->chunk_idx < p->cfg.warmup_chunks)
        return 0;
    const kvp_ent *last = &s->ents[s->n_ents - 1];
    return !(last->kind == KVP_PAGE && last->n < p->P);
}

int kvp_prefix_adopt(kvp_seq *s, const int32_t *toks, int n, const void **data)
{
    kvp_pool *p = s->p;
    struct kvp_prefix *x = p->px;
    *data = NULL;
    if (!x || s->n_tokens != 0 || s->n_ents != 0 || s->st.active || n <= 0)
        return 0;
    x->queries += n;
    const int C = p->cfg.chunk_size;
    /* the last prompt token is always computed: its logits are needed */
    int kmax = (n - 1) / C, best = -1;
    uint64_t h = seq_seed(s);
    for (int k = 1; k <= kmax; k++) {
        h = fnv(h, toks + (size_t)(k - 1) * C, (size_t)C * sizeof *toks);
        int i = node_find(p, s->mode, h, toks, k * C);
        if (i >= 0)
            best = i; /* the longest match wins */
    }
    if (best < 0)
        return 0;
    kvp_node *nd = x->nodes[best];
    if (nd->n_ents > s->cap.ents || nd->n_tokens >= s->max_tokens)
        return 0; /* a shorter sequence than the one that stored it */
    nd->last_use = ++x->clock;
    for (int i = 0; i < nd->n_ents; i++) {
        s->ents[i] = nd->ents[i];
        hold(p, nd->ents[i].kind, nd->ents[i].id, 1, 0);
    }
    s->n_ents = nd->n_ents;
    s->n_tokens = nd->n_tokens;
    s->chunk_idx = nd->chunk_idx;
    s->prefill_done = 0;
    s->stage_first = s->tail_first = -1;
    x->hits += nd->n_tokens;
    *data = nd->data;
    return nd->n_tokens;
}

int kvp_prefix_insert(kvp_seq *s, const int32_t *toks, void **data)
{
    kvp_pool *p = s->p;
    struct kvp_prefix *x = p->px;
    *data = NULL;
    if (!shareable(s))
        return 0;
    const int C = p->cfg.chunk_size, n = s->n_tokens;
    uint64_t h = seq_seed(s);
    for (int k = 0; k < n / C; k++)
        h = fnv(h, toks + (size_t)k * C, (size_t)C * sizeof *toks);
    int i = node_find(p, s->mode, h, toks, n);
    if (i >= 0) {
        x->nodes[i]->last_use = ++x->clock;
        return 0;
    }
    if (x->n_nodes == x->max_nodes)
        evict_lru(p);
    kvp_node *nd = calloc(1, sizeof *nd);
    if (!nd)
        return -ENOMEM;
    nd->toks = malloc((size_t)n * sizeof *toks);
    nd->ents = malloc((size_t)s->n_ents * sizeof *nd->ents);
    nd->data = x->data_bytes ? malloc(x->data_bytes) : NULL;
    if (!nd->toks || !nd->ents || (x->data_bytes && !nd->data)) {
        free(nd->toks);
        free(nd->ents);
        free(nd->data);
        free(nd);
        return -ENOMEM; /* nothing cached: still correct */
    }
    memcpy(nd->toks, toks, (size_t)n * sizeof *toks);
    memcpy(nd->ents, s->ents, (size_t)s->n_ents * sizeof *nd->ents);
    for (int k = 0; k < s->n_ents; k++)
        hold(p, s->ents[k].kind, s->ents[k].id, 0, 1);
    nd->n_ents = s->n_ents;
    nd->n_tokens = n;
    nd->chunk_idx = s->chunk_idx;
    nd->hash = h;
    nd->mode = s->mode;
    nd->last_use = ++x->clock;
    x->nodes[x->n_nodes++] = nd;
    x->inserts++;
    *data = nd->data;
    return 1;
}

int kvp_seq_fork(kvp_seq *dst, const kvp_seq *src, kvp_src *copy_from, int32_t *copy_to,
                 char *err, size_t errlen)
{
    kvp_pool *p = dst->p;
    copy_from->id = -1;
    copy_from->n = 0;
    *copy_to = -1;
    if (src->p != p || dst == src)
        return lkq_err(err, errlen, -EINVAL, "fork: the sequences must differ and share a pool");
    if (dst->n_ents || dst->n_tokens || dst->st.active || src->st.active)
        return lkq_err(err, errlen, -EINVAL, "fork: the target must be empty and no step open");
    if (p->window > 0)
        return lkq_err(err, errlen, -ENOTSUP, "fork: not supported for sliding-window layers");
    if (src->n_ents > dst->cap.ents || src->n_tokens > dst->max_tokens)
        return lkq_err(err, errlen, -EINVAL, "fork: the target sequence is too short");
    int n = src->n_ents;
    /* a partially filled last page is continued by a later step: the fork
     * gets its own copy (the executor copies the slots) */
    int cow = n > 0 && src->ents[n - 1].kind == KVP_PAGE && src->ents[n - 1].n < p->P;
    if (cow) {
        if (take(p, KVP_PAGE, src->mode, copy_to) < 0)
            return lkq_err(err, errlen, -ENOSPC, "KV pool exhausted (fork)");
        *copy_from = (kvp_src){src->ents[n - 1].id, src->ents[n - 1].n};
    }
    for (int i = 0; i < n; i++) {
        dst->ents[i] = src->ents[i];
        if (cow && i == n - 1)
            dst->ents[i].id = *copy_to; /* already held: take() */
        else
            hold(p, src->ents[i].kind, src->ents[i].id, 1, 0);
    }
    dst->n_ents = n;
    dst->mode = src->mode; /* it continues src */
    dst->n_tokens = src->n_tokens;
    dst->chunk_idx = src->chunk_idx;
    dst->prefill_done = src->prefill_done;
    dst->stage_first = src->stage_first;
    dst->tail_first = src->tail_first;
    return 0;
}

void kvp_prefix_get_stats(const kvp_pool *p, kvc_prefix_stats *out)
{
    memset(out, 0, sizeof *out);
    const struct kvp_prefix *x = p->px;
    if (!x)
        return;
    out->queries = x->queries;
    out->hits = x->hits;
    out->inserts = x->inserts;
    out->evictions = x->evictions;
    out->nodes = x->n_nodes;
    out->qblocks = p->ncached[KVP_BLOCK];
    out->fpages = p->ncached[KVP_PAGE];
    out->bytes = out->qblocks * (int64_t)p->qbytes + out->fpages * (int64_t)p->fbytes;
    if (p->shared) {
        out->bytes = 0;
        for (int c = 0; c < CFG_KV_MODES; c++)
            out->bytes += p->cached_cls[c] * (int64_t)(c ? p->qbm[c] : p->fbytes);
    }
    for (int i = 0; i < x->n_nodes; i++)
        if (x->nodes[i]->n_tokens > out->longest)
            out->longest = x->nodes[i]->n_tokens;
}
