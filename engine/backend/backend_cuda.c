/*
 * backend_cuda.c - the CUDA backend: the table of operations bk_cuda_ops
 * (engine/backend/backend.h) over kernels/cuda, cuBLAS and the device KV
 * cache engine/kv/kvcache_cuda.h. The layer sequence is the graph's
 * (engine/graph/forward.c); this file only executes its ops on a GPU.
 *
 * Memory: everything the graph gets (activations, vectors, weights) is
 * device memory allocated once, listed in the instance and freed by
 * destroy. Weights: F32 stays F32 (cuBLAS in FP32, no TF32), F16 / BF16
 * stay as they are, quantized types are dequantized once to F16 at upload;
 * GEMMs accumulate in FP32. A 16-bit GEMM needs its input in the weight's
 * type: the conversion of the last input (conv) is kept while that input is
 * unchanged, so Q, K and V (or gate and up) share one conversion; every op
 * that writes device memory drops it when it overlaps the converted input.
 *
 * A step: step_begin uploads, in one copy, the tables every op of the step
 * reads (layout below), then the graph's ops run in order on the context's
 * one stream; only read (and the profile) waits for the device.
 *   tab: tokens [B] int32 | positions [B] int32 | attention items [S] |
 *        history segments of all slices, concatenated [cap_segs]
 * (B = max_batch, S = max_seqs; each item's seg0 points at its sequence's
 * part). The tables, the attention scratch and the KV pool are allocated by
 * pool_create (they depend on the cache configuration).
 *
 * May call: kernels/cuda (and cuBLAS through kcu_rt), kernels/ref (the
 * dequantization of quantized weights at upload), engine/kv (the device
 * KV executor kvcache_cuda and the plan's page size). Never the graph.
 *
 * Errors: kernels/cuda and cuBLAS failures are -EIO with their message
 * (after a device fault the context stays unusable and every later op
 * fails); out of device memory -ENOMEM; a call outside what the instance
 * was planned for -EINVAL; sliding-window attention -ENOTSUP.
 * Threading: an instance and its sequences are used by one thread at a
 * time (the engine thread), with the instance's kcu_ctx.
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/backend/backend.h"

#include "engine/util/err.h"
#include "engine/kv/kvcache_cuda.h"
#include "kernels/cuda/kcu_attn.cuh"
#include "kernels/cuda/kcu_bias.cuh"
#include "kernels/cuda/kcu_elem.cuh"
#include "kernels/cuda/kcu_geglu.cuh"
#include "kernels/cuda/kcu_hadamard.cuh"
#include "kernels/cuda/kcu_rmsnorm.cuh"
#include "kernels/cuda/kcu_rope.cuh"
#include "kernels/cuda/kcu_scale.cuh"
#include "kernels/cuda/kcu_softcap.cuh"
#include "kernels/cuda/kcu_swiglu.cuh"
#include "kernels/ref/kref.h"

/* A weight in device memory (rows x cols of type t: F32, F16 or BF16). */
struct bk_weight {
    kt_type t;
    void *d;
    int rows, cols;
    const void *src; /* the model's data it came from (NULL: synthetic) */
    kt_type src_t;
};

typedef struct {
    kcu_ctx *c;
    mdl_hparams hp;
    bk_config cfg; /* cfg.hp is not kept (borrowed for create only) */
    char desc[320];
    /* device memory handed out (alloc, vectors, weight data) and the weight
     * handles; freed by destroy */
    void **mem;
    int n_mem, cap_mem;
    bk_weight **wts;
    int n_wts, cap_wts;
    size_t weight_bytes;
    /* the GEMM input conversion: conv holds conv_src [conv_n] as conv_t */
    void *conv;
    size_t conv_cap; /* elements */
    const float *conv_src;
    kt_type conv_t;
    size_t conv_n;
    /* the KV pool and what depends on it */
    kvcd_pool *pool;
    cfg_kv kv;
    int kv_dim;
    /* the step's tables: tokens | positions | per layer group, its
     * attention items (one per slice) and their segments */
    char *tab_h, *tab_d;
    size_t off_pos, off_items[KVC_LAYER_KINDS], off_segs[KVC_LAYER_KINDS], tab_bytes;
    int cap_segs; /* per group */
    void *attn_scr;
    size_t attn_scr_bytes;
    int attn_path;
    /* the open step */
    bk_slice *slices; /* [max_seqs] */
    int n_sl, n_rows, max_q;
    /* device timers (BK_CTL_PROFILE_*): per layer, and the whole step from
     * step_begin to the end of its last op; a step's times are collected
     * at the next step_begin or PROFILE_GET */
    int prof, prof_open;
    kcu_timer **t_attn, **t_kv, *t_step;
    unsigned char *attn_timed, *kv_timed; /* [n_layers]: stopped in the open step */
    int step_timed;
    int64_t prof_tokens;
    bk_dev_profile pr;
} cuda_be;

/* A kernels/cuda call: its -1 becomes -EIO (the message is in err). */
#define KCU(call) ((call) < 0 ? -EIO : 0)

/* ---- memory ---------------------------------------------------------------------- */

static int dev_alloc(cuda_be *s, void **p, size_t bytes, char *err, size_t errlen)
{
    *p = NULL;
    if (s->n_mem == s->cap_mem) {
        int cap = s->cap_mem ? 2 * s->cap_mem : 64;
        void **m = realloc(s->mem, (size_t)cap * sizeof *m);
        if (!m)
            return lkq_err(err, errlen, -ENOMEM, "out of host memory");
        s->mem = m;
        s->cap_mem = cap;
    }
    if (kcu_malloc(s->c, p, bytes ? bytes : 1, err, errlen) < 0)
        return -ENOMEM;
    s->mem[s->n_mem++] = *p;
    return 0;
}

