/*
 * kvcache.c - the CPU KV cache (see kvcache.h for the protocol): an executor
 * of the KV planner (kv_plan.h). It owns the host arenas (INT4 blocks, FP16
 * pages), the per-layer clipped-EMA state and every data operation on them
 * (chunk statistics, quantization, page writes, re-quantization, segment
 * tables); every decision - which pages and blocks a step reserves, what is
 * staged, quantized, re-quantized and freed, the entry list and the free
 * lists - is the planner's, shared with the GPU cache (kvcache_cuda.c).
 *
 * A step writes only into blocks/pages reserved by kvc_begin and not yet
 * visible (or past the visible end of the last page), so attention during
 * the step reads the history exactly as it was before the step.
 * May call: kv_plan, kernels (kvq, ktypes). Engine thread only.
 */
#include "engine/kv/kvcache.h"

#include "engine/util/err.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/kv/kv_plan.h"
#include "kernels/ktypes.h"

struct kvc_pool {
    kvp_pool *pl;         /* the planner's bookkeeping of this pool */
    kvc_dims d;
    const kvq_layout *L;  /* the planner's; NULL in fp16 mode */
    int P;                /* tokens per FP16 page */
    size_t qbytes;        /* one block, all layers */
    size_t fbytes;        /* one page, all layers */
    size_t f_layer;       /* one page, one layer: K [P][D] then V [P][D] fp16 */
    uint8_t *qarena, *farena;
};

struct kvc_seq {
    kvc_pool *p;
    kvp_seq *pl;          /* entries and the step plan; owner: this */
    kvq_ema *ek, *ev;     /* [n_layers] */
    float *ema_mem;
    int64_t n_quantized, n_outliers, n_clamped;
    float *sk, *sv;       /* [T][D] re-quantization gather buffers */
    float *qscr;          /* quantile scratch */
    float *a, *b;         /* [D] chunk statistics */
    void *kq_scr;
};

double kvc_stats_bits(const kvc_stats *s)
{
    return s->elements > 0 ? 8.0 * (double)s->bytes_total / (double)s->elements : 0.0;
}

void kvc_stats_add_counts(kvc_stats *sum, const kvc_stats *s)
{
    kvp_stats_add_counts(sum, s);
}

void kvc_stats_set_bytes(kvc_stats *s, const kvq_layout *Lq, int n_layers, size_t qbytes,
                         size_t fbytes, int64_t nq, int64_t nf)
{
    kvp_stats_set_bytes(s, Lq, n_layers, qbytes, fbytes, nq, nf);
}

/* ---- pool ----------------------------------------------------------------- */

int kvc_plan_page_tokens(const cfg_kv *c)
{
    return kvp_page_tokens(c);
}

void kvc_plan_estimate(const cfg_kv *c, int n, int64_t *nq, int64_t *nf)
{
    kvp_estimate(c, n, nq, nf);
}

int kvc_pool_plan(const cfg_kv *cfg, const kvc_dims *d, int n_ctx, int max_seqs,
                  int64_t *n_qblocks, int64_t *n_fpages, char *err, size_t errlen)
{
    return kvp_pool_size(cfg, d, n_ctx, max_seqs, n_qblocks, n_fpages, err, errlen);
}

int kvc_pool_create(const cfg_kv *cfg, const kvc_dims *d, int64_t n_qblocks,
                    int64_t n_fpages, kvc_pool **out, char *err, size_t errlen)
{
    *out = NULL;
    kvc_pool *p = calloc(1, sizeof *p);
    if (!p)
        return lkq_err(err, errlen, -ENOMEM, "out of memory");
    int rc = kvp_pool_create(cfg, d, n_qblocks, n_fpages, &p->pl, err, errlen);
    if (rc < 0) {
        free(p);
        return rc;
    }
    int64_t nq, nf;
    kvp_pool_units(p->pl, &nq, &nf);
    kvp_pool_unit_bytes(p->pl, &p->qbytes, &p->fbytes);
    p->d = *d;
    p->L = kvp_pool_layout(p->pl);
    p->P = kvp_pool_page_tokens(p->pl);
    p->f_layer = p->fbytes / (size_t)d->n_layers;
    p->qarena = nq ? malloc((size_t)nq * p->qbytes) : NULL;
    p->farena = malloc((size_t)nf * p->fbytes);
    if ((nq && !p->qarena) || !p->farena) {
        double mib = ((double)nq * (double)p->qbytes + (double)nf * (double)p->fbytes) /
                     (1024.0 * 1024.0);
        kvc_pool_destroy(p);
        return lkq_err(err, errlen, -ENOMEM, "cannot allocate the KV pool (%.1f MiB)", mib);
    }
    *out = p;
    return 0;
}

void kvc_pool_destroy(kvc_pool *p)
{
    if (!p)
        return;
    free(p->qarena);
    free(p->farena);
    kvp_pool_destroy(p->pl);
    free(p);
}

const kvq_layout *kvc_pool_layout(const kvc_pool *p)
{
    return p->L;
}

const cfg_kv *kvc_pool_cfg(const kvc_pool *p)
{
    return kvp_pool_cfg(p->pl);
}

