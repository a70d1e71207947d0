/*
 * kv_plan.c - the host-side KV planner (see kv_plan.h): free lists of INT4
 * blocks and FP16 pages, the entry lists of sequences, and every step
 * decision of the LiveKVQuant-P lifecycle (sinks, warm-up staging and its
 * re-quantization, live blocks, the decode tail), plus pool sizing and the
 * admission estimate. Owns only host bookkeeping: no arena, no EMA state,
 * no data. May call config/ and kernels/kvq.h (layout sizes).
 *
 * Invariants: the entries of a sequence cover positions [0, n_tokens) in
 * order; stage_first / tail_first (entry indices, -1 none) open the runs of
 * staged warm-up pages and of decode-tail pages, which always run to the end
 * of the entry list. A step writes only into units it reserved or past the
 * visible end of the last page, so the history read during the step is the
 * history as it was before it.
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

struct kvp_pool {
    cfg_kv cfg;
    kvc_dims d;
    kvq_layout L;
    int has_q;     /* int4 mode */
    int P;         /* tokens per FP16 page */
    size_t qbytes; /* one block, all layers */
    size_t fbytes; /* one page, all layers */
    int32_t *qfree, *ffree; /* stacks of free ids */
    int64_t nq, nf, nqfree, nffree;
    kvp_seq *seqs; /* live sequences, newest first */
};