/* A weight handle listed in s (its data allocated by the caller). */
static bk_weight *new_weight(cuda_be *s, char *err, size_t errlen)
{
    if (s->n_wts == s->cap_wts) {
        int cap = s->cap_wts ? 2 * s->cap_wts : 64;
        bk_weight **w = realloc(s->wts, (size_t)cap * sizeof *w);
        if (!w) {
            lkq_err(err, errlen, -ENOMEM, "out of host memory");
            return NULL;
        }
        s->wts = w;
        s->cap_wts = cap;
    }
    bk_weight *w = calloc(1, sizeof *w);
    if (!w)
        lkq_err(err, errlen, -ENOMEM, "out of host memory");
    else
        s->wts[s->n_wts++] = w;
    return w;
}

/* An op wrote dst [n floats]: the conversion of an input it overlaps is stale. */
static void touch(cuda_be *s, const float *dst, size_t n)
{
    if (s->conv_src && dst < s->conv_src + s->conv_n && s->conv_src < dst + n)
        s->conv_src = NULL;
}

static int cu_alloc(void *be, size_t bytes, void **out, char *err, size_t errlen)
{
    return dev_alloc(be, out, bytes, err, errlen);
}

/* Dequantizes w (a quantized or half type) to F16, or with f32 to F32
 * (exact mode), into d, a bounded number of rows at a time through host
 * staging. */
static int upload_dequant(cuda_be *s, const mdl_weight *w, void *d, int f32, char *err,
                          size_t errlen)
{
    const size_t cols = (size_t)w->n_cols, rb = kt_row_bytes(w->type, w->n_cols);
    const size_t rows_per = ((size_t)8 << 20) / (cols * 4) + 1;
    float *tmp = malloc(rows_per * cols * sizeof(float));
    uint16_t *h = f32 ? NULL : malloc(rows_per * cols * sizeof(uint16_t));
    int rc = 0;
    if (!tmp || (!f32 && !h))
        rc = lkq_err(err, errlen, -ENOMEM, "out of host memory converting weights");
    for (size_t r0 = 0; rc == 0 && r0 < (size_t)w->n_rows; r0 += rows_per) {
        size_t nr = (size_t)w->n_rows - r0 < rows_per ? (size_t)w->n_rows - r0 : rows_per;
        for (size_t r = 0; r < nr; r++)
            kref_dequant_row(w->type, (const uint8_t *)w->data + (r0 + r) * rb, tmp + r * cols,
                             w->n_cols);
        if (f32) {
            rc = KCU(kcu_h2d(s->c, (float *)d + r0 * cols, tmp, nr * cols * 4, err, errlen));
            continue;
        }
        for (size_t i = 0; i < nr * cols; i++)
            h[i] = kt_f32_to_f16(tmp[i]);
        rc = KCU(kcu_h2d(s->c, (uint16_t *)d + r0 * cols, h, nr * cols * 2, err, errlen));
    }
    free(tmp);
    free(h);
    return rc;
}

static int cu_upload_weight(void *be, const mdl_weight *w, bk_weight **out, char *err,
                            size_t errlen)
{
    cuda_be *s = be;
    *out = NULL;
    if (w->n_rows <= 0 || w->n_cols <= 0 || w->n_rows > INT32_MAX || w->n_cols > INT32_MAX)
        return lkq_err(err, errlen, -EINVAL, "weight of %lld x %lld elements",
                    (long long)w->n_rows, (long long)w->n_cols);
    for (int i = 0; i < s->n_wts; i++) { /* the same tensor again (a tied head) */
        bk_weight *o = s->wts[i];
        if (o->src == w->data && o->src_t == w->type && o->rows == w->n_rows &&
            o->cols == w->n_cols) {
            *out = o;
            return 0;
        }
    }
    bk_weight *d = new_weight(s, err, errlen);
    if (!d)
        return -ENOMEM;
    d->rows = (int)w->n_rows;
    d->cols = (int)w->n_cols;
    d->src = w->data;
    d->src_t = w->type;
    /* exact mode: every weight in F32, so GEMM inputs stay f32 (no TF32) */
    int as_is = w->type == KT_F32 ||
                (!s->cfg.exact && (w->type == KT_F16 || w->type == KT_BF16));
    d->t = as_is ? w->type : s->cfg.exact ? KT_F32 : KT_F16;
    size_t bytes = kt_row_bytes(d->t, w->n_cols) * (size_t)w->n_rows;
    int rc = dev_alloc(s, &d->d, bytes, err, errlen);
    if (rc < 0)
        return rc;
    s->weight_bytes += bytes;
    rc = as_is ? KCU(kcu_h2d(s->c, d->d, w->data, bytes, err, errlen))
               : upload_dequant(s, w, d->d, d->t == KT_F32, err, errlen);
    if (rc == 0)
        *out = d;
    return rc;
}

static int cu_upload_vector(void *be, const float *v, size_t n, float **out, char *err,
                            size_t errlen)
{
    cuda_be *s = be;
    int rc = dev_alloc(s, (void **)out, n * sizeof(float), err, errlen);
    if (rc == 0)
        rc = KCU(kcu_h2d(s->c, *out, v, n * sizeof(float), err, errlen));
    if (rc == 0)
        s->weight_bytes += n * sizeof(float);
    return rc;
}

