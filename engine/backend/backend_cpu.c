/*
 * backend_cpu.c - the CPU backend: the op table of backend.h over
 * kernels/cpu (SIMD + the thread pool) or, with use_ref, kernels/ref (the
 * single-threaded oracle), and the CPU KV cache (kv/kvcache.h) as the KV
 * executor. Backend memory is host memory (host_memory = 1): weights stay
 * where the model holds them (borrowed), activations are malloc'd once.
 *
 * May call: kernels/cpu, kernels/ref, engine/kv. Never the graph.
 * Threading: one thread at a time per instance (matmuls and attention
 * fan out to the instance's kcpu_pool workers; the small per-row ops run on
 * the calling thread).
 */
#include "engine/backend/backend.h"

#include "engine/util/err.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/kcpu.h"
#include "kernels/ref/kref.h"

struct bk_weight {
    mdl_weight w; /* a view of the model's tensor, or (exact mode) of its f32 copy */
    const void *src; /* the model's tensor (exact mode: finds a tied head's copy) */
    kcpu_rp *rp;     /* the repacked copy for prompt batches, or NULL */
};

/* Quantized layer weights are repacked for the integer GEMM of prompts
 * (kcpu_rp: ~3x the per-core speed of the kernels on the GGUF layout, at
 * ~10-12 bits per weight beside the model's own tensor) when the CPU path
 * is AVX-512 VNNI, unless LKQ_CPU_REPACK=0. The rows of prompt slices go
 * through the repacked copy, decode rows through the GGUF tensor (a
 * memory-bound stream, where the smaller format wins) - chosen per slice,
 * never by the step's size, so a row's logits are the same alone or
 * batched. The output head (n_vocab rows; a prompt uses it for one row) is
 * not repacked. */

typedef struct {
    kcpu_pool *pool;
    int use_ref, exact, n_threads, max_batch, max_seqs, n_ctx, head_dim, kv_dim, n_vocab;
    /* exact mode: the f32 copies made so far (a tied head reuses its table's) */
    bk_weight **f32w;
    int n_f32w;
    unsigned char *head_pf; /* [max_batch] BK_CTL_HEAD_ROWS: head row i is a prompt row */
    int n_head;             /* rows told for the next head matmul, -1 none */
    /* everything handed out (alloc, weights), freed by destroy */
    void **owned;
    int n_owned, cap_owned;
    /* the current step */
    int32_t *tokens; /* [max_batch] */
    int n;
    bk_slice *slices; /* [max_seqs] */
    int n_slices;
    /* scratch: matmul (grown as weights are uploaded), attention */
    void *ws_mm;
    size_t ws_mm_bytes;
    void *ws_attn;
    float *ref_scratch; /* kref_attn_seg: the whole history as f32 */
    kvs_seg *segs;
    int cap_segs;
    kvc_pool *kvp;
    kcpu_rp **rps; /* every repacked weight (freed by destroy) */
    int n_rps;
    size_t rp_bytes;
    char desc[96];
} cpu_be;

/* Keeps p to be freed by destroy; frees it and fails when it cannot. */
static int own(cpu_be *b, void *p, char *err, size_t errlen)
{
    if (!p)
        return lkq_err(err, errlen, -ENOMEM, "out of memory");
    if (b->n_owned == b->cap_owned) {
        int cap = b->cap_owned ? 2 * b->cap_owned : 64;
        void **o = realloc(b->owned, (size_t)cap * sizeof *o);
        if (!o) {
            free(p);
            return lkq_err(err, errlen, -ENOMEM, "out of memory");
        }
        b->owned = o;
        b->cap_owned = cap;
    }
    b->owned[b->n_owned++] = p;
    return 0;
}

