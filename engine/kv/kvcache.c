/*
 * kvcache.c - paged KV pool and the LiveKVQuant-P sequence lifecycle (see
 * kvcache.h for the protocol). Engine thread only.
 *
 * Entries of a sequence are kept in position order:
 *   [sink FP16 pages] [INT4 blocks | staged FP16 pages] ... [FP16 tail pages]
 * Staged pages (warm-up chunks) are replaced by INT4 blocks when warm-up
 * ends; the tail is replaced by one INT4 block each time it reaches
 * block_tokens tokens. A step writes only into blocks/pages reserved by
 * kvc_begin and not yet visible, so attention during the step reads the
 * history exactly as it was before the step.
 */
#include "engine/kv/kvcache.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ktypes.h"

enum { ENT_F = 0, ENT_Q = 1 };

typedef struct {
    int32_t kind;
    int32_t id;
    int32_t pos0;
    int32_t n;
} kvc_ent;

/* Where some of the step's tokens go: rows [row0, row0+n) of the step into
 * page/block id starting at slot0. existing: the page is already an entry
 * (a partially filled last page), else new. */
typedef struct {
    int32_t kind;
    int32_t id;
    int32_t slot0;
    int32_t row0;
    int32_t n;
    int32_t existing;
} kvc_tgt;

/* A run of staged tokens to re-quantize: page id, tokens in it. */
typedef struct {
    int32_t id;
    int32_t n;
} kvc_src;

struct kvc_pool {
    cfg_kv cfg;
    kvc_dims d;
    kvq_layout L;
    int has_q;
    int P;                /* tokens per FP16 page */
    size_t qbytes;        /* one block, all layers */
    size_t fbytes;        /* one page, all layers */
    size_t f_layer;       /* one page, one layer: K [P][D] then V [P][D] fp16 */
    uint8_t *qarena, *farena;
    int32_t *qfree, *ffree;
    int64_t nq, nf, nqfree, nffree;
    kvc_seq *seqs;        /* live sequences (for pool-wide stats) */
};

struct kvc_seq {
    kvc_pool *p;
    kvc_seq *next, *prev;
    int max_tokens;
    kvc_ent *ents;
    int n_ents, cap_ents;
    int n_tokens;
    int chunk_idx;
    int prefill_done;
    int stage_first; /* index of the first staged entry, -1 none */
    int tail_first;  /* index of the first tail entry, -1 none */
    kvq_ema *ek, *ev;
    float *ema_mem;
    int64_t n_quantized, n_outliers, n_clamped;
    /* the current step (plain values; reset with memset) */
    struct kvc_step {
        int active, pos0, n, prefill;
        int stats;      /* fold the step into the EMA (prefill, int4) */
        int row_stats;  /* first row of the step that is not a sink */
        int n_tgt;      /* targets in tgt[] */
        int rq;         /* 1: warm-up end, 2: tail full */
        int rq_tokens;
        int n_rq;       /* new INT4 blocks in rq_ids[] */
        int n_src;      /* sources in src[] */
    } st;
    kvc_tgt *tgt;
    int32_t *rq_ids;
    kvc_src *src;
    int cap_tgt, cap_rq, cap_src;
    float *sk, *sv;     /* [T][D] gather buffers */
    float *qscr;        /* quantile scratch */
    float *a, *b;       /* [D] chunk statistics */
    void *kq_scr;
};

static int fail(char *err, size_t errlen, int rc, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return rc;
}

double kvc_stats_bits(const kvc_stats *s)
{
    return s->elements > 0 ? 8.0 * (double)s->bytes_total / (double)s->elements : 0.0;
}

static int is_int4(const kvc_pool *p)
{
    return p->cfg.mode == CFG_KV_INT4;
}

/* ---- pool ----------------------------------------------------------------- */

int kvc_plan_page_tokens(const cfg_kv *c)
{
    /* fp16 mode: pages are the blocks; int4 mode: small pages so sinks, the
     * tail and staging hold little slack */
    if (c->mode == CFG_KV_FP16)
        return c->block_tokens;
    return c->block_tokens < 16 ? c->block_tokens : 16;
}

static int make_layout(const cfg_kv *c, const kvc_dims *d, kvq_layout *L,
                       char *err, size_t errlen)
{
    return kvq_layout_init(L, c->block_tokens, d->kv_dim, d->head_dim,
                           cfg_kv_v_group(c, d->head_dim),
                           c->k_mode, c->outlier_budget, err, errlen);
}

