/*
 * kvcache_cuda.c - the GPU KV cache (see kvcache_cuda.h). Host side: the
 * entry list, free lists and the step plan, decided exactly as
 * engine/kvcache.c decides them; device side: the arenas, the EMA ranges,
 * the step's tables (uploaded once per step) and every data operation
 * through kernels/cuda (kcu_kvq_fold, kcu_kvq_quantize, kcu_kv_store_pages,
 * kcu_kv_gather_pages).
 *
 * Entries of a sequence, in position order:
 *   [sink FP16 pages] [INT4 blocks | staged FP16 pages] ... [FP16 tail pages]
 * A step writes only into pages/blocks reserved by kvcd_begin and not yet
 * visible (or past the visible end of the last page), so attention during
 * the step reads the history as it was before the step.
 * Engine thread only.
 */
#include "engine/kv/kvcache_cuda.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/kcu_kvq_quant.cuh"
#include "kernels/cuda/kcu_kvq_stats.cuh"
#include "kernels/cuda/kcu_kvstore.cuh"

enum { E_PAGE = 0, E_BLOCK = 1 };

typedef struct {
    int32_t kind, id, pos0, n;
} kvcd_ent;

/* Rows [row0, row0+n) of the step into page/block id from slot0; existing:
 * the page is the last entry, partially filled. */
typedef struct {
    int32_t kind, id, slot0, row0, n, existing;
} kvcd_tgt;

typedef struct {
    int32_t id, n;
} kvcd_src;

struct kvcd_pool {
    kcu_ctx *c;
    cfg_kv cfg;
    kvc_dims d;
    kvq_layout L;
    int has_q;
    int P;             /* tokens per FP16 page */
    size_t qbytes;     /* one block, all layers */
    size_t fbytes;     /* one page, all layers */
    kcu_kv_arena A;
    int32_t *qfree, *ffree;
    int64_t nq, nf, nqfree, nffree;
    /* device scratch shared by the pool's sequences (one thread at a time) */
    void *fold_scr;
    size_t fold_bytes;
    void *quant_scr;
    size_t quant_bytes;
    int quant_tgts;
    float *gk, *gv;    /* re-quantization rows [rq_rows][kv_dim] */
    int rq_rows;
    int64_t *cnt;      /* [4] header sums */
    kvcd_seq *seqs;    /* live sequences (pool-wide statistics) */
};

