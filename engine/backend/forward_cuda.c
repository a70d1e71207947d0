/*
 * forward_cuda.c - the Llama forward pass on a CUDA GPU (see
 * forward_cuda.h). Everything runs in order on the context's one stream;
 * the host waits only for the logits (or for the profile timers).
 *
 * Device shapes (B = max_batch, D = dim, Q = n_heads * head_dim, KV =
 * n_kv_heads * head_dim, H = hidden_dim, V = n_vocab, R = logit rows):
 *   x [B][D] residual stream; xb [B][max(D, Q)]; xb2 [B][D]; q [B][Q];
 *   k, v [B][KV]; att [B][Q]; hb, hb2 [B][H]; conv: the GEMM input in the
 *   weight's 16-bit type [B][max(D, Q, H)]; logits [R][V].
 * A step is one or more slices (one per sequence) of consecutive rows; its
 * tables go up in one copy (tab, laid out as the host staging buffer):
 *   tokens [B] int32 | positions [B] int32 | attention items [S] |
 *   history segments of all slices, concatenated [S * segs per sequence]
 * (S = max(1, max_seqs)); each item's seg0 points at its sequence's part.
 */
#include "engine/backend/forward_cuda.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/kv/kvcache_cuda.h"
#include "kernels/cuda/kcu_attn.cuh"
#include "kernels/cuda/kcu_elem.cuh"
#include "kernels/cuda/kcu_rmsnorm.cuh"
#include "kernels/cuda/kcu_rope.cuh"
#include "kernels/cuda/kcu_swiglu.cuh"
#include "kernels/ref/kref.h"

typedef struct {
    kt_type t; /* KT_F32, KT_F16 or KT_BF16 */
    void *d;
    int rows, cols;
} dweight;

typedef struct {
    float *attn_norm, *ffn_norm;
    dweight wq, wk, wv, wo, gate, down, up;
} dlayer;

/* One sequence's slice of a step. */
typedef struct {
    kvcd_seq *seq;
    int off, n, pos0; /* first row, tokens, position of the first token */
} fwdc_slice;

