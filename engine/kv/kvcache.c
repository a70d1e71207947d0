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
 * Prefix reuse: the planner shares the entries; this file keeps the EMA
 * state and counters at a cached boundary (a node's data), restores them
 * when a sequence continues from it, and copies them (and a partially
 * filled page) for a fork.
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

/* One layer group of the pool: the planner's pool and its arenas. */
typedef struct {
    kvp_pool *pl;         /* NULL: the model has no layers of this kind */
    const kvq_layout *L;  /* the planner's (the pool's mode); NULL in fp16 mode */
    int P;                /* tokens per FP16 page */
    size_t qbytes;        /* one block, all layers of the group */
    size_t fbytes;        /* one page, all layers of the group */
    size_t qstride, fstride; /* bytes per unit id (a shared pool: its id step) */
    size_t f_layer;       /* one page, one layer: K [P][D] then V [P][D] fp16 */
    uint8_t *qarena, *farena; /* a shared pool: one arena, farena == qarena */
} kvc_group;

struct kvc_pool {
    kvc_dims d;           /* the model's (layer_window: group / local below) */
    cfg_kv cfg;
    kvc_group g[KVC_LAYER_KINDS];
    int32_t *group, *local; /* [n_layers]: layer -> group, index in the group */
};

/* kvp_commit's callback context: a sequence and one of its groups. */
typedef struct {
    struct kvc_seq *s;
    int g;
} kvc_cb;

struct kvc_seq {
    kvc_pool *p;
    kvp_seq *pl[KVC_LAYER_KINDS]; /* entries and step plans; owner: this */
    kvc_cb cb[KVC_LAYER_KINDS];
    kvq_ema *ek, *ev;     /* [n_layers] */
    float *ema_mem;
    int64_t n_quantized, n_outliers, n_clamped; /* of the blocks held */
    float *sk, *sv;       /* [T][D] re-quantization gather buffers */
    float *qscr;          /* quantile scratch */
    float *a, *b;         /* [D] chunk statistics */
    void *kq_scr;
};

double kvc_stats_bits(const kvc_stats *s)
{
    return s->elements > 0 ? 8.0 * (double)s->bytes_total / (double)s->elements : 0.0;
}

double kvc_stats_kind_bits(const kvc_stats *s, int kind)
{
    if (kind < 0 || kind >= KVC_LAYER_KINDS || s->layer_kind[kind].elements <= 0)
        return 0.0;
    return 8.0 * (double)s->layer_kind[kind].bytes_total / (double)s->layer_kind[kind].elements;
}

void kvc_stats_add_counts(kvc_stats *sum, const kvc_stats *s)
{
    kvp_stats_add_counts(sum, s);
}

/* ---- pool ----------------------------------------------------------------- */

int kvc_plan_page_tokens(const cfg_kv *c)
{
    return kvp_page_tokens(c);
}

int kvc_plan_unit_tokens(const cfg_kv *c)
{
    return kvp_unit_tokens(c);
}

void kvc_plan_estimate(const cfg_kv *c, int n, int64_t *nq, int64_t *nf)
{
    kvp_estimate(c, n, nq, nf);
}

int kvc_pool_plan(const cfg_kv *cfg, const kvc_dims *d, int n_ctx, int max_seqs,
                  kvc_pool_sizes *out, char *err, size_t errlen)
{
    return kvp_pool_size(cfg, d, n_ctx, max_seqs, out, err, errlen);
}

int kvc_pool_create(const cfg_kv *cfg, const kvc_dims *d, const kvc_pool_sizes *sz,
                    kvc_pool **out, char *err, size_t errlen)
{
    *out = NULL;
    if (kvp_check(cfg, d, err, errlen) < 0)
        return -EINVAL;
    kvc_pool *p = calloc(1, sizeof *p);
    if (!p)
        return lkq_err(err, errlen, -ENOMEM, "out of memory");
    p->d = *d;
    p->d.layer_window = NULL;
    p->cfg = *cfg;
    p->group = malloc((size_t)d->n_layers * sizeof *p->group);
    p->local = malloc((size_t)d->n_layers * sizeof *p->local);
    if (!p->group || !p->local) {
        kvc_pool_destroy(p);
        return lkq_err(err, errlen, -ENOMEM, "out of memory");
    }
    kvp_groups gr;
    kvp_layer_groups(cfg, d, &gr, p->group, p->local);
    for (int k = 0; k < KVC_LAYER_KINDS; k++) {
        kvc_group *g = &p->g[k];
        if (gr.n_layers[k] == 0)
            continue;
        int rc = kvp_pool_create(&gr.cfg[k], &gr.dims[k], k == KVC_LAYER_WINDOW ? gr.window : 0,
                                 sz->n_qblocks[k], sz->n_fpages[k], &g->pl, err, errlen);
        if (rc < 0) {
            kvc_pool_destroy(p);
            return rc;
        }
        size_t qa, fa;
        kvp_pool_unit_bytes(g->pl, &g->qbytes, &g->fbytes);
        kvp_pool_arena(g->pl, &qa, &fa, &g->qstride, &g->fstride);
        g->L = kvp_pool_layout(g->pl);
        g->P = kvp_pool_page_tokens(g->pl);
        g->f_layer = g->fbytes / (size_t)gr.n_layers[k];
        g->qarena = qa ? malloc(qa) : NULL;
        g->farena = fa ? malloc(fa) : g->qarena; /* shared: one arena */
        if ((qa && !g->qarena) || !g->farena) {
            double mib = ((double)qa + (double)fa) / (1024.0 * 1024.0);
            kvc_pool_destroy(p);
            return lkq_err(err, errlen, -ENOMEM, "cannot allocate the KV pool (%.1f MiB)", mib);
        }
    }
    *out = p;
    return 0;
}

void kvc_pool_destroy(kvc_pool *p)
{
    if (!p)
        return;
    for (int k = 0; k < KVC_LAYER_KINDS; k++) {
        if (p->g[k].farena != p->g[k].qarena)
            free(p->g[k].farena);
        free(p->g[k].qarena);
        kvp_pool_destroy(p->g[k].pl);
    }
    free(p->group);
    free(p->local);
    free(p);
}

const kvq_layout *kvc_pool_layout(const kvc_pool *p)
{
    return p->g[KVC_LAYER_GLOBAL].L;
}

const kvq_layout *kvc_layer_layout(const kvc_pool *p, int layer)
{
    return p->g[p->group[layer]].L;
}

const kvq_layout *kvc_seq_layer_layout(const kvc_seq *s, int layer)
{
    return kvp_seq_layout(s->pl[s->p->group[layer]]);
}

size_t kvc_pool_attn_layouts(const kvc_pool *p, const kvq_layout **out, size_t cap)
{
    size_t n = 0;
    for (int k = 0; k < KVC_LAYER_KINDS; k++)
        for (int m = 1; p->g[k].pl && m < CFG_KV_MODES; m++) {
            const kvq_layout *L = kvp_pool_mode_layout(p->g[k].pl, m);
            if (L && n < cap)
                out[n++] = L;
        }
    return n;
}

int64_t kvc_pool_free_bytes(const kvc_pool *p)
{
    return p->g[KVC_LAYER_GLOBAL].pl ? kvp_pool_free_bytes(p->g[KVC_LAYER_GLOBAL].pl) : 0;
}

const cfg_kv *kvc_pool_cfg(const kvc_pool *p)
{
    return &p->cfg;
}

int kvc_pool_page_tokens(const kvc_pool *p)
{
    return kvp_page_tokens(&p->cfg);
}

/* Layer li of block id, of layout L (the sequence's mode's). */
static uint8_t *qblock(const kvc_pool *p, int g, const kvq_layout *L, int32_t id, int li)
{
    const kvc_group *G = &p->g[g];
    return G->qarena + (size_t)id * G->qstride + (size_t)li * L->bytes;
}

static uint16_t *fpage_k(const kvc_pool *p, int g, int32_t id, int li)
{
    const kvc_group *G = &p->g[g];
    return (uint16_t *)(G->farena + (size_t)id * G->fstride + (size_t)li * G->f_layer);
}

static uint16_t *fpage_v(const kvc_pool *p, int g, int32_t id, int li)
{
    return fpage_k(p, g, id, li) + (size_t)p->g[g].P * (size_t)p->d.kv_dim;
}

/* The sequence's first group (the global one when the model has one): its
 * position, chunk and warm-up state are every group's. */
static const kvp_seq *first_seq(const kvc_seq *s)
{
    return s->pl[KVC_LAYER_GLOBAL] ? s->pl[KVC_LAYER_GLOBAL] : s->pl[KVC_LAYER_WINDOW];
}

void kvc_seq_held(const kvc_seq *s, kvc_stats *out)
{
    kvp_seq_groups_stats(s->pl, KVC_LAYER_KINDS, out);
}

void kvc_seq_stats(const kvc_seq *s, kvc_stats *out)
{
    kvc_seq_held(s, out);
    out->n_quantized = s->n_quantized;
    out->n_outliers = s->n_outliers;
    out->n_clamped = s->n_clamped;
}

void kvc_pool_stats(const kvc_pool *p, kvc_stats *out)
{
    memset(out, 0, sizeof *out);
    const kvp_pool *pl0 = p->g[KVC_LAYER_GLOBAL].pl ? p->g[KVC_LAYER_GLOBAL].pl
                                                    : p->g[KVC_LAYER_WINDOW].pl;
    /* every sequence has a kvp_seq in the first group: its owner */
    for (kvp_seq *q = kvp_pool_next_seq(pl0, NULL); q; q = kvp_pool_next_seq(pl0, q)) {
        kvc_stats t;
        kvc_seq_stats(kvp_seq_owner(q), &t);
        kvp_stats_add_counts(out, &t);
    }
    for (int k = 0; k < KVC_LAYER_KINDS; k++)
        if (p->g[k].pl)
            kvp_pool_add_stats(p->g[k].pl, k, out);
}

double kvc_pool_usage(const kvc_pool *p)
{
    double used = 0.0, total = 0.0;
    for (int k = 0; k < KVC_LAYER_KINDS; k++) {
        if (!p->g[k].pl)
            continue;
        double cap = (double)kvp_pool_capacity_bytes(p->g[k].pl);
        used += kvp_pool_usage(p->g[k].pl) * cap;
        total += cap;
    }
    return total > 0 ? used / total : 0.0;
}

int64_t kvc_pool_capacity_bytes(const kvc_pool *p)
{
    int64_t b = 0;
    for (int k = 0; k < KVC_LAYER_KINDS; k++)
        if (p->g[k].pl)
            b += kvp_pool_capacity_bytes(p->g[k].pl);
    return b;
}

void kvc_pool_kind_units(const kvc_pool *p, int kind, int64_t *qfree, int64_t *ffree,
                         int64_t *qtotal, int64_t *ftotal)
{
    *qfree = *ffree = *qtotal = *ftotal = 0;
    if (kind < 0 || kind >= KVC_LAYER_KINDS || !p->g[kind].pl)
        return;
    kvp_pool_free_units(p->g[kind].pl, qfree, ffree);
    kvp_pool_units(p->g[kind].pl, qtotal, ftotal);
}

void kvc_pool_free_units(const kvc_pool *p, int64_t *qfree, int64_t *ffree)
{
    int64_t tq, tf;
    kvc_pool_kind_units(p, KVC_LAYER_GLOBAL, qfree, ffree, &tq, &tf);
}

void kvc_pool_estimate(const kvc_pool *p, int n, int64_t *nq, int64_t *nf)
{
    *nq = *nf = 0;
    if (p->g[KVC_LAYER_GLOBAL].pl)
        kvp_estimate(kvp_pool_cfg(p->g[KVC_LAYER_GLOBAL].pl), n, nq, nf);
}

/* ---- sequences -------------------------------------------------------------- */

int kvc_seq_create(kvc_pool *p, int max_tokens, kvc_seq **out, char *err, size_t errlen)
{
    *out = NULL;
    kvc_seq *s = calloc(1, sizeof *s);
    if (!s)
        return lkq_err(err, errlen, -ENOMEM, "out of memory");
    s->p = p;
    for (int k = 0; k < KVC_LAYER_KINDS; k++) {
        s->cb[k] = (kvc_cb){s, k};
        if (!p->g[k].pl)
            continue;
        int rc = kvp_seq_create(p->g[k].pl, max_tokens, s, &s->pl[k], err, errlen);
        if (rc < 0) {
            kvc_seq_destroy(s);
            return rc;
        }
    }
    const cfg_kv *c = &p->cfg;
    const int T = c->block_tokens, C = c->chunk_size;
    const int D = p->d.kv_dim, L = p->d.n_layers;
    /* quantization scratch for the widest layout of any mode any group holds */
    size_t kq_bytes = 0;
    for (int k = 0; k < KVC_LAYER_KINDS; k++)
        for (int m = 1; p->g[k].pl && m < CFG_KV_MODES; m++) {
            const kvq_layout *Lm = kvp_pool_mode_layout(p->g[k].pl, m);
            size_t b = Lm ? kvq_quantize_scratch_bytes(Lm) : 0;
            kq_bytes = b > kq_bytes ? b : kq_bytes;
        }
    int quant = p->g[KVC_LAYER_GLOBAL].L || p->g[KVC_LAYER_WINDOW].L;
    s->ek = calloc((size_t)L, sizeof *s->ek);
    s->ev = calloc((size_t)L, sizeof *s->ev);
    s->ema_mem = calloc((size_t)L * 2 * 4 * (size_t)D, sizeof(float));
    int gather = T > C ? T : C;
    s->sk = malloc((size_t)T * D * sizeof(float));
    s->sv = malloc((size_t)T * D * sizeof(float));
    s->qscr = malloc((size_t)gather * sizeof(float));
    s->a = malloc((size_t)D * sizeof(float));
    s->b = malloc((size_t)D * sizeof(float));
    s->kq_scr = quant ? malloc(kq_bytes + 1) : NULL;
    if (!s->ek || !s->ev || !s->ema_mem || !s->sk || !s->sv || !s->qscr || !s->a || !s->b ||
        (quant && !s->kq_scr)) {
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
    for (int k = 0; k < KVC_LAYER_KINDS; k++)
        if (s->pl[k])
            kvp_seq_reset(s->pl[k]);
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
    for (int k = 0; k < KVC_LAYER_KINDS; k++)
        kvp_seq_destroy(s->pl[k]); /* returns its units */
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

int kvc_seq_set_mode(kvc_seq *s, int mode, char *err, size_t errlen)
{
    return kvp_seq_set_mode_groups(s->pl, KVC_LAYER_KINDS, &s->p->cfg, mode, err, errlen);
}

int kvc_seq_mode(const kvc_seq *s)
{
    return kvp_seq_mode(first_seq(s)); /* the global group's when there is one */
}

int kvc_seq_n_tokens(const kvc_seq *s)
{
    return kvp_seq_n_tokens(first_seq(s));
}

int kvc_seq_warming(const kvc_seq *s)
{
    for (int k = 0; k < KVC_LAYER_KINDS; k++)
        if (s->pl[k] && kvp_seq_warming(s->pl[k]))
            return 1;
    return 0;
}

int kvc_seq_chunks(const kvc_seq *s)
{
    return kvp_seq_chunks(first_seq(s));
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
    int n = 0;
    for (int k = 0; k < KVC_LAYER_KINDS; k++)
        if (s->pl[k] && kvp_seq_max_entries(s->pl[k]) > n)
            n = kvp_seq_max_entries(s->pl[k]);
    return n;
}

int kvc_segments(const kvc_seq *s, int layer, kvs_seg *segs, int cap)
{
    const kvc_pool *p = s->p;
    const int g = p->group[layer], li = p->local[layer];
    int n_ents;
    const kvp_ent *ents = kvp_seq_entries(s->pl[g], &n_ents);
    int n = 0;
    for (int i = 0; i < n_ents && n < cap; i++) {
        const kvp_ent *e = &ents[i];
        kvs_seg *sg = &segs[n++];
        sg->pos0 = e->pos0;
        sg->n = e->n;
        if (e->kind == KVP_BLOCK) {
            sg->kind = KVS_Q4;
            sg->k = qblock(p, g, kvp_seq_layout(s->pl[g]), e->id, li);
            sg->v = NULL;
            sg->stride = 0;
        } else {
            sg->kind = KVS_F16;
            sg->k = fpage_k(p, g, e->id, li);
            sg->v = fpage_v(p, g, e->id, li);
            sg->stride = (size_t)p->d.kv_dim;
        }
    }
    return n;
}

/* ---- the step protocol: the planner decides, this file moves the data ------ */

void kvc_abort(kvc_seq *s)
{
    for (int k = 0; k < KVC_LAYER_KINDS; k++)
        if (s->pl[k])
            kvp_abort(s->pl[k]);
}

static int finish_group(void *ctx, int g, char *err, size_t errlen);

int kvc_begin(kvc_seq *s, int pos0, int n, int prefill, char *err, size_t errlen)
{
    return kvp_begin_groups(s->pl, KVC_LAYER_KINDS, pos0, n, prefill, finish_group, s, err,
                            errlen);
}

/* Copies rows of an FP16 page of group g (layer li of it) into f32 rows. */
static void page_to_f32(const kvc_pool *p, int g, int32_t id, int li, int slot0, int n,
                        float *k, float *v)
{
    const size_t D = (size_t)p->d.kv_dim;
    const uint16_t *pk = fpage_k(p, g, id, li) + (size_t)slot0 * D;
    const uint16_t *pv = fpage_v(p, g, id, li) + (size_t)slot0 * D;
    for (size_t i = 0; i < (size_t)n * D; i++) {
        k[i] = kt_f16_to_f32(pk[i]);
        v[i] = kt_f16_to_f32(pv[i]);
    }
}

static void fold_stats(kvc_seq *s, int layer, const float *k, const float *v, int n,
                       float weight)
{
    /* the layer's group's knobs: a quantized window group may clip its
     * ranges otherwise than the global layers (kvp_layer_groups) */
    const cfg_kv *c = kvp_pool_cfg(s->p->g[s->p->group[layer]].pl);
    const int D = s->p->d.kv_dim;
    kvq_ema_params ep = {c->ema_decay, c->ema_clip, c->clip_quantile, c->warmup_chunks};
    kvq_chunk_quantiles(k, n, D, (size_t)D, c->clip_quantile, s->a, s->b, s->qscr);
    kvq_ema_update(&s->ek[layer], &ep, s->a, s->b, D, weight);
    kvq_chunk_quantiles(v, n, D, (size_t)D, c->clip_quantile, s->a, s->b, s->qscr);
    kvq_ema_update(&s->ev[layer], &ep, s->a, s->b, D, weight);
}

/* Quantizes n tokens into block id of one layer (model layer `layer`, in
 * its group) with the layer's current EMA ranges. With no outlier budget
 * there is no outlier band for V (each group's min/max covers all its
 * values): together with per-token keys that is the naive INT4 baseline. */
static void quantize(kvc_seq *s, int layer, int32_t id, const float *k, const float *v,
                     int n)
{
    const kvc_pool *p = s->p;
    const int g = p->group[layer];
    const kvq_layout *L = kvp_seq_layout(s->pl[g]);
    int band = p->cfg.outlier_budget > 0.0f;
    kvq_quantize_block(L, qblock(p, g, L, id, p->local[layer]), k, v, (size_t)p->d.kv_dim,
                       n, s->ek[layer].lo, s->ek[layer].hi, band ? s->ev[layer].lo : NULL,
                       band ? s->ev[layer].hi : NULL, s->kq_scr);
}

/* Re-quantizes the step's sources (staged pages or the tail) of one layer
 * into the reserved blocks, the group's block_tokens T tokens at a time; a
 * full tail block is folded into the EMA (weight T / chunk_size) first. */
static void requant_layer(kvc_seq *s, int layer)
{
    const kvc_pool *p = s->p;
    const int g = p->group[layer], li = p->local[layer];
    const kvp_step *st = kvp_seq_step(s->pl[g]);
    const cfg_kv *c = &p->cfg;
    /* the group's blocks: a quantized window group's are smaller than the
     * global layers' (kvp_layer_groups) */
    const int T = kvp_pool_cfg(p->g[g].pl)->block_tokens, D = p->d.kv_dim;
    int blk = 0, fill = 0;
    for (int i = 0; i < st->n_src; i++) {
        int off = 0;
        while (off < st->src[i].n) {
            int k = st->src[i].n - off;
            if (k > T - fill)
                k = T - fill;
            page_to_f32(p, g, st->src[i].id, li, off, k, s->sk + (size_t)fill * D,
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
    const int g = p->group[layer], li = p->local[layer];
    const kvp_step *st = kvp_seq_step(s->pl[g]);
    const size_t D = (size_t)p->d.kv_dim;
    if (st->stats && st->n > st->row_stats)
        fold_stats(s, layer, k + (size_t)st->row_stats * D, v + (size_t)st->row_stats * D,
                   st->n - st->row_stats, 1.0f);
    for (int i = 0; i < st->n_tgt; i++) {
        const kvp_tgt *t = &st->tgt[i];
        const float *tk = k + (size_t)t->row0 * D, *tv = v + (size_t)t->row0 * D;
        if (t->kind == KVP_PAGE) {
            uint16_t *pk = fpage_k(p, g, t->id, li) + (size_t)t->slot0 * D;
            uint16_t *pv = fpage_v(p, g, t->id, li) + (size_t)t->slot0 * D;
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

/* kvp_commit's callback: adds (added) or takes away (the window moved past
 * it) the outlier / clamp counters of a block of one group, over the
 * group's layers. */
static void count_block(void *ctx, int32_t id, int added)
{
    const kvc_cb *cb = ctx;
    kvc_seq *s = cb->s;
    const kvc_pool *p = s->p;
    const int64_t sign = added ? 1 : -1;
    const kvq_layout *L = kvp_seq_layout(s->pl[cb->g]);
    for (int l = 0; l < p->d.n_layers; l++) {
        if (p->group[l] != cb->g)
            continue;
        const kvq_block_hdr *h = kvq_chdr(qblock(p, cb->g, L, id, p->local[l]));
        s->n_quantized += sign * (int64_t)h->n_tok * p->d.kv_dim * 2;
        s->n_outliers += sign * (int64_t)(h->n_kout + h->n_vout);
        s->n_clamped += sign * (int64_t)h->n_clamped;
    }
}

void kvc_commit(kvc_seq *s)
{
    for (int k = 0; k < KVC_LAYER_KINDS; k++)
        if (s->pl[k])
            kvp_commit(s->pl[k], count_block, &s->cb[k]);
}

/* Ends the prefill of group g (see kvc_finish_prefill). */
static int finish_group(void *ctx, int g, char *err, size_t errlen)
{
    kvc_seq *s = ctx;
    int rc = kvp_finish_prefill(s->pl[g], err, errlen);
    if (rc != KVP_REQUANT)
        return rc;
    for (int l = 0; l < s->p->d.n_layers; l++)
        if (s->p->group[l] == g)
            requant_layer(s, l);
    kvp_commit(s->pl[g], count_block, &s->cb[g]);
    return 0;
}

int kvc_finish_prefill(kvc_seq *s, char *err, size_t errlen)
{
    int ret = 0;
    for (int k = 0; k < KVC_LAYER_KINDS; k++) {
        if (!s->pl[k])
            continue;
        int rc = finish_group(s, k, err, errlen);
        if (rc < 0 && ret == 0)
            ret = rc;
    }
    return ret;
}

int kvc_seq_layer_counts(const kvc_seq *s, int layer, kvc_layer_counts *out)
{
    const kvc_pool *p = s->p;
    memset(out, 0, sizeof *out);
    if (layer < 0 || layer >= p->d.n_layers)
        return -1;
    const int g = p->group[layer], li = p->local[layer];
    int n_ents;
    const kvp_ent *ents = kvp_seq_entries(s->pl[g], &n_ents);
    const kvq_layout *L = kvp_seq_layout(s->pl[g]);
    for (int i = 0; i < n_ents; i++) {
        const kvp_ent *e = &ents[i];
        if (e->kind != KVP_BLOCK)
            continue;
        const kvq_block_hdr *h = kvq_chdr(qblock(p, g, L, e->id, li));
        out->n_quantized += (int64_t)h->n_tok * p->d.kv_dim * 2;
        out->n_k_outliers += h->n_kout;
        out->n_v_outliers += h->n_vout;
        out->n_clamped += h->n_clamped;
    }
    return 0;
}

/* ---- prefix reuse: the planner shares the entries, this file the state ---- */

/* A sequence's state at a chunk boundary besides its entries (kept in a
 * prefix node): the counters, then each layer's EMA n_chunks (K, V), then
 * ema_mem. */
typedef struct {
    int64_t n_quantized, n_outliers, n_clamped;
} kvc_snap_hdr;

static size_t snap_bytes(const kvc_pool *p)
{
    const size_t L = (size_t)p->d.n_layers, D = (size_t)p->d.kv_dim;
    return sizeof(kvc_snap_hdr) + L * 2 * sizeof(int32_t) + L * 8 * D * sizeof(float);
}

/* Copies the state of src into dst (same pool). */
static void copy_state(kvc_seq *dst, const kvc_seq *src)
{
    const kvc_pool *p = src->p;
    dst->n_quantized = src->n_quantized;
    dst->n_outliers = src->n_outliers;
    dst->n_clamped = src->n_clamped;
    memcpy(dst->ema_mem, src->ema_mem,
           (size_t)p->d.n_layers * 8 * (size_t)p->d.kv_dim * sizeof(float));
    for (int l = 0; l < p->d.n_layers; l++) {
        dst->ek[l].n_chunks = src->ek[l].n_chunks;
        dst->ev[l].n_chunks = src->ev[l].n_chunks;
    }
}

static void snap_save(const kvc_seq *s, unsigned char *d)
{
    const kvc_pool *p = s->p;
    const int L = p->d.n_layers;
    kvc_snap_hdr h = {s->n_quantized, s->n_outliers, s->n_clamped};
    memcpy(d, &h, sizeof h);
    d += sizeof h;
    for (int l = 0; l < L; l++) {
        int32_t nc[2] = {s->ek[l].n_chunks, s->ev[l].n_chunks};
        memcpy(d, nc, sizeof nc);
        d += sizeof nc;
    }
    memcpy(d, s->ema_mem, (size_t)L * 8 * (size_t)p->d.kv_dim * sizeof(float));
}

static void snap_load(kvc_seq *s, const unsigned char *d)
{
    const kvc_pool *p = s->p;
    const int L = p->d.n_layers;
    kvc_snap_hdr h;
    memcpy(&h, d, sizeof h);
    d += sizeof h;
    s->n_quantized = h.n_quantized;
    s->n_outliers = h.n_outliers;
    s->n_clamped = h.n_clamped;
    for (int l = 0; l < L; l++) {
        int32_t nc[2];
        memcpy(nc, d, sizeof nc);
        d += sizeof nc;
        s->ek[l].n_chunks = nc[0];
        s->ev[l].n_chunks = nc[1];
    }
    memcpy(s->ema_mem, d, (size_t)L * 8 * (size_t)p->d.kv_dim * sizeof(float));
}

int kvc_pool_prefix_enable(kvc_pool *p, int max_nodes, char *err, size_t errlen)
{
    if (p->g[KVC_LAYER_WINDOW].pl || !p->g[KVC_LAYER_GLOBAL].pl)
        return lkq_err(err, errlen, -ENOTSUP, "prefix reuse is not supported for models "
                       "with sliding-window layers");
    return kvp_prefix_enable(p->g[KVC_LAYER_GLOBAL].pl, max_nodes, snap_bytes(p), err,
                             errlen);
}

void kvc_pool_prefix_stats(const kvc_pool *p, kvc_prefix_stats *out)
{
    memset(out, 0, sizeof *out);
    if (p->g[KVC_LAYER_GLOBAL].pl)
        kvp_prefix_get_stats(p->g[KVC_LAYER_GLOBAL].pl, out);
}

int kvc_seq_prefix_adopt(kvc_seq *s, const int32_t *toks, int n)
{
    if (s->pl[KVC_LAYER_WINDOW] || !s->pl[KVC_LAYER_GLOBAL])
        return 0;
    const void *d;
    int k = kvp_prefix_adopt(s->pl[KVC_LAYER_GLOBAL], toks, n, &d);
    if (k > 0)
        snap_load(s, d);
    return k;
}

void kvc_seq_prefix_store(kvc_seq *s, const int32_t *toks)
{
    if (s->pl[KVC_LAYER_WINDOW] || !s->pl[KVC_LAYER_GLOBAL])
        return;
    void *d;
    if (kvp_prefix_insert(s->pl[KVC_LAYER_GLOBAL], toks, &d) == 1)
        snap_save(s, d);
}

int kvc_seq_fork(kvc_seq *dst, const kvc_seq *src, char *err, size_t errlen)
{
    const kvc_pool *p = src->p;
    if (dst->p != p || src->pl[KVC_LAYER_WINDOW])
        return lkq_err(err, errlen, -ENOTSUP, "fork: not supported for models with "
                       "sliding-window layers");
    kvp_src from;
    int32_t to;
    int rc = kvp_seq_fork(dst->pl[KVC_LAYER_GLOBAL], src->pl[KVC_LAYER_GLOBAL], &from, &to,
                          err, errlen);
    if (rc < 0)
        return rc;
    if (from.id >= 0) {
        const kvc_group *G = &p->g[KVC_LAYER_GLOBAL];
        memcpy(G->farena + (size_t)to * G->fstride, G->farena + (size_t)from.id * G->fstride,
               G->fbytes);
    }
    copy_state(dst, src);
    return 0;
}