static void cpu_destroy(void *be)
{
    cpu_be *b = be;
    if (!b)
        return;
    kcpu_pool_destroy(b->pool);
    kvc_pool_destroy(b->kvp);
    for (int i = 0; i < b->n_rps; i++)
        kcpu_rp_destroy(b->rps[i]);
    free(b->rps);
    for (int i = 0; i < b->n_owned; i++)
        free(b->owned[i]);
    free(b->owned);
    free(b->f32w);
    free(b->tokens);
    free(b->head_pf);
    free(b->slices);
    free(b->ws_mm);
    free(b->ws_attn);
    free(b->ref_scratch);
    free(b->segs);
    free(b);
}

static int cpu_create(const bk_config *c, void **out, char *err, size_t errlen)
{
    *out = NULL;
    cpu_be *b = calloc(1, sizeof *b);
    if (!b)
        return lkq_err(err, errlen, -ENOMEM, "out of memory");
    b->use_ref = c->use_ref;
    b->exact = c->exact;
    b->n_threads = c->n_threads > 0 ? c->n_threads : 1;
    b->max_batch = c->max_batch;
    b->max_seqs = c->max_seqs > 0 ? c->max_seqs : 1;
    b->n_ctx = c->n_ctx;
    b->head_dim = c->hp->head_dim;
    b->kv_dim = c->hp->n_kv_heads * c->hp->head_dim;
    b->n_vocab = c->hp->n_vocab;
    b->tokens = malloc((size_t)b->max_batch * sizeof *b->tokens);
    b->head_pf = malloc((size_t)b->max_batch * sizeof *b->head_pf);
    b->n_head = -1;
    b->slices = malloc((size_t)b->max_seqs * sizeof *b->slices);
    if (!b->tokens || !b->slices || !b->head_pf) {
        cpu_destroy(b);
        return lkq_err(err, errlen, -ENOMEM, "out of memory");
    }
    if (kcpu_pool_create(b->n_threads, &b->pool) < 0) {
        cpu_destroy(b);
        return lkq_err(err, errlen, -ENOMEM, "cannot start %d worker threads", c->n_threads);
    }
    snprintf(b->desc, sizeof b->desc, "cpu (%s, %d threads%s)",
             b->use_ref ? "reference" : kcpu_simd_name(), b->n_threads,
             b->exact ? ", exact f32 matmuls" : "");
    *out = b;
    return 0;
}

static const char *cpu_describe(void *be)
{
    return ((cpu_be *)be)->desc;
}

static int cpu_ctl(void *be, int what, void *arg, char *err, size_t errlen)
{
    cpu_be *b = be;
    if (what == BK_CTL_POOL_BYTES && b->kvp) {
        *(size_t *)arg = (size_t)kvc_pool_capacity_bytes(b->kvp);
        return 0;
    }
    if (what == BK_CTL_HEAD_ROWS) {
        const bk_head_rows *hr = arg;
        b->n_head = -1;
        if (hr->n < 0 || hr->n > b->max_batch)
            return lkq_err(err, errlen, -EINVAL, "%d head rows", hr->n);
        for (int i = 0; i < hr->n; i++) {
            if (hr->rows[i] < 0 || hr->rows[i] >= b->n)
                return lkq_err(err, errlen, -EINVAL, "head row %d is not a row of the step",
                               hr->rows[i]);
            b->head_pf[i] = 0;
            for (int k = 0; k < b->n_slices; k++)
                if (hr->rows[i] >= b->slices[k].off &&
                    hr->rows[i] < b->slices[k].off + b->slices[k].n)
                    b->head_pf[i] = b->slices[k].prefill != 0;
        }
        b->n_head = hr->n;
        return 0;
    }
    if (what == BK_CTL_WEIGHT_BYTES) {
        *(size_t *)arg = b->rp_bytes; /* else the model's own mapping */
        return 0;
    }
    return lkq_err(err, errlen, -ENOTSUP, "control %d is not supported by the cpu backend", what);
}

/* ---- memory --------------------------------------------------------------------- */