/* Random weight of rows x cols in type t: uniform with variance 1/cols
 * (amplitude sqrt(3/cols)), or amplitude amp > 0, generated on the device. */
static int cu_synth_weight(void *be, kt_type t, int rows, int cols, uint64_t seed, float amp,
                           bk_weight **out, char *err, size_t errlen)
{
    cuda_be *s = be;
    *out = NULL;
    if (t != KT_F32 && t != KT_F16 && t != KT_BF16)
        return lkq_err(err, errlen, -EINVAL, "synthetic weights must be F32, F16 or BF16, not %s",
                    kt_name(t));
    if (rows <= 0 || cols <= 0)
        return lkq_err(err, errlen, -EINVAL, "synthetic weight of %d x %d", rows, cols);
    bk_weight *d = new_weight(s, err, errlen);
    if (!d)
        return -ENOMEM;
    size_t n = (size_t)rows * (size_t)cols, bytes = n * (t == KT_F32 ? 4 : 2);
    *d = (bk_weight){t, NULL, rows, cols, NULL, t};
    int rc = dev_alloc(s, &d->d, bytes, err, errlen);
    if (rc < 0)
        return rc;
    s->weight_bytes += bytes;
    float a = amp > 0 ? amp : sqrtf(3.0f / (float)cols);
    rc = KCU(kcu_fill_uniform(s->c, t, d->d, n, seed, -a, a, err, errlen));
    if (rc == 0)
        *out = d;
    return rc;
}

static int cu_synth_vector(void *be, size_t n, float value, float **out, char *err,
                           size_t errlen)
{
    cuda_be *s = be;
    int rc = dev_alloc(s, (void **)out, n * sizeof(float), err, errlen);
    if (rc == 0)
        rc = KCU(kcu_fill_uniform(s->c, KT_F32, *out, n, 1, value, value, err, errlen));
    if (rc == 0)
        s->weight_bytes += n * sizeof(float);
    return rc;
}

static int cu_read(void *be, float *dst, const float *src, size_t n, char *err, size_t errlen)
{
    cuda_be *s = be;
    return KCU(kcu_d2h(s->c, dst, src, n * sizeof(float), err, errlen));
}

/* ---- device timers ------------------------------------------------------------------ */

static void profile_off(cuda_be *s)
{
    for (int l = 0; s->t_attn && l < s->hp.n_layers; l++)
        kcu_timer_destroy(s->t_attn[l]);
    for (int l = 0; s->t_kv && l < s->hp.n_layers; l++)
        kcu_timer_destroy(s->t_kv[l]);
    kcu_timer_destroy(s->t_step);
    free(s->t_attn);
    free(s->t_kv);
    free(s->attn_timed);
    free(s->kv_timed);
    s->t_attn = s->t_kv = NULL;
    s->t_step = NULL;
    s->attn_timed = s->kv_timed = NULL;
    s->prof = s->prof_open = 0;
}

static int profile_on(cuda_be *s, char *err, size_t errlen)
{
    if (s->prof)
        return 0;
    const size_t L = (size_t)s->hp.n_layers;
    s->t_attn = calloc(L, sizeof *s->t_attn);
    s->t_kv = calloc(L, sizeof *s->t_kv);
    s->attn_timed = calloc(L, 1);
    s->kv_timed = calloc(L, 1);
    int rc = 0;
    if (!s->t_attn || !s->t_kv || !s->attn_timed || !s->kv_timed)
        rc = lkq_err(err, errlen, -ENOMEM, "out of host memory");
    if (rc == 0)
        rc = KCU(kcu_timer_create(s->c, &s->t_step, err, errlen));
    for (size_t l = 0; rc == 0 && l < L; l++) {
        rc = KCU(kcu_timer_create(s->c, &s->t_attn[l], err, errlen));
        if (rc == 0)
            rc = KCU(kcu_timer_create(s->c, &s->t_kv[l], err, errlen));
    }
    if (rc < 0) {
        profile_off(s);
        return rc;
    }
    s->prof = 1;
    return 0;
}

/* Adds the open step's timings to the profile (waits for the step). Only
 * the timers stopped in that step count (a failed step stops early). */
static int profile_collect(cuda_be *s, char *err, size_t errlen)
{
    if (!s->prof_open)
        return 0;
    s->prof_open = 0;
    double ms;
    if (s->step_timed) {
        if (kcu_timer_ms(s->t_step, &ms, err, errlen) < 0)
            return -EIO;
        s->pr.step_ms += ms;
    }
    for (int l = 0; l < s->hp.n_layers; l++) {
        if (s->attn_timed[l]) {
            if (kcu_timer_ms(s->t_attn[l], &ms, err, errlen) < 0)
                return -EIO;
            s->pr.attn_ms += ms;
        }
        if (s->kv_timed[l]) {
            if (kcu_timer_ms(s->t_kv[l], &ms, err, errlen) < 0)
                return -EIO;
            s->pr.kv_ms += ms;
        }
    }
    s->pr.steps++;
    s->pr.tokens += s->prof_tokens;
    return 0;
}

/* The end of an op of the step (rc its result): while profiling, the step
 * timer's stop moves to here, so that the step ends with its last op. */