struct fwdc_state {
    mdl_hparams hp;
    fwd_params p;
    int max_items;  /* sequences per step: max(1, max_seqs) */
    int logit_rows; /* rows of logits */
    kcu_ctx *c;
    dweight tok_embd, output;
    int output_shared;
    float *out_norm;
    dlayer *layers;
    size_t weight_bytes;
    float *x, *xb, *xb2, *q, *k, *v, *att, *hb, *hb2, *logits_d;
    void *conv;
    const float *conv_src; /* what conv holds: conversion of conv_src ... */
    kt_type conv_t;        /* ... to conv_t, conv_n values */
    size_t conv_n;
    float *logits; /* host [logit_rows][V] */
    kvcd_pool *pool;
    kvcd_seq *seq;
    /* the step's tables: host staging and its device copy (see above) */
    char *tab_h, *tab_d;
    size_t off_pos, off_items, off_segs;
    int cap_segs;        /* segments of all slices */
    fwdc_slice *slices;  /* [max_items] */
    int *head_rows;      /* [logit_rows] rows that get logits */
    void *attn_scr;
    size_t attn_scr_bytes;
    int attn_path;
    int prof;
    kcu_timer **t_attn, **t_kv, *t_step;
    fwdc_profile pr;
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

static size_t max_sz(size_t a, size_t b)
{
    return a > b ? a : b;
}

/* ---- weights ------------------------------------------------------------------------ */

static int dev_alloc(fwdc_state *s, void **p, size_t bytes, char *err, size_t errlen)
{
    if (kcu_malloc(s->c, p, bytes, err, errlen) < 0)
        return -ENOMEM;
    return 0;
}

/* Uploads w as F32 / F16 / BF16 (quantized types dequantized to F16, a
 * bounded number of rows at a time through a host staging buffer). */
static int upload_weight(fwdc_state *s, const mdl_weight *w, dweight *d, char *err,
                         size_t errlen)
{
    d->rows = (int)w->n_rows;
    d->cols = (int)w->n_cols;
    size_t n = (size_t)w->n_rows * (size_t)w->n_cols;
    if (w->type == KT_F32 || w->type == KT_F16 || w->type == KT_BF16) {
        d->t = w->type;
        size_t bytes = kt_row_bytes(w->type, w->n_cols) * (size_t)w->n_rows;
        if (dev_alloc(s, &d->d, bytes, err, errlen) < 0 ||
            kcu_h2d(s->c, d->d, w->data, bytes, err, errlen) < 0)
            return -EIO;
        s->weight_bytes += bytes;
        return 0;
    }
    d->t = KT_F16;
    if (dev_alloc(s, &d->d, n * 2, err, errlen) < 0)
        return -ENOMEM;
    s->weight_bytes += n * 2;
    size_t rb = kt_row_bytes(w->type, w->n_cols);
    size_t rows_per = ((size_t)8 << 20) / ((size_t)w->n_cols * 4) + 1;
    float *tmp = malloc(rows_per * (size_t)w->n_cols * sizeof(float));
    uint16_t *h = malloc(rows_per * (size_t)w->n_cols * sizeof(uint16_t));
    int rc = 0;
    if (!tmp || !h)
        rc = fail(err, errlen, -ENOMEM, "out of host memory converting weights");
    for (size_t r0 = 0; rc == 0 && r0 < (size_t)w->n_rows; r0 += rows_per) {
        size_t nr = (size_t)w->n_rows - r0 < rows_per ? (size_t)w->n_rows - r0 : rows_per;
        for (size_t r = 0; r < nr; r++)
            kref_dequant_row(w->type, (const uint8_t *)w->data + (r0 + r) * rb,
                             tmp + r * (size_t)w->n_cols, w->n_cols);
        for (size_t i = 0; i < nr * (size_t)w->n_cols; i++)
            h[i] = kt_f32_to_f16(tmp[i]);
        if (kcu_h2d(s->c, (uint16_t *)d->d + r0 * (size_t)w->n_cols, h,
                    nr * (size_t)w->n_cols * 2, err, errlen) < 0)
            rc = -EIO;
    }
    free(tmp);
    free(h);
    return rc;
}

static int upload_vec(fwdc_state *s, const float *v, int n, float **d, char *err, size_t errlen)
{
    if (dev_alloc(s, (void **)d, (size_t)n * sizeof(float), err, errlen) < 0 ||
        kcu_h2d(s->c, *d, v, (size_t)n * sizeof(float), err, errlen) < 0)
        return -EIO;
    s->weight_bytes += (size_t)n * sizeof(float);
    return 0;
}

/* Random weight of rows x cols in type t, uniform with variance 1/cols. */
static int synth_weight(fwdc_state *s, kt_type t, int rows, int cols, uint64_t seed,
                        float amp, dweight *d, char *err, size_t errlen)
{
    size_t n = (size_t)rows * (size_t)cols, es = t == KT_F32 ? 4 : 2;
    d->t = t;
    d->rows = rows;
    d->cols = cols;
    if (dev_alloc(s, &d->d, n * es, err, errlen) < 0)
        return -ENOMEM;
    s->weight_bytes += n * es;
    float a = amp > 0 ? amp : sqrtf(3.0f / (float)cols);
    return kcu_fill_uniform(s->c, t, d->d, n, seed, -a, a, err, errlen) < 0 ? -EIO : 0;
}

static int synth_vec(fwdc_state *s, int n, float value, float **d, char *err, size_t errlen)
{
    if (dev_alloc(s, (void **)d, (size_t)n * sizeof(float), err, errlen) < 0)
        return -ENOMEM;
    s->weight_bytes += (size_t)n * sizeof(float);
    return kcu_fill_uniform(s->c, KT_F32, *d, (size_t)n, 1, value, value, err, errlen) < 0
               ? -EIO
               : 0;
}

/* ---- creation ------------------------------------------------------------------------- */

static int check_shapes(const mdl_hparams *hp, char *err, size_t errlen)
{
    if (hp->n_layers <= 0 || hp->dim <= 0 || hp->n_heads <= 0 || hp->n_kv_heads <= 0 ||
        hp->head_dim <= 0 || hp->hidden_dim <= 0 || hp->n_vocab <= 0 ||
        hp->n_heads % hp->n_kv_heads)
        return fail(err, errlen, -EINVAL, "unsupported model shape for the GPU");
    if (hp->head_dim > 512)
        return fail(err, errlen, -EINVAL, "head_dim %d > 512 is not supported on the GPU",
                    hp->head_dim);
    return 0;
}

/* Everything but the weights: context, activations, KV pool, scratch. */
static int create_common(const mdl_hparams *hp, const fwd_params *pp, int device,
                         fwdc_state **out, char *err, size_t errlen)
{
    *out = NULL;
    if (check_shapes(hp, err, errlen) < 0)
        return -EINVAL;
    fwd_params p = pp ? *pp : fwd_default_params();
    if (p.n_ctx <= 0)
        p.n_ctx = hp->n_ctx_train > 0 ? hp->n_ctx_train : 2048;
    if (p.max_batch <= 0)
        p.max_batch = 512;
    if (p.max_seqs <= 0)
        p.max_seqs = 1;
    if (p.max_seqs == 1) { /* as fwd_create */
        if (p.max_batch > p.kv.chunk_size)
            p.max_batch = p.kv.chunk_size; /* a step never spans two chunks */
        if (p.max_batch > p.n_ctx)
            p.max_batch = p.n_ctx;
    }
    fwdc_state *s = calloc(1, sizeof *s);
    if (!s)
        return fail(err, errlen, -ENOMEM, "out of memory");
    s->hp = *hp;
    s->p = p;
    s->max_items = p.max_seqs;
    s->logit_rows = p.logits_all ? p.max_batch : 1;
    if (s->logit_rows < p.max_seqs)
        s->logit_rows = p.max_seqs < p.max_batch ? p.max_seqs : p.max_batch;
    s->layers = calloc((size_t)hp->n_layers, sizeof *s->layers);
    s->slices = calloc((size_t)s->max_items, sizeof *s->slices);
    s->head_rows = calloc((size_t)s->logit_rows, sizeof *s->head_rows);
    if (!s->layers || !s->slices || !s->head_rows) {
        free(s->slices);
        free(s->head_rows);
        free(s->layers);
        free(s);
        return fail(err, errlen, -ENOMEM, "out of memory");
    }
    if (kcu_ctx_create(device, &s->c, err, errlen) < 0) {
        fwdc_destroy(s);
        return -ENODEV;
    }
    const size_t B = (size_t)p.max_batch, D = (size_t)hp->dim, H = (size_t)hp->hidden_dim;
    const size_t Q = (size_t)hp->n_heads * (size_t)hp->head_dim;
    const size_t KV = (size_t)hp->n_kv_heads * (size_t)hp->head_dim, V = (size_t)hp->n_vocab;
    const size_t nlog = (size_t)s->logit_rows * V;
    /* the step tables: every slice's history is at most n_ctx positions
     * (kvcache.c's bound on a sequence's entries) */
    int unit = kvc_plan_page_tokens(&p.kv) < p.kv.block_tokens ? kvc_plan_page_tokens(&p.kv)
                                                                : p.kv.block_tokens;
    s->cap_segs = s->max_items * (p.n_ctx / unit + p.n_ctx / p.kv.chunk_size + 16);
    s->off_pos = B * sizeof(int32_t);
    s->off_items = (s->off_pos + B * sizeof(int32_t) + 255) & ~(size_t)255;
    s->off_segs = (s->off_items + (size_t)s->max_items * sizeof(kcu_attn_item) + 255) &
                  ~(size_t)255;
    size_t tab_bytes = s->off_segs + (size_t)s->cap_segs * sizeof(kcu_seg);
    int rc = 0;
    void **bufs[] = {(void **)&s->x, (void **)&s->xb, (void **)&s->xb2, (void **)&s->q,
                     (void **)&s->k, (void **)&s->v, (void **)&s->att, (void **)&s->hb,
                     (void **)&s->hb2, (void **)&s->logits_d, &s->conv, (void **)&s->tab_d};
    size_t sizes[] = {B * D * 4, B * max_sz(D, Q) * 4, B * D * 4, B * Q * 4, B * KV * 4,
                      B * KV * 4, B * Q * 4, B * H * 4, B * H * 4, nlog * 4,
                      B * max_sz(max_sz(D, Q), H) * 2, tab_bytes};
    for (size_t i = 0; rc == 0 && i < sizeof sizes / sizeof sizes[0]; i++)
        rc = dev_alloc(s, bufs[i], sizes[i], err, errlen);
    s->logits = malloc(nlog * sizeof(float));
    s->tab_h = malloc(tab_bytes);
    if (rc == 0 && (!s->logits || !s->tab_h))
        rc = fail(err, errlen, -ENOMEM, "out of host memory for the logits");
    /* the KV pool: planned like the CPU's (max_seqs sequences or the budget) */
    kvc_dims kd = {hp->n_layers, (int32_t)KV, hp->head_dim};
    int64_t nq = 0, nf = 0;
    if (rc == 0)
        rc = kvc_pool_plan(&p.kv, &kd, p.n_ctx, p.max_seqs, &nq, &nf, err, errlen);
    if (rc == 0)
        rc = kvcd_pool_create(s->c, &p.kv, &kd, nq, nf, &s->pool, err, errlen);
    if (rc == 0)
        rc = kvcd_seq_create(s->pool, p.n_ctx, &s->seq, err, errlen);
    kcu_attn_shape sh = {hp->n_heads, hp->n_kv_heads, hp->head_dim,
                         1.0f / sqrtf((float)hp->head_dim),
                         s->pool ? kvcd_pool_layout(s->pool) : NULL};
    int max_q = p.max_batch < p.kv.chunk_size ? p.max_batch : p.kv.chunk_size;
    s->attn_scr_bytes = kcu_attn_scratch_bytes(&sh, s->max_items, p.max_batch, max_q);
    if (rc == 0)
        rc = dev_alloc(s, &s->attn_scr, s->attn_scr_bytes, err, errlen);
    if (rc < 0) {
        fwdc_destroy(s);
        return rc;
    }
    *out = s;
    return 0;
}

int fwdc_create(const mdl_model *m, const fwd_params *p, int device, fwdc_state **out,
                char *err, size_t errlen)
{
    fwdc_state *s;
    int rc = create_common(&m->hp, p, device, &s, err, errlen);
    if (rc < 0) {
        *out = NULL;
        return rc;
    }
    const mdl_hparams *hp = &m->hp;
    rc = upload_weight(s, &m->tok_embd, &s->tok_embd, err, errlen);
    if (rc == 0 && m->output.data == m->tok_embd.data && m->output.type == m->tok_embd.type) {
        s->output = s->tok_embd; /* tied head */
        s->output_shared = 1;
    } else if (rc == 0) {
        rc = upload_weight(s, &m->output, &s->output, err, errlen);
    }
    if (rc == 0)
        rc = upload_vec(s, m->out_norm, hp->dim, &s->out_norm, err, errlen);
    for (int l = 0; rc == 0 && l < hp->n_layers; l++) {
        const mdl_layer *L = &m->layers[l];
        dlayer *d = &s->layers[l];
        rc = upload_vec(s, L->attn_norm, hp->dim, &d->attn_norm, err, errlen);
        if (rc == 0)
            rc = upload_vec(s, L->ffn_norm, hp->dim, &d->ffn_norm, err, errlen);
        const mdl_weight *src[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->ffn_gate, &L->ffn_down,
                                   &L->ffn_up};
        dweight *dst[] = {&d->wq, &d->wk, &d->wv, &d->wo, &d->gate, &d->down, &d->up};
        for (int i = 0; rc == 0 && i < 7; i++)
            rc = upload_weight(s, src[i], dst[i], err, errlen);
    }
    if (rc == 0)
        rc = kcu_sync(s->c, err, errlen) < 0 ? -EIO : 0;
    if (rc < 0) {
        fwdc_destroy(s);
        *out = NULL;
        return rc;
    }
    *out = s;
    return 0;
}

int fwdc_create_synthetic(const mdl_hparams *hp, kt_type wtype, uint64_t seed,
                          const fwd_params *p, int device, fwdc_state **out, char *err,
                          size_t errlen)
{
    if (wtype != KT_F32 && wtype != KT_F16 && wtype != KT_BF16)
        return fail(err, errlen, -EINVAL, "synthetic weights must be F32, F16 or BF16");
    fwdc_state *s;
    int rc = create_common(hp, p, device, &s, err, errlen);
    if (rc < 0) {
        *out = NULL;
        return rc;
    }
    const int D = hp->dim, H = hp->hidden_dim, V = hp->n_vocab;
    const int Q = hp->n_heads * hp->head_dim, KV = hp->n_kv_heads * hp->head_dim;
    uint64_t sd = seed * 1000;
    rc = synth_weight(s, wtype, V, D, sd++, 1.0f, &s->tok_embd, err, errlen);
    if (rc == 0)
        rc = synth_weight(s, wtype, V, D, sd++, 0.0f, &s->output, err, errlen);
    if (rc == 0)
        rc = synth_vec(s, D, 1.0f, &s->out_norm, err, errlen);
    for (int l = 0; rc == 0 && l < hp->n_layers; l++) {
        dlayer *d = &s->layers[l];
        rc = synth_vec(s, D, 1.0f, &d->attn_norm, err, errlen);
        if (rc == 0)
            rc = synth_vec(s, D, 1.0f, &d->ffn_norm, err, errlen);
        const int shp[7][2] = {{Q, D}, {KV, D}, {KV, D}, {D, Q}, {H, D}, {D, H}, {H, D}};
        dweight *dst[] = {&d->wq, &d->wk, &d->wv, &d->wo, &d->gate, &d->down, &d->up};
        for (int i = 0; rc == 0 && i < 7; i++)
            rc = synth_weight(s, wtype, shp[i][0], shp[i][1], sd++, 0.0f, dst[i], err, errlen);
    }
    if (rc == 0)
        rc = kcu_sync(s->c, err, errlen) < 0 ? -EIO : 0;
    if (rc < 0) {
        fwdc_destroy(s);
        *out = NULL;
        return rc;
    }
    *out = s;
    return 0;
}

static void free_weight(fwdc_state *s, dweight *w)
{
    kcu_free(s->c, w->d);
    w->d = NULL;
}

void fwdc_destroy(fwdc_state *s)
{
    if (!s)
        return;
    if (s->c) {
        kvcd_seq_destroy(s->seq);
        kvcd_pool_destroy(s->pool);
        free_weight(s, &s->tok_embd);
        if (!s->output_shared)
            free_weight(s, &s->output);
        kcu_free(s->c, s->out_norm);
        for (int l = 0; s->layers && l < s->hp.n_layers; l++) {
            dlayer *d = &s->layers[l];
            kcu_free(s->c, d->attn_norm);
            kcu_free(s->c, d->ffn_norm);
            dweight *ws[] = {&d->wq, &d->wk, &d->wv, &d->wo, &d->gate, &d->down, &d->up};
            for (int i = 0; i < 7; i++)
                free_weight(s, ws[i]);
        }
        void *bufs[] = {s->x, s->xb, s->xb2, s->q, s->k, s->v, s->att, s->hb, s->hb2,
                        s->logits_d, s->conv, s->tab_d, s->attn_scr};
        for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
            kcu_free(s->c, bufs[i]);
        (void)fwdc_set_profile(s, 0, NULL, 0);
        kcu_ctx_destroy(s->c);
    }
    free(s->layers);
    free(s->logits);
    free(s->tab_h);
    free(s->slices);
    free(s->head_rows);
    free(s);
}

int32_t fwdc_n_ctx(const fwdc_state *s)
{
    return s->p.n_ctx;
}

const char *fwdc_device_name(const fwdc_state *s)
{
    return kcu_ctx_name(s->c);
}

size_t fwdc_weight_bytes(const fwdc_state *s)
{
    return s->weight_bytes;
}

size_t fwdc_kv_pool_bytes(const fwdc_state *s)
{
    return kvcd_pool_bytes(s->pool);
}

int fwdc_kv_stats(fwdc_state *s, kvc_stats *out, char *err, size_t errlen)
{
    return kvcd_seq_stats(s->seq, out, err, errlen);
}

void fwdc_reset(fwdc_state *s)
{
    kvcd_seq_reset(s->seq);
}

int fwdc_finish_prefill(fwdc_state *s, char *err, size_t errlen)
{
    return kvcd_finish_prefill(s->seq, err, errlen);
}

void fwdc_set_attn_path(fwdc_state *s, int path)
{
    s->attn_path = path;
}

int fwdc_set_profile(fwdc_state *s, int on, char *err, size_t errlen)
{
    int L = s->hp.n_layers;
    if (!on || s->prof) {
        if (!on && s->prof) {
            for (int l = 0; l < L; l++) {
                kcu_timer_destroy(s->t_attn[l]);
                kcu_timer_destroy(s->t_kv[l]);
            }
            kcu_timer_destroy(s->t_step);
            free(s->t_attn);
            free(s->t_kv);
            s->t_attn = s->t_kv = NULL;
            s->t_step = NULL;
            s->prof = 0;
        }
        return 0;
    }
    s->t_attn = calloc((size_t)L, sizeof *s->t_attn);
    s->t_kv = calloc((size_t)L, sizeof *s->t_kv);
    s->prof = 1; /* so that a failure below is cleaned up by the off path */
    if (!s->t_attn || !s->t_kv) {
        (void)fwdc_set_profile(s, 0, NULL, 0);
        return fail(err, errlen, -ENOMEM, "out of memory");
    }
    int rc = kcu_timer_create(s->c, &s->t_step, err, errlen);
    for (int l = 0; rc == 0 && l < L; l++) {
        rc = kcu_timer_create(s->c, &s->t_attn[l], err, errlen);
        if (rc == 0)
            rc = kcu_timer_create(s->c, &s->t_kv[l], err, errlen);
    }
    if (rc < 0) {
        (void)fwdc_set_profile(s, 0, NULL, 0);
        return -EIO;
    }
    return 0;
}

void fwdc_get_profile(const fwdc_state *s, fwdc_profile *out)
{
    *out = s->pr;
}

void fwdc_clear_profile(fwdc_state *s)
{
    memset(&s->pr, 0, sizeof s->pr);
}

/* ---- the step ----------------------------------------------------------------------- */

/* x as input of a GEMM with weight w: itself for F32 weights, else its
 * conversion to the weight's type in conv (kept while x is unchanged). */
static const void *gemm_input(fwdc_state *s, const dweight *w, const float *x, size_t n,
                              char *err, size_t errlen)
{
    if (w->t == KT_F32)
        return x;
    if (s->conv_src == x && s->conv_t == w->t && s->conv_n == n)
        return s->conv;
    if (kcu_convert(s->c, w->t, s->conv, x, n, err, errlen) < 0)
        return NULL;
    s->conv_src = x;
    s->conv_t = w->t;
    s->conv_n = n;
    return s->conv;
}

/* y [n][w.rows] = x [n][w.cols] @ w^T */
static int gemm(fwdc_state *s, const dweight *w, const float *x, float *y, int n, char *err,
                size_t errlen)
{
    const void *in = gemm_input(s, w, x, (size_t)n * (size_t)w->cols, err, errlen);
    if (!in)
        return -EIO;
    return kcu_gemm(s->c, w->t, w->d, in, y, w->rows, w->cols, n, err, errlen) < 0 ? -EIO : 0;
}

#define TRY(call)                                                                           \
    do {                                                                                    \
        if ((call) < 0)                                                                     \
            return -EIO;                                                                    \
    } while (0)

/* Fills the step tables for the s->slices[0..n_sl) (each with an open KV
 * step; their tokens already in the staging area) and uploads them in one
 * copy: positions per row, one attention item per slice with seg0 at its
 * sequence's segments in the concatenated table. */
static int upload_tables(fwdc_state *s, int n_sl, char *err, size_t errlen)
{
    int32_t *pos = (int32_t *)(s->tab_h + s->off_pos);
    kcu_attn_item *items = (kcu_attn_item *)(s->tab_h + s->off_items);
    kcu_seg *segs = (kcu_seg *)(s->tab_h + s->off_segs);
    int n_segs = 0;
    for (int c = 0; c < n_sl; c++) {
        const fwdc_slice *sl = &s->slices[c];
        for (int i = 0; i < sl->n; i++)
            pos[sl->off + i] = sl->pos0 + i;
        int ns;
        const kcu_seg *src = kvcd_seq_host_segs(sl->seq, &ns);
        if (n_segs + ns > s->cap_segs)
            return fail(err, errlen, -EINVAL, "the step's histories have more than %d "
                        "segments (a sequence longer than n_ctx %d?)", s->cap_segs,
                        s->p.n_ctx);
        memcpy(segs + n_segs, src, (size_t)ns * sizeof *segs);
        items[c] = (kcu_attn_item){n_segs, ns, sl->pos0, sl->n, sl->off, sl->off, {0, 0}};
        n_segs += ns;
    }
    size_t bytes = s->off_segs + (size_t)n_segs * sizeof(kcu_seg);
    return kcu_h2d(s->c, s->tab_d, s->tab_h, bytes, err, errlen) < 0 ? -EIO : 0;
}

/* One step over the n rows of the s->slices[0..n_sl) (tables uploaded,
 * every slice's KV step open): every layer's K/V of each slice is stored
 * into its sequence; logits of the n_head rows in s->head_rows go to
 * logits_d rows 0 .. n_head-1. */
static int step(fwdc_state *s, int n, int n_sl, int n_head, char *err, size_t errlen)
{
    const mdl_hparams *hp = &s->hp;
    const int D = hp->dim, H = hp->hidden_dim, hd = hp->head_dim;
    const size_t Q = (size_t)hp->n_heads * hd, KV = (size_t)hp->n_kv_heads * hd;
    kcu_ctx *c = s->c;
    const int32_t *tok_d = (const int32_t *)s->tab_d;
    const int32_t *pos_d = (const int32_t *)(s->tab_d + s->off_pos);
    const kcu_attn_item *items_h = (const kcu_attn_item *)(s->tab_h + s->off_items);
    const kcu_attn_item *items_d = (const kcu_attn_item *)(s->tab_d + s->off_items);
    const kcu_seg *segs_d = (const kcu_seg *)(s->tab_d + s->off_segs);
    s->conv_src = NULL;
    TRY(kcu_embed(c, s->tok_embd.t, s->tok_embd.d, tok_d, n, D, s->x, err, errlen));
    kcu_attn_shape sh = {hp->n_heads, hp->n_kv_heads, hd, 1.0f / sqrtf((float)hd),
                         kvcd_pool_layout(s->pool)};
    const kcu_kv_arena *A = kvcd_pool_arena(s->pool);
    for (int l = 0; l < hp->n_layers; l++) {
        const dlayer *L = &s->layers[l];
        TRY(kcu_rmsnorm(c, s->xb, s->x, L->attn_norm, n, D, hp->norm_eps, err, errlen));
        s->conv_src = NULL;
        TRY(gemm(s, &L->wq, s->xb, s->q, n, err, errlen));
        TRY(gemm(s, &L->wk, s->xb, s->k, n, err, errlen));
        TRY(gemm(s, &L->wv, s->xb, s->v, n, err, errlen));
        TRY(kcu_rope_at(c, s->q, n, Q, hp->n_heads, hd, hp->n_rot, pos_d, hp->rope_theta,
                        hp->rope_freq_scale, err, errlen));
        TRY(kcu_rope_at(c, s->k, n, KV, hp->n_kv_heads, hd, hp->n_rot, pos_d, hp->rope_theta,
                        hp->rope_freq_scale, err, errlen));
        if (s->prof)
            TRY(kcu_timer_start(s->t_attn[l], err, errlen));
        TRY(kcu_attn(c, &sh, A, l, items_h, items_d, n_sl, segs_d, s->q, s->att, s->k, s->v,
                     s->attn_path, s->attn_scr, s->attn_scr_bytes, err, errlen));
        if (s->prof) {
            TRY(kcu_timer_stop(s->t_attn[l], err, errlen));
            TRY(kcu_timer_start(s->t_kv[l], err, errlen));
        }
        for (int i = 0; i < n_sl; i++) {
            const fwdc_slice *sl = &s->slices[i];
            int rc = kvcd_store(sl->seq, l, s->k + (size_t)sl->off * KV,
                                s->v + (size_t)sl->off * KV, err, errlen);
            if (rc < 0)
                return rc;
        }
        if (s->prof)
            TRY(kcu_timer_stop(s->t_kv[l], err, errlen));
        TRY(gemm(s, &L->wo, s->att, s->xb2, n, err, errlen));
        TRY(kcu_add(c, s->x, s->xb2, (size_t)n * D, err, errlen));
        TRY(kcu_rmsnorm(c, s->xb, s->x, L->ffn_norm, n, D, hp->norm_eps, err, errlen));
        s->conv_src = NULL;
        TRY(gemm(s, &L->gate, s->xb, s->hb, n, err, errlen));
        TRY(gemm(s, &L->up, s->xb, s->hb2, n, err, errlen));
        TRY(kcu_swiglu(c, s->hb, s->hb2, (size_t)n * H, err, errlen));
        TRY(gemm(s, &L->down, s->hb, s->xb2, n, err, errlen));
        TRY(kcu_add(c, s->x, s->xb2, (size_t)n * D, err, errlen));
    }
    if (n_head == 0)
        return 0;
    /* the final norm of the head rows: one call per run of consecutive rows */
    for (int i = 0; i < n_head;) {
        int k = 1;
        while (i + k < n_head && s->head_rows[i + k] == s->head_rows[i] + k)
            k++;
        TRY(kcu_rmsnorm(c, s->xb + (size_t)i * D, s->x + (size_t)s->head_rows[i] * D,
                        s->out_norm, k, D, hp->norm_eps, err, errlen));
        i += k;
    }
    s->conv_src = NULL;
    TRY(gemm(s, &s->output, s->xb, s->logits_d, n_head, err, errlen));
    return 0;
}

/* Adds the step's event timings to the profile (waits for the step). */
static int collect_profile(fwdc_state *s, int n, char *err, size_t errlen)
{
    double ms;
    TRY(kcu_timer_ms(s->t_step, &ms, err, errlen));
    s->pr.step_ms += ms;
    for (int l = 0; l < s->hp.n_layers; l++) {
        TRY(kcu_timer_ms(s->t_attn[l], &ms, err, errlen));
        s->pr.attn_ms += ms;
        TRY(kcu_timer_ms(s->t_kv[l], &ms, err, errlen));
        s->pr.kv_ms += ms;
    }
    s->pr.steps++;
    s->pr.tokens += n;
    return 0;
}

/* Runs the s->slices[0..n_sl) of n rows as one timed step (tables
 * uploaded first); the KV steps stay open. */
static int run_step(fwdc_state *s, int n, int n_sl, int n_head, char *err, size_t errlen)
{
    int rc = upload_tables(s, n_sl, err, errlen);
    if (rc == 0 && s->prof && kcu_timer_start(s->t_step, err, errlen) < 0)
        rc = -EIO;
    if (rc == 0)
        rc = step(s, n, n_sl, n_head, err, errlen);
    if (rc == 0 && s->prof)
        rc = kcu_timer_stop(s->t_step, err, errlen) < 0 ? -EIO : 0;
    if (rc == 0 && s->prof)
        rc = collect_profile(s, n, err, errlen);
    return rc;
}

int fwdc_eval(fwdc_state *s, const int32_t *tokens, int n, int pos, int want_all,
              const float **logits, char *err, size_t errlen)
{
    const mdl_hparams *hp = &s->hp;
    const size_t V = (size_t)hp->n_vocab;
    *logits = NULL;
    if (n <= 0 || pos < 0)
        return fail(err, errlen, -EINVAL, "nothing to evaluate (n %d, pos %d)", n, pos);
    if ((int64_t)pos + n > s->p.n_ctx)
        return fail(err, errlen, -ENOSPC, "context full: %d + %d tokens exceed n_ctx %d", pos, n,
                    s->p.n_ctx);
    if (want_all && (!s->p.logits_all || n > s->p.max_batch))
        return fail(err, errlen, -EINVAL, "all-token logits need logits_all and n <= %d",
                    s->p.max_batch);
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= hp->n_vocab)
            return fail(err, errlen, -EINVAL, "token id %d out of range [0, %d)", tokens[i],
                        hp->n_vocab);
    if (pos == 0 && kvcd_seq_n_tokens(s->seq) > 0)
        kvcd_seq_reset(s->seq);
    if (pos != kvcd_seq_n_tokens(s->seq))
        return fail(err, errlen, -EINVAL,
                    "position %d: the cache holds %d positions (continue at %d or restart at 0)",
                    pos, kvcd_seq_n_tokens(s->seq), kvcd_seq_n_tokens(s->seq));
    const int C = s->p.kv.chunk_size;
    const int cap = s->p.max_batch < C ? s->p.max_batch : C;
    int prefill = n > 1 || pos == 0;
    for (int done = 0; done < n;) {
        int at = pos + done;
        int b = n - done < cap ? n - done : cap;
        int to_boundary = C - at % C; /* chunks are aligned to multiples of C */
        if (b > to_boundary)
            b = to_boundary;
        int rc = kvcd_begin(s->seq, at, b, prefill, err, errlen);
        if (rc < 0)
            return rc;
        memcpy(s->tab_h, tokens + done, (size_t)b * sizeof *tokens);
        s->slices[0] = (fwdc_slice){s->seq, 0, b, at};
        int n_head = 0;
        if (want_all) {
            for (int i = 0; i < b; i++)
                s->head_rows[i] = i;
            n_head = b;
        } else if (done + b == n) {
            s->head_rows[0] = b - 1;
            n_head = 1;
        }
        rc = run_step(s, b, 1, n_head, err, errlen);
        /* all-token logits: this piece's rows, copied before the next piece
         * overwrites the device rows */
        if (rc == 0 && n_head > 0 &&
            kcu_d2h(s->c, s->logits + (want_all ? (size_t)done * V : 0), s->logits_d,
                    (size_t)n_head * V * sizeof(float), err, errlen) < 0)
            rc = -EIO;
        if (rc < 0) {
            kvcd_abort(s->seq);
            return rc;
        }
        kvcd_commit(s->seq);
        done += b;
    }
    *logits = s->logits;
    return 0;
}