static int cpu_alloc(void *be, size_t bytes, void **out, char *err, size_t errlen)
{
    *out = malloc(bytes > 0 ? bytes : 1);
    int rc = own(be, *out, err, errlen);
    if (rc < 0)
        *out = NULL;
    return rc;
}

/* Exact mode: h->w becomes an f32 copy of a quantized / half tensor (the
 * one made for the same tensor before, when a tied head asks again), so
 * kcpu_matmul takes its f32 path (f32 activations, fixed order per row). */
static int to_f32(cpu_be *b, bk_weight *h, char *err, size_t errlen)
{
    const mdl_weight *w = &h->w;
    for (int i = 0; i < b->n_f32w; i++) {
        const bk_weight *o = b->f32w[i];
        if (o->src == w->data && o->w.n_rows == w->n_rows && o->w.n_cols == w->n_cols) {
            h->w = o->w;
            return 0;
        }
    }
    bk_weight **grown = realloc(b->f32w, (size_t)(b->n_f32w + 1) * sizeof *grown);
    if (!grown)
        return lkq_err(err, errlen, -ENOMEM, "out of memory");
    b->f32w = grown;
    const size_t rb = kt_row_bytes(w->type, w->n_cols);
    float *f = malloc((size_t)w->n_rows * (size_t)w->n_cols * sizeof(float));
    int rc = own(b, f, err, errlen);
    if (rc < 0)
        return lkq_err(err, errlen, rc, "out of memory for the f32 copy of a %lld x %lld "
                       "weight (exact mode)", (long long)w->n_rows, (long long)w->n_cols);
    for (int64_t r = 0; r < w->n_rows; r++)
        kref_dequant_row(w->type, (const uint8_t *)w->data + (size_t)r * rb,
                         f + (size_t)r * (size_t)w->n_cols, w->n_cols);
    h->w.data = f;
    h->w.type = KT_F32;
    b->f32w[b->n_f32w++] = h;
    return 0;
}

static int cpu_upload_weight(void *be, const mdl_weight *w, bk_weight **out, char *err,
                             size_t errlen)
{
    cpu_be *b = be;
    *out = NULL;
    bk_weight *h = malloc(sizeof *h);
    int rc = own(b, h, err, errlen);
    if (rc < 0)
        return rc;
    h->w = *w;
    h->src = w->data;
    if (b->exact && w->type != KT_F32 && (rc = to_f32(b, h, err, errlen)) < 0)
        return rc;
    w = &h->w;
    h->rp = NULL;
    const char *env = getenv("LKQ_CPU_REPACK");
    if (!b->use_ref && !b->exact && kt_is_quant(w->type) && w->n_rows != b->n_vocab &&
        kcpu_rp_wanted() && !(env && !strcmp(env, "0"))) {
        kcpu_rp **grown = realloc(b->rps, (size_t)(b->n_rps + 1) * sizeof *grown);
        if (!grown)
            return lkq_err(err, errlen, -ENOMEM, "out of memory");
        b->rps = grown;
        h->rp = kcpu_rp_create(w->type, w->data, (int)w->n_rows, (int)w->n_cols);
        if (!h->rp)
            return lkq_err(err, errlen, -ENOMEM, "out of memory repacking a %lld x %lld %s "
                           "weight (LKQ_CPU_REPACK=0 keeps the file's layout only)",
                           (long long)w->n_rows, (long long)w->n_cols, kt_name(w->type));
        b->rps[b->n_rps++] = h->rp;
        b->rp_bytes += kcpu_rp_bytes(h->rp);
    }
    /* the matmul scratch for this weight at a full step, grown once here */
    size_t need = kcpu_matmul_scratch_bytes(w->type, (int)w->n_cols, b->max_batch);
    if (h->rp && kcpu_rp_scratch_bytes((int)w->n_cols, b->max_batch) > need)
        need = kcpu_rp_scratch_bytes((int)w->n_cols, b->max_batch);
    if (need > b->ws_mm_bytes) {
        void *ws = realloc(b->ws_mm, need);
        if (!ws)
            return lkq_err(err, errlen, -ENOMEM, "out of memory for matmul scratch");
        b->ws_mm = ws;
        b->ws_mm_bytes = need;
    }
    *out = h;
    return 0;
}