static int op_end(cuda_be *s, int rc, char *err, size_t errlen)
{
    if (rc == 0 && s->prof_open) {
        rc = KCU(kcu_timer_stop(s->t_step, err, errlen));
        s->step_timed = rc == 0;
    }
    return rc;
}

/* ---- instance ---------------------------------------------------------------------- */

static void cu_destroy(void *be)
{
    cuda_be *s = be;
    if (!s)
        return;
    if (s->c) {
        kvcd_pool_destroy(s->pool);
        for (int i = 0; i < s->n_mem; i++)
            kcu_free(s->c, s->mem[i]);
        profile_off(s);
        kcu_ctx_destroy(s->c);
    }
    for (int i = 0; i < s->n_wts; i++)
        free(s->wts[i]);
    free(s->wts);
    free(s->mem);
    free(s->tab_h);
    free(s->slices);
    free(s);
}

static size_t max_sz(size_t a, size_t b)
{
    return a > b ? a : b;
}

static int cu_create(const bk_config *c, void **be, char *err, size_t errlen)
{
    *be = NULL;
    const mdl_hparams *hp = c->hp;
    if (!hp || hp->n_layers <= 0 || hp->dim <= 0 || hp->n_heads <= 0 || hp->n_kv_heads <= 0 ||
        hp->head_dim <= 0 || hp->hidden_dim <= 0 || hp->n_vocab <= 0 ||
        hp->n_heads % hp->n_kv_heads)
        return lkq_err(err, errlen, -EINVAL, "unsupported model shape for the GPU");
    if (hp->head_dim > 512)
        return lkq_err(err, errlen, -EINVAL, "head_dim %d > 512 is not supported on the GPU",
                    hp->head_dim);
    if (c->max_batch <= 0 || c->max_seqs <= 0 || c->n_ctx <= 0)
        return lkq_err(err, errlen, -EINVAL, "bad plan: max_batch %d, max_seqs %d, n_ctx %d",
                    c->max_batch, c->max_seqs, c->n_ctx);
    cuda_be *s = calloc(1, sizeof *s);
    if (!s)
        return lkq_err(err, errlen, -ENOMEM, "out of host memory");
    s->hp = *hp;
    s->cfg = *c;
    s->cfg.hp = NULL;
    s->slices = calloc((size_t)c->max_seqs, sizeof *s->slices);
    if (!s->slices) {
        cu_destroy(s);
        return lkq_err(err, errlen, -ENOMEM, "out of host memory");
    }
    if (kcu_ctx_create(c->device_index, &s->c, err, errlen) < 0) {
        cu_destroy(s);
        return -ENODEV;
    }
    snprintf(s->desc, sizeof s->desc, "cuda (%s)", kcu_ctx_name(s->c));
    /* the GEMM input conversion: any matmul input of a step */
    const size_t Q = (size_t)hp->n_heads * (size_t)hp->head_dim;
    s->conv_cap = (size_t)c->max_batch *
                  max_sz(max_sz((size_t)hp->dim, Q), (size_t)hp->hidden_dim);
    int rc = dev_alloc(s, &s->conv, s->conv_cap * 2, err, errlen);
    if (rc < 0) {
        cu_destroy(s);
        return rc;
    }
    *be = s;
    return 0;
}

static const char *cu_describe(void *be)
{
    return ((cuda_be *)be)->desc;
}

static int cu_ctl(void *be, int what, void *arg, char *err, size_t errlen)
{
    cuda_be *s = be;
    switch (what) {
    case BK_CTL_ATTN_PATH: {
        int p = *(const int *)arg;
        if (p != KCU_ATTN_AUTO && p != KCU_ATTN_GENERIC && p != KCU_ATTN_MMA)
            return lkq_err(err, errlen, -EINVAL, "attention path %d (0 auto, 1 generic, 2 mma)", p);
        /* the tensor-core kernel must take every layer group's layout */
        int ok = s->pool != NULL;
        for (int g = 0; ok && g < KVC_LAYER_KINDS; g++) {
            if (!kvcd_group_arena(s->pool, g))
                continue;
            kcu_attn_shape sh = {s->hp.n_heads, s->hp.n_kv_heads, s->hp.head_dim, 1.0f,
                                 kvcd_group_layout(s->pool, g), 0};
            ok = kcu_attn_mma_supported(&sh);
        }
        if (p == KCU_ATTN_MMA && !ok)
            return lkq_err(err, errlen, -ENOTSUP, "the tensor-core attention does not take "
                        "head_dim %d with this cache layout", s->hp.head_dim);
        s->attn_path = p;
        return 0;
    }
    case BK_CTL_PROFILE_ON:
        if (*(const int *)arg)
            return profile_on(s, err, errlen);
        profile_off(s);
        return 0;
    case BK_CTL_PROFILE_GET: {
        int rc = s->prof ? profile_collect(s, err, errlen) : 0;
        *(bk_dev_profile *)arg = s->pr;
        return rc;
    }
    case BK_CTL_PROFILE_CLEAR: {
        int rc = s->prof ? profile_collect(s, err, errlen) : 0;
        memset(&s->pr, 0, sizeof s->pr);
        return rc;
    }
    case BK_CTL_WEIGHT_BYTES:
        *(size_t *)arg = s->weight_bytes;
        return 0;
    case BK_CTL_POOL_BYTES:
        *(size_t *)arg = s->pool ? kvcd_pool_bytes(s->pool) : 0;
        return 0;
    default:
        return lkq_err(err, errlen, -ENOTSUP, "the cuda backend has no control %d", what);
    }
}