struct kvcd_seq {
    kvcd_pool *p;
    kvcd_seq *next, *prev;
    int max_tokens;
    kvcd_ent *ents;
    int n_ents, cap_ents;
    int n_tokens, chunk_idx, prefill_done;
    int stage_first, tail_first; /* entry indices, -1 none */
    float *ema;                  /* device [layers][2][4][kv_dim]: lo, hi, sum_a, sum_b */
    int *ema_n;                  /* [layers][2] chunks folded */
    uint64_t ema_ver, mean_ver;  /* EMA changes; the version of ema_mean */
    float *ema_host;             /* host copy of ema (means for metrics) */
    float *ema_mean;             /* [layers][2][2] channel means of lo, hi */
    int32_t *pend;               /* committed blocks not yet counted */
    int n_pend, cap_pend;
    int64_t n_quantized, n_outliers, n_clamped;
    struct {
        int active, pos0, n, prefill;
        int stats, row_stats;
        int n_tgt;
        int rq, rq_tokens, n_rq, n_src;
    } st;
    kvcd_tgt *tgt;
    int32_t *rq_ids;
    kvcd_src *src;
    int cap_tgt, cap_rq, cap_src;
    /* the step's device tables (uploaded by kvcd_begin) */
    char *htab, *dtab;
    size_t tab_bytes;
    size_t off_segs, off_ptgt, off_qtgt, off_rows, off_rqtgt;
    int n_segs, n_ptgt, max_ptgt_n, n_qtgt, n_rows;
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

static int is_int4(const kvcd_pool *p)
{
    return p->cfg.mode == CFG_KV_INT4;
}

static size_t al256(size_t x)
{
    return (x + 255) & ~(size_t)255;
}

/* ---- pool ------------------------------------------------------------------------ */

int kvcd_pool_create(kcu_ctx *c, const cfg_kv *cfg, const kvc_dims *d, int64_t n_qblocks,
                     int64_t n_fpages, kvcd_pool **out, char *err, size_t errlen)
{
    *out = NULL;
    if (cfg_kv_validate(cfg, err, errlen) < 0 ||
        cfg_kv_validate_model(cfg, d->head_dim, d->kv_dim / d->head_dim, err, errlen) < 0)
        return -EINVAL;
    if (d->n_layers <= 0 || d->kv_dim <= 0 || d->head_dim <= 0 || d->kv_dim % d->head_dim)
        return fail(err, errlen, -EINVAL, "bad KV dimensions");
    if (n_qblocks < 0 || n_fpages < 1 || n_qblocks > INT32_MAX || n_fpages > INT32_MAX)
        return fail(err, errlen, -EINVAL, "bad pool size (%lld blocks, %lld pages)",
                    (long long)n_qblocks, (long long)n_fpages);
    kvcd_pool *p = calloc(1, sizeof *p);
    if (!p)
        return fail(err, errlen, -ENOMEM, "out of memory");
    p->c = c;
    p->cfg = *cfg;
    p->d = *d;
    const int T = cfg->block_tokens, C = cfg->chunk_size, D = d->kv_dim;
    p->P = kvc_plan_page_tokens(cfg); /* as kvcache.c */
    p->has_q = is_int4(p);
    if (p->has_q) {
        if (kvq_layout_init(&p->L, T, D, d->head_dim, cfg_kv_v_group(cfg, d->head_dim),
                            cfg->k_mode, cfg->outlier_budget, err, errlen) < 0) {
            free(p);
            return -EINVAL;
        }
        p->qbytes = p->L.bytes * (size_t)d->n_layers;
    } else {
        n_qblocks = 0;
    }
    size_t f_layer = (size_t)p->P * (size_t)D * 2 * sizeof(uint16_t);
    p->fbytes = f_layer * (size_t)d->n_layers;
    p->nq = n_qblocks;
    p->nf = n_fpages;
    p->A.q_stride = p->qbytes;
    p->A.q_layer = p->L.bytes;
    p->A.f_stride = p->fbytes;
    p->A.f_layer = f_layer;
    p->A.page_tokens = p->P;
    p->A.kv_dim = D;
    p->qfree = malloc(((size_t)n_qblocks + 1) * sizeof(int32_t));
    p->ffree = malloc((size_t)n_fpages * sizeof(int32_t));
    if (!p->qfree || !p->ffree) {
        kvcd_pool_destroy(p);
        return fail(err, errlen, -ENOMEM, "out of memory");
    }
    /* the arenas: once, in device memory; zeroed so that never-written page
     * slots read as finite values */
    int rc = 0;
    if (n_qblocks > 0)
        rc = kcu_malloc(c, (void **)&p->A.qarena, (size_t)n_qblocks * p->qbytes, err, errlen);
    if (rc == 0)
        rc = kcu_malloc(c, (void **)&p->A.farena, (size_t)n_fpages * p->fbytes, err, errlen);
    if (rc == 0)
        rc = kcu_memset(c, p->A.farena, 0, (size_t)n_fpages * p->fbytes, err, errlen);
    if (rc == 0 && p->A.qarena)
        rc = kcu_memset(c, p->A.qarena, 0, (size_t)n_qblocks * p->qbytes, err, errlen);
    /* scratch: statistics of a chunk (or a decode block), quantization of a
     * chunk's blocks at a time, re-quantization rows */
    int rows = C > T ? C : T;
    int cap_rq = (cfg->warmup_chunks * C) / T + 4;
    p->rq_rows = cap_rq * T;
    p->quant_tgts = C / T + 2;
    if (rc == 0 && p->has_q) {
        p->fold_bytes = kcu_kvq_fold_scratch_bytes(rows, D);
        p->quant_bytes = kcu_kvq_quant_scratch_bytes(&p->L, p->quant_tgts);
        if (p->quant_bytes == 0)
            rc = fail(err, errlen, -EINVAL, "kv_dim %d is too wide for the GPU quantizer", D);
        if (rc == 0)
            rc = kcu_malloc(c, &p->fold_scr, p->fold_bytes, err, errlen);
        if (rc == 0)
            rc = kcu_malloc(c, &p->quant_scr, p->quant_bytes, err, errlen);
        if (rc == 0)
            rc = kcu_malloc(c, (void **)&p->gk, (size_t)p->rq_rows * D * sizeof(float), err,
                            errlen);
        if (rc == 0)
            rc = kcu_malloc(c, (void **)&p->gv, (size_t)p->rq_rows * D * sizeof(float), err,
                            errlen);
        if (rc == 0)
            rc = kcu_malloc(c, (void **)&p->cnt, 4 * sizeof(int64_t), err, errlen);
    }
    if (rc < 0) {
        kvcd_pool_destroy(p);
        return rc == -1 ? -ENOMEM : rc;
    }
    for (int64_t i = 0; i < n_qblocks; i++)
        p->qfree[i] = (int32_t)(n_qblocks - 1 - i);
    for (int64_t i = 0; i < n_fpages; i++)
        p->ffree[i] = (int32_t)(n_fpages - 1 - i);
    p->nqfree = n_qblocks;
    p->nffree = n_fpages;
    *out = p;
    return 0;
}

void kvcd_pool_destroy(kvcd_pool *p)
{
    if (!p)
        return;
    kcu_free(p->c, p->A.qarena);
    kcu_free(p->c, p->A.farena);
    kcu_free(p->c, p->fold_scr);
    kcu_free(p->c, p->quant_scr);
    kcu_free(p->c, p->gk);
    kcu_free(p->c, p->gv);
    kcu_free(p->c, p->cnt);
    free(p->qfree);
    free(p->ffree);
    free(p);
}

const kvq_layout *kvcd_pool_layout(const kvcd_pool *p)
{
    return p->has_q ? &p->L : NULL;
}

const kcu_kv_arena *kvcd_pool_arena(const kvcd_pool *p)
{
    return &p->A;
}

size_t kvcd_pool_bytes(const kvcd_pool *p)
{
    return (size_t)p->nq * p->qbytes + (size_t)p->nf * p->fbytes;
}

void kvcd_pool_free_units(const kvcd_pool *p, int64_t *qfree, int64_t *ffree)
{
    *qfree = p->nqfree;
    *ffree = p->nffree;
}

void kvcd_pool_estimate(const kvcd_pool *p, int n, int64_t *nq, int64_t *nf)
{
    kvc_plan_estimate(&p->cfg, n, nq, nf);
}

double kvcd_pool_usage(const kvcd_pool *p)
{
    double total = (double)p->nq * (double)p->qbytes + (double)p->nf * (double)p->fbytes;
    double used = (double)(p->nq - p->nqfree) * (double)p->qbytes +
                  (double)(p->nf - p->nffree) * (double)p->fbytes;
    return total > 0 ? used / total : 0.0;
}

/* The byte split of nq blocks and nf pages (kvcache.c's accounting). */
static void pool_bytes(const kvcd_pool *p, int64_t nq, int64_t nf, kvc_stats *out)
{
    kvc_stats_set_bytes(out, p->has_q ? &p->L : NULL, p->d.n_layers, p->qbytes, p->fbytes, nq,
                        nf);
    out->qblocks_total = p->nq;
    out->fpages_total = p->nf;
}

int kvcd_pool_stats(kvcd_pool *p, kvc_stats *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    int rc = 0;
    for (kvcd_seq *s = p->seqs; s; s = s->next) {
        kvc_stats t;
        int r = kvcd_seq_stats(s, &t, err, errlen);
        if (r < 0) {
            rc = r; /* the others are still counted */
            continue;
        }
        kvc_stats_add_counts(out, &t);
    }
    out->qblocks_used = p->nq - p->nqfree;
    out->fpages_used = p->nf - p->nffree;
    pool_bytes(p, out->qblocks_used, out->fpages_used, out);
    out->bytes_fp16_equiv = out->elements * 2;
    return rc;
}

/* ---- sequences ------------------------------------------------------------------- */

int kvcd_seq_create(kvcd_pool *p, int max_tokens, kvcd_seq **out, char *err, size_t errlen)
{
    *out = NULL;
    if (max_tokens <= 0)
        return fail(err, errlen, -EINVAL, "max_tokens must be positive");
    kvcd_seq *s = calloc(1, sizeof *s);
    if (!s)
        return fail(err, errlen, -ENOMEM, "out of memory");
    s->p = p;
    s->max_tokens = max_tokens;
    const int T = p->cfg.block_tokens, P = p->P, C = p->cfg.chunk_size;
    const int D = p->d.kv_dim, L = p->d.n_layers;
    int unit = P < T ? P : T;
    /* the same capacities as kvcache.c */
    s->cap_ents = max_tokens / unit + max_tokens / C + 16;
    s->cap_tgt = C / unit + 8;
    s->cap_src = (p->cfg.warmup_chunks * C) / unit + T / unit + 8;
    s->cap_rq = (p->cfg.warmup_chunks * C) / T + 4;
    s->cap_pend = s->cap_ents + s->cap_rq;
    s->ents = malloc((size_t)s->cap_ents * sizeof *s->ents);
    s->tgt = malloc((size_t)s->cap_tgt * sizeof *s->tgt);
    s->src = malloc((size_t)s->cap_src * sizeof *s->src);
    s->rq_ids = malloc((size_t)s->cap_rq * sizeof *s->rq_ids);
    s->pend = malloc((size_t)s->cap_pend * sizeof *s->pend);
    s->ema_n = calloc((size_t)L * 2, sizeof *s->ema_n);
    if (p->has_q) {
        s->ema_host = malloc((size_t)L * 8 * (size_t)D * sizeof(float));
        s->ema_mean = malloc((size_t)L * 4 * sizeof(float));
    }
    /* step tables: segments | page targets | block targets | re-quantization
     * rows | re-quantization blocks */
    size_t off = 0;
    s->off_segs = off;
    off = al256(off + (size_t)s->cap_ents * sizeof(kcu_seg));
    s->off_ptgt = off;
    off = al256(off + (size_t)s->cap_tgt * sizeof(kcu_page_tgt));
    s->off_qtgt = off;
    off = al256(off + (size_t)s->cap_tgt * sizeof(kcu_q_tgt));
    s->off_rows = off;
    off = al256(off + (size_t)s->cap_rq * T * sizeof(kcu_page_row));
    s->off_rqtgt = off;
    off = al256(off + (size_t)s->cap_rq * sizeof(kcu_q_tgt));
    s->tab_bytes = off;
    s->htab = malloc(off);
    if (!s->ents || !s->tgt || !s->src || !s->rq_ids || !s->pend || !s->ema_n || !s->htab ||
        (p->has_q && (!s->ema_host || !s->ema_mean))) {
        kvcd_seq_destroy(s);
        return fail(err, errlen, -ENOMEM, "out of memory for a sequence");
    }
    int rc = kcu_malloc(p->c, (void **)&s->dtab, s->tab_bytes, err, errlen);
    if (rc == 0 && p->has_q)
        rc = kcu_malloc(p->c, (void **)&s->ema, (size_t)L * 8 * (size_t)D * sizeof(float), err,
                        errlen);
    if (rc < 0) {
        kvcd_seq_destroy(s);
        return -ENOMEM;
    }
    s->stage_first = s->tail_first = -1;
    kvcd_seq_reset(s);
    s->next = p->seqs;
    if (p->seqs)
        p->seqs->prev = s;
    p->seqs = s;
    *out = s;
    return 0;
}

static void give(kvcd_pool *p, int kind, int32_t id)
{
    if (kind == E_BLOCK)
        p->qfree[p->nqfree++] = id;
    else
        p->ffree[p->nffree++] = id;
}

static int take(kvcd_pool *p, int kind, int32_t *id)
{
    if (kind == E_BLOCK) {
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

void kvcd_seq_reset(kvcd_seq *s)
{
    if (s->st.active)
        kvcd_abort(s);
    for (int i = 0; i < s->n_ents; i++)
        give(s->p, s->ents[i].kind, s->ents[i].id);
    s->n_ents = 0;
    s->n_tokens = 0;
    s->chunk_idx = 0;
    s->prefill_done = 0;
    s->stage_first = s->tail_first = -1;
    s->n_quantized = s->n_outliers = s->n_clamped = 0;
    s->n_pend = 0;
    memset(s->ema_n, 0, (size_t)s->p->d.n_layers * 2 * sizeof *s->ema_n);
    s->ema_ver++;
    if (s->ema) /* a failure here surfaces at the next device call */
        (void)kcu_memset(s->p->c, s->ema, 0,
                         (size_t)s->p->d.n_layers * 8 * (size_t)s->p->d.kv_dim * sizeof(float),
                         NULL, 0);
}

void kvcd_seq_destroy(kvcd_seq *s)
{
    if (!s)
        return;
    kvcd_pool *p = s->p;
    if (s->ents && s->ema_n)
        kvcd_seq_reset(s);
    if (s->prev)
        s->prev->next = s->next;
    else if (p->seqs == s)
        p->seqs = s->next;
    if (s->next)
        s->next->prev = s->prev;
    kcu_free(s->p->c, s->dtab);
    kcu_free(s->p->c, s->ema);
    free(s->ents);
    free(s->tgt);
    free(s->src);
    free(s->rq_ids);
    free(s->pend);
    free(s->ema_n);
    free(s->ema_host);
    free(s->ema_mean);
    free(s->htab);
    free(s);
}

int kvcd_seq_n_tokens(const kvcd_seq *s)
{
    return s->n_tokens;
}

int kvcd_seq_ema(const kvcd_seq *s, int layer, int tensor, const float **lo, const float **hi,
                 int *n_chunks)
{
    if (!s->ema || layer < 0 || layer >= s->p->d.n_layers || tensor < 0 || tensor > 1)
        return -1;
    size_t D = (size_t)s->p->d.kv_dim;
    const float *b = s->ema + ((size_t)layer * 2 + (size_t)tensor) * 4 * D;
    *lo = b;
    *hi = b + D;
    *n_chunks = s->ema_n[layer * 2 + tensor];
    return 0;
}

int kvcd_seq_ema_mean(kvcd_seq *s, int layer, int tensor, float *lo, float *hi)
{
    const int L = s->p->d.n_layers;
    const size_t D = (size_t)s->p->d.kv_dim;
    if (!s->ema || layer < 0 || layer >= L || tensor < 0 || tensor > 1 ||
        s->ema_n[layer * 2 + tensor] == 0)
        return -1;
    if (s->mean_ver != s->ema_ver) {
        /* one copy of every layer's EMA state (lo, hi, sums), then the
         * channel means in double as kvc_seq_ema */
        if (s->st.active ||
            kcu_d2h(s->p->c, s->ema_host, s->ema, (size_t)L * 8 * D * sizeof(float), NULL, 0) < 0)
            return -1;
        for (int l = 0; l < L; l++)
            for (int t = 0; t < 2; t++) {
                const float *b = s->ema_host + ((size_t)l * 2 + (size_t)t) * 4 * D;
                double sl = 0, sh = 0;
                for (size_t c = 0; c < D; c++) {
                    sl += b[c];
                    sh += b[D + c];
                }
                s->ema_mean[(l * 2 + t) * 2] = (float)(sl / (double)D);
                s->ema_mean[(l * 2 + t) * 2 + 1] = (float)(sh / (double)D);
            }
        s->mean_ver = s->ema_ver;
    }
    *lo = s->ema_mean[(layer * 2 + tensor) * 2];
    *hi = s->ema_mean[(layer * 2 + tensor) * 2 + 1];
    return 0;
}

int kvcd_seq_warming(const kvcd_seq *s)
{
    return is_int4(s->p) && s->chunk_idx < s->p->cfg.warmup_chunks && !s->prefill_done;
}

const kcu_seg *kvcd_seq_host_segs(const kvcd_seq *s, int *n)
{
    *n = s->n_segs;
    return (const kcu_seg *)(s->htab + s->off_segs);
}

int kvcd_seq_stats(kvcd_seq *s, kvc_stats *out, char *err, size_t errlen)
{
    kvcd_pool *p = s->p;
    memset(out, 0, sizeof *out);
    if (s->n_pend > 0 && s->st.active)
        return fail(err, errlen, -EINVAL, "KV statistics during an open step");
    /* the outlier / clamp counters of newly committed blocks, in batches
     * that fit the (idle) re-quantization row table */
    int batch = (int)((s->off_rqtgt - s->off_rows) / sizeof(int32_t));
    for (int i0 = 0; i0 < s->n_pend; i0 += batch) {
        int nb = s->n_pend - i0 < batch ? s->n_pend - i0 : batch;
        int64_t h[4] = {0, 0, 0, 0};
        int32_t *dids = (int32_t *)(s->dtab + s->off_rows);
        if (kcu_memset(p->c, p->cnt, 0, sizeof h, err, errlen) < 0 ||
            kcu_h2d(p->c, dids, s->pend + i0, (size_t)nb * sizeof(int32_t), err, errlen) < 0 ||
            kcu_kvq_count_blocks(p->c, &p->A, p->d.n_layers, dids, nb, p->cnt, err, errlen) < 0 ||
            kcu_d2h(p->c, h, p->cnt, sizeof h, err, errlen) < 0)
            return -EIO;
        s->n_quantized += h[0] * p->d.kv_dim * 2;
        s->n_outliers += h[1];
        s->n_clamped += h[2];
    }
    s->n_pend = 0;
    int64_t nq = 0, nf = 0;
    for (int i = 0; i < s->n_ents; i++)
        if (s->ents[i].kind == E_BLOCK)
            nq++;
        else
            nf++;
    pool_bytes(p, nq, nf, out);
    out->qblocks_used = nq;
    out->fpages_used = nf;
    out->tokens = s->n_tokens;
    out->elements = (int64_t)s->n_tokens * p->d.n_layers * p->d.kv_dim * 2;
    out->bytes_fp16_equiv = out->elements * 2;
    out->n_quantized = s->n_quantized;
    out->n_outliers = s->n_outliers;
    out->n_clamped = s->n_clamped;
    return 0;
}

/* ---- the step plan (kvcache.c's decisions) ------------------------------------------ */

void kvcd_abort(kvcd_seq *s)
{
    if (!s->st.active)
        return;
    for (int i = 0; i < s->st.n_tgt; i++)
        if (!s->tgt[i].existing)
            give(s->p, s->tgt[i].kind, s->tgt[i].id);
    for (int i = 0; i < s->st.n_rq; i++)
        give(s->p, E_BLOCK, s->rq_ids[i]);
    s->st.active = 0;
    s->st.n_tgt = s->st.n_rq = s->st.n_src = 0;
}

/* Rows [row, row+m) into FP16 pages from position pos: first the rest of the
 * last entry when it is a partial page of the run starting at run_first
 * (-1: a new run), then new pages. */
static int plan_pages(kvcd_seq *s, int row, int m, int pos, int run_first)
{
    kvcd_pool *p = s->p;
    if (run_first >= 0 && s->n_ents > run_first) {
        kvcd_ent *last = &s->ents[s->n_ents - 1];
        if (last->kind == E_PAGE && last->n < p->P && last->pos0 + last->n == pos) {
            int k = p->P - last->n < m ? p->P - last->n : m;
            s->tgt[s->st.n_tgt++] = (kvcd_tgt){E_PAGE, last->id, last->n, row, k, 1};
            row += k;
            m -= k;
        }
    }
    while (m > 0) {
        int32_t id;
        if (s->st.n_tgt >= s->cap_tgt || take(p, E_PAGE, &id) < 0)
            return -1;
        int k = m < p->P ? m : p->P;
        s->tgt[s->st.n_tgt++] = (kvcd_tgt){E_PAGE, id, 0, row, k, 0};
        row += k;
        m -= k;
    }
    return 0;
}

/* Rows [row, row+m) quantized live into new blocks of up to T tokens. */
static int plan_blocks(kvcd_seq *s, int row, int m)
{
    const int T = s->p->cfg.block_tokens;
    while (m > 0) {
        int32_t id;
        if (s->st.n_tgt >= s->cap_tgt || take(s->p, E_BLOCK, &id) < 0)
            return -1;
        int k = m < T ? m : T;
        s->tgt[s->st.n_tgt++] = (kvcd_tgt){E_BLOCK, id, 0, row, k, 0};
        row += k;
        m -= k;
    }
    return 0;
}

/* Blocks for re-quantizing the FP16 entries from index `first` on plus the
 * step's new non-sink page rows; kind 1 = warm-up end, 2 = full tail. */
static int plan_requant(kvcd_seq *s, int first, int kind)
{
    const int T = s->p->cfg.block_tokens;
    int tokens = 0;
    s->st.n_src = 0;
    for (int i = first; i >= 0 && i < s->n_ents; i++) {
        if (s->st.n_src >= s->cap_src)
            return -1;
        s->src[s->st.n_src++] = (kvcd_src){s->ents[i].id, s->ents[i].n};
        tokens += s->ents[i].n;
    }
    for (int i = 0; i < s->st.n_tgt; i++) {
        const kvcd_tgt *t = &s->tgt[i];
        if (t->kind != E_PAGE || t->row0 < s->st.row_stats)
            continue;
        if (t->existing) {
            s->src[s->st.n_src - 1].n += t->n; /* the last source grows */
        } else {
            if (s->st.n_src >= s->cap_src)
                return -1;
            s->src[s->st.n_src++] = (kvcd_src){t->id, t->n};
        }
        tokens += t->n;
    }
    int nb = (tokens + T - 1) / T;
    if (nb > s->cap_rq)
        return -1;
    for (int i = 0; i < nb; i++) {
        if (take(s->p, E_BLOCK, &s->rq_ids[i]) < 0)
            return -1;
        s->st.n_rq = i + 1;
    }
    s->st.rq = kind;
    s->st.rq_tokens = tokens;
    return 0;
}

/* Builds the step's device tables in htab and uploads them. */
static int upload_step(kvcd_seq *s, char *err, size_t errlen)
{
    kvcd_pool *p = s->p;
    const int T = p->cfg.block_tokens;
    kcu_seg *sg = (kcu_seg *)(s->htab + s->off_segs);
    for (int i = 0; i < s->n_ents; i++) {
        const kvcd_ent *e = &s->ents[i];
        sg[i] = (kcu_seg){e->kind == E_BLOCK ? KVS_Q4 : KVS_F16, e->pos0, e->n, e->id};
    }
    s->n_segs = s->n_ents;
    kcu_page_tgt *pt = (kcu_page_tgt *)(s->htab + s->off_ptgt);
    kcu_q_tgt *qt = (kcu_q_tgt *)(s->htab + s->off_qtgt);
    s->n_ptgt = s->n_qtgt = s->max_ptgt_n = 0;
    for (int i = 0; i < s->st.n_tgt; i++) {
        const kvcd_tgt *t = &s->tgt[i];
        if (t->kind == E_PAGE) {
            pt[s->n_ptgt++] = (kcu_page_tgt){t->id, t->slot0, t->row0, t->n};
            if (t->n > s->max_ptgt_n)
                s->max_ptgt_n = t->n;
        } else {
            qt[s->n_qtgt++] = (kcu_q_tgt){t->id, t->row0, t->n, 0};
        }
    }
    s->n_rows = 0;
    if (s->st.rq) {
        kcu_page_row *rw = (kcu_page_row *)(s->htab + s->off_rows);
        for (int i = 0; i < s->st.n_src; i++)
            for (int k = 0; k < s->src[i].n; k++)
                rw[s->n_rows++] = (kcu_page_row){s->src[i].id, k};
        kcu_q_tgt *rt = (kcu_q_tgt *)(s->htab + s->off_rqtgt);
        for (int i = 0; i < s->st.n_rq; i++) {
            int k = s->st.rq_tokens - i * T < T ? s->st.rq_tokens - i * T : T;
            rt[i] = (kcu_q_tgt){s->rq_ids[i], i * T, k, 0};
        }
    }
    size_t upto = s->st.rq ? s->off_rqtgt + (size_t)s->st.n_rq * sizeof(kcu_q_tgt)
                           : s->off_qtgt + (size_t)s->n_qtgt * sizeof(kcu_q_tgt);
    return kcu_h2d(p->c, s->dtab, s->htab, upto, err, errlen) < 0 ? -EIO : 0;
}

int kvcd_begin(kvcd_seq *s, int pos0, int n, int prefill, char *err, size_t errlen)
{
    kvcd_pool *p = s->p;
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
        int rc = kvcd_finish_prefill(s, err, errlen);
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
        int ns = c->sink_tokens - pos0; /* sinks first */
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
        kvcd_abort(s);
        return fail(err, errlen, -ENOSPC,
                    "KV pool exhausted (%lld/%lld INT4 blocks and %lld/%lld FP16 pages free)",
                    (long long)p->nqfree, (long long)p->nq, (long long)p->nffree,
                    (long long)p->nf);
    }
    int rc = upload_step(s, err, errlen);
    if (rc < 0)
        kvcd_abort(s);
    return rc;
}

const kcu_seg *kvcd_segs(const kvcd_seq *s)
{
    return (const kcu_seg *)(s->dtab + s->off_segs);
}

int kvcd_n_segs(const kvcd_seq *s)
{
    return s->n_segs;
}

/* ---- data operations ---------------------------------------------------------------- */

static kcu_ema_dev ema_of(const kvcd_seq *s, int layer, int tensor)
{
    size_t D = (size_t)s->p->d.kv_dim;
    float *b = s->ema + ((size_t)layer * 2 + (size_t)tensor) * 4 * D;
    return (kcu_ema_dev){b, b + D, b + 2 * D, b + 3 * D, s->ema_n[layer * 2 + tensor]};
}

/* Chunk statistics of n rows of k, v folded into layer's EMA (weight). */
static int fold(kvcd_seq *s, int layer, const float *k, const float *v, int n, float weight,
                char *err, size_t errlen)
{
    kvcd_pool *p = s->p;
    const cfg_kv *c = &p->cfg;
    kvq_ema_params ep = {c->ema_decay, c->ema_clip, c->clip_quantile, c->warmup_chunks};
    kcu_ema_dev e[2] = {ema_of(s, layer, 0), ema_of(s, layer, 1)};
    const float *x[2] = {k, v};
    if (kcu_kvq_fold(p->c, x, n, p->d.kv_dim, (size_t)p->d.kv_dim, c->clip_quantile, NULL, NULL,
                     e, &ep, weight, p->fold_scr, p->fold_bytes, err, errlen) < 0)
        return -EIO;
    s->ema_n[layer * 2]++;
    s->ema_n[layer * 2 + 1]++;
    s->ema_ver++;
    return 0;
}

/* Quantizes targets tg[0..n) (device) from rows of k, v with layer's EMA;
 * without an outlier budget there is no V band (as kvcache.c). */
static int quantize(kvcd_seq *s, int layer, const kcu_q_tgt *tg, int n, const float *k,
                    const float *v, char *err, size_t errlen)
{
    kvcd_pool *p = s->p;
    kcu_ema_dev ek = ema_of(s, layer, 0), ev = ema_of(s, layer, 1);
    int band = p->cfg.outlier_budget > 0.0f;
    if (kcu_kvq_quantize(p->c, &p->L, &p->A, layer, tg, n, p->quant_tgts, k, v,
                         (size_t)p->d.kv_dim, ek.lo, ek.hi, band ? ev.lo : NULL,
                         band ? ev.hi : NULL, p->quant_scr, p->quant_bytes, err, errlen) < 0)
        return -EIO;
    return 0;
}

/* Re-quantizes the step's sources (staged pages or the tail) of one layer:
 * gathered to f32, then blocks of T tokens; a full tail block is folded
 * into the EMA (weight T / chunk_size) before it is quantized. */
static int requant_layer(kvcd_seq *s, int layer, char *err, size_t errlen)
{
    kvcd_pool *p = s->p;
    const int T = p->cfg.block_tokens;
    const size_t D = (size_t)p->d.kv_dim;
    const kcu_q_tgt *rt = (const kcu_q_tgt *)(s->dtab + s->off_rqtgt);
    if (kcu_kv_gather_pages(p->c, &p->A, layer, (const kcu_page_row *)(s->dtab + s->off_rows),
                            s->n_rows, p->gk, p->gv, err, errlen) < 0)
        return -EIO;
    if (s->st.rq == 1)
        return quantize(s, layer, rt, s->st.n_rq, p->gk, p->gv, err, errlen);
    for (int b = 0; b < s->st.n_rq; b++) {
        int full = (b + 1) * T <= s->st.rq_tokens;
        if (full && fold(s, layer, p->gk + (size_t)b * T * D, p->gv + (size_t)b * T * D, T,
                         (float)T / (float)p->cfg.chunk_size, err, errlen) < 0)
            return -EIO;
        if (quantize(s, layer, rt + b, 1, p->gk, p->gv, err, errlen) < 0)
            return -EIO;
    }
    return 0;
}

int kvcd_store(kvcd_seq *s, int layer, const float *k, const float *v, char *err,
               size_t errlen)
{
    kvcd_pool *p = s->p;
    const size_t D = (size_t)p->d.kv_dim;
    if (!s->st.active)
        return fail(err, errlen, -EINVAL, "kvcd_store outside a step");
    if (s->st.stats && s->st.n > s->st.row_stats &&
        fold(s, layer, k + (size_t)s->st.row_stats * D, v + (size_t)s->st.row_stats * D,
             s->st.n - s->st.row_stats, 1.0f, err, errlen) < 0)
        return -EIO;
    if (s->n_ptgt > 0 &&
        kcu_kv_store_pages(p->c, &p->A, layer, (const kcu_page_tgt *)(s->dtab + s->off_ptgt),
                           s->n_ptgt, s->max_ptgt_n, k, v, err, errlen) < 0)
        return -EIO;
    if (s->n_qtgt > 0 &&
        quantize(s, layer, (const kcu_q_tgt *)(s->dtab + s->off_qtgt), s->n_qtgt, k, v, err,
                 errlen) < 0)
        return -EIO;
    if (s->st.rq)
        return requant_layer(s, layer, err, errlen);
    return 0;
}

static void pend_block(kvcd_seq *s, int32_t id)
{
    if (s->n_pend < s->cap_pend)
        s->pend[s->n_pend++] = id;
}

void kvcd_commit(kvcd_seq *s)
{
    kvcd_pool *p = s->p;
    if (!s->st.active)
        return;
    for (int i = 0; i < s->st.n_tgt; i++) {
        const kvcd_tgt *t = &s->tgt[i];
        int is_sink = t->row0 < s->st.row_stats;
        if (t->existing) {
            s->ents[s->n_ents - 1].n += t->n;
        } else {
            int idx = s->n_ents++;
            s->ents[idx] = (kvcd_ent){t->kind, t->id, s->st.pos0 + t->row0, t->n};
            if (t->kind == E_BLOCK)
                pend_block(s, t->id);
            else if (!is_sink && is_int4(p)) {
                if (s->st.prefill && s->stage_first < 0)
                    s->stage_first = idx;
                else if (!s->st.prefill && s->tail_first < 0)
                    s->tail_first = idx;
            }
        }
    }
    if (s->st.rq) {
        int first = s->st.rq == 1 ? s->stage_first : s->tail_first;
        int pos0 = s->ents[first].pos0;
        for (int i = first; i < s->n_ents; i++)
            give(p, s->ents[i].kind, s->ents[i].id);
        s->n_ents = first;
        const int T = p->cfg.block_tokens;
        int left = s->st.rq_tokens;
        for (int i = 0; i < s->st.n_rq; i++) {
            int k = left < T ? left : T;
            s->ents[s->n_ents++] = (kvcd_ent){E_BLOCK, s->rq_ids[i], pos0, k};
            pend_block(s, s->rq_ids[i]);
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

int kvcd_finish_prefill(kvcd_seq *s, char *err, size_t errlen)
{
    kvcd_pool *p = s->p;
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
        kvcd_abort(s);
        s->stage_first = -1; /* staged chunks stay FP16: still exact */
        return fail(err, errlen, -ENOSPC, "KV pool exhausted while quantizing the "
                    "warm-up chunks; they stay FP16");
    }
    int rc = upload_step(s, err, errlen);
    for (int l = 0; rc == 0 && l < p->d.n_layers; l++)
        rc = requant_layer(s, l, err, errlen);
    if (rc < 0) {
        kvcd_abort(s);
        return rc;
    }
    s->st.prefill = 0;
    kvcd_commit(s);
    return 0;
}