static int cpu_upload_vector(void *be, const float *v, size_t n, float **out, char *err,
                             size_t errlen)
{
    (void)be;
    (void)n;
    (void)err;
    (void)errlen;
    *out = (float *)v; /* host memory already; the model outlives the backend */
    return 0;
}

static int cpu_read(void *be, float *dst, const float *src, size_t n, char *err, size_t errlen)
{
    (void)be;
    (void)err;
    (void)errlen;
    if (dst != src)
        memcpy(dst, src, n * sizeof(float));
    return 0;
}

/* ---- the step's ops --------------------------------------------------------------- */

static int cpu_step_begin(void *be, const bk_step *st, char *err, size_t errlen)
{
    cpu_be *b = be;
    if (st->n > b->max_batch || st->n_slices > b->max_seqs)
        return lkq_err(err, errlen, -EINVAL, "step of %d rows / %d sequences exceeds %d / %d",
                    st->n, st->n_slices, b->max_batch, b->max_seqs);
    memcpy(b->tokens, st->tokens, (size_t)st->n * sizeof *b->tokens);
    memcpy(b->slices, st->slices, (size_t)st->n_slices * sizeof *b->slices);
    b->n = st->n;
    b->n_slices = st->n_slices;
    return 0;
}

static int cpu_embed(void *be, const bk_weight *table, float scale, float *x, char *err,
                     size_t errlen)
{
    cpu_be *b = be;
    (void)err;
    (void)errlen;
    const mdl_weight *w = &table->w;
    const size_t D = (size_t)w->n_cols, row = kt_row_bytes(w->type, w->n_cols);
    for (int i = 0; i < b->n; i++) {
        const uint8_t *src = (const uint8_t *)w->data + (size_t)b->tokens[i] * row;
        float *xi = x + (size_t)i * D;
        if (b->use_ref)
            kref_dequant_row(w->type, src, xi, (int64_t)D);
        else
            kcpu_dequant_row(w->type, src, xi, (int64_t)D);
        if (scale != 1.0f)
            for (size_t j = 0; j < D; j++)
                xi[j] *= scale;
    }
    return 0;
}

static int cpu_matmul(void *be, const bk_weight *wt, const float *x, float *y, int n, char *err,
                      size_t errlen)
{
    cpu_be *b = be;
    (void)err;
    (void)errlen;
    const mdl_weight *w = &wt->w;
    const int rows = (int)w->n_rows, cols = (int)w->n_cols;
    if (b->use_ref) {
        kref_matmul(w->type, w->data, x, y, rows, cols, n);
        return 0;
    }
    if (rows == b->n_vocab && b->n_head == n) {
        /* the output head, its rows' kinds told (BK_CTL_HEAD_ROWS): runs of
         * one kind, prompt rows split, decode rows not */
        b->n_head = -1;
        for (int i = 0; i < n;) {
            int j = i + 1;
            while (j < n && b->head_pf[j] == b->head_pf[i])
                j++;
            kcpu_matmul_ex(b->pool, w->type, w->data, wt->rp, b->head_pf[i] ? -1.0f : 0.0f,
                           x + (size_t)i * (size_t)cols, y + (size_t)i * (size_t)rows, rows,
                           cols, j - i, b->ws_mm);
            i = j;
        }
        return 0;
    }
    if (n != b->n || b->n_slices == 0 || rows == b->n_vocab) {
        /* not the step's rows (or an output head whose rows were not told):
         * one call, outliers split */
        kcpu_matmul_ex(b->pool, w->type, w->data, wt->rp, -1.0f, x, y, rows, cols, n,
                       b->ws_mm);
        return 0;
    }
    /* runs of consecutive slices of one kind (prompt / decode): prompt rows
     * take the repacked GEMM where there is one and split their activation
     * outliers (kcpu.h); decode rows the GGUF tensor's kernels without the
     * split (its column fetches would cost a decode step more than they
     * give) - chosen by a row's kind, never by what else is batched */
    for (int i = 0; i < b->n_slices;) {
        const int pf = b->slices[i].prefill != 0, r0 = b->slices[i].off;
        int j = i + 1;
        while (j < b->n_slices && (b->slices[j].prefill != 0) == pf)
            j++;
        const int r1 = j < b->n_slices ? b->slices[j].off : n;
        const float *xr = x + (size_t)r0 * (size_t)cols;
        float *yr = y + (size_t)r0 * (size_t)rows;
        if (pf && wt->rp)
            kcpu_matmul_rp(b->pool, wt->rp, xr, yr, r1 - r0, b->ws_mm);
        else
            kcpu_matmul_ex(b->pool, w->type, w->data, wt->rp, pf ? -1.0f : 0.0f, xr, yr, rows,
                           cols, r1 - r0, b->ws_mm);
        i = j;
    }
    return 0;
}