/* ---- the step ------------------------------------------------------------------------- */

/* Fills the step's tables (tokens, positions per row and, per layer group,
 * one attention item per slice with seg0 at its sequence's segments in the
 * group's concatenated table) and uploads them in one copy. Every slice's
 * KV step is open. */
static int cu_step_begin(void *be, const bk_step *st, char *err, size_t errlen)
{
    cuda_be *s = be;
    if (!s->pool)
        return lkq_err(err, errlen, -EINVAL, "a step before the KV pool was created");
    if (st->n < 0 || st->n > s->cfg.max_batch || st->n_slices < 0 ||
        st->n_slices > s->cfg.max_seqs)
        return lkq_err(err, errlen, -EINVAL, "a step of %d rows in %d slices (planned: %d, %d)",
                    st->n, st->n_slices, s->cfg.max_batch, s->cfg.max_seqs);
    int32_t *tok = (int32_t *)s->tab_h;
    int32_t *pos = (int32_t *)(s->tab_h + s->off_pos);
    for (int i = 0; i < st->n; i++) {
        if (st->tokens[i] < 0 || st->tokens[i] >= s->hp.n_vocab)
            return lkq_err(err, errlen, -EINVAL, "token id %d out of range [0, %d)",
                        st->tokens[i], s->hp.n_vocab);
        tok[i] = st->tokens[i];
    }
    int n_segs[KVC_LAYER_KINDS] = {0}, max_q = 0;
    for (int c = 0; c < st->n_slices; c++) {
        const bk_slice *sl = &st->slices[c];
        if (sl->off < 0 || sl->n < 0 || sl->off + sl->n > st->n || !sl->seq)
            return lkq_err(err, errlen, -EINVAL, "slice %d: rows %d + %d of a %d-row step", c,
                        sl->off, sl->n, st->n);
        for (int i = 0; i < sl->n; i++)
            pos[sl->off + i] = sl->pos0 + i;
        for (int g = 0; g < KVC_LAYER_KINDS; g++) {
            kcu_attn_item *items = (kcu_attn_item *)(s->tab_h + s->off_items[g]);
            kcu_seg *segs = (kcu_seg *)(s->tab_h + s->off_segs[g]);
            int ns;
            const kcu_seg *src = kvcd_seq_host_segs(sl->seq, g, &ns);
            if (n_segs[g] + ns > s->cap_segs)
                return lkq_err(err, errlen, -EINVAL, "the step's histories have more than %d "
                            "segments (a sequence longer than n_ctx %d?)", s->cap_segs,
                            s->cfg.n_ctx);
            if (ns > 0)
                memcpy(segs + n_segs[g], src, (size_t)ns * sizeof *segs);
            items[c] = (kcu_attn_item){n_segs[g], ns, sl->pos0, sl->n, sl->off, sl->off,
                                       {0, 0}};
            n_segs[g] += ns;
        }
        max_q = sl->n > max_q ? sl->n : max_q;
        s->slices[c] = *sl;
    }
    s->n_sl = st->n_slices;
    s->n_rows = st->n;
    s->max_q = max_q;
    int rc = 0;
    if (s->prof) {
        rc = profile_collect(s, err, errlen); /* the previous step's */
        memset(s->attn_timed, 0, (size_t)s->hp.n_layers);
        memset(s->kv_timed, 0, (size_t)s->hp.n_layers);
        s->step_timed = 0;
        if (rc == 0)
            rc = KCU(kcu_timer_start(s->t_step, err, errlen));
        s->prof_open = rc == 0;
        s->prof_tokens = st->n;
    }
    /* what is used of the tables: up to the global group's segments, then
     * (with window layers) the window group's items and segments */
    const size_t G = KVC_LAYER_GLOBAL, W = KVC_LAYER_WINDOW;
    size_t bytes = s->off_segs[G] + (size_t)n_segs[G] * sizeof(kcu_seg);
    if (rc == 0)
        rc = KCU(kcu_h2d(s->c, s->tab_d, s->tab_h, bytes, err, errlen));
    if (rc == 0 && kvcd_group_arena(s->pool, KVC_LAYER_WINDOW))
        rc = KCU(kcu_h2d(s->c, s->tab_d + s->off_items[W], s->tab_h + s->off_items[W],
                         s->off_segs[W] - s->off_items[W] + (size_t)n_segs[W] * sizeof(kcu_seg),
                         err, errlen));
    return op_end(s, rc, err, errlen);
}

static int cu_embed(void *be, const bk_weight *table, float scale, float *x, char *err,
                    size_t errlen)
{
    cuda_be *s = be;
    const size_t n = (size_t)s->n_rows * (size_t)table->cols;
    int rc = KCU(kcu_embed(s->c, table->t, table->d, (const int32_t *)s->tab_d, s->n_rows,
                           table->cols, x, err, errlen));
    if (rc == 0 && scale != 1.0f)
        rc = KCU(kcu_scale(s->c, x, n, scale, err, errlen));
    touch(s, x, n);
    return op_end(s, rc, err, errlen);
}

/* x as input of a GEMM with weight w: itself for F32 weights, else its
 * conversion to the weight's type in conv (kept while x is unchanged). */
