/*
 * kvcache_cuda.c - the GPU KV cache (see kvcache_cuda.h): an executor of the
 * KV planner (kv_plan.h), like kvcache.c. The planner, on the host, decides
 * everything (layer groups, entries, free lists, what each step reserves,
 * stages, quantizes, re-quantizes and frees, and what a window group drops
 * as its window moves on); this file owns the device side: the arenas of
 * each layer group, the EMA ranges, the step's tables (built from the plan
 * and uploaded once per step and group) and every data operation through
 * kernels/cuda (kcu_kvq_fold, kcu_kvq_quantize, kcu_kv_store_pages,
 * kcu_kv_gather_pages, kcu_kvq_count_blocks).
 *
 * A step writes only into pages/blocks reserved by kvcd_begin and not yet
 * visible (or past the visible end of the last page), so attention during
 * the step reads the history as it was before the step.
 * The INT4 counters of a sequence (n_quantized, outliers, clamped) count
 * the blocks it holds: at each commit the headers of the blocks that
 * became entries are added, those of the blocks the window dropped taken
 * away, by one small kernel each into the sequence's device counters, in
 * stream order (before a later step can reuse a dropped id); kvcd_seq_stats
 * reads them (32 bytes, waits).
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

/* One layer group of the pool: the planner's pool and its device arenas. */
typedef struct {
    kvp_pool *pl;        /* NULL: the model has no layers of this kind */
    const kvq_layout *L; /* the planner's; NULL in fp16 mode */
    kcu_kv_arena A;
    int n_layers;
} kvcd_group;

struct kvcd_pool {
    kcu_ctx *c;
    kvc_dims d;          /* the model's (layer_window: group / local below) */
    cfg_kv cfg;
    kvcd_group g[KVC_LAYER_KINDS];
    int32_t *group, *local; /* [n_layers]: layer -> group, index in the group */
    const kvq_layout *Lq;   /* the INT4 layout (the same in both groups), or NULL */
    /* device scratch shared by the pool's sequences (one thread at a time) */
    void *fold_scr;
    size_t fold_bytes;
    void *quant_scr;
    size_t quant_bytes;
    int quant_tgts;
    float *gk, *gv;    /* re-quantization rows [rq_rows][kv_dim] */
    int rq_rows;
};

/* The step's device tables of one group of a sequence (built from the plan,
 * uploaded by kvcd_begin): segments | page targets | block targets |
 * re-quantization rows | re-quantization blocks | block ids to count. */
typedef struct {
    char *htab, *dtab;
    size_t tab_bytes;
    size_t off_segs, off_ptgt, off_qtgt, off_rows, off_rqtgt, off_ids;
    int n_segs, n_ptgt, max_ptgt_n, n_qtgt, n_rows;
    int cap_ids;
} kvcd_tabs;

/* kvp_commit's callback context: a sequence and one of its groups. */
typedef struct {
    struct kvcd_seq *s;
    int g;
} kvcd_cb;

struct kvcd_seq {
    kvcd_pool *p;
    kvp_seq *pl[KVC_LAYER_KINDS]; /* entries and the step plans; owner: this */
    kvcd_cb cb[KVC_LAYER_KINDS];
    kvcd_tabs t[KVC_LAYER_KINDS];
    float *ema;                  /* device [layers][2][4][kv_dim]: lo, hi, sum_a, sum_b */
    int *ema_n;                  /* [layers][2] chunks folded */
    uint64_t ema_ver, mean_ver;  /* EMA changes; the version of ema_mean */
    float *ema_host;             /* host copy of ema (means for metrics) */
    float *ema_mean;             /* [layers][2][2] channel means of lo, hi */
    int64_t *cnt;                /* device [8]: header sums of the blocks added, dropped */
    int32_t *ids;                /* host: a commit's added then dropped block ids */
    int n_add, n_drop, cap_ids;
    int cnt_rc;                  /* a failure of the commit-time counting, or 0 */
    char cnt_err[128];
};