kvcd_pool *fwdc_kv_pool(fwdc_state *s)
{
    return s->pool;
}

int32_t fwdc_max_batch(const fwdc_state *s)
{
    return s->p.max_batch;
}

int fwdc_eval_batch(fwdc_state *s, fwdc_item *items, int n_items, int *failed, char *err,
                    size_t errlen)
{
    const fwd_batch_limits lim = {s->p.kv.chunk_size, s->p.n_ctx, s->p.max_batch,
                                  s->logit_rows, s->hp.n_vocab};
    const size_t V = (size_t)s->hp.n_vocab;
    int total = 0, n_head = 0;
    char dummy[8];
    if (!err || !errlen) {
        err = dummy;
        errlen = sizeof dummy;
    }
    if (failed)
        *failed = -1;
    for (int i = 0; i < n_items; i++) {
        fwdc_item *it = &items[i];
        it->out_logits = NULL;
        int pos = kvcd_seq_n_tokens(it->seq);
        int rc = 0;
        if (i >= s->max_items)
            rc = fail(err, errlen, -EINVAL, "more than %d sequences in one step (max_seqs)",
                      s->max_items);
        else
            rc = fwd_batch_check_item(&lim, i, it->tokens, it->n, it->prefill, it->want_logits,
                                      pos, total, n_head, err, errlen);
        if (rc < 0) {
            if (failed)
                *failed = i;
            return rc;
        }
        memcpy((int32_t *)s->tab_h + total, it->tokens, (size_t)it->n * sizeof *it->tokens);
        s->slices[i] = (fwdc_slice){it->seq, total, it->n, pos};
        total += it->n;
        if (it->want_logits)
            s->head_rows[n_head++] = total - 1;
    }
    for (int i = 0; i < n_items; i++) {
        int rc = kvcd_begin(items[i].seq, s->slices[i].pos0, items[i].n, items[i].prefill, err,
                            errlen);
        if (rc < 0) {
            for (int j = 0; j < i; j++)
                kvcd_abort(items[j].seq);
            if (failed)
                *failed = i;
            return rc;
        }
    }
    int rc = 0;
    if (total > 0)
        rc = run_step(s, total, n_items, n_head, err, errlen);
    if (rc == 0 && n_head > 0 &&
        kcu_d2h(s->c, s->logits, s->logits_d, (size_t)n_head * V * sizeof(float), err,
                errlen) < 0)
        rc = -EIO;
    if (rc < 0) { /* a device error: the step is undone on the host side */
        for (int i = 0; i < n_items; i++)
            kvcd_abort(items[i].seq);
        return rc;
    }
    int h = 0;
    for (int i = 0; i < n_items; i++) {
        kvcd_commit(items[i].seq);
        if (items[i].want_logits)
            items[i].out_logits = s->logits + (size_t)h++ * V;
    }
    return 0;
}