static const void *gemm_input(cuda_be *s, const bk_weight *w, const float *x, size_t n,
                              char *err, size_t errlen)
{
    if (w->t == KT_F32)
        return x;
    if (s->conv_src == x && s->conv_t == w->t && s->conv_n == n)
        return s->conv;
    s->conv_src = NULL;
    if (kcu_convert(s->c, w->t, s->conv, x, n, err, errlen) < 0)
        return NULL;
    s->conv_src = x;
    s->conv_t = w->t;
    s->conv_n = n;
    return s->conv;
}

static int cu_matmul(void *be, const bk_weight *w, const float *x, float *y, int n, char *err,
                     size_t errlen)
{
    cuda_be *s = be;
    const size_t nin = (size_t)n * (size_t)w->cols;
    if (n < 0 || (w->t != KT_F32 && nin > s->conv_cap))
        return lkq_err(err, errlen, -EINVAL, "matmul of %d rows x %d columns: more than planned "
                    "(%zu inputs)", n, w->cols, s->conv_cap);
    if (n == 0)
        return 0;
    const void *in = gemm_input(s, w, x, nin, err, errlen);
    int rc = in ? KCU(kcu_gemm(s->c, w->t, w->d, in, y, w->rows, w->cols, n, err, errlen))
                : -EIO;
    touch(s, y, (size_t)n * (size_t)w->rows);
    return op_end(s, rc, err, errlen);
}

static int cu_rmsnorm(void *be, float *out, const float *x, const float *w, int rows, int dim,
                      float eps, char *err, size_t errlen)
{
    cuda_be *s = be;
    int rc = KCU(kcu_rmsnorm(s->c, out, x, w, rows, dim, eps, err, errlen));
    touch(s, out, (size_t)rows * (size_t)dim);
    return op_end(s, rc, err, errlen);
}

static int cu_add_bias(void *be, float *y, const float *b, int rows, int cols, char *err,
                       size_t errlen)
{
    cuda_be *s = be;
    int rc = KCU(kcu_add_bias(s->c, y, b, rows, cols, err, errlen));
    touch(s, y, (size_t)rows * (size_t)cols);
    return op_end(s, rc, err, errlen);
}

static int cu_rope(void *be, float *x, size_t row_stride, const bk_rope *r, char *err,
                   size_t errlen)
{
    cuda_be *s = be;
    const int32_t *pos = (const int32_t *)(s->tab_d + s->off_pos);
    int rc = KCU(kcu_rope_ex(s->c, x, s->n_rows, row_stride, r->n_heads, r->head_dim, r->n_rot,
                             pos, r->theta, r->freq_scale, r->freqs, r->neox, err, errlen));
    touch(s, x, (size_t)s->n_rows * row_stride);
    return op_end(s, rc, err, errlen);
}

/* gate [rows][cols] = act(gate) * up: element-wise, so one launch over all
 * rows (each element's result does not depend on where it lies). */
static int cu_glu(void *be, float *gate, const float *up, int rows, int cols, mdl_act act,
                  char *err, size_t errlen)
{
    cuda_be *s = be;
    const size_t n = (size_t)rows * (size_t)cols;
    int rc;
    if (act == MDL_ACT_SILU)
        rc = KCU(kcu_swiglu(s->c, gate, up, n, err, errlen));
    else if (act == MDL_ACT_GELU_TANH)
        rc = KCU(kcu_geglu(s->c, gate, up, n, err, errlen));
    else
        return lkq_err(err, errlen, -ENOTSUP, "the cuda backend has no activation %d", (int)act);
    touch(s, gate, n);
    return op_end(s, rc, err, errlen);
}

static int cu_add(void *be, float *y, const float *x, size_t n, char *err, size_t errlen)
{
    cuda_be *s = be;
    int rc = KCU(kcu_add(s->c, y, x, n, err, errlen));
    touch(s, y, n);
    return op_end(s, rc, err, errlen);
}

static int cu_softcap(void *be, float *x, size_t n, float cap, char *err, size_t errlen)
{
    cuda_be *s = be;
    int rc = KCU(kcu_softcap(s->c, x, n, cap, err, errlen));
    touch(s, x, n);
    return op_end(s, rc, err, errlen);
}

static int cu_hadamard(void *be, float *x, int rows, int dim, char *err, size_t errlen)
{
    cuda_be *s = be;
    int rc = KCU(kcu_hadamard(s->c, x, rows, dim, err, errlen));
    touch(s, x, (size_t)rows * (size_t)dim);
    return op_end(s, rc, err, errlen);
}

/* One kcu_attn call over every slice of the step (the items and segments
 * of the layer's group, uploaded by step_begin; a window layer's window
 * masks what its group still holds beyond it); timed per layer while
 * profiling. */