static int cpu_rmsnorm(void *be, float *out, const float *x, const float *w, int rows, int dim,
                       float eps, char *err, size_t errlen)
{
    cpu_be *b = be;
    (void)err;
    (void)errlen;
    for (int i = 0; i < rows; i++) {
        float *o = out + (size_t)i * (size_t)dim;
        const float *xi = x + (size_t)i * (size_t)dim;
        if (b->use_ref)
            kref_rmsnorm(o, xi, w, dim, eps);
        else
            kcpu_rmsnorm(o, xi, w, dim, eps);
    }
    return 0;
}

static int cpu_add_bias(void *be, float *y, const float *bias, int rows, int cols, char *err,
                        size_t errlen)
{
    (void)be;
    (void)err;
    (void)errlen;
    for (int i = 0; i < rows; i++) {
        float *yi = y + (size_t)i * (size_t)cols;
        for (int j = 0; j < cols; j++)
            yi[j] += bias[j];
    }
    return 0;
}

static int cpu_rope(void *be, float *x, size_t row_stride, const bk_rope *r, char *err,
                    size_t errlen)
{
    cpu_be *b = be;
    (void)err;
    (void)errlen;
    for (int c = 0; c < b->n_slices; c++) {
        const bk_slice *sl = &b->slices[c];
        for (int i = 0; i < sl->n; i++) {
            float *xi = x + (size_t)(sl->off + i) * row_stride;
            if (b->use_ref)
                kref_rope_ex(xi, r->n_heads, r->head_dim, r->n_rot, sl->pos0 + i, r->theta,
                             r->freq_scale, r->freqs, r->neox);
            else
                kcpu_rope_ex(xi, r->n_heads, r->head_dim, r->n_rot, sl->pos0 + i, r->theta,
                             r->freq_scale, r->freqs, r->neox);
        }
    }
    return 0;
}

static int cpu_glu(void *be, float *gate, const float *up, int rows, int cols, mdl_act act,
                   char *err, size_t errlen)
{
    cpu_be *b = be;
    if (act != MDL_ACT_SILU && act != MDL_ACT_GELU_TANH)
        return lkq_err(err, errlen, -ENOTSUP, "activation %d is not supported", (int)act);
    size_t n = (size_t)rows * (size_t)cols; /* the rows are contiguous */
    if (!b->use_ref) {
        kcpu_glu(b->pool, act == MDL_ACT_GELU_TANH, gate, up, n);
        return 0;
    }
    if (act == MDL_ACT_SILU)
        kref_swiglu(gate, up, (int)n);
    else
        kref_geglu(gate, up, (int)n);
    return 0;
}

static int cpu_add(void *be, float *y, const float *x, size_t n, char *err, size_t errlen)
{
    (void)be;
    (void)err;
    (void)errlen;
    for (size_t i = 0; i < n; i++)
        y[i] += x[i];
    return 0;
}