int kvc_pool_plan(const cfg_kv *cfg, const kvc_dims *d, int n_ctx, int max_seqs,
                  int64_t *n_qblocks, int64_t *n_fpages, char *err, size_t errlen)
{
    if (cfg_kv_validate_model(cfg, d->head_dim, d->kv_dim / d->head_dim, err, errlen) < 0)
        return -EINVAL;
    if (n_ctx <= 0 || max_seqs <= 0)
        return fail(err, errlen, -EINVAL, "n_ctx and max_seqs must be positive");
    const int T = cfg->block_tokens, P = kvc_plan_page_tokens(cfg);
    const int64_t L = d->n_layers, D = d->kv_dim;
    const int64_t fbytes = (int64_t)P * L * D * 2 * 2;
    if (cfg->mode == CFG_KV_FP16) {
        int64_t per_seq = (n_ctx + P - 1) / P + 1;
        int64_t nf = per_seq * max_seqs;
        if (cfg->kv_budget_bytes > 0)
            nf = cfg->kv_budget_bytes / fbytes;
        else if (cfg->kv_budget_tokens > 0)
            nf = (cfg->kv_budget_tokens + P - 1) / P;
        if (nf < 1)
            return fail(err, errlen, -EINVAL, "kv_budget is smaller than one KV page (%lld bytes)",
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
    if (cfg->kv_budget_bytes > 0 || cfg->kv_budget_tokens > 0) {
        /* A budget buys INT4 blocks; staging pages for a few sequences at a
         * time are carved out of it first. */
        int64_t budget = cfg->kv_budget_bytes;
        if (cfg->kv_budget_tokens > 0)
            budget = (cfg->kv_budget_tokens + T - 1) / T * qbytes;
        /* FP16 pages are shared: warm-up staging for the sequences that
         * may prefill at once (KVC_PREFILL_SLOTS) plus, per sequence, its
         * sink page and a short decode tail (a longer tail borrows pages
         * the staging does not use; if none are left the scheduler
         * preempts). */
        int64_t slots = max_seqs < KVC_PREFILL_SLOTS ? max_seqs : KVC_PREFILL_SLOTS;
        /* sequences the budget can hold if they average half the context */
        int64_t half = (n_ctx + 1) / 2;
        int64_t q_half = (half + T - 1) / T + (half + cfg->chunk_size - 1) / cfg->chunk_size;
        int64_t held = cfg->kv_budget_tokens > 0 ? (cfg->kv_budget_tokens + half - 1) / half
                                                 : budget / (q_half * qbytes);
        held = held < 1 ? 1 : held > max_seqs ? max_seqs : held;
        int64_t nf = slots * ((stage + P - 1) / P + cfg->warmup_chunks + 1) +
                     held * ((cfg->sink_tokens + P - 1) / P + 2);
        if (cfg->kv_budget_tokens > 0)
            budget += nf * fbytes; /* tokens count what is quantized */
        int64_t nq = (budget - nf * fbytes) / qbytes;
        if (nq < 1)
            return fail(err, errlen, -EINVAL,
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

int kvc_pool_create(const cfg_kv *cfg, const kvc_dims *d, int64_t n_qblocks,
                    int64_t n_fpages, kvc_pool **out, char *err, size_t errlen)
{
    *out = NULL;
    if (cfg_kv_validate_model(cfg, d->head_dim, d->kv_dim / d->head_dim, err, errlen) < 0)
        return -EINVAL;
    if (d->n_layers <= 0 || d->kv_dim <= 0 || d->head_dim <= 0 ||
        d->kv_dim % d->head_dim)
        return fail(err, errlen, -EINVAL, "bad KV dimensions");
    if (n_qblocks < 0 || n_fpages < 1 || n_qblocks > INT32_MAX || n_fpages > INT32_MAX)
        return fail(err, errlen, -EINVAL, "bad pool size (%lld blocks, %lld pages)",
                    (long long)n_qblocks, (long long)n_fpages);
    kvc_pool *p = calloc(1, sizeof *p);
    if (!p)
        return fail(err, errlen, -ENOMEM, "out of memory");
    p->cfg = *cfg;
    p->d = *d;
    p->P = kvc_plan_page_tokens(cfg);
    p->has_q = is_int4(p);
    if (p->has_q) {
        if (make_layout(cfg, d, &p->L, err, errlen) < 0) {
            free(p);
            return -EINVAL;
        }
        p->qbytes = p->L.bytes * (size_t)d->n_layers;
    } else {
        n_qblocks = 0;
    }
    p->f_layer = (size_t)p->P * (size_t)d->kv_dim * 2 * sizeof(uint16_t);
    p->fbytes = p->f_layer * (size_t)d->n_layers;
    p->nq = n_qblocks;
    p->nf = n_fpages;
    p->qarena = n_qblocks ? malloc((size_t)n_qblocks * p->qbytes) : NULL;
    p->farena = malloc((size_t)n_fpages * p->fbytes);
    p->qfree = malloc(((size_t)n_qblocks + 1) * sizeof(int32_t));
    p->ffree = malloc((size_t)n_fpages * sizeof(int32_t));
    if ((n_qblocks && !p->qarena) || !p->farena || !p->qfree || !p->ffree) {
        double mib = ((double)n_qblocks * (double)p->qbytes +
                      (double)n_fpages * (double)p->fbytes) / (1024.0 * 1024.0);
        kvc_pool_destroy(p);
        return fail(err, errlen, -ENOMEM, "cannot allocate the KV pool (%.1f MiB)", mib);
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

void kvc_pool_destroy(kvc_pool *p)
{
    if (!p)
        return;
    free(p->qarena);
    free(p->farena);
    free(p->qfree);
    free(p->ffree);
    free(p);
}

const kvq_layout *kvc_pool_layout(const kvc_pool *p)
{
    return p->has_q ? &p->L : NULL;
}

const cfg_kv *kvc_pool_cfg(const kvc_pool *p)
{
    return &p->cfg;
}

int kvc_pool_page_tokens(const kvc_pool *p)
{
    return p->P;
}

static uint8_t *qblock(const kvc_pool *p, int32_t id, int layer)
{
    return p->qarena + (size_t)id * p->qbytes + (size_t)layer * p->L.bytes;
}

static uint16_t *fpage_k(const kvc_pool *p, int32_t id, int layer)
{
    return (uint16_t *)(p->farena + (size_t)id * p->fbytes + (size_t)layer * p->f_layer);
}

static uint16_t *fpage_v(const kvc_pool *p, int32_t id, int layer)
{
    return fpage_k(p, id, layer) + (size_t)p->P * (size_t)p->d.kv_dim;
}

void kvc_stats_add_counts(kvc_stats *sum, const kvc_stats *s)
{
    sum->tokens += s->tokens;
    sum->elements += s->elements;
    sum->n_quantized += s->n_quantized;
    sum->n_outliers += s->n_outliers;
    sum->n_clamped += s->n_clamped;
}

void kvc_stats_set_bytes(kvc_stats *s, const kvq_layout *Lq, int n_layers, size_t qbytes,
                         size_t fbytes, int64_t nq, int64_t nf)
{
    const int64_t L = n_layers;
    if (Lq) {
        s->bytes_int4 = nq * L * (int64_t)Lq->bytes_dense;
        s->bytes_scales = nq * L * (int64_t)Lq->bytes_scales;
        s->bytes_outliers = nq * L * (int64_t)Lq->bytes_outliers;
        s->bytes_other = nq * (int64_t)qbytes - s->bytes_int4 - s->bytes_scales -
                         s->bytes_outliers;
    }
    s->bytes_fp16 = nf * (int64_t)fbytes;
    s->bytes_total = s->bytes_int4 + s->bytes_scales + s->bytes_outliers +
                     s->bytes_fp16 + s->bytes_other;
}

static void fill_bytes(const kvc_pool *p, int64_t nq, int64_t nf, kvc_stats *s)
{
    kvc_stats_set_bytes(s, p->has_q ? &p->L : NULL, p->d.n_layers, p->qbytes, p->fbytes, nq,
                        nf);
    s->qblocks_total = p->nq;
    s->fpages_total = p->nf;
}

void kvc_seq_stats(const kvc_seq *s, kvc_stats *out)
{
    memset(out, 0, sizeof *out);
    int64_t nq = 0, nf = 0;
    for (int i = 0; i < s->n_ents; i++)
        if (s->ents[i].kind == ENT_Q)
            nq++;
        else
            nf++;
    fill_bytes(s->p, nq, nf, out);
    out->qblocks_used = nq;
    out->fpages_used = nf;
    out->tokens = s->n_tokens;
    out->elements = (int64_t)s->n_tokens * s->p->d.n_layers * s->p->d.kv_dim * 2;
    out->bytes_fp16_equiv = out->elements * 2;
    out->n_quantized = s->n_quantized;
    out->n_outliers = s->n_outliers;
    out->n_clamped = s->n_clamped;
}

void kvc_pool_stats(const kvc_pool *p, kvc_stats *out)
{
    memset(out, 0, sizeof *out);
    for (const kvc_seq *s = p->seqs; s; s = s->next) {
        kvc_stats t;
        kvc_seq_stats(s, &t);
        kvc_stats_add_counts(out, &t);
    }
    out->qblocks_used = p->nq - p->nqfree;
    out->fpages_used = p->nf - p->nffree;
    fill_bytes(p, out->qblocks_used, out->fpages_used, out);
    out->bytes_fp16_equiv = out->elements * 2;
}

double kvc_pool_usage(const kvc_pool *p)
{
    double total = (double)p->nq * (double)p->qbytes + (double)p->nf * (double)p->fbytes;
    double used = (double)(p->nq - p->nqfree) * (double)p->qbytes +
                  (double)(p->nf - p->nffree) * (double)p->fbytes;
    return total > 0 ? used / total : 0.0;
}

int64_t kvc_pool_capacity_bytes(const kvc_pool *p)
{
    return p->nq * (int64_t)p->qbytes + p->nf * (int64_t)p->fbytes;
}

void kvc_pool_free_units(const kvc_pool *p, int64_t *qfree, int64_t *ffree)
{
    *qfree = p->nqfree;
    *ffree = p->nffree;
}

void kvc_pool_estimate(const kvc_pool *p, int n, int64_t *nq, int64_t *nf)
{
    kvc_plan_estimate(&p->cfg, n, nq, nf);
}

void kvc_plan_estimate(const cfg_kv *c, int n, int64_t *nq, int64_t *nf)
{
    const int64_t P = kvc_plan_page_tokens(c), T = c->block_tokens, C = c->chunk_size;
    if (c->mode != CFG_KV_INT4) {
        *nq = 0;
        *nf = (n + P - 1) / P + 1;
        return;
    }
    /* sinks stay in FP16; every chunk's other tokens fill whole blocks of
     * their own (chunks are multiples of the block size) */
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

/* ---- sequences -------------------------------------------------------------- */

int kvc_seq_create(kvc_pool *p, int max_tokens, kvc_seq **out, char *err, size_t errlen)
{
    *out = NULL;
    if (max_tokens <= 0)
        return fail(err, errlen, -EINVAL, "max_tokens must be positive");
    kvc_seq *s = calloc(1, sizeof *s);
    if (!s)
        return fail(err, errlen, -ENOMEM, "out of memory");
    s->p = p;
    s->max_tokens = max_tokens;
    const int T = p->cfg.block_tokens, P = p->P, C = p->cfg.chunk_size;
    const int D = p->d.kv_dim, L = p->d.n_layers;
    int unit = P < T ? P : T;
    /* entries: every position could sit in a page of its own kind boundary;
     * bound generously by pages + one partial block per chunk */
    s->cap_ents = max_tokens / unit + max_tokens / C + 16;
    s->cap_tgt = C / unit + 8;
    s->cap_src = (p->cfg.warmup_chunks * C) / unit + T / unit + 8;
    s->cap_rq = (p->cfg.warmup_chunks * C) / T + 4;
    s->ents = malloc((size_t)s->cap_ents * sizeof *s->ents);
    s->tgt = malloc((size_t)s->cap_tgt * sizeof *s->tgt);
    s->src = malloc((size_t)s->cap_src * sizeof *s->src);
    s->rq_ids = malloc((size_t)s->cap_rq * sizeof *s->rq_ids);
    s->ek = calloc((size_t)L, sizeof *s->ek);
    s->ev = calloc((size_t)L, sizeof *s->ev);
    s->ema_mem = calloc((size_t)L * 2 * 4 * (size_t)D, sizeof(float));
    int gather = T > C ? T : C;
    s->sk = malloc((size_t)T * D * sizeof(float));
    s->sv = malloc((size_t)T * D * sizeof(float));
    s->qscr = malloc((size_t)gather * sizeof(float));
    s->a = malloc((size_t)D * sizeof(float));
    s->b = malloc((size_t)D * sizeof(float));
    s->kq_scr = p->has_q ? malloc(kvq_quantize_scratch_bytes(&p->L) + 1) : NULL;
    if (!s->ents || !s->tgt || !s->src || !s->rq_ids || !s->ek || !s->ev ||
        !s->ema_mem || !s->sk || !s->sv || !s->qscr || !s->a || !s->b ||
        (p->has_q && !s->kq_scr)) {
        kvc_seq_destroy(s);
        return fail(err, errlen, -ENOMEM, "out of memory for a sequence");
    }
    for (int l = 0; l < L; l++) {
        float *m = s->ema_mem + (size_t)l * 8 * D;
        s->ek[l] = (kvq_ema){m, m + D, m + 2 * D, m + 3 * D, 0};
        s->ev[l] = (kvq_ema){m + 4 * D, m + 5 * D, m + 6 * D, m + 7 * D, 0};
    }
    s->stage_first = s->tail_first = -1;
    s->next = p->seqs;
    if (p->seqs)
        p->seqs->prev = s;
    p->seqs = s;
    *out = s;
    return 0;
}

static void free_ent(kvc_pool *p, const kvc_ent *e)
{
    if (e->kind == ENT_Q)
        p->qfree[p->nqfree++] = e->id;
    else
        p->ffree[p->nffree++] = e->id;
}

void kvc_seq_reset(kvc_seq *s)
{
    if (s->st.active)
        kvc_abort(s);
    for (int i = 0; i < s->n_ents; i++)
        free_ent(s->p, &s->ents[i]);
    s->n_ents = 0;
    s->n_tokens = 0;
    s->chunk_idx = 0;
    s->prefill_done = 0;
    s->stage_first = s->tail_first = -1;
    s->n_quantized = s->n_outliers = s->n_clamped = 0;
    memset(s->ema_mem, 0, (size_t)s->p->d.n_layers * 8 * (size_t)s->p->d.kv_dim * sizeof(float));
    for (int l = 0; l < s->p->d.n_layers; l++) {
        s->ek[l].n_chunks = 0;
        s->ev[l].n_chunks = 0;
    }
}

void kvc_seq_destroy(kvc_seq *s)
{
    if (!s)
        return;
    kvc_pool *p = s->p;
    if (s->ents && s->ema_mem && s->ek && s->ev)
        kvc_seq_reset(s);
    if (s->prev)
        s->prev->next = s->next;
    else if (p->seqs == s)
        p->seqs = s->next;
    if (s->next)
        s->next->prev = s->prev;
    free(s->ents);
    free(s->tgt);
    free(s->src);
    free(s->rq_ids);
    free(s->ek);
    free(s->ev);
    free(s->ema_mem);
    free(s->sk);
    free(s->sv);
    free(s->qscr);
    free(s->a);
    free(s->b);
    free(s->kq_scr);
    free(s);
}

int kvc_seq_n_tokens(const kvc_seq *s)
{
    return s->n_tokens;
}

int kvc_seq_warming(const kvc_seq *s)
{
    return is_int4(s->p) && s->chunk_idx < s->p->cfg.warmup_chunks && !s->prefill_done;
}

int kvc_seq_chunks(const kvc_seq *s)
{
    return s->chunk_idx;
}

int kvc_seq_ema(const kvc_seq *s, int layer, int tensor, float *lo, float *hi)
{
    if (layer < 0 || layer >= s->p->d.n_layers)
        return -1;
    const kvq_ema *e = tensor ? &s->ev[layer] : &s->ek[layer];
    if (e->n_chunks == 0)
        return -1;
    double sl = 0, sh = 0;
    int D = s->p->d.kv_dim;
    for (int c = 0; c < D; c++) {
        sl += e->lo[c];
        sh += e->hi[c];
    }
    *lo = (float)(sl / D);
    *hi = (float)(sh / D);
    return 0;
}

int kvc_max_segments(const kvc_seq *s)
{
    return s->cap_ents;
}

int kvc_segments(const kvc_seq *s, int layer, kvs_seg *segs, int cap)
{
    const kvc_pool *p = s->p;
    int n = 0;
    for (int i = 0; i < s->n_ents && n < cap; i++) {
        const kvc_ent *e = &s->ents[i];
        kvs_seg *g = &segs[n++];
        g->pos0 = e->pos0;
        g->n = e->n;
        if (e->kind == ENT_Q) {
            g->kind = KVS_Q4;
            g->k = qblock(p, e->id, layer);
            g->v = NULL;
            g->stride = 0;
        } else {
            g->kind = KVS_F16;
            g->k = fpage_k(p, e->id, layer);
            g->v = fpage_v(p, e->id, layer);
            g->stride = (size_t)p->d.kv_dim;
        }
    }
    return n;
}

/* ---- the step protocol -------------------------------------------------------- */

static int take(kvc_pool *p, int kind, int32_t *id)
{
    if (kind == ENT_Q) {
        if (p->nqfree == 0)
            return -1;
        *id = p->qfree[--p->nqfree];
    } else {
        if (p->nffree == 0)
            return -1;
        *id = p->ffree[--p->nffree];
    }
    return 0;
}

static void give(kvc_pool *p, int kind, int32_t id)
{
    if (kind == ENT_Q)
        p->qfree[p->nqfree++] = id;
    else
        p->ffree[p->nffree++] = id;
}

/* Undo every reservation of the current step. */
void kvc_abort(kvc_seq *s)
{
    if (!s->st.active)
        return;
    for (int i = 0; i < s->st.n_tgt; i++)
        if (!s->tgt[i].existing)
            give(s->p, s->tgt[i].kind, s->tgt[i].id);
    for (int i = 0; i < s->st.n_rq; i++)
        give(s->p, ENT_Q, s->rq_ids[i]);
    s->st.active = 0;
    s->st.n_tgt = s->st.n_rq = s->st.n_src = 0;
}

/* Adds targets for rows [row, row+m) into FP16 pages, continuing the last
 * entry when it is a partially filled page of the same run (run_first: the
 * index of the run's first entry, or -1 when the run starts now). */
static int plan_pages(kvc_seq *s, int row, int m, int pos, int run_first)
{
    kvc_pool *p = s->p;
    if (run_first >= 0 && s->n_ents > run_first) {
        kvc_ent *last = &s->ents[s->n_ents - 1];
        if (last->kind == ENT_F && last->n < p->P && last->pos0 + last->n == pos) {
            int k = p->P - last->n < m ? p->P - last->n : m;
            s->tgt[s->st.n_tgt++] = (kvc_tgt){ENT_F, last->id, last->n, row, k, 1};
            row += k;
            m -= k;
        }
    }
    while (m > 0) {
        int32_t id;
        if (s->st.n_tgt >= s->cap_tgt || take(p, ENT_F, &id) < 0)
            return -1;
        int k = m < p->P ? m : p->P;
        s->tgt[s->st.n_tgt++] = (kvc_tgt){ENT_F, id, 0, row, k, 0};
        row += k;
        m -= k;
    }
    return 0;
}

static int plan_blocks(kvc_seq *s, int row, int m)
{
    const int T = s->p->cfg.block_tokens;
    while (m > 0) {
        int32_t id;
        if (s->st.n_tgt >= s->cap_tgt || take(s->p, ENT_Q, &id) < 0)
            return -1;
        int k = m < T ? m : T;
        s->tgt[s->st.n_tgt++] = (kvc_tgt){ENT_Q, id, 0, row, k, 0};
        row += k;
        m -= k;
    }
    return 0;
}

/* Reserves the INT4 blocks for re-quantizing the FP16 entries from index
 * first on plus the step's new FP16 targets (in position order). */
static int plan_requant(kvc_seq *s, int first, int kind)
{
    const int T = s->p->cfg.block_tokens;
    int tokens = 0;
    s->st.n_src = 0;
    for (int i = first; i >= 0 && i < s->n_ents; i++) {
        if (s->st.n_src >= s->cap_src)
            return -1;
        s->src[s->st.n_src++] = (kvc_src){s->ents[i].id, s->ents[i].n};
        tokens += s->ents[i].n;
    }
    for (int i = 0; i < s->st.n_tgt; i++) {
        const kvc_tgt *t = &s->tgt[i];
        if (t->kind != ENT_F || t->row0 < s->st.row_stats)
            continue; /* sinks are never re-quantized */
        if (t->existing) {
            /* the page is already the last source: it grows by t->n */
            s->src[s->st.n_src - 1].n += t->n;
        } else {
            if (s->st.n_src >= s->cap_src)
                return -1;
            s->src[s->st.n_src++] = (kvc_src){t->id, t->n};
        }
        tokens += t->n;
    }
    int nb = (tokens + T - 1) / T;
    if (nb > s->cap_rq)
        return -1;
    for (int i = 0; i < nb; i++) {
        if (take(s->p, ENT_Q, &s->rq_ids[i]) < 0)
            return -1;
        s->st.n_rq = i + 1;
    }
    s->st.rq = kind;
    s->st.rq_tokens = tokens;
    return 0;
}

int kvc_begin(kvc_seq *s, int pos0, int n, int prefill, char *err, size_t errlen)
{
    kvc_pool *p = s->p;
    const cfg_kv *c = &p->cfg;
    if (s->st.active)
        return fail(err, errlen, -EINVAL, "a KV step is already open");
    if (pos0 != s->n_tokens)
        return fail(err, errlen, -EINVAL, "KV step at position %d, but the sequence holds %d",
                    pos0, s->n_tokens);
    if (n <= 0 || n > c->chunk_size)
        return fail(err, errlen, -EINVAL, "KV step of %d tokens (1..chunk_size %d)", n,
                    c->chunk_size);
    if ((int64_t)pos0 + n > s->max_tokens)
        return fail(err, errlen, -ENOSPC, "sequence full: %d + %d > %d tokens", pos0, n,
                    s->max_tokens);
    if (!prefill && n > 1)
        prefill = 1; /* several tokens at once are a chunk */
    if (is_int4(p) && !prefill && !s->prefill_done) {
        int rc = kvc_finish_prefill(s, err, errlen);
        if (rc < 0 && rc != -ENOSPC)
            return rc;
    }
    memset(&s->st, 0, sizeof s->st);
    s->st.active = 1;
    s->st.pos0 = pos0;
    s->st.n = n;
    s->st.prefill = prefill;
    int ok = 0;
    if (!is_int4(p)) {
        ok = plan_pages(s, 0, n, pos0, 0);
    } else {
        /* sinks first */
        int ns = c->sink_tokens - pos0;
        ns = ns < 0 ? 0 : ns > n ? n : ns;
        s->st.row_stats = ns;
        if (ns > 0)
            ok = plan_pages(s, 0, ns, pos0, 0);
        int m = n - ns, pos = pos0 + ns;
        if (ok == 0 && m > 0) {
            if (prefill) {
                s->tail_first = -1; /* an old tail stays FP16, in place */
                int warm = s->chunk_idx < c->warmup_chunks && !s->prefill_done;
                s->st.stats = 1;
                if (warm) {
                    ok = plan_pages(s, ns, m, pos, s->stage_first);
                    int last_warm = s->chunk_idx == c->warmup_chunks - 1;
                    if (ok == 0 && last_warm && !c->keep_warmup_fp16)
                        ok = plan_requant(s, s->stage_first, 1);
                } else {
                    ok = plan_blocks(s, ns, m);
                }
            } else {
                int tail_n = 0;
                for (int i = s->tail_first; i >= 0 && i < s->n_ents; i++)
                    tail_n += s->ents[i].n;
                ok = plan_pages(s, ns, m, pos, s->tail_first);
                if (ok == 0 && tail_n + m >= c->block_tokens)
                    ok = plan_requant(s, s->tail_first, 2);
            }
        }
    }
    if (ok < 0) {
        kvc_abort(s);
        return fail(err, errlen, -ENOSPC,
                    "KV pool exhausted (%lld/%lld INT4 blocks and %lld/%lld FP16 pages free)",
                    (long long)p->nqfree, (long long)p->nq, (long long)p->nffree,
                    (long long)p->nf);
    }
    return 0;
}

/* Copies rows of an FP16 page into f32 rows. */
static void page_to_f32(const kvc_pool *p, int32_t id, int layer, int slot0, int n,
                        float *k, float *v)
{
    const size_t D = (size_t)p->d.kv_dim;
    const uint16_t *pk = fpage_k(p, id, layer) + (size_t)slot0 * D;
    const uint16_t *pv = fpage_v(p, id, layer) + (size_t)slot0 * D;
    for (size_t i = 0; i < (size_t)n * D; i++) {
        k[i] = kt_f16_to_f32(pk[i]);
        v[i] = kt_f16_to_f32(pv[i]);
    }
}

static void fold_stats(kvc_seq *s, int layer, const float *k, const float *v, int n,
                       float weight)
{
    const cfg_kv *c = &s->p->cfg;
    const int D = s->p->d.kv_dim;
    kvq_ema_params ep = {c->ema_decay, c->ema_clip, c->clip_quantile, c->warmup_chunks};
    kvq_chunk_quantiles(k, n, D, (size_t)D, c->clip_quantile, s->a, s->b, s->qscr);
    kvq_ema_update(&s->ek[layer], &ep, s->a, s->b, D, weight);
    kvq_chunk_quantiles(v, n, D, (size_t)D, c->clip_quantile, s->a, s->b, s->qscr);
    kvq_ema_update(&s->ev[layer], &ep, s->a, s->b, D, weight);
}

/* Quantizes n tokens into block id of one layer with the layer's current
 * EMA ranges. With no outlier budget there is no outlier band for V (each
 * group's min/max covers all its values): together with per-token keys
 * that is the naive INT4 baseline. */
static void quantize(kvc_seq *s, int layer, int32_t id, const float *k, const float *v,
                     int n)
{
    const kvc_pool *p = s->p;
    int band = p->cfg.outlier_budget > 0.0f;
    kvq_quantize_block(&p->L, qblock(p, id, layer), k, v, (size_t)p->d.kv_dim, n,
                       s->ek[layer].lo, s->ek[layer].hi, band ? s->ev[layer].lo : NULL,
                       band ? s->ev[layer].hi : NULL, s->kq_scr);
}

/* Re-quantizes the step's sources (staged pages or the tail) of one layer
 * into the reserved blocks, block_tokens tokens at a time. */
static void requant_layer(kvc_seq *s, int layer)
{
    const kvc_pool *p = s->p;
    const int T = p->cfg.block_tokens, D = p->d.kv_dim;
    int blk = 0, fill = 0;
    for (int i = 0; i < s->st.n_src; i++) {
        int off = 0;
        while (off < s->src[i].n) {
            int k = s->src[i].n - off;
            if (k > T - fill)
                k = T - fill;
            page_to_f32(p, s->src[i].id, layer, off, k, s->sk + (size_t)fill * D,
                        s->sv + (size_t)fill * D);
            fill += k;
            off += k;
            if (fill == T) {
                if (s->st.rq == 2) /* tail: fold the block into the EMA */
                    fold_stats(s, layer, s->sk, s->sv, T,
                               (float)T / (float)p->cfg.chunk_size);
                quantize(s, layer, s->rq_ids[blk++], s->sk, s->sv, T);
                fill = 0;
            }
        }
    }
    if (fill > 0 && blk < s->st.n_rq)
        quantize(s, layer, s->rq_ids[blk], s->sk, s->sv, fill);
}

void kvc_store(kvc_seq *s, int layer, const float *k, const float *v)
{
    kvc_pool *p = s->p;
    const size_t D = (size_t)p->d.kv_dim;
    if (s->st.stats && s->st.n > s->st.row_stats)
        fold_stats(s, layer, k + (size_t)s->st.row_stats * D, v + (size_t)s->st.row_stats * D,
                   s->st.n - s->st.row_stats, 1.0f);
    for (int i = 0; i < s->st.n_tgt; i++) {
        const kvc_tgt *t = &s->tgt[i];
        const float *tk = k + (size_t)t->row0 * D, *tv = v + (size_t)t->row0 * D;
        if (t->kind == ENT_F) {
            uint16_t *pk = fpage_k(p, t->id, layer) + (size_t)t->slot0 * D;
            uint16_t *pv = fpage_v(p, t->id, layer) + (size_t)t->slot0 * D;
            for (size_t j = 0; j < (size_t)t->n * D; j++) {
                pk[j] = kt_f32_to_f16(tk[j]);
                pv[j] = kt_f32_to_f16(tv[j]);
            }
        } else {
            quantize(s, layer, t->id, tk, tv, t->n);
        }
    }
    if (s->st.rq)
        requant_layer(s, layer);
}

/* Sums the outlier / clamp counters of a block over all layers. */
static void count_block(kvc_seq *s, int32_t id)
{
    const kvc_pool *p = s->p;
    for (int l = 0; l < p->d.n_layers; l++) {
        const kvq_block_hdr *h = kvq_chdr(qblock(p, id, l));
        s->n_quantized += (int64_t)h->n_tok * p->d.kv_dim * 2;
        s->n_outliers += h->n_kout + h->n_vout;
        s->n_clamped += h->n_clamped;
    }
}

void kvc_commit(kvc_seq *s)
{
    kvc_pool *p = s->p;
    if (!s->st.active)
        return;
    int pos = s->st.pos0;
    for (int i = 0; i < s->st.n_tgt; i++) {
        const kvc_tgt *t = &s->tgt[i];
        int is_sink = t->row0 < s->st.row_stats;
        if (t->existing) {
            s->ents[s->n_ents - 1].n += t->n;
        } else {
            int idx = s->n_ents++;
            s->ents[idx] = (kvc_ent){t->kind, t->id, s->st.pos0 + t->row0, t->n};
            if (t->kind == ENT_Q)
                count_block(s, t->id);
            else if (!is_sink && is_int4(p)) {
                if (s->st.prefill && s->stage_first < 0)
                    s->stage_first = idx;
                else if (!s->st.prefill && s->tail_first < 0)
                    s->tail_first = idx;
            }
        }
        pos += t->n;
    }
    if (s->st.rq) {
        int first = s->st.rq == 1 ? s->stage_first : s->tail_first;
        int pos0 = s->ents[first].pos0;
        for (int i = first; i < s->n_ents; i++)
            free_ent(p, &s->ents[i]);
        s->n_ents = first;
        const int T = p->cfg.block_tokens;
        int left = s->st.rq_tokens;
        for (int i = 0; i < s->st.n_rq; i++) {
            int k = left < T ? left : T;
            s->ents[s->n_ents++] = (kvc_ent){ENT_Q, s->rq_ids[i], pos0, k};
            count_block(s, s->rq_ids[i]);
            pos0 += k;
            left -= k;
        }
        if (s->st.rq == 1)
            s->stage_first = -1;
        else
            s->tail_first = -1;
    }
    s->n_tokens += s->st.n;
    if (s->st.prefill)
        s->chunk_idx++;
    s->st.active = 0;
    s->st.n_tgt = s->st.n_rq = s->st.n_src = 0;
}

int kvc_finish_prefill(kvc_seq *s, char *err, size_t errlen)
{
    kvc_pool *p = s->p;
    if (s->prefill_done || !is_int4(p))
        return 0;
    s->prefill_done = 1;
    if (s->stage_first < 0 || p->cfg.keep_warmup_fp16)
        return 0;
    /* The prompt ended during warm-up: quantize what was staged with the
     * statistics gathered so far (the warm-up mean). */
    memset(&s->st, 0, sizeof s->st);
    s->st.active = 1;
    s->st.pos0 = s->n_tokens;
    if (plan_requant(s, s->stage_first, 1) < 0) {
        kvc_abort(s);
        s->stage_first = -1; /* staged chunks stay FP16: still exact */
        return fail(err, errlen, -ENOSPC, "KV pool exhausted while quantizing the "
                    "warm-up chunks; they stay FP16");
    }
    for (int l = 0; l < p->d.n_layers; l++)
        requant_layer(s, l);
    s->st.prefill = 0;
    kvc_commit(s);
    return 0;
}

int kvc_seq_layer_counts(const kvc_seq *s, int layer, kvc_layer_counts *out)
{
    const kvc_pool *p = s->p;
    memset(out, 0, sizeof *out);
    if (layer < 0 || layer >= p->d.n_layers)
        return -1;
    for (int i = 0; i < s->n_ents; i++) {
        const kvc_ent *e = &s->ents[i];
        if (e->kind != ENT_Q)
            continue;
        const kvq_block_hdr *h = kvq_chdr(qblock(p, e->id, layer));
        out->n_quantized += (int64_t)h->n_tok * p->d.kv_dim * 2;
        out->n_k_outliers += h->n_kout;
        out->n_v_outliers += h->n_vout;
        out->n_clamped += h->n_clamped;
    }
    return 0;
}