static int cu_attention(void *be, int layer, const bk_attn *a, const float *q, float *out,
                        const float *k, const float *v, char *err, size_t errlen)
{
    cuda_be *s = be;
    if (layer < 0 || layer >= s->hp.n_layers || !s->pool)
        return lkq_err(err, errlen, -EINVAL, "attention of layer %d (of %d)", layer,
                    s->hp.n_layers);
    int li, g = kvcd_layer_group(s->pool, layer, &li);
    kcu_attn_shape sh = {a->n_heads, a->n_kv_heads, a->head_dim, a->scale,
                         kvcd_group_layout(s->pool, g), a->window};
    if (kcu_attn_scratch_bytes(&sh, s->n_sl, s->n_rows, s->max_q) > s->attn_scr_bytes)
        return lkq_err(err, errlen, -EINVAL, "attention of %d heads of %d over %d rows: more than "
                    "planned", a->n_heads, a->head_dim, s->n_rows);
    const kcu_attn_item *items_h = (const kcu_attn_item *)(s->tab_h + s->off_items[g]);
    const kcu_attn_item *items_d = (const kcu_attn_item *)(s->tab_d + s->off_items[g]);
    const kcu_seg *segs_d = (const kcu_seg *)(s->tab_d + s->off_segs[g]);
    int rc = 0;
    if (s->prof_open)
        rc = KCU(kcu_timer_start(s->t_attn[layer], err, errlen));
    if (rc == 0)
        rc = KCU(kcu_attn(s->c, &sh, kvcd_group_arena(s->pool, g), li, items_h, items_d,
                          s->n_sl, segs_d, q, out, k, v, s->attn_path, s->attn_scr,
                          s->attn_scr_bytes, err, errlen));
    if (rc == 0 && s->prof_open) {
        rc = KCU(kcu_timer_stop(s->t_attn[layer], err, errlen));
        s->attn_timed[layer] = rc == 0;
    }
    touch(s, out, (size_t)s->n_rows * (size_t)a->n_heads * (size_t)a->head_dim);
    return op_end(s, rc, err, errlen);
}

/* Each slice's rows of k, v into its sequence (kvcd_store: statistics,
 * staging, live quantization, tail). */
static int cu_kv_store(void *be, int layer, const float *k, const float *v, char *err,
                       size_t errlen)
{
    cuda_be *s = be;
    if (layer < 0 || layer >= s->hp.n_layers || !s->pool)
        return lkq_err(err, errlen, -EINVAL, "KV store of layer %d (of %d)", layer,
                    s->hp.n_layers);
    const size_t KV = (size_t)s->kv_dim;
    int rc = 0;
    if (s->prof_open)
        rc = KCU(kcu_timer_start(s->t_kv[layer], err, errlen));
    for (int i = 0; rc == 0 && i < s->n_sl; i++) {
        const bk_slice *sl = &s->slices[i];
        rc = kvcd_store(sl->seq, layer, k + (size_t)sl->off * KV, v + (size_t)sl->off * KV, err,
                        errlen);
    }
    if (rc == 0 && s->prof_open) {
        rc = KCU(kcu_timer_stop(s->t_kv[layer], err, errlen));
        s->kv_timed[layer] = rc == 0;
    }
    return op_end(s, rc, err, errlen);
}

/* ---- the KV pool and its sequences ------------------------------------------------------ */

/* The pool on the instance's context, then what depends on its
 * configuration: the step tables and the attention scratch. */
static int cu_pool_create(void *be, const cfg_kv *cfg, const kvc_dims *d,
                          const kvc_pool_sizes *sz, char *err, size_t errlen)
{
    cuda_be *s = be;
    if (s->pool)
        return lkq_err(err, errlen, -EINVAL, "the instance already has a KV pool");
    int rc = kvcd_pool_create(s->c, cfg, d, sz, &s->pool, err, errlen);
    if (rc < 0)
        return rc;
    s->kv = *cfg;
    s->kv_dim = d->kv_dim;
    const size_t B = (size_t)s->cfg.max_batch, S = (size_t)s->cfg.max_seqs;
    const int n_ctx = s->cfg.n_ctx;
    /* every slice's history is at most n_ctx positions: pages or blocks,
     * and the chunk boundaries that may split them (a window group holds
     * fewer; each group has a table of this size) */
    int unit = kvc_plan_unit_tokens(cfg);
    s->cap_segs = (int)S * (n_ctx / unit + n_ctx / cfg->chunk_size + 16);
    s->off_pos = B * sizeof(int32_t);
    size_t off = s->off_pos + B * sizeof(int32_t);
    for (int g = 0; g < KVC_LAYER_KINDS; g++) {
        s->off_items[g] = (off + 255) & ~(size_t)255;
        s->off_segs[g] = (s->off_items[g] + S * sizeof(kcu_attn_item) + 255) & ~(size_t)255;
        off = s->off_segs[g] + (size_t)s->cap_segs * sizeof(kcu_seg);
    }
    s->tab_bytes = off;
    s->tab_h = malloc(s->tab_bytes);
    if (!s->tab_h)
        rc = lkq_err(err, errlen, -ENOMEM, "out of host memory for the step tables");
    if (rc == 0)
        rc = dev_alloc(s, (void **)&s->tab_d, s->tab_bytes, err, errlen);
    kcu_attn_shape sh = {s->hp.n_heads, s->hp.n_kv_heads, s->hp.head_dim, 1.0f,
                         kvcd_pool_layout(s->pool), 0};
    int max_q = s->cfg.max_batch < cfg->chunk_size ? s->cfg.max_batch : cfg->chunk_size;
    s->attn_scr_bytes = kcu_attn_scratch_bytes(&sh, (int)S, s->cfg.max_batch, max_q);
    if (rc == 0)
        rc = dev_alloc(s, &s->attn_scr, s->attn_scr_bytes, err, errlen);
    if (rc < 0) { /* nothing of the pool stays */
        kvcd_pool_destroy(s->pool);
        s->pool = NULL;
        free(s->tab_h);
        s->tab_h = NULL;
    }
    return rc;
}

static int64_t cu_pool_capacity_bytes(void *be)
{
    cuda_be *s = be;
    return s->pool ? (int64_t)kvcd_pool_bytes(s->pool) : 0;
}

