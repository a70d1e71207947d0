/*
 * kvcache_cuda.c - the GPU KV cache (see kvcache_cuda.h): an executor of the
 * KV planner (kv_plan.h), like kvcache.c. The planner, on the host, decides
 * everything (entries, free lists, what each step reserves, stages,
 * quantizes, re-quantizes and frees); this file owns the device side: the
 * arenas, the EMA ranges, the step's tables (built from the plan and
 * uploaded once per step) and every data operation through kernels/cuda
 * (kcu_kvq_fold, kcu_kvq_quantize, kcu_kv_store_pages, kcu_kv_gather_pages,
 * kcu_kvq_count_blocks).
 *
 * A step writes only into pages/blocks reserved by kvcd_begin and not yet
 * visible (or past the visible end of the last page), so attention during
 * the step reads the history as it was before the step.
 * May call: kv_plan, kernels/cuda. Engine thread only.
 */
#include "engine/kv/kvcache_cuda.h"

#include "engine/util/err.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/kv/kv_plan.h"
#include "kernels/cuda/kcu_kvq_quant.cuh"
#include "kernels/cuda/kcu_kvq_stats.cuh"
#include "kernels/cuda/kcu_kvstore.cuh"

struct kvcd_pool {
    kcu_ctx *c;
    kvp_pool *pl;        /* the planner's bookkeeping of this pool */
    kvc_dims d;
    const kvq_layout *L; /* the planner's; NULL in fp16 mode */
    kcu_kv_arena A;
    /* device scratch shared by the pool's sequences (one thread at a time) */
    void *fold_scr;
    size_t fold_bytes;
    void *quant_scr;
    size_t quant_bytes;
    int quant_tgts;
    float *gk, *gv;    /* re-quantization rows [rq_rows][kv_dim] */
    int rq_rows;
    int64_t *cnt;      /* [4] header sums */
};

struct kvcd_seq {
    kvcd_pool *p;
    kvp_seq *pl;                 /* entries and the step plan; owner: this */
    float *ema;                  /* device [layers][2][4][kv_dim]: lo, hi, sum_a, sum_b */
    int *ema_n;                  /* [layers][2] chunks folded */
    uint64_t ema_ver, mean_ver;  /* EMA changes; the version of ema_mean */
    float *ema_host;             /* host copy of ema (means for metrics) */
    float *ema_mean;             /* [layers][2][2] channel means of lo, hi */
    int32_t *pend;               /* committed blocks not yet counted */
    int n_pend, cap_pend;
    int64_t n_quantized, n_outliers, n_clamped;
    /* the step's device tables (built from the plan, uploaded by kvcd_begin) */
    char *htab, *dtab;
    size_t tab_bytes;
    size_t off_segs, off_ptgt, off_qtgt, off_rows, off_rqtgt;
    int n_segs, n_ptgt, max_ptgt_n, n_qtgt, n_rows;
};

static size_t al256(size_t x)
{
    return (x + 255) & ~(size_t)255;
}

/* ---- pool ------------------------------------------------------------------------ */