int kvc_pool_page_tokens(const kvc_pool *p)
{
    return p->P;
}

static uint8_t *qblock(const kvc_pool *p, int32_t id, int layer)
{
    return p->qarena + (size_t)id * p->qbytes + (size_t)layer * p->L->bytes;
}

static uint16_t *fpage_k(const kvc_pool *p, int32_t id, int layer)
{
    return (uint16_t *)(p->farena + (size_t)id * p->fbytes + (size_t)layer * p->f_layer);
}

static uint16_t *fpage_v(const kvc_pool *p, int32_t id, int layer)
{
    return fpage_k(p, id, layer) + (size_t)p->P * (size_t)p->d.kv_dim;
}

void kvc_seq_stats(const kvc_seq *s, kvc_stats *out)
{
    kvp_seq_fill_stats(s->pl, out);
    out->n_quantized = s->n_quantized;
    out->n_outliers = s->n_outliers;
    out->n_clamped = s->n_clamped;
}

void kvc_pool_stats(const kvc_pool *p, kvc_stats *out)
{
    memset(out, 0, sizeof *out);
    for (kvp_seq *q = kvp_pool_next_seq(p->pl, NULL); q; q = kvp_pool_next_seq(p->pl, q)) {
        kvc_stats t;
        kvc_seq_stats(kvp_seq_owner(q), &t);
        kvp_stats_add_counts(out, &t);
    }
    kvp_pool_fill_stats(p->pl, out);
}

double kvc_pool_usage(const kvc_pool *p)
{
    return kvp_pool_usage(p->pl);
}

int64_t kvc_pool_capacity_bytes(const kvc_pool *p)
{
    return kvp_pool_capacity_bytes(p->pl);
}

void kvc_pool_free_units(const kvc_pool *p, int64_t *qfree, int64_t *ffree)
{
    kvp_pool_free_units(p->pl, qfree, ffree);
}

void kvc_pool_estimate(const kvc_pool *p, int n, int64_t *nq, int64_t *nf)
{
    kvp_estimate(kvp_pool_cfg(p->pl), n, nq, nf);
}

/* ---- sequences -------------------------------------------------------------- */

int kvc_seq_create(kvc_pool *p, int max_tokens, kvc_seq **out, char *err, size_t errlen)
{
    *out = NULL;
    kvc_seq *s = calloc(1, sizeof *s);
    if (!s)
        return lkq_err(err, errlen, -ENOMEM, "out of memory");
    s->p = p;
    int rc = kvp_seq_create(p->pl, max_tokens, s, &s->pl, err, errlen);
    if (rc < 0) {
        free(s);
        return rc;
    }
    const cfg_kv *c = kvp_pool_cfg(p->pl);
    const int T = c->block_tokens, C = c->chunk_size;
    const int D = p->d.kv_dim, L = p->d.n_layers;
    s->ek = calloc((size_t)L, sizeof *s->ek);
    s->ev = calloc((size_t)L, sizeof *s->ev);
    s->ema_mem = calloc((size_t)L * 2 * 4 * (size_t)D, sizeof(float));
    int gather = T > C ? T : C;
    s->sk = malloc((size_t)T * D * sizeof(float));
    s->sv = malloc((size_t)T * D * sizeof(float));
    s->qscr = malloc((size_t)gather * sizeof(float));
    s->a = malloc((size_t)D * sizeof(float));
    s->b = malloc((size_t)D * sizeof(float));
    s->kq_scr = p->L ? malloc(kvq_quantize_scratch_bytes(p->L) + 1) : NULL;
    if (!s->ek || !s->ev || !s->ema_mem || !s->sk || !s->sv || !s->qscr || !s->a || !s->b ||
        (p->L && !s->kq_scr)) {
        kvc_seq_destroy(s);
        return lkq_err(err, errlen, -ENOMEM, "out of memory for a sequence");
    }
    for (int l = 0; l < L; l++) {
        float *m = s->ema_mem + (size_t)l * 8 * D;
        s->ek[l] = (kvq_ema){m, m + D, m + 2 * D, m + 3 * D, 0};
        s->ev[l] = (kvq_ema){m + 4 * D, m + 5 * D, m + 6 * D, m + 7 * D, 0};
    }
    *out = s;
    return 0;
}

void kvc_seq_reset(kvc_seq *s)
{
    kvp_seq_reset(s->pl);
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
    kvp_seq_destroy(s->pl); /* returns its units */
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
    return kvp_seq_n_tokens(s->pl);
}

int kvc_seq_warming(const kvc_seq *s)
{
    return kvp_seq_warming(s->pl);
}

int kvc_seq_chunks(const kvc_seq *s)
{
    return kvp_seq_chunks(s->pl);
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
    return kvp_seq_max_entries(s->pl);
}