struct kvp_seq {
    kvp_pool *p;
    kvp_seq *next, *prev; /* the pool's list */
    void *owner;
    int max_tokens;
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

static int is_int4(const kvp_pool *p)
{
    return p->cfg.mode == CFG_KV_INT4;
}

/* ---- configuration-level planning --------------------------------------------- */

int kvp_page_tokens(const cfg_kv *c)
{
    if (c->mode == CFG_KV_FP16)
        return c->block_tokens;
    return c->block_tokens < 16 ? c->block_tokens : 16;
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
    if (kvq_layout_init(L, c->block_tokens, d->kv_dim, d->head_dim,
                        cfg_kv_v_group(c, d->head_dim), c->k_mode, c->outlier_budget, err,
                        errlen) < 0)
        return -EINVAL;
    return 0;
}

int kvp_pool_size(const cfg_kv *cfg, const kvc_dims *d, int n_ctx, int max_seqs,
                  int64_t *n_qblocks, int64_t *n_fpages, char *err, size_t errlen)
{
    if (kvp_check(cfg, d, err, errlen) < 0)
        return -EINVAL;
    if (n_ctx <= 0 || max_seqs <= 0)
        return lkq_err(err, errlen, -EINVAL, "n_ctx and max_seqs must be positive");
    const int T = cfg->block_tokens, P = kvp_page_tokens(cfg);
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

void kvp_stats_set_bytes(kvc_stats *s, const kvq_layout *Lq, int n_layers, size_t qbytes,
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
    s->bytes_total = s->bytes_int4 + s->bytes_scales + s->bytes_outliers + s->bytes_fp16 +
                     s->bytes_other;
}

void kvp_stats_add_counts(kvc_stats *sum, const kvc_stats *s)
{
    sum->tokens += s->tokens;
    sum->elements += s->elements;
    sum->n_quantized += s->n_quantized;
    sum->n_outliers += s->n_outliers;
    sum->n_clamped += s->n_clamped;
}

/* ---- the pool ------------------------------------------------------------------ */

int kvp_pool_create(const cfg_kv *cfg, const kvc_dims *d, int64_t n_qblocks,
                    int64_t n_fpages, kvp_pool **out, char *err, size_t errlen)
{
    *out = NULL;
    if (kvp_check(cfg, d, err, errlen) < 0)
        return -EINVAL;
    if (cfg->mode != CFG_KV_INT4)
        n_qblocks = 0;
    if (n_qblocks < 0 || n_fpages < 1 || n_qblocks > INT32_MAX || n_fpages > INT32_MAX)
        return lkq_err(err, errlen, -EINVAL, "bad pool size (%lld blocks, %lld pages)",
                    (long long)n_qblocks, (long long)n_fpages);
    kvp_pool *p = calloc(1, sizeof *p);
    if (!p)
        return lkq_err(err, errlen, -ENOMEM, "out of memory");
    p->cfg = *cfg;
    p->d = *d;
    p->P = kvp_page_tokens(cfg);
    p->has_q = is_int4(p);
    if (p->has_q) {
        if (make_layout(cfg, d, &p->L, err, errlen) < 0) {
            free(p);
            return -EINVAL;
        }
        p->qbytes = p->L.bytes * (size_t)d->n_layers;
    }
    p->fbytes = (size_t)p->P * (size_t)d->kv_dim * 2 * sizeof(uint16_t) * (size_t)d->n_layers;
    p->nq = n_qblocks;
    p->nf = n_fpages;
    p->qfree = malloc(((size_t)n_qblocks + 1) * sizeof(int32_t));
    p->ffree = malloc((size_t)n_fpages * sizeof(int32_t));
    if (!p->qfree || !p->ffree) {
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
    free(p->qfree);
    free(p->ffree);
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

const kvq_layout *kvp_pool_layout(const kvp_pool *p)
{
    return p->has_q ? &p->L : NULL;
}

int kvp_pool_page_tokens(const kvp_pool *p)
{
    return p->P;
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

void kvp_pool_free_units(const kvp_pool *p, int64_t *qfree, int64_t *ffree)
{
    *qfree = p->nqfree;
    *ffree = p->nffree;
}

const int32_t *kvp_pool_free_list(const kvp_pool *p, int kind, int64_t *n)
{
    *n = kind == KVP_BLOCK ? p->nqfree : p->nffree;
    return kind == KVP_BLOCK ? p->qfree : p->ffree;
}

int64_t kvp_pool_capacity_bytes(const kvp_pool *p)
{
    return p->nq * (int64_t)p->qbytes + p->nf * (int64_t)p->fbytes;
}

double kvp_pool_usage(const kvp_pool *p)
{
    double total = (double)p->nq * (double)p->qbytes + (double)p->nf * (double)p->fbytes;
    double used = (double)(p->nq - p->nqfree) * (double)p->qbytes +
                  (double)(p->nf - p->nffree) * (double)p->fbytes;
    return total > 0 ? used / total : 0.0;
}

/* The byte split of nq blocks and nf pages, and the pool's totals. */
static void fill_bytes(const kvp_pool *p, int64_t nq, int64_t nf, kvc_stats *s)
{
    kvp_stats_set_bytes(s, kvp_pool_layout(p), p->d.n_layers, p->qbytes, p->fbytes, nq, nf);
    s->qblocks_total = p->nq;
    s->fpages_total = p->nf;
}

void kvp_pool_fill_stats(const kvp_pool *p, kvc_stats *out)
{
    out->qblocks_used = p->nq - p->nqfree;
    out->fpages_used = p->nf - p->nffree;
    fill_bytes(p, out->qblocks_used, out->fpages_used, out);
    out->bytes_fp16_equiv = out->elements * 2;
}

static int take(kvp_pool *p, int kind, int32_t *id)
{
    if (kind == KVP_BLOCK) {
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

static void give(kvp_pool *p, int kind, int32_t id)
{
    if (kind == KVP_BLOCK)
        p->qfree[p->nqfree++] = id;
    else
        p->ffree[p->nffree++] = id;
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
    return is_int4(s->p) && s->chunk_idx < s->p->cfg.warmup_chunks && !s->prefill_done;
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

void kvp_seq_fill_stats(const kvp_seq *s, kvc_stats *out)
{
    const kvp_pool *p = s->p;
    int64_t nq, nf;
    memset(out, 0, sizeof *out);
    kvp_seq_units(s, &nq, &nf);
    fill_bytes(p, nq, nf, out);
    out->qblocks_used = nq;
    out->fpages_used = nf;
    out->tokens = s->n_tokens;
    out->elements = (int64_t)s->n_tokens * p->d.n_layers * p->d.kv_dim * 2;
    out->bytes_fp16_equiv = out->elements * 2;
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
        if (take(p, KVP_PAGE, &id) < 0)
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
        if (take(s->p, KVP_BLOCK, &id) < 0)
            return NO_UNITS;
        int k = m < T ? m : T;
        s->tgt[s->st.n_tgt++] = (kvp_tgt){KVP_BLOCK, id, 0, row, k, 0};
        row += k;
        m -= k;
    }
    return 0;
}

/* Reserves the INT4 blocks for re-quantizing the FP16 entries from index
 * first on (-1: none) plus the step's non-sink page targets, in position
 * order, and lists them as sources. Returns 0, NO_UNITS or NO_ROOM. */
static int plan_requant(kvp_seq *s, int first, int kind)
{
    const int T = s->p->cfg.block_tokens;
    int tokens = 0;
    s->st.n_src = 0;
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
    int nb = (tokens + T - 1) / T;
    if (nb > s->cap.rq)
        return NO_ROOM;
    for (int i = 0; i < nb; i++) {
        if (take(s->p, KVP_BLOCK, &s->rq_ids[i]) < 0)
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
    if (is_int4(p) && !prefill && !s->prefill_done) {
        /* the first decode step ends the prefill */
        if (s->stage_first >= 0 && !c->keep_warmup_fp16)
            return KVP_FINISH_PREFILL; /* staged chunks to quantize first */
        s->prefill_done = 1;
    }
    open_step(s, pos0, n, prefill);
    int ok = 0;
    if (!is_int4(p)) {
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
    if (s->prefill_done || !is_int4(p))
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

void kvp_commit(kvp_seq *s, kvp_block_fn on_block, void *ctx)
{
    kvp_pool *p = s->p;
    kvp_step *st = &s->st;
    if (!st->active)
        return;
    if (is_int4(p) && st->prefill && st->n > st->row_stats)
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
                on_block(ctx, t->id);
        } else if (!is_sink && is_int4(p)) {
            if (st->prefill && s->stage_first < 0)
                s->stage_first = idx;
            else if (!st->prefill && s->tail_first < 0)
                s->tail_first = idx;
        }
    }
    if (st->rq) {
        int first = st->rq == KVP_RQ_WARMUP ? s->stage_first : s->tail_first;
        assert(first >= 0); /* a re-quantization always has a staged / tail run */
        int pos = s->ents[first].pos0;
        for (int i = first; i < s->n_ents; i++)
            give(p, s->ents[i].kind, s->ents[i].id);
        s->n_ents = first;
        const int T = p->cfg.block_tokens;
        int left = st->rq_tokens;
        for (int i = 0; i < st->n_rq; i++) {
            int k = left < T ? left : T;
            s->ents[s->n_ents++] = (kvp_ent){KVP_BLOCK, s->rq_ids[i], pos, k};
            if (on_block)
                on_block(ctx, s->rq_ids[i]);
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
    close_step(s);
}