static int cpu_softcap(void *be, float *x, size_t n, float cap, char *err, size_t errlen)
{
    cpu_be *b = be;
    (void)err;
    (void)errlen;
    if (b->use_ref)
        kref_softcap(x, (int)n, cap);
    else
        kcpu_softcap(x, (int)n, cap);
    return 0;
}

static int cpu_hadamard(void *be, float *x, int rows, int dim, char *err, size_t errlen)
{
    cpu_be *b = be;
    if (dim < 1 || dim > 4096 || (dim & (dim - 1)))
        return lkq_err(err, errlen, -EINVAL, "rotation of %d channels: not a power of two "
                       "in [1, 4096]", dim);
    if (b->use_ref)
        kref_hadamard(x, rows, dim);
    else
        kcpu_hadamard(x, rows, dim);
    return 0;
}

static int cpu_attention(void *be, int layer, const bk_attn *a, const float *q, float *out,
                         const float *k, const float *v, char *err, size_t errlen)
{
    cpu_be *b = be;
    (void)err;
    (void)errlen;
    const size_t KV = (size_t)a->n_kv_heads * (size_t)a->head_dim;
    const size_t Q = (size_t)a->n_heads * (size_t)a->head_dim;
    for (int c = 0; c < b->n_slices; c++) {
        const bk_slice *sl = &b->slices[c];
        /* the blocks of this sequence's mode in the layer's group */
        const kvq_layout *L = kvc_seq_layer_layout(sl->seq, layer);
        const size_t off = (size_t)sl->off;
        int ns = kvc_segments(sl->seq, layer, b->segs, b->cap_segs - 1);
        b->segs[ns++] = (kvs_seg){KVS_F32, sl->pos0, sl->n, k + off * KV, v + off * KV, KV};
        float *o = out + off * Q;
        const float *qs = q + off * Q;
        if (b->use_ref) {
            for (int i = 0; i < sl->n; i++)
                kref_attn_seg(o + (size_t)i * Q, qs + (size_t)i * Q, sl->pos0 + i, a->window,
                              b->segs, ns, L, a->n_heads, a->n_kv_heads, a->head_dim, a->scale,
                              b->ref_scratch);
        } else {
            kcpu_attn_seg(b->pool, o, qs, sl->pos0, sl->n, a->window, b->segs, ns, L, a->n_heads,
                          a->n_kv_heads, a->head_dim, a->scale, b->ws_attn);
        }
    }
    return 0;
}

static int cpu_kv_store(void *be, int layer, const float *k, const float *v, char *err,
                        size_t errlen)
{
    cpu_be *b = be;
    (void)err;
    (void)errlen;
    const size_t KV = (size_t)b->kv_dim;
    for (int c = 0; c < b->n_slices; c++) {
        const bk_slice *sl = &b->slices[c];
        kvc_store(sl->seq, layer, k + (size_t)sl->off * KV, v + (size_t)sl->off * KV);
    }
    return 0;
}

/* ---- KV pool and sequences ------------------------------------------------------ */