int kvc_segments(const kvc_seq *s, int layer, kvs_seg *segs, int cap)
{
    const kvc_pool *p = s->p;
    int n_ents;
    const kvp_ent *ents = kvp_seq_entries(s->pl, &n_ents);
    int n = 0;
    for (int i = 0; i < n_ents && n < cap; i++) {
        const kvp_ent *e = &ents[i];
        kvs_seg *g = &segs[n++];
        g->pos0 = e->pos0;
        g->n = e->n;
        if (e->kind == KVP_BLOCK) {
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

/* ---- the step protocol: the planner decides, this file moves the data ------ */

void kvc_abort(kvc_seq *s)
{
    kvp_abort(s->pl);
}

int kvc_begin(kvc_seq *s, int pos0, int n, int prefill, char *err, size_t errlen)
{
    int rc = kvp_begin(s->pl, pos0, n, prefill, err, errlen);
    if (rc == KVP_FINISH_PREFILL) {
        rc = kvc_finish_prefill(s, err, errlen);
        if (rc < 0 && rc != -ENOSPC)
            return rc;
        rc = kvp_begin(s->pl, pos0, n, prefill, err, errlen);
    }
    return rc < 0 ? rc : 0;
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
    const cfg_kv *c = kvp_pool_cfg(s->p->pl);
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
    int band = kvp_pool_cfg(p->pl)->outlier_budget > 0.0f;
    kvq_quantize_block(p->L, qblock(p, id, layer), k, v, (size_t)p->d.kv_dim, n,
                       s->ek[layer].lo, s->ek[layer].hi, band ? s->ev[layer].lo : NULL,
                       band ? s->ev[layer].hi : NULL, s->kq_scr);
}

/* Re-quantizes the step's sources (staged pages or the tail) of one layer
 * into the reserved blocks, block_tokens tokens at a time; a full tail
 * block is folded into the EMA (weight T / chunk_size) first. */
static void requant_layer(kvc_seq *s, int layer)
{
    const kvc_pool *p = s->p;
    const kvp_step *st = kvp_seq_step(s->pl);
    const cfg_kv *c = kvp_pool_cfg(p->pl);
    const int T = c->block_tokens, D = p->d.kv_dim;
    int blk = 0, fill = 0;
    for (int i = 0; i < st->n_src; i++) {
        int off = 0;
        while (off < st->src[i].n) {
            int k = st->src[i].n - off;
            if (k > T - fill)
                k = T - fill;
            page_to_f32(p, st->src[i].id, layer, off, k, s->sk + (size_t)fill * D,
                        s->sv + (size_t)fill * D);
            fill += k;
            off += k;
            if (fill == T) {
                if (st->rq == KVP_RQ_TAIL)
                    fold_stats(s, layer, s->sk, s->sv, T, (float)T / (float)c->chunk_size);
                quantize(s, layer, st->rq_ids[blk++], s->sk, s->sv, T);
                fill = 0;
            }
        }
    }
    if (fill > 0 && blk < st->n_rq)
        quantize(s, layer, st->rq_ids[blk], s->sk, s->sv, fill);
}

void kvc_store(kvc_seq *s, int layer, const float *k, const float *v)
{
    kvc_pool *p = s->p;
    const kvp_step *st = kvp_seq_step(s->pl);
    const size_t D = (size_t)p->d.kv_dim;
    if (st->stats && st->n > st->row_stats)
        fold_stats(s, layer, k + (size_t)st->row_stats * D, v + (size_t)st->row_stats * D,
                   st->n - st->row_stats, 1.0f);
    for (int i = 0; i < st->n_tgt; i++) {
        const kvp_tgt *t = &st->tgt[i];
        const float *tk = k + (size_t)t->row0 * D, *tv = v + (size_t)t->row0 * D;
        if (t->kind == KVP_PAGE) {
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
    if (st->rq)
        requant_layer(s, layer);
}

/* kvp_commit's callback: sums the outlier / clamp counters of a block that
 * became an entry, over all layers. */
static void count_block(void *ctx, int32_t id)
{
    kvc_seq *s = ctx;
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
    kvp_commit(s->pl, count_block, s);
}

int kvc_finish_prefill(kvc_seq *s, char *err, size_t errlen)
{
    int rc = kvp_finish_prefill(s->pl, err, errlen);
    if (rc != KVP_REQUANT)
        return rc;
    for (int l = 0; l < s->p->d.n_layers; l++)
        requant_layer(s, l);
    kvp_commit(s->pl, count_block, s);
    return 0;
}

int kvc_seq_layer_counts(const kvc_seq *s, int layer, kvc_layer_counts *out)
{
    const kvc_pool *p = s->p;
    memset(out, 0, sizeof *out);
    if (layer < 0 || layer >= p->d.n_layers)
        return -1;
    int n_ents;
    const kvp_ent *ents = kvp_seq_entries(s->pl, &n_ents);
    for (int i = 0; i < n_ents; i++) {
        const kvp_ent *e = &ents[i];
        if (e->kind != KVP_BLOCK)
            continue;
        const kvq_block_hdr *h = kvq_chdr(qblock(p, e->id, layer));
        out->n_quantized += (int64_t)h->n_tok * p->d.kv_dim * 2;
        out->n_k_outliers += h->n_kout;
        out->n_v_outliers += h->n_vout;
        out->n_clamped += h->n_clamped;
    }
    return 0;
}