static void cu_pool_free_units(void *be, int64_t *qfree, int64_t *ffree)
{
    kvcd_pool_free_units(((cuda_be *)be)->pool, qfree, ffree);
}

static int64_t cu_pool_free_bytes(void *be)
{
    return kvcd_pool_free_bytes(((cuda_be *)be)->pool);
}

static double cu_pool_usage(void *be)
{
    return kvcd_pool_usage(((cuda_be *)be)->pool);
}

/* Outlier / clamp counts of newly committed blocks are read from the
 * device (waits). */
static int cu_pool_stats(void *be, kvc_stats *out, char *err, size_t errlen)
{
    return kvcd_pool_stats(((cuda_be *)be)->pool, out, err, errlen);
}

static const kvq_layout *cu_pool_layout(void *be)
{
    return kvcd_pool_layout(((cuda_be *)be)->pool);
}

static int cu_seq_create(void *be, int max_tokens, void **seq, char *err, size_t errlen)
{
    cuda_be *s = be;
    *seq = NULL;
    if (!s->pool)
        return lkq_err(err, errlen, -EINVAL, "a sequence before the KV pool was created");
    kvcd_seq *q = NULL;
    int rc = kvcd_seq_create(s->pool, max_tokens, &q, err, errlen);
    *seq = q;
    return rc;
}

/* The sequence ops take the kvcd_seq itself (it knows its pool). */
static void cu_seq_destroy(void *seq) { kvcd_seq_destroy(seq); }
static void cu_seq_reset(void *seq) { kvcd_seq_reset(seq); }
static int cu_seq_n_tokens(const void *seq) { return kvcd_seq_n_tokens(seq); }
static int cu_seq_warming(const void *seq) { return kvcd_seq_warming(seq); }
static int cu_seq_set_mode(void *seq, int mode, char *err, size_t errlen)
{
    return kvcd_seq_set_mode(seq, mode, err, errlen);
}
static int cu_seq_mode(const void *seq) { return kvcd_seq_mode(seq); }
static void cu_seq_held(const void *seq, kvc_stats *out) { kvcd_seq_held(seq, out); }
static void cu_kv_commit(void *seq) { kvcd_commit(seq); }
static void cu_kv_abort(void *seq) { kvcd_abort(seq); }

/* Exact accounting (reads the block headers from the device: waits). */
static int cu_seq_stats(void *seq, kvc_stats *out, char *err, size_t errlen)
{
    return kvcd_seq_stats(seq, out, err, errlen);
}

/* The first call after the EMA changed copies it from the device (waits). */
static int cu_seq_ema(void *seq, int layer, int tensor, float *lo, float *hi)
{
    return kvcd_seq_ema_mean(seq, layer, tensor, lo, hi);
}

/* kvcache_cuda.h has no per-layer outlier counts yet (they live in the
 * device block headers). */
static int cu_seq_layer_counts(void *seq, int layer, kvc_layer_counts *out, char *err,
                               size_t errlen)
{
    (void)seq;
    memset(out, 0, sizeof *out);
    return lkq_err(err, errlen, -ENOTSUP, "per-layer outlier counts (layer %d) are not read "
                "from the GPU cache yet", layer);
}

static int cu_seq_finish_prefill(void *seq, char *err, size_t errlen)
{
    return kvcd_finish_prefill(seq, err, errlen);
}

/* Reserves the step's pages / blocks and uploads the sequence's tables. */
static int cu_kv_begin(void *seq, int pos0, int n, int prefill, char *err, size_t errlen)
{
    return kvcd_begin(seq, pos0, n, prefill, err, errlen);
}

const bk_ops bk_cuda_ops = {
    .name = "cuda", .host_memory = 0,
    /* instance and memory */
    .create = cu_create, .destroy = cu_destroy, .describe = cu_describe, .ctl = cu_ctl,
    .alloc = cu_alloc, .upload_weight = cu_upload_weight, .upload_vector = cu_upload_vector,
    .synth_weight = cu_synth_weight, .synth_vector = cu_synth_vector, .read = cu_read,
    /* the ops of a step */
    .step_begin = cu_step_begin, .embed = cu_embed, .matmul = cu_matmul,
    .rmsnorm = cu_rmsnorm, .add_bias = cu_add_bias, .rope = cu_rope, .glu = cu_glu,
    .add = cu_add, .softcap = cu_softcap, .attention = cu_attention, .kv_store = cu_kv_store,
    .hadamard = cu_hadamard,
    /* the KV pool */
    .pool_create = cu_pool_create, .pool_capacity_bytes = cu_pool_capacity_bytes,
    .pool_free_units = cu_pool_free_units, .pool_usage = cu_pool_usage,
    .pool_free_bytes = cu_pool_free_bytes,
    .pool_stats = cu_pool_stats, .pool_layout = cu_pool_layout,
    /* its sequences */
    .seq_create = cu_seq_create, .seq_destroy = cu_seq_destroy, .seq_reset = cu_seq_reset,
    .seq_n_tokens = cu_seq_n_tokens, .seq_stats = cu_seq_stats, .seq_ema = cu_seq_ema,
    .seq_warming = cu_seq_warming, .seq_set_mode = cu_seq_set_mode, .seq_mode = cu_seq_mode,
    .seq_held = cu_seq_held,
    .seq_layer_counts = cu_seq_layer_counts,
    .seq_finish_prefill = cu_seq_finish_prefill, .kv_begin = cu_kv_begin,
    .kv_commit = cu_kv_commit, .kv_abort = cu_kv_abort,
};