static int cpu_pool_create(void *be, const cfg_kv *cfg, const kvc_dims *d,
                           const kvc_pool_sizes *sz, char *err, size_t errlen)
{
    cpu_be *b = be;
    if (b->kvp)
        return lkq_err(err, errlen, -EINVAL, "the backend already has a KV pool");
    int rc = kvc_pool_create(cfg, d, sz, &b->kvp, err, errlen);
    if (rc < 0)
        return rc;
    /* the scratch of the widest block layout (global or window layers) */
    size_t ws = kcpu_attn_seg_scratch_bytes(b->n_threads, NULL, b->head_dim);
    const kvq_layout *lay[2 * CFG_KV_MODES];
    size_t n_lay = kvc_pool_attn_layouts(b->kvp, lay, 2 * CFG_KV_MODES);
    for (size_t i = 0; i < n_lay; i++) {
        size_t w = kcpu_attn_seg_scratch_bytes(b->n_threads, lay[i], b->head_dim);
        ws = w > ws ? w : ws;
    }
    b->ws_attn = malloc(ws > 0 ? ws : 1);
    if (!b->ws_attn)
        return lkq_err(err, errlen, -ENOMEM, "out of memory for attention scratch");
    if (b->use_ref) {
        /* dequantize-then-attend needs the whole history as f32 */
        size_t fl = ((size_t)b->n_ctx + (size_t)cfg->block_tokens) * (size_t)d->kv_dim * 2 +
                    (size_t)b->n_ctx + 64;
        b->ref_scratch = malloc(fl * sizeof(float));
        if (!b->ref_scratch)
            return lkq_err(err, errlen, -ENOMEM, "out of memory for the reference attention");
    }
    return 0;
}

static int64_t cpu_pool_capacity_bytes(void *be)
{
    return kvc_pool_capacity_bytes(((cpu_be *)be)->kvp);
}

static void cpu_pool_free_units(void *be, int64_t *qfree, int64_t *ffree)
{
    kvc_pool_free_units(((cpu_be *)be)->kvp, qfree, ffree);
}

static int64_t cpu_pool_free_bytes(void *be)
{
    return kvc_pool_free_bytes(((cpu_be *)be)->kvp);
}

static double cpu_pool_usage(void *be)
{
    return kvc_pool_usage(((cpu_be *)be)->kvp);
}

static int cpu_pool_stats(void *be, kvc_stats *out, char *err, size_t errlen)
{
    (void)err;
    (void)errlen;
    kvc_pool_stats(((cpu_be *)be)->kvp, out);
    return 0;
}

static const kvq_layout *cpu_pool_layout(void *be)
{
    return kvc_pool_layout(((cpu_be *)be)->kvp);
}

static int cpu_seq_create(void *be, int max_tokens, void **out, char *err, size_t errlen)
{
    cpu_be *b = be;
    kvc_seq *q = NULL;
    *out = NULL;
    int rc = kvc_seq_create(b->kvp, max_tokens, &q, err, errlen);
    if (rc < 0)
        return rc;
    /* the segment table must hold this sequence's history plus the step */
    int need = kvc_max_segments(q) + 1;
    if (need > b->cap_segs) {
        kvs_seg *segs = realloc(b->segs, (size_t)need * sizeof *segs);
        if (!segs) {
            kvc_seq_destroy(q);
            return lkq_err(err, errlen, -ENOMEM, "out of memory for a segment table");
        }
        b->segs = segs;
        b->cap_segs = need;
    }
    *out = q;
    return 0;
}

static void cpu_seq_destroy(void *q)
{
    kvc_seq_destroy(q);
}

static void cpu_seq_reset(void *q)
{
    kvc_seq_reset(q);
}

static int cpu_seq_n_tokens(const void *q)
{
    return kvc_seq_n_tokens(q);
}

static int cpu_seq_stats(void *q, kvc_stats *out, char *err, size_t errlen)
{
    (void)err;
    (void)errlen;
    kvc_seq_stats(q, out);
    return 0;
}

static int cpu_seq_ema(void *q, int layer, int tensor, float *lo, float *hi)
{
    return kvc_seq_ema(q, layer, tensor, lo, hi);
}

static int cpu_seq_set_mode(void *q, int mode, char *err, size_t errlen)
{
    return kvc_seq_set_mode(q, mode, err, errlen);
}

static int cpu_seq_mode(const void *q)
{
    return kvc_seq_mode(q);
}

static void cpu_seq_held(const void *q, kvc_stats *out)
{
    kvc_seq_held(q, out);
}

static int cpu_seq_warming(const void *q)
{
    return kvc_seq_warming(q);
}