int kvcd_pool_create(kcu_ctx *c, const cfg_kv *cfg, const kvc_dims *d, int64_t n_qblocks,
                     int64_t n_fpages, kvcd_pool **out, char *err, size_t errlen)
{
    *out = NULL;
    kvcd_pool *p = calloc(1, sizeof *p);
    if (!p)
        return lkq_err(err, errlen, -ENOMEM, "out of memory");
    p->c = c;
    int rc = kvp_pool_create(cfg, d, n_qblocks, n_fpages, &p->pl, err, errlen);
    if (rc < 0) {
        free(p);
        return rc;
    }
    p->d = *d;
    p->L = kvp_pool_layout(p->pl);
    const int T = cfg->block_tokens, C = cfg->chunk_size, D = d->kv_dim;
    int64_t nq, nf;
    size_t qbytes, fbytes;
    kvp_pool_units(p->pl, &nq, &nf);
    kvp_pool_unit_bytes(p->pl, &qbytes, &fbytes);
    p->A.q_stride = qbytes;
    p->A.q_layer = p->L ? p->L->bytes : 0;
    p->A.f_stride = fbytes;
    p->A.f_layer = fbytes / (size_t)d->n_layers;
    p->A.page_tokens = kvp_pool_page_tokens(p->pl);
    p->A.kv_dim = D;
    /* the arenas: once, in device memory; zeroed so that never-written page
     * slots read as finite values */
    if (nq > 0)
        rc = kcu_malloc(c, (void **)&p->A.qarena, (size_t)nq * qbytes, err, errlen);
    if (rc == 0)
        rc = kcu_malloc(c, (void **)&p->A.farena, (size_t)nf * fbytes, err, errlen);
    if (rc == 0)
        rc = kcu_memset(c, p->A.farena, 0, (size_t)nf * fbytes, err, errlen);
    if (rc == 0 && p->A.qarena)
        rc = kcu_memset(c, p->A.qarena, 0, (size_t)nq * qbytes, err, errlen);
    /* scratch: statistics of a chunk (or a decode block), quantization of a
     * chunk's blocks at a time, re-quantization rows (the planner's bound
     * of a step's re-quantization blocks) */
    kvp_caps caps;
    kvp_plan_caps(cfg, 1, &caps);
    int rows = C > T ? C : T;
    p->rq_rows = caps.rq * T;
    p->quant_tgts = C / T + 2;
    if (rc == 0 && p->L) {
        p->fold_bytes = kcu_kvq_fold_scratch_bytes(rows, D);
        p->quant_bytes = kcu_kvq_quant_scratch_bytes(p->L, p->quant_tgts);
        if (p->quant_bytes == 0)
            rc = lkq_err(err, errlen, -EINVAL, "kv_dim %d is too wide for the GPU quantizer", D);
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
    kvp_pool_destroy(p->pl);
    free(p);
}

const kvq_layout *kvcd_pool_layout(const kvcd_pool *p)
{
    return p->L;
}

const kcu_kv_arena *kvcd_pool_arena(const kvcd_pool *p)
{
    return &p->A;
}

size_t kvcd_pool_bytes(const kvcd_pool *p)
{
    return (size_t)kvp_pool_capacity_bytes(p->pl);
}

void kvcd_pool_free_units(const kvcd_pool *p, int64_t *qfree, int64_t *ffree)
{
    kvp_pool_free_units(p->pl, qfree, ffree);
}

void kvcd_pool_estimate(const kvcd_pool *p, int n, int64_t *nq, int64_t *nf)
{
    kvp_estimate(kvp_pool_cfg(p->pl), n, nq, nf);
}

double kvcd_pool_usage(const kvcd_pool *p)
{
    return kvp_pool_usage(p->pl);
}

int kvcd_pool_stats(kvcd_pool *p, kvc_stats *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    int rc = 0;
    for (kvp_seq *q = kvp_pool_next_seq(p->pl, NULL); q; q = kvp_pool_next_seq(p->pl, q)) {
        kvc_stats t;
        int r = kvcd_seq_stats(kvp_seq_owner(q), &t, err, errlen);
        if (r < 0) {
            rc = r; /* the others are still counted */
            continue;
        }
        kvp_stats_add_counts(out, &t);
    }
    kvp_pool_fill_stats(p->pl, out);
    return rc;
}

/* ---- sequences ------------------------------------------------------------------- */

int kvcd_seq_create(kvcd_pool *p, int max_tokens, kvcd_seq **out, char *err, size_t errlen)
{
    *out = NULL;
    kvcd_seq *s = calloc(1, sizeof *s);
    if (!s)
        return lkq_err(err, errlen, -ENOMEM, "out of memory");
    s->p = p;
    int rc = kvp_seq_create(p->pl, max_tokens, s, &s->pl, err, errlen);
    if (rc < 0) {
        free(s);
        return rc;
    }
    const int T = kvp_pool_cfg(p->pl)->block_tokens;
    const int D = p->d.kv_dim, L = p->d.n_layers;
    kvp_caps cap; /* the planner's tables: the device tables mirror them */
    kvp_plan_caps(kvp_pool_cfg(p->pl), max_tokens, &cap);
    s->cap_pend = cap.ents + cap.rq;
    s->pend = malloc((size_t)s->cap_pend * sizeof *s->pend);
    s->ema_n = calloc((size_t)L * 2, sizeof *s->ema_n);
    if (p->L) {
        s->ema_host = malloc((size_t)L * 8 * (size_t)D * sizeof(float));
        s->ema_mean = malloc((size_t)L * 4 * sizeof(float));
    }
    /* step tables: segments | page targets | block targets | re-quantization
     * rows | re-quantization blocks */
    size_t off = 0;
    s->off_segs = off;
    off = al256(off + (size_t)cap.ents * sizeof(kcu_seg));
    s->off_ptgt = off;
    off = al256(off + (size_t)cap.tgt * sizeof(kcu_page_tgt));
    s->off_qtgt = off;
    off = al256(off + (size_t)cap.tgt * sizeof(kcu_q_tgt));
    s->off_rows = off;
    off = al256(off + (size_t)cap.rq * T * sizeof(kcu_page_row));
    s->off_rqtgt = off;
    off = al256(off + (size_t)cap.rq * sizeof(kcu_q_tgt));
    s->tab_bytes = off;
    s->htab = malloc(off);
    if (!s->pend || !s->ema_n || !s->htab || (p->L && (!s->ema_host || !s->ema_mean))) {
        kvcd_seq_destroy(s);
        return lkq_err(err, errlen, -ENOMEM, "out of memory for a sequence");
    }
    rc = kcu_malloc(p->c, (void **)&s->dtab, s->tab_bytes, err, errlen);
    if (rc == 0 && p->L)
        rc = kcu_malloc(p->c, (void **)&s->ema, (size_t)L * 8 * (size_t)D * sizeof(float), err,
                        errlen);
    if (rc < 0) {
        kvcd_seq_destroy(s);
        return -ENOMEM;
    }
    kvcd_seq_reset(s);
    *out = s;
    return 0;
}

void kvcd_seq_reset(kvcd_seq *s)
{
    kvp_seq_reset(s->pl);
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
    kvp_seq_destroy(s->pl); /* returns its units */
    kcu_free(p->c, s->dtab);
    kcu_free(p->c, s->ema);
    free(s->pend);
    free(s->ema_n);
    free(s->ema_host);
    free(s->ema_mean);
    free(s->htab);
    free(s);
}

int kvcd_seq_n_tokens(const kvcd_seq *s)
{
    return kvp_seq_n_tokens(s->pl);
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
        if (kvp_seq_step(s->pl)->active ||
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
    return kvp_seq_warming(s->pl);
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
    if (s->n_pend > 0 && kvp_seq_step(s->pl)->active)
        return lkq_err(err, errlen, -EINVAL, "KV statistics during an open step");
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
    kvp_seq_fill_stats(s->pl, out);
    out->n_quantized = s->n_quantized;
    out->n_outliers = s->n_outliers;
    out->n_clamped = s->n_clamped;
    return 0;
}

/* ---- the step protocol: the planner decides, this file builds the tables ---------- */

void kvcd_abort(kvcd_seq *s)
{
    kvp_abort(s->pl);
}

/* Builds the step's device tables in htab from the plan and uploads them:
 * the committed history's segments, the page and block targets, and for a
 * re-quantization its source rows and target blocks. */
static int upload_step(kvcd_seq *s, char *err, size_t errlen)
{
    kvcd_pool *p = s->p;
    const int T = kvp_pool_cfg(p->pl)->block_tokens;
    const kvp_step *st = kvp_seq_step(s->pl);
    int n_ents;
    const kvp_ent *ents = kvp_seq_entries(s->pl, &n_ents);
    kcu_seg *sg = (kcu_seg *)(s->htab + s->off_segs);
    for (int i = 0; i < n_ents; i++) {
        const kvp_ent *e = &ents[i];
        sg[i] = (kcu_seg){e->kind == KVP_BLOCK ? KVS_Q4 : KVS_F16, e->pos0, e->n, e->id};
    }
    s->n_segs = n_ents;
    kcu_page_tgt *pt = (kcu_page_tgt *)(s->htab + s->off_ptgt);
    kcu_q_tgt *qt = (kcu_q_tgt *)(s->htab + s->off_qtgt);
    s->n_ptgt = s->n_qtgt = s->max_ptgt_n = 0;
    for (int i = 0; i < st->n_tgt; i++) {
        const kvp_tgt *t = &st->tgt[i];
        if (t->kind == KVP_PAGE) {
            pt[s->n_ptgt++] = (kcu_page_tgt){t->id, t->slot0, t->row0, t->n};
            if (t->n > s->max_ptgt_n)
                s->max_ptgt_n = t->n;
        } else {
            qt[s->n_qtgt++] = (kcu_q_tgt){t->id, t->row0, t->n, 0};
        }
    }
    s->n_rows = 0;
    if (st->rq) {
        kcu_page_row *rw = (kcu_page_row *)(s->htab + s->off_rows);
        for (int i = 0; i < st->n_src; i++)
            for (int k = 0; k < st->src[i].n; k++)
                rw[s->n_rows++] = (kcu_page_row){st->src[i].id, k};
        kcu_q_tgt *rt = (kcu_q_tgt *)(s->htab + s->off_rqtgt);
        for (int i = 0; i < st->n_rq; i++) {
            int k = st->rq_tokens - i * T < T ? st->rq_tokens - i * T : T;
            rt[i] = (kcu_q_tgt){st->rq_ids[i], i * T, k, 0};
        }
    }
    size_t upto = st->rq ? s->off_rqtgt + (size_t)st->n_rq * sizeof(kcu_q_tgt)
                         : s->off_qtgt + (size_t)s->n_qtgt * sizeof(kcu_q_tgt);
    return kcu_h2d(p->c, s->dtab, s->htab, upto, err, errlen) < 0 ? -EIO : 0;
}

int kvcd_begin(kvcd_seq *s, int pos0, int n, int prefill, char *err, size_t errlen)
{
    int rc = kvp_begin(s->pl, pos0, n, prefill, err, errlen);
    if (rc == KVP_FINISH_PREFILL) {
        rc = kvcd_finish_prefill(s, err, errlen);
        if (rc < 0 && rc != -ENOSPC)
            return rc;
        rc = kvp_begin(s->pl, pos0, n, prefill, err, errlen);
    }
    if (rc < 0)
        return rc;
    rc = upload_step(s, err, errlen);
    if (rc < 0)
        kvp_abort(s->pl);
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
    const cfg_kv *c = kvp_pool_cfg(p->pl);
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
    int band = kvp_pool_cfg(p->pl)->outlier_budget > 0.0f;
    if (kcu_kvq_quantize(p->c, p->L, &p->A, layer, tg, n, p->quant_tgts, k, v,
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
    const kvp_step *st = kvp_seq_step(s->pl);
    const int T = kvp_pool_cfg(p->pl)->block_tokens;
    const size_t D = (size_t)p->d.kv_dim;
    const kcu_q_tgt *rt = (const kcu_q_tgt *)(s->dtab + s->off_rqtgt);
    if (kcu_kv_gather_pages(p->c, &p->A, layer, (const kcu_page_row *)(s->dtab + s->off_rows),
                            s->n_rows, p->gk, p->gv, err, errlen) < 0)
        return -EIO;
    if (st->rq == KVP_RQ_WARMUP)
        return quantize(s, layer, rt, st->n_rq, p->gk, p->gv, err, errlen);
    for (int b = 0; b < st->n_rq; b++) {
        int full = (b + 1) * T <= st->rq_tokens;
        if (full && fold(s, layer, p->gk + (size_t)b * T * D, p->gv + (size_t)b * T * D, T,
                         (float)T / (float)kvp_pool_cfg(p->pl)->chunk_size, err, errlen) < 0)
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
    const kvp_step *st = kvp_seq_step(s->pl);
    const size_t D = (size_t)p->d.kv_dim;
    if (!st->active)
        return lkq_err(err, errlen, -EINVAL, "kvcd_store outside a step");
    if (st->stats && st->n > st->row_stats &&
        fold(s, layer, k + (size_t)st->row_stats * D, v + (size_t)st->row_stats * D,
             st->n - st->row_stats, 1.0f, err, errlen) < 0)
        return -EIO;
    if (s->n_ptgt > 0 &&
        kcu_kv_store_pages(p->c, &p->A, layer, (const kcu_page_tgt *)(s->dtab + s->off_ptgt),
                           s->n_ptgt, s->max_ptgt_n, k, v, err, errlen) < 0)
        return -EIO;
    if (s->n_qtgt > 0 &&
        quantize(s, layer, (const kcu_q_tgt *)(s->dtab + s->off_qtgt), s->n_qtgt, k, v, err,
                 errlen) < 0)
        return -EIO;
    if (st->rq)
        return requant_layer(s, layer, err, errlen);
    return 0;
}

/* kvp_commit's callback: a block that became an entry; its device header
 * counters are read by the next kvcd_seq_stats. */
static void pend_block(void *ctx, int32_t id)
{
    kvcd_seq *s = ctx;
    if (s->n_pend < s->cap_pend)
        s->pend[s->n_pend++] = id;
}

void kvcd_commit(kvcd_seq *s)
{
    kvp_commit(s->pl, pend_block, s);
}

int kvcd_finish_prefill(kvcd_seq *s, char *err, size_t errlen)
{
    int rc = kvp_finish_prefill(s->pl, err, errlen);
    if (rc != KVP_REQUANT)
        return rc;
    rc = upload_step(s, err, errlen);
    for (int l = 0; rc == 0 && l < s->p->d.n_layers; l++)
        rc = requant_layer(s, l, err, errlen);
    if (rc < 0) {
        kvp_abort(s->pl);
        return rc;
    }
    kvp_commit(s->pl, pend_block, s);
    return 0;
}