static size_t al256(size_t x)
{
    return (x + 255) & ~(size_t)255;
}

/* ---- pool ------------------------------------------------------------------------ */

int kvcd_pool_create(kcu_ctx *c, const cfg_kv *cfg, const kvc_dims *d, const kvc_pool_sizes *sz,
                     kvcd_pool **out, char *err, size_t errlen)
{
    *out = NULL;
    if (kvp_check(cfg, d, err, errlen) < 0)
        return -EINVAL;
    kvcd_pool *p = calloc(1, sizeof *p);
    if (!p)
        return lkq_err(err, errlen, -ENOMEM, "out of memory");
    p->c = c;
    p->d = *d;
    p->d.layer_window = NULL;
    p->cfg = *cfg;
    p->group = malloc((size_t)d->n_layers * sizeof *p->group);
    p->local = malloc((size_t)d->n_layers * sizeof *p->local);
    if (!p->group || !p->local) {
        kvcd_pool_destroy(p);
        return lkq_err(err, errlen, -ENOMEM, "out of memory");
    }
    kvp_groups gr;
    kvp_layer_groups(cfg, d, &gr, p->group, p->local);
    const int T = cfg->block_tokens, C = cfg->chunk_size, D = d->kv_dim;
    int rc = 0;
    /* the device kernels take one block layout per pool (p->Lq): kv_modes
     * may add fp16 to one quantized width, not several widths */
    if ((cfg_kv_mode_mask(cfg) & ~(1u << CFG_KV_FP16)) &
        ((cfg_kv_mode_mask(cfg) & ~(1u << CFG_KV_FP16)) - 1u)) {
        char l[160];
        cfg_kv_modes_str(cfg_kv_mode_mask(cfg), l, sizeof l);
        kvcd_pool_destroy(p);
        return lkq_err(err, errlen, -ENOTSUP, "the CUDA KV cache holds fp16 and one quantized "
                       "width per server, not several (kv_modes %s): use --device cpu, or "
                       "--kv-modes fp16,%s", l, cfg_kv_mode_name(cfg));
    }
    for (int k = 0; rc == 0 && k < KVC_LAYER_KINDS; k++) {
        kvcd_group *g = &p->g[k];
        if (gr.n_layers[k] == 0)
            continue;
        rc = kvp_pool_create(&gr.cfg[k], &gr.dims[k], k == KVC_LAYER_WINDOW ? gr.window : 0,
                             sz->n_qblocks[k], sz->n_fpages[k], &g->pl, err, errlen);
        if (rc < 0)
            break;
        g->n_layers = gr.n_layers[k];
        g->L = kvp_pool_layout(g->pl);
        if (g->L)
            p->Lq = g->L;
        size_t qbytes, fbytes, qa, fa;
        kvp_pool_unit_bytes(g->pl, &qbytes, &fbytes);
        /* a shared pool (kv_modes): one arena, units at id * its id step */
        kvp_pool_arena(g->pl, &qa, &fa, &g->A.q_stride, &g->A.f_stride);
        g->A.q_layer = g->L ? g->L->bytes : 0;
        g->A.f_layer = fbytes / (size_t)g->n_layers;
        g->A.page_tokens = kvp_pool_page_tokens(g->pl);
        g->A.kv_dim = D;
        /* the arenas: once, in device memory; zeroed so that never-written
         * page slots read as finite values */
        if (qa > 0)
            rc = kcu_malloc(c, (void **)&g->A.qarena, qa, err, errlen);
        if (rc == 0 && fa > 0)
            rc = kcu_malloc(c, (void **)&g->A.farena, fa, err, errlen);
        else if (rc == 0)
            g->A.farena = g->A.qarena; /* shared: pages live in the one arena */
        if (rc == 0 && fa > 0)
            rc = kcu_memset(c, g->A.farena, 0, fa, err, errlen);
        if (rc == 0 && g->A.qarena)
            rc = kcu_memset(c, g->A.qarena, 0, qa, err, errlen);
    }
    /* scratch: statistics of a chunk (or a decode block), quantization of a
     * chunk's blocks at a time, re-quantization rows (the planner's bound
     * of a step's re-quantization blocks), each the larger of the quantized
     * groups' (a window group's blocks are smaller: more of them a chunk) */
    int rows = C > T ? C : T;
    p->rq_rows = 0;
    p->quant_tgts = 0;
    p->quant_bytes = 0;
    for (int k = 0; rc == 0 && k < KVC_LAYER_KINDS; k++) {
        if (!p->g[k].pl || !p->g[k].L)
            continue;
        const cfg_kv *gc = kvp_pool_cfg(p->g[k].pl);
        const int Tg = gc->block_tokens;
        kvp_caps caps;
        kvp_plan_caps(gc, 1, &caps);
        if (caps.rq * Tg > p->rq_rows)
            p->rq_rows = caps.rq * Tg;
        if (C / Tg + 2 > p->quant_tgts)
            p->quant_tgts = C / Tg + 2;
    }
    for (int k = 0; rc == 0 && k < KVC_LAYER_KINDS; k++) {
        if (!p->g[k].pl || !p->g[k].L)
            continue;
        size_t qb = kcu_kvq_quant_scratch_bytes(p->g[k].L, p->quant_tgts);
        if (qb == 0)
            rc = lkq_err(err, errlen, -EINVAL, "kv_dim %d is too wide for the GPU quantizer", D);
        if (qb > p->quant_bytes)
            p->quant_bytes = qb;
    }
    if (rc == 0 && p->Lq) {
        p->fold_bytes = kcu_kvq_fold_scratch_bytes(rows, D);
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
    for (int k = 0; k < KVC_LAYER_KINDS; k++) {
        if (p->g[k].A.farena != p->g[k].A.qarena)
            kcu_free(p->c, p->g[k].A.farena);
        kcu_free(p->c, p->g[k].A.qarena);
        kvp_pool_destroy(p->g[k].pl);
    }
    kcu_free(p->c, p->fold_scr);
    kcu_free(p->c, p->quant_scr);
    kcu_free(p->c, p->gk);
    kcu_free(p->c, p->gv);
    free(p->group);
    free(p->local);
    free(p);
}

const kvq_layout *kvcd_pool_layout(const kvcd_pool *p)
{
    return p->g[KVC_LAYER_GLOBAL].L;
}

int kvcd_layer_group(const kvcd_pool *p, int layer, int *local)
{
    if (local)
        *local = p->local[layer];
    return p->group[layer];
}

const kvq_layout *kvcd_group_layout(const kvcd_pool *p, int g)
{
    return p->g[g].L;
}

const kcu_kv_arena *kvcd_group_arena(const kvcd_pool *p, int g)
{
    return p->g[g].pl ? &p->g[g].A : NULL;
}

size_t kvcd_pool_bytes(const kvcd_pool *p)
{
    size_t b = 0;
    for (int k = 0; k < KVC_LAYER_KINDS; k++)
        if (p->g[k].pl)
            b += (size_t)kvp_pool_capacity_bytes(p->g[k].pl);
    return b;
}

void kvcd_pool_kind_units(const kvcd_pool *p, int kind, int64_t *qfree, int64_t *ffree,
                          int64_t *qtotal, int64_t *ftotal)
{
    *qfree = *ffree = *qtotal = *ftotal = 0;
    if (kind < 0 || kind >= KVC_LAYER_KINDS || !p->g[kind].pl)
        return;
    kvp_pool_free_units(p->g[kind].pl, qfree, ffree);
    kvp_pool_units(p->g[kind].pl, qtotal, ftotal);
}

void kvcd_pool_free_units(const kvcd_pool *p, int64_t *qfree, int64_t *ffree)
{
    int64_t tq, tf;
    kvcd_pool_kind_units(p, KVC_LAYER_GLOBAL, qfree, ffree, &tq, &tf);
}

int64_t kvcd_pool_free_bytes(const kvcd_pool *p)
{
    return p->g[KVC_LAYER_GLOBAL].pl ? kvp_pool_free_bytes(p->g[KVC_LAYER_GLOBAL].pl) : 0;
}

void kvcd_pool_estimate(const kvcd_pool *p, int n, int64_t *nq, int64_t *nf)
{
    *nq = *nf = 0;
    if (p->g[KVC_LAYER_GLOBAL].pl)
        kvp_estimate(kvp_pool_cfg(p->g[KVC_LAYER_GLOBAL].pl), n, nq, nf);
}

double kvcd_pool_usage(const kvcd_pool *p)
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

int kvcd_pool_stats(kvcd_pool *p, kvc_stats *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    int rc = 0;
    const kvp_pool *pl0 = p->g[KVC_LAYER_GLOBAL].pl ? p->g[KVC_LAYER_GLOBAL].pl
                                                    : p->g[KVC_LAYER_WINDOW].pl;
    /* every sequence has a kvp_seq in the first group: its owner */
    for (kvp_seq *q = kvp_pool_next_seq(pl0, NULL); q; q = kvp_pool_next_seq(pl0, q)) {
        kvc_stats t;
        int r = kvcd_seq_stats(kvp_seq_owner(q), &t, err, errlen);
        if (r < 0) {
            rc = r; /* the others are still counted */
            continue;
        }
        kvp_stats_add_counts(out, &t);
    }
    for (int k = 0; k < KVC_LAYER_KINDS; k++)
        if (p->g[k].pl)
            kvp_pool_add_stats(p->g[k].pl, k, out);
    return rc;
}

/* ---- sequences ------------------------------------------------------------------- */

/* The host and device step tables of group g for sequences of max_tokens. */
static int tabs_create(kvcd_seq *s, int g, int max_tokens, char *err, size_t errlen)
{
    kvcd_pool *p = s->p;
    kvcd_tabs *t = &s->t[g];
    const int T = kvp_pool_cfg(p->g[g].pl)->block_tokens; /* the group's blocks */
    kvp_caps cap; /* the planner's tables: the device tables mirror them */
    kvp_plan_caps(kvp_pool_cfg(p->g[g].pl), max_tokens, &cap);
    t->cap_ids = cap.tgt + cap.rq + cap.ents;
    size_t off = 0;
    t->off_segs = off;
    off = al256(off + (size_t)cap.ents * sizeof(kcu_seg));
    t->off_ptgt = off;
    off = al256(off + (size_t)cap.tgt * sizeof(kcu_page_tgt));
    t->off_qtgt = off;
    off = al256(off + (size_t)cap.tgt * sizeof(kcu_q_tgt));
    t->off_rows = off;
    off = al256(off + (size_t)cap.rq * T * sizeof(kcu_page_row));
    t->off_rqtgt = off;
    off = al256(off + (size_t)cap.rq * sizeof(kcu_q_tgt));
    t->off_ids = off;
    off = al256(off + (size_t)t->cap_ids * sizeof(int32_t));
    t->tab_bytes = off;
    t->htab = malloc(off);
    if (!t->htab)
        return lkq_err(err, errlen, -ENOMEM, "out of memory for a sequence");
    if (t->cap_ids > s->cap_ids)
        s->cap_ids = t->cap_ids;
    return kcu_malloc(p->c, (void **)&t->dtab, t->tab_bytes, err, errlen) < 0 ? -ENOMEM : 0;
}

int kvcd_seq_create(kvcd_pool *p, int max_tokens, kvcd_seq **out, char *err, size_t errlen)
{
    *out = NULL;
    kvcd_seq *s = calloc(1, sizeof *s);
    if (!s)
        return lkq_err(err, errlen, -ENOMEM, "out of memory");
    s->p = p;
    const int D = p->d.kv_dim, L = p->d.n_layers;
    int rc = 0;
    for (int k = 0; rc == 0 && k < KVC_LAYER_KINDS; k++) {
        s->cb[k] = (kvcd_cb){s, k};
        if (!p->g[k].pl)
            continue;
        rc = kvp_seq_create(p->g[k].pl, max_tokens, s, &s->pl[k], err, errlen);
        if (rc == 0)
            rc = tabs_create(s, k, max_tokens, err, errlen);
    }
    if (rc < 0) {
        kvcd_seq_destroy(s);
        return rc;
    }
    s->ids = malloc((size_t)s->cap_ids * sizeof *s->ids);
    s->ema_n = calloc((size_t)L * 2, sizeof *s->ema_n);
    if (p->Lq) {
        s->ema_host = malloc((size_t)L * 8 * (size_t)D * sizeof(float));
        s->ema_mean = malloc((size_t)L * 4 * sizeof(float));
    }
    if (!s->ids || !s->ema_n || (p->Lq && (!s->ema_host || !s->ema_mean))) {
        kvcd_seq_destroy(s);
        return lkq_err(err, errlen, -ENOMEM, "out of memory for a sequence");
    }
    if (p->Lq) {
        rc = kcu_malloc(p->c, (void **)&s->ema, (size_t)L * 8 * (size_t)D * sizeof(float), err,
                        errlen);
        if (rc == 0)
            rc = kcu_malloc(p->c, (void **)&s->cnt, 8 * sizeof(int64_t), err, errlen);
    }
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
    for (int k = 0; k < KVC_LAYER_KINDS; k++)
        if (s->pl[k])
            kvp_seq_reset(s->pl[k]);
    s->n_add = s->n_drop = 0;
    s->cnt_rc = 0;
    memset(s->ema_n, 0, (size_t)s->p->d.n_layers * 2 * sizeof *s->ema_n);
    s->ema_ver++;
    /* a failure here surfaces at the next device call */
    if (s->ema)
        (void)kcu_memset(s->p->c, s->ema, 0,
                         (size_t)s->p->d.n_layers * 8 * (size_t)s->p->d.kv_dim * sizeof(float),
                         NULL, 0);
    if (s->cnt)
        (void)kcu_memset(s->p->c, s->cnt, 0, 8 * sizeof(int64_t), NULL, 0);
}

void kvcd_seq_destroy(kvcd_seq *s)
{
    if (!s)
        return;
    kvcd_pool *p = s->p;
    for (int k = 0; k < KVC_LAYER_KINDS; k++) {
        kvp_seq_destroy(s->pl[k]); /* returns its units */
        kcu_free(p->c, s->t[k].dtab);
        free(s->t[k].htab);
    }
    kcu_free(p->c, s->ema);
    kcu_free(p->c, s->cnt);
    free(s->ids);
    free(s->ema_n);
    free(s->ema_host);
    free(s->ema_mean);
    free(s);
}

/* The sequence's first group (the global one when the model has one): its
 * position and warm-up state are every group's. */
static const kvp_seq *first_seq(const kvcd_seq *s)
{
    return s->pl[KVC_LAYER_GLOBAL] ? s->pl[KVC_LAYER_GLOBAL] : s->pl[KVC_LAYER_WINDOW];
}

int kvcd_seq_set_mode(kvcd_seq *s, int mode, char *err, size_t errlen)
{
    return kvp_seq_set_mode_groups(s->pl, KVC_LAYER_KINDS, &s->p->cfg, mode, err, errlen);
}

int kvcd_seq_mode(const kvcd_seq *s)
{
    return kvp_seq_mode(first_seq(s)); /* the global group's when there is one */
}

int kvcd_seq_n_tokens(const kvcd_seq *s)
{
    return kvp_seq_n_tokens(first_seq(s));
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

static int step_active(const kvcd_seq *s)
{
    for (int k = 0; k < KVC_LAYER_KINDS; k++)
        if (s->pl[k] && kvp_seq_step(s->pl[k])->active)
            return 1;
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
        if (step_active(s) ||
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
    for (int k = 0; k < KVC_LAYER_KINDS; k++)
        if (s->pl[k] && kvp_seq_warming(s->pl[k]))
            return 1;
    return 0;
}

const kcu_seg *kvcd_seq_host_segs(const kvcd_seq *s, int g, int *n)
{
    if (!s->pl[g]) {
        *n = 0;
        return NULL;
    }
    *n = s->t[g].n_segs;
    return (const kcu_seg *)(s->t[g].htab + s->t[g].off_segs);
}

void kvcd_seq_held(const kvcd_seq *s, kvc_stats *out)
{
    kvp_seq_groups_stats(s->pl, KVC_LAYER_KINDS, out);
}

int kvcd_seq_stats(kvcd_seq *s, kvc_stats *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    if (s->cnt_rc < 0)
        return lkq_err(err, errlen, s->cnt_rc, "%s", s->cnt_err);
    int64_t h[8] = {0};
    if (s->cnt && kcu_d2h(s->p->c, h, s->cnt, sizeof h, err, errlen) < 0)
        return -EIO;
    kvcd_seq_held(s, out);
    out->n_quantized = (h[0] - h[4]) * s->p->d.kv_dim * 2;
    out->n_outliers = h[1] - h[5];
    out->n_clamped = h[2] - h[6];
    return 0;
}

/* ---- the step protocol: the planner decides, this file builds the tables ---------- */

void kvcd_abort(kvcd_seq *s)
{
    for (int k = 0; k < KVC_LAYER_KINDS; k++)
        if (s->pl[k])
            kvp_abort(s->pl[k]);
}

/* Builds group g's step tables in htab from the plan and uploads them: the
 * committed history's segments, the page and block targets, and for a
 * re-quantization its source rows and target blocks. */
static int upload_step(kvcd_seq *s, int g, char *err, size_t errlen)
{
    kvcd_pool *p = s->p;
    kvcd_tabs *t = &s->t[g];
    const int T = kvp_pool_cfg(p->g[g].pl)->block_tokens; /* the group's blocks */
    const kvp_step *st = kvp_seq_step(s->pl[g]);
    int n_ents;
    const kvp_ent *ents = kvp_seq_entries(s->pl[g], &n_ents);
    kcu_seg *sg = (kcu_seg *)(t->htab + t->off_segs);
    for (int i = 0; i < n_ents; i++) {
        const kvp_ent *e = &ents[i];
        sg[i] = (kcu_seg){e->kind == KVP_BLOCK ? KVS_Q4 : KVS_F16, e->pos0, e->n, e->id};
    }
    t->n_segs = n_ents;
    kcu_page_tgt *pt = (kcu_page_tgt *)(t->htab + t->off_ptgt);
    kcu_q_tgt *qt = (kcu_q_tgt *)(t->htab + t->off_qtgt);
    t->n_ptgt = t->n_qtgt = t->max_ptgt_n = 0;
    for (int i = 0; i < st->n_tgt; i++) {
        const kvp_tgt *tg = &st->tgt[i];
        if (tg->kind == KVP_PAGE) {
            pt[t->n_ptgt++] = (kcu_page_tgt){tg->id, tg->slot0, tg->row0, tg->n};
            if (tg->n > t->max_ptgt_n)
                t->max_ptgt_n = tg->n;
        } else {
            qt[t->n_qtgt++] = (kcu_q_tgt){tg->id, tg->row0, tg->n, 0};
        }
    }
    t->n_rows = 0;
    if (st->rq) {
        kcu_page_row *rw = (kcu_page_row *)(t->htab + t->off_rows);
        for (int i = 0; i < st->n_src; i++)
            for (int k = 0; k < st->src[i].n; k++)
                rw[t->n_rows++] = (kcu_page_row){st->src[i].id, k};
        kcu_q_tgt *rt = (kcu_q_tgt *)(t->htab + t->off_rqtgt);
        for (int i = 0; i < st->n_rq; i++) {
            int k = st->rq_tokens - i * T < T ? st->rq_tokens - i * T : T;
            rt[i] = (kcu_q_tgt){st->rq_ids[i], i * T, k, 0};
        }
    }
    size_t upto = st->rq ? t->off_rqtgt + (size_t)st->n_rq * sizeof(kcu_q_tgt)
                         : t->off_qtgt + (size_t)t->n_qtgt * sizeof(kcu_q_tgt);
    return kcu_h2d(p->c, t->dtab, t->htab, upto, err, errlen) < 0 ? -EIO : 0;
}

static int finish_group(void *ctx, int g, char *err, size_t errlen);

int kvcd_begin(kvcd_seq *s, int pos0, int n, int prefill, char *err, size_t errlen)
{
    int rc = kvp_begin_groups(s->pl, KVC_LAYER_KINDS, pos0, n, prefill, finish_group, s, err,
                              errlen);
    for (int k = 0; rc == 0 && k < KVC_LAYER_KINDS; k++)
        if (s->pl[k])
            rc = upload_step(s, k, err, errlen);
    if (rc < 0)
        kvcd_abort(s);
    return rc;
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
    const cfg_kv *c = kvp_pool_cfg(p->g[p->group[layer]].pl); /* the layer's group's knobs */
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

/* Quantizes targets tg[0..n) (device) from rows of k, v with layer's EMA
 * into its group's arena; without an outlier budget there is no V band (as
 * kvcache.c). */
static int quantize(kvcd_seq *s, int layer, const kcu_q_tgt *tg, int n, const float *k,
                    const float *v, char *err, size_t errlen)
{
    kvcd_pool *p = s->p;
    const kvcd_group *G = &p->g[p->group[layer]];
    kcu_ema_dev ek = ema_of(s, layer, 0), ev = ema_of(s, layer, 1);
    int band = p->cfg.outlier_budget > 0.0f;
    if (kcu_kvq_quantize(p->c, G->L, &G->A, p->local[layer], tg, n, p->quant_tgts, k, v,
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
    const int g = p->group[layer];
    const kvcd_tabs *t = &s->t[g];
    const kvp_step *st = kvp_seq_step(s->pl[g]);
    const int T = kvp_pool_cfg(p->g[g].pl)->block_tokens; /* the group's blocks */
    const size_t D = (size_t)p->d.kv_dim;
    const kcu_q_tgt *rt = (const kcu_q_tgt *)(t->dtab + t->off_rqtgt);
    if (st->n_rq == 0)
        return 0; /* the window passed every staged page */
    if (kcu_kv_gather_pages(p->c, &p->g[g].A, p->local[layer],
                            (const kcu_page_row *)(t->dtab + t->off_rows), t->n_rows, p->gk,
                            p->gv, err, errlen) < 0)
        return -EIO;
    if (st->rq == KVP_RQ_WARMUP)
        return quantize(s, layer, rt, st->n_rq, p->gk, p->gv, err, errlen);
    for (int b = 0; b < st->n_rq; b++) {
        int full = (b + 1) * T <= st->rq_tokens;
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
    if (layer < 0 || layer >= p->d.n_layers)
        return lkq_err(err, errlen, -EINVAL, "kvcd_store of layer %d (of %d)", layer,
                       p->d.n_layers);
    const int g = p->group[layer];
    const kvcd_tabs *t = &s->t[g];
    const kvp_step *st = kvp_seq_step(s->pl[g]);
    const size_t D = (size_t)p->d.kv_dim;
    if (!st->active)
        return lkq_err(err, errlen, -EINVAL, "kvcd_store outside a step");
    if (st->stats && st->n > st->row_stats &&
        fold(s, layer, k + (size_t)st->row_stats * D, v + (size_t)st->row_stats * D,
             st->n - st->row_stats, 1.0f, err, errlen) < 0)
        return -EIO;
    if (t->n_ptgt > 0 &&
        kcu_kv_store_pages(p->c, &p->g[g].A, p->local[layer],
                           (const kcu_page_tgt *)(t->dtab + t->off_ptgt), t->n_ptgt,
                           t->max_ptgt_n, k, v, err, errlen) < 0)
        return -EIO;
    if (t->n_qtgt > 0 &&
        quantize(s, layer, (const kcu_q_tgt *)(t->dtab + t->off_qtgt), t->n_qtgt, k, v, err,
                 errlen) < 0)
        return -EIO;
    if (st->rq)
        return requant_layer(s, layer, err, errlen);
    return 0;
}

/* kvp_commit's callback: a block that became an entry (added) or that the
 * window dropped; counted by count_commit once the commit is done. */
static void note_block(void *ctx, int32_t id, int added)
{
    const kvcd_cb *cb = ctx;
    kvcd_seq *s = cb->s;
    if (s->n_add + s->n_drop >= s->cap_ids)
        return; /* not reached: the planner's tables bound a commit's blocks */
    if (added) {
        /* the dropped ids (if any yet) move up by one */
        memmove(s->ids + s->n_add + 1, s->ids + s->n_add, (size_t)s->n_drop * sizeof *s->ids);
        s->ids[s->n_add++] = id;
    } else {
        s->ids[s->n_add + s->n_drop++] = id;
    }
}

/* Adds the headers of the blocks group g's commit added to the sequence's
 * device counters [0..3] and those it dropped to [4..7]: the ids go up in
 * the group's (idle until the next step) id table, the counting runs in
 * stream order, before any later step can write over a dropped block. */
static void count_commit(kvcd_seq *s, int g)
{
    kvcd_pool *p = s->p;
    kvcd_tabs *t = &s->t[g];
    int n = s->n_add + s->n_drop;
    if (n == 0 || !s->cnt || s->cnt_rc < 0)
        goto out;
    int32_t *dids = (int32_t *)(t->dtab + t->off_ids);
    const kcu_kv_arena *A = &p->g[g].A;
    int nl = p->g[g].n_layers;
    int rc = kcu_h2d(p->c, dids, s->ids, (size_t)n * sizeof *dids, s->cnt_err,
                     sizeof s->cnt_err);
    if (rc == 0 && s->n_add > 0)
        rc = kcu_kvq_count_blocks(p->c, A, nl, dids, s->n_add, s->cnt, s->cnt_err,
                                  sizeof s->cnt_err);
    if (rc == 0 && s->n_drop > 0)
        rc = kcu_kvq_count_blocks(p->c, A, nl, dids + s->n_add, s->n_drop, s->cnt + 4,
                                  s->cnt_err, sizeof s->cnt_err);
    if (rc < 0)
        s->cnt_rc = -EIO;
out:
    s->n_add = s->n_drop = 0;
}

void kvcd_commit(kvcd_seq *s)
{
    for (int k = 0; k < KVC_LAYER_KINDS; k++) {
        if (!s->pl[k])
            continue;
        kvp_commit(s->pl[k], note_block, &s->cb[k]);
        count_commit(s, k);
    }
}

/* Ends the prefill of group g (see kvcd_finish_prefill). */
static int finish_group(void *ctx, int g, char *err, size_t errlen)
{
    kvcd_seq *s = ctx;
    int rc = kvp_finish_prefill(s->pl[g], err, errlen);
    if (rc != KVP_REQUANT)
        return rc;
    rc = upload_step(s, g, err, errlen);
    for (int l = 0; rc == 0 && l < s->p->d.n_layers; l++)
        if (s->p->group[l] == g)
            rc = requant_layer(s, l, err, errlen);
    if (rc < 0) {
        kvp_abort(s->pl[g]);
        return rc;
    }
    kvp_commit(s->pl[g], note_block, &s->cb[g]);
    count_commit(s, g);
    return 0;
}

int kvcd_finish_prefill(kvcd_seq *s, char *err, size_t errlen)
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