static int cpu_seq_layer_counts(void *q, int layer, kvc_layer_counts *out, char *err,
                                size_t errlen)
{
    if (kvc_seq_layer_counts(q, layer, out) < 0)
        return lkq_err(err, errlen, -EINVAL, "layer %d out of range", layer);
    return 0;
}

static int cpu_seq_finish_prefill(void *q, char *err, size_t errlen)
{
    return kvc_finish_prefill(q, err, errlen);
}

static int cpu_kv_begin(void *q, int pos0, int n, int prefill, char *err, size_t errlen)
{
    return kvc_begin(q, pos0, n, prefill, err, errlen);
}

static void cpu_kv_commit(void *q)
{
    kvc_commit(q);
}

static void cpu_kv_abort(void *q)
{
    kvc_abort(q);
}

static int cpu_prefix_enable(void *be, int max_nodes, char *err, size_t errlen)
{
    return kvc_pool_prefix_enable(((cpu_be *)be)->kvp, max_nodes, err, errlen);
}

static void cpu_prefix_stats(void *be, kvc_prefix_stats *out)
{
    kvc_pool_prefix_stats(((cpu_be *)be)->kvp, out);
}

static int cpu_seq_prefix_adopt(void *q, const int32_t *toks, int n)
{
    return kvc_seq_prefix_adopt(q, toks, n);
}

static void cpu_seq_prefix_store(void *q, const int32_t *toks)
{
    kvc_seq_prefix_store(q, toks);
}

static int cpu_seq_fork(void *dst, const void *src, char *err, size_t errlen)
{
    return kvc_seq_fork(dst, src, err, errlen);
}

const bk_ops bk_cpu_ops = {
    .name = "cpu",
    .host_memory = 1,
    .create = cpu_create,
    .destroy = cpu_destroy,
    .describe = cpu_describe,
    .ctl = cpu_ctl,
    .alloc = cpu_alloc,
    .upload_weight = cpu_upload_weight,
    .upload_vector = cpu_upload_vector,
    .synth_weight = NULL,
    .synth_vector = NULL,
    .read = cpu_read,
    .step_begin = cpu_step_begin,
    .embed = cpu_embed,
    .matmul = cpu_matmul,
    .rmsnorm = cpu_rmsnorm,
    .add_bias = cpu_add_bias,
    .rope = cpu_rope,
    .glu = cpu_glu,
    .add = cpu_add,
    .softcap = cpu_softcap, .hadamard = cpu_hadamard,
    .attention = cpu_attention,
    .kv_store = cpu_kv_store,
    .pool_create = cpu_pool_create,
    .pool_capacity_bytes = cpu_pool_capacity_bytes,
    .pool_free_units = cpu_pool_free_units,
    .pool_free_bytes = cpu_pool_free_bytes,
    .pool_usage = cpu_pool_usage,
    .pool_stats = cpu_pool_stats,
    .pool_layout = cpu_pool_layout,
    .seq_create = cpu_seq_create,
    .seq_destroy = cpu_seq_destroy,
    .seq_reset = cpu_seq_reset,
    .seq_n_tokens = cpu_seq_n_tokens,
    .seq_set_mode = cpu_seq_set_mode,
    .seq_mode = cpu_seq_mode,
    .seq_held = cpu_seq_held,
    .seq_stats = cpu_seq_stats,
    .seq_ema = cpu_seq_ema,
    .seq_warming = cpu_seq_warming,
    .seq_layer_counts = cpu_seq_layer_counts,
    .seq_finish_prefill = cpu_seq_finish_prefill,
    .kv_begin = cpu_kv_begin,
    .kv_commit = cpu_kv_commit,
    .kv_abort = cpu_kv_abort,
    .prefix_enable = cpu_prefix_enable,
    .prefix_stats = cpu_prefix_stats,
    .seq_prefix_adopt = cpu_seq_prefix_adopt,
    .seq_prefix_store = cpu_seq_prefix_store,
    .seq_fork = cpu_seq_fork,
};
