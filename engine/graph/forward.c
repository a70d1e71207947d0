/*
 * forward.c - the one layer graph (see forward.h): the layer sequence of
 * every architecture, written once over the model descriptor
 * (engine/model/model.h) and a backend's op table (engine/backend/
 * backend.h). It decides what runs (which ops, on which rows, in which
 * chunks, with which KV reservations); the backend decides how. Nothing
 * here knows which device it drives.
 *
 * Shapes (B = tokens in this step, D = dim, Q = n_heads*head_dim,
 * KV = n_kv_heads*head_dim, H = hidden_dim, V = n_vocab):
 *   x [B, D] residual stream; xb [B, max(D, Q)] normed input; xb2 [B, D];
 *   q [B, Q]; k, v [B, KV]; att [B, Q]; hb, hb2 [B, H]; logits [R, V]
 *   (R = logit rows). All in backend memory; the logits are read back to
 *   the host (a view when the backend's memory is host memory).
 * A step is one or more slices (one per sequence) of consecutive rows.
 *
 * May call: engine/backend (the op table), engine/kv (plan estimate,
 * accounting types), engine/model (the descriptor). Threading: one thread
 * at a time per state.
 */
#include "engine/graph/forward.h"

#include "engine/util/err.h"
#include "engine/kv/kv_plan.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* A layer's weights as the backend holds them. */
typedef struct {
    float *attn_norm, *ffn_norm, *post_attn_norm, *post_ffn_norm;
    float *bq, *bk, *bv, *q_norm, *k_norm;
    bk_weight *wq, *wk, *wv, *wo, *gate, *down, *up;
    int32_t window;
    float rope_theta;
} gr_layer;

struct fwd_seq {
    fwd_state *s;
    void *b; /* the backend's sequence */
};

struct fwd_state {
    const bk_ops *ops;
    void *be;
    mdl_hparams hp;
    fwd_params p;
    int logit_rows;
    /* weights */
    bk_weight *tok_embd, *output;
    float *out_norm, *rope_freqs;
    gr_layer *layers;
    /* activations (backend memory) */
    float *x, *xb, *xb2, *q, *k, *v, *att, *hb, *hb2, *logits_b;
    float *logits; /* host [logit_rows][V] (= logits_b on a host-memory backend) */
    int32_t *tok_buf;  /* [max_batch] the step's tokens, all sequences */
    bk_slice *slices;  /* [max_seqs] */
    int *head_rows;    /* [logit_rows] rows that get logits */
    int has_global;    /* the model has global (window 0) layers */
    int shared;        /* the global layers' pool holds several KV modes: one
                          arena of slabs, admission by bytes (kv_plan.h) */
    cfg_kv gcfg;       /* the global group's configuration and dimensions */
    kvc_dims gdims;
    fwd_seq *own;
    fwd_profile prof;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

fwd_params fwd_default_params(void)
{
    fwd_params p = {.n_ctx = 0, .max_batch = 512, .n_threads = 0, .logits_all = 0,
                    .use_ref = 0, .max_seqs = 1, .device = BK_DEVICE_CPU, .device_index = 0,
                    .kv = cfg_kv_default()};
    return p;
}

/* ---- creation ---------------------------------------------------------------------- */

/* The descriptor's shape, checked before anything is allocated. */
static int check_shape(const mdl_hparams *hp, char *err, size_t errlen)
{
    if (hp->n_layers <= 0 || hp->dim <= 0 || hp->n_heads <= 0 || hp->n_kv_heads <= 0 ||
        hp->head_dim <= 0 || hp->hidden_dim <= 0 || hp->n_vocab <= 0)
        return lkq_err(err, errlen, -EINVAL, "model shape has a non-positive dimension");
    if (hp->n_heads % hp->n_kv_heads)
        return lkq_err(err, errlen, -EINVAL, "head_count %d is not a multiple of head_count_kv %d",
                    hp->n_heads, hp->n_kv_heads);
    if (hp->n_rot <= 0 || hp->n_rot > hp->head_dim || hp->n_rot % 2)
        return lkq_err(err, errlen, -EINVAL, "rope dimension %d does not fit head_dim %d",
                    hp->n_rot, hp->head_dim);
    if (hp->act != MDL_ACT_SILU && hp->act != MDL_ACT_GELU_TANH)
        return lkq_err(err, errlen, -EINVAL, "unknown activation %d", (int)hp->act);
    return 0;
}

/* Plans the parameters: defaults, the step size a single sequence allows. */
static fwd_params plan_params(const mdl_hparams *hp, const fwd_params *pp)
{
    fwd_params p = pp ? *pp : fwd_default_params();
    if (p.n_ctx <= 0)
        p.n_ctx = hp->n_ctx_train > 0 ? hp->n_ctx_train : 2048;
    if (p.max_batch <= 0)
        p.max_batch = 512;
    if (p.max_seqs <= 0)
        p.max_seqs = 1;
    if (p.max_seqs == 1) {
        if (p.max_batch > p.kv.chunk_size)
            p.max_batch = p.kv.chunk_size; /* a step never spans two chunks */
        if (p.max_batch > p.n_ctx)
            p.max_batch = p.n_ctx;
    }
    if (p.n_threads <= 0) {
        long nc = sysconf(_SC_NPROCESSORS_ONLN);
        p.n_threads = nc > 0 ? (int)nc : 1;
    }
    if (p.n_threads > 256)
        p.n_threads = 256;
    return p;
}

/* Everything but the weights: backend instance, activations, KV pool (its
 * layer groups from layer_window: NULL or [n_layers] windows), the state's
 * own sequence. */
static int create_common(const mdl_hparams *hp, const fwd_params *pp,
                         const int32_t *layer_window, fwd_state **out, char *err,
                         size_t errlen)
{
    *out = NULL;
    int rc = check_shape(hp, err, errlen);
    if (rc < 0)
        return rc;
    fwd_params p = plan_params(hp, pp);
    /* auto becomes 0, 1 or 2 here, once: every later reader (the graph, the
     * pool's prefix seed, the backends) sees the rotation the state runs */
    p.kv.kv_rotate = cfg_kv_rotate_resolve(&p.kv, hp->head_dim, hp->qk_norm);
    if (p.kv.kv_rotate && (hp->head_dim & (hp->head_dim - 1)))
        return lkq_err(err, errlen, -EINVAL, "kv_rotate %d needs a power-of-two head_dim "
                       "(this model's is %d); use kv_rotate = auto or 0", p.kv.kv_rotate,
                       hp->head_dim);
    const bk_ops *ops = bk_find(p.device, err, errlen);
    if (!ops)
        return -ENODEV;
    fwd_state *s = calloc(1, sizeof *s);
    if (!s)
        return lkq_err(err, errlen, -ENOMEM, "out of memory");
    s->ops = ops;
    s->hp = *hp;
    s->p = p;
    s->logit_rows = p.logits_all ? p.max_batch : 1;
    if (s->logit_rows < p.max_seqs)
        s->logit_rows = p.max_seqs < p.max_batch ? p.max_seqs : p.max_batch;
    bk_config bc = {hp, p.max_batch, p.max_seqs, s->logit_rows, p.n_ctx, p.n_threads,
                    p.use_ref, p.device_index, p.exact};
    rc = ops->create(&bc, &s->be, err, errlen);
    if (rc < 0) {
        s->be = NULL;
        fwd_destroy(s);
        return rc;
    }
    const size_t B = (size_t)p.max_batch, D = (size_t)hp->dim, H = (size_t)hp->hidden_dim;
    const size_t Q = (size_t)hp->n_heads * (size_t)hp->head_dim;
    const size_t KV = (size_t)hp->n_kv_heads * (size_t)hp->head_dim;
    const size_t V = (size_t)hp->n_vocab;
    struct {
        float **dst;
        size_t n;
    } bufs[] = {{&s->x, B * D},  {&s->xb, B * (D > Q ? D : Q)}, {&s->xb2, B * D},
                {&s->q, B * Q},  {&s->k, B * KV},  {&s->v, B * KV}, {&s->att, B * Q},
                {&s->hb, B * H}, {&s->hb2, B * H}, {&s->logits_b, (size_t)s->logit_rows * V}};
    for (size_t i = 0; rc == 0 && i < sizeof bufs / sizeof bufs[0]; i++)
        rc = ops->alloc(s->be, bufs[i].n * sizeof(float), (void **)bufs[i].dst, err, errlen);
    if (rc == 0) {
        s->logits = ops->host_memory ? s->logits_b
                                     : malloc((size_t)s->logit_rows * V * sizeof(float));
        s->tok_buf = malloc(B * sizeof *s->tok_buf);
        s->slices = malloc((size_t)p.max_seqs * sizeof *s->slices);
        s->head_rows = malloc((size_t)s->logit_rows * sizeof *s->head_rows);
        s->layers = calloc((size_t)hp->n_layers, sizeof *s->layers);
        if (!s->logits || !s->tok_buf || !s->slices || !s->head_rows || !s->layers)
            rc = lkq_err(err, errlen, -ENOMEM, "out of memory for the forward state (batch %d)",
                      p.max_batch);
    }
    /* KV pool sized for max_seqs sequences of n_ctx (or the configured
     * budget); window layers in a group of their own, bounded by their
     * window */
    kvc_dims kd = {hp->n_layers, (int32_t)KV, hp->head_dim, layer_window};
    kvc_pool_sizes sz;
    s->has_global = 0;
    for (int l = 0; l < hp->n_layers; l++)
        s->has_global |= !layer_window || layer_window[l] <= 0;
    if (s->has_global) {
        kvp_groups gr;
        kvp_layer_groups(&p.kv, &kd, &gr, NULL, NULL);
        s->gcfg = gr.cfg[KVC_LAYER_GLOBAL];
        s->gdims = gr.dims[KVC_LAYER_GLOBAL];
        s->shared = cfg_kv_mode_count(&s->gcfg) > 1;
    }
    if (rc == 0)
        rc = kvc_pool_plan(&p.kv, &kd, p.n_ctx, p.max_seqs, &sz, err, errlen);
    if (rc == 0)
        rc = ops->pool_create(s->be, &p.kv, &kd, &sz, err, errlen);
    if (rc == 0)
        rc = fwd_seq_create(s, p.n_ctx, &s->own, err, errlen);
    if (rc < 0) {
        fwd_destroy(s);
        return rc < 0 ? rc : -EINVAL;
    }
    *out = s;
    return 0;
}

static int up_w(fwd_state *s, const mdl_weight *w, bk_weight **out, char *err, size_t errlen)
{
    return s->ops->upload_weight(s->be, w, out, err, errlen);
}

/* An optional vector (NULL stays NULL). */
static int up_v(fwd_state *s, const float *v, size_t n, float **out, char *err, size_t errlen)
{
    *out = NULL;
    return v ? s->ops->upload_vector(s->be, v, n, out, err, errlen) : 0;
}

/* Checks that the vectors a feature needs are there (a loader bug or an
 * incomplete file must not reach the backend as a NULL pointer). */
static int check_layer(const mdl_hparams *hp, const mdl_layer *L, int l, char *err,
                       size_t errlen)
{
    if (!L->attn_norm || !L->ffn_norm)
        return lkq_err(err, errlen, -EINVAL, "layer %d lacks its norms", l);
    if (hp->qkv_bias && (!L->bq || !L->bk || !L->bv))
        return lkq_err(err, errlen, -EINVAL, "layer %d lacks the Q/K/V biases", l);
    if (hp->qk_norm && (!L->q_norm || !L->k_norm))
        return lkq_err(err, errlen, -EINVAL, "layer %d lacks the Q/K norms", l);
    if (hp->sandwich_norm && (!L->post_attn_norm || !L->post_ffn_norm))
        return lkq_err(err, errlen, -EINVAL, "layer %d lacks the post-attention/FFN norms", l);
    return 0;
}

int fwd_create(const mdl_model *m, const fwd_params *pp, fwd_state **out, char *err,
               size_t errlen)
{
    fwd_state *s;
    int32_t *win = malloc((size_t)(m->hp.n_layers > 0 ? m->hp.n_layers : 1) * sizeof *win);
    if (!win)
        return lkq_err(err, errlen, -ENOMEM, "out of memory");
    for (int l = 0; l < m->hp.n_layers; l++)
        win[l] = m->layers[l].window;
    int rc = create_common(&m->hp, pp, win, &s, err, errlen);
    free(win);
    if (rc < 0)
        return rc;
    const mdl_hparams *hp = &m->hp;
    const size_t D = (size_t)hp->dim, hd = (size_t)hp->head_dim;
    const size_t Q = (size_t)hp->n_heads * hd, KV = (size_t)hp->n_kv_heads * hd;
    rc = up_w(s, &m->tok_embd, &s->tok_embd, err, errlen);
    if (rc == 0)
        rc = up_w(s, &m->output, &s->output, err, errlen);
    if (rc == 0)
        rc = up_v(s, m->out_norm, D, &s->out_norm, err, errlen);
    if (rc == 0 && hp->rope_scaling == MDL_ROPE_SCALE_LLAMA3 && !m->rope_freqs)
        rc = lkq_err(err, errlen, -EINVAL, "llama3 rope scaling without rope_freqs");
    if (rc == 0)
        rc = up_v(s, m->rope_freqs, (size_t)hp->n_rot / 2, &s->rope_freqs, err, errlen);
    for (int l = 0; rc == 0 && l < hp->n_layers; l++) {
        const mdl_layer *L = &m->layers[l];
        gr_layer *G = &s->layers[l];
        rc = check_layer(hp, L, l, err, errlen);
        if (rc == 0)
            rc = up_w(s, &L->wq, &G->wq, err, errlen);
        if (rc == 0)
            rc = up_w(s, &L->wk, &G->wk, err, errlen);
        if (rc == 0)
            rc = up_w(s, &L->wv, &G->wv, err, errlen);
        if (rc == 0)
            rc = up_w(s, &L->wo, &G->wo, err, errlen);
        if (rc == 0)
            rc = up_w(s, &L->ffn_gate, &G->gate, err, errlen);
        if (rc == 0)
            rc = up_w(s, &L->ffn_down, &G->down, err, errlen);
        if (rc == 0)
            rc = up_w(s, &L->ffn_up, &G->up, err, errlen);
        if (rc == 0)
            rc = up_v(s, L->attn_norm, D, &G->attn_norm, err, errlen);
        if (rc == 0)
            rc = up_v(s, L->ffn_norm, D, &G->ffn_norm, err, errlen);
        if (rc == 0 && hp->sandwich_norm)
            rc = up_v(s, L->post_attn_norm, D, &G->post_attn_norm, err, errlen);
        if (rc == 0 && hp->sandwich_norm)
            rc = up_v(s, L->post_ffn_norm, D, &G->post_ffn_norm, err, errlen);
        if (rc == 0 && hp->qkv_bias)
            rc = up_v(s, L->bq, Q, &G->bq, err, errlen);
        if (rc == 0 && hp->qkv_bias)
            rc = up_v(s, L->bk, KV, &G->bk, err, errlen);
        if (rc == 0 && hp->qkv_bias)
            rc = up_v(s, L->bv, KV, &G->bv, err, errlen);
        if (rc == 0 && hp->qk_norm)
            rc = up_v(s, L->q_norm, hd, &G->q_norm, err, errlen);
        if (rc == 0 && hp->qk_norm)
            rc = up_v(s, L->k_norm, hd, &G->k_norm, err, errlen);
        G->window = L->window;
        G->rope_theta = L->rope_theta > 0 ? L->rope_theta : hp->rope_theta;
    }
    if (rc < 0) {
        fwd_destroy(s);
        return rc;
    }
    *out = s;
    return 0;
}

int fwd_create_synthetic(const mdl_hparams *hp, kt_type wtype, uint64_t seed,
                         const fwd_params *pp, fwd_state **out, char *err, size_t errlen)
{
    *out = NULL;
    fwd_params p = pp ? *pp : fwd_default_params();
    const bk_ops *ops = bk_find(p.device, err, errlen);
    if (!ops)
        return -ENODEV;
    if (!ops->synth_weight || !ops->synth_vector)
        return lkq_err(err, errlen, -ENOTSUP, "the %s backend has no synthetic weights", ops->name);
    if (hp->qkv_bias || hp->qk_norm || hp->sandwich_norm ||
        hp->rope_scaling == MDL_ROPE_SCALE_LLAMA3)
        return lkq_err(err, errlen, -ENOTSUP, "synthetic models are plain Llama shapes");
    fwd_state *s;
    int rc = create_common(hp, &p, NULL, &s, err, errlen);
    if (rc < 0)
        return rc;
    const int D = hp->dim, H = hp->hidden_dim, V = hp->n_vocab;
    const int Q = hp->n_heads * hp->head_dim, KV = hp->n_kv_heads * hp->head_dim;
    uint64_t sd = seed;
    rc = ops->synth_weight(s->be, wtype, V, D, sd++, 1.0f, &s->tok_embd, err, errlen);
    if (rc == 0)
        rc = ops->synth_weight(s->be, wtype, V, D, sd++, 0, &s->output, err, errlen);
    if (rc == 0)
        rc = ops->synth_vector(s->be, (size_t)D, 1.0f, &s->out_norm, err, errlen);
    for (int l = 0; rc == 0 && l < hp->n_layers; l++) {
        gr_layer *G = &s->layers[l];
        struct {
            bk_weight **w;
            int rows, cols;
        } ws[] = {{&G->wq, Q, D},    {&G->wk, KV, D}, {&G->wv, KV, D}, {&G->wo, D, Q},
                  {&G->gate, H, D}, {&G->down, D, H}, {&G->up, H, D}};
        for (size_t i = 0; rc == 0 && i < sizeof ws / sizeof ws[0]; i++)
            rc = ops->synth_weight(s->be, wtype, ws[i].rows, ws[i].cols, sd++, 0, ws[i].w, err,
                                   errlen);
        if (rc == 0)
            rc = ops->synth_vector(s->be, (size_t)D, 1.0f, &G->attn_norm, err, errlen);
        if (rc == 0)
            rc = ops->synth_vector(s->be, (size_t)D, 1.0f, &G->ffn_norm, err, errlen);
        G->rope_theta = hp->rope_theta;
    }
    if (rc < 0) {
        fwd_destroy(s);
        return rc;
    }
    *out = s;
    return 0;
}

void fwd_destroy(fwd_state *s)
{
    if (!s)
        return;
    fwd_seq_destroy(s->own);
    if (s->ops && !s->ops->host_memory)
        free(s->logits);
    if (s->ops)
        s->ops->destroy(s->be); /* frees activations, weights, the pool */
    free(s->tok_buf);
    free(s->slices);
    free(s->head_rows);
    free(s->layers);
    free(s);
}

/* ---- small accessors ----------------------------------------------------------------- */

int32_t fwd_n_ctx(const fwd_state *s)
{
    return s->p.n_ctx;
}

int32_t fwd_n_threads(const fwd_state *s)
{
    return s->p.n_threads;
}

int32_t fwd_max_batch(const fwd_state *s)
{
    return s->p.max_batch;
}

bk_device fwd_device(const fwd_state *s)
{
    return s->p.device;
}

const char *fwd_describe(const fwd_state *s)
{
    return s->ops->describe(s->be);
}

int fwd_ctl(fwd_state *s, int what, void *arg, char *err, size_t errlen)
{
    return s->ops->ctl(s->be, what, arg, err, errlen);
}

const cfg_kv *fwd_kv_cfg(const fwd_state *s)
{
    return &s->p.kv;
}

size_t fwd_kv_bytes(fwd_state *s)
{
    kvc_stats st;
    if (fwd_kv_stats(s, &st, NULL, 0) < 0)
        return 0;
    return (size_t)st.bytes_total;
}

int fwd_kv_stats(fwd_state *s, kvc_stats *out, char *err, size_t errlen)
{
    return fwd_seq_stats(s->own, out, err, errlen);
}

fwd_seq *fwd_own_seq(fwd_state *s)
{
    return s->own;
}

void *fwd_seq_backend(fwd_seq *q)
{
    return q->b;
}

void fwd_reset(fwd_state *s)
{
    fwd_seq_reset(s->own);
}

int fwd_finish_prefill(fwd_state *s, char *err, size_t errlen)
{
    return fwd_seq_finish_prefill(s->own, err, errlen);
}

/* ---- sequences and the pool ------------------------------------------------------------ */

int fwd_seq_create(fwd_state *s, int max_tokens, fwd_seq **out, char *err, size_t errlen)
{
    *out = NULL;
    if (max_tokens > s->p.n_ctx)
        return lkq_err(err, errlen, -EINVAL, "a sequence of %d positions exceeds n_ctx %d",
                    max_tokens, s->p.n_ctx);
    fwd_seq *q = calloc(1, sizeof *q);
    if (!q)
        return lkq_err(err, errlen, -ENOMEM, "out of memory");
    q->s = s;
    int rc = s->ops->seq_create(s->be, max_tokens, &q->b, err, errlen);
    if (rc < 0) {
        free(q);
        return rc;
    }
    *out = q;
    return 0;
}

void fwd_seq_destroy(fwd_seq *q)
{
    if (!q)
        return;
    q->s->ops->seq_destroy(q->b);
    free(q);
}

void fwd_seq_reset(fwd_seq *q)
{
    q->s->ops->seq_reset(q->b);
}

int fwd_seq_n_tokens(const fwd_seq *q)
{
    return q->s->ops->seq_n_tokens(q->b);
}

int fwd_seq_stats(fwd_seq *q, kvc_stats *out, char *err, size_t errlen)
{
    return q->s->ops->seq_stats(q->b, out, err, errlen);
}

int fwd_seq_ema(fwd_seq *q, int layer, int tensor, float *lo, float *hi)
{
    return q->s->ops->seq_ema(q->b, layer, tensor, lo, hi);
}

int fwd_seq_set_mode(fwd_seq *q, int mode, char *err, size_t errlen)
{
    return q->s->ops->seq_set_mode(q->b, mode, err, errlen);
}

int fwd_seq_mode(const fwd_seq *q)
{
    return q->s->ops->seq_mode(q->b);
}

void fwd_seq_held(const fwd_seq *q, kvc_stats *out)
{
    q->s->ops->seq_held(q->b, out);
}

int fwd_seq_warming(const fwd_seq *q)
{
    return q->s->ops->seq_warming(q->b);
}

int fwd_seq_layer_counts(fwd_seq *q, int layer, kvc_layer_counts *out, char *err,
                         size_t errlen)
{
    return q->s->ops->seq_layer_counts(q->b, layer, out, err, errlen);
}

int fwd_seq_finish_prefill(fwd_seq *q, char *err, size_t errlen)
{
    return q->s->ops->seq_finish_prefill(q->b, err, errlen);
}

/* ---- prefix reuse: the backend's, when it has it ---- */

int fwd_prefix_enable(fwd_state *s, int max_nodes, char *err, size_t errlen)
{
    if (!s->ops->prefix_enable)
        return lkq_err(err, errlen, -ENOTSUP, "prefix reuse is not implemented on the %s "
                       "backend", s->ops->name);
    return s->ops->prefix_enable(s->be, max_nodes, err, errlen);
}

void fwd_prefix_stats(const fwd_state *s, kvc_prefix_stats *out)
{
    memset(out, 0, sizeof *out);
    if (s->ops->prefix_stats)
        s->ops->prefix_stats(s->be, out);
}

int fwd_seq_prefix_adopt(fwd_seq *q, const int32_t *toks, int n)
{
    return q->s->ops->seq_prefix_adopt ? q->s->ops->seq_prefix_adopt(q->b, toks, n) : 0;
}

void fwd_seq_prefix_store(fwd_seq *q, const int32_t *toks)
{
    if (q->s->ops->seq_prefix_store)
        q->s->ops->seq_prefix_store(q->b, toks);
}

int fwd_seq_fork(fwd_seq *dst, const fwd_seq *src, char *err, size_t errlen)
{
    if (dst->s != src->s)
        return lkq_err(err, errlen, -EINVAL, "fork: the sequences are on different states");
    if (!dst->s->ops->seq_fork)
        return lkq_err(err, errlen, -ENOTSUP, "fork is not implemented on the %s backend",
                       dst->s->ops->name);
    return dst->s->ops->seq_fork(dst->b, src->b, err, errlen);
}

int64_t fwd_pool_capacity_bytes(const fwd_state *s)
{
    return s->ops->pool_capacity_bytes(s->be);
}

void fwd_pool_free_units(const fwd_state *s, int64_t *qfree, int64_t *ffree)
{
    if (s->shared) {
        /* one currency, the bytes of the shared arena (see the header) */
        *qfree = s->ops->pool_free_bytes(s->be);
        *ffree = INT64_MAX / 4;
        return;
    }
    s->ops->pool_free_units(s->be, qfree, ffree);
}

int fwd_pool_shared(const fwd_state *s)
{
    return s->shared;
}

int64_t fwd_pool_held_cost(const fwd_state *s, int mode, int n)
{
    if (!s->shared || !cfg_kv_has_mode(&s->p.kv, mode))
        return 0;
    cfg_kv c = cfg_kv_with_mode(&s->gcfg, mode);
    int64_t nq, nf;
    kvc_plan_estimate(&c, n, &nq, &nf);
    if (mode != CFG_KV_FP16) {
        /* after its prefill: its blocks, the sink pages and a tail page */
        int64_t P = kvc_plan_page_tokens(&c), sinks = c.sink_tokens < n ? c.sink_tokens : n;
        nf = (sinks + P - 1) / P + 1;
    }
    return kvp_plan_cost(&s->gcfg, &s->gdims, mode, nq, nf);
}

int64_t fwd_pool_page_cost(const fwd_state *s)
{
    return s->shared ? kvp_plan_cost(&s->gcfg, &s->gdims, CFG_KV_FP16, 0, 1) : 1;
}

void fwd_pool_estimate(const fwd_state *s, int n, int64_t *nq, int64_t *nf)
{
    fwd_pool_estimate_mode(s, cfg_kv_mode_id(&s->p.kv), n, nq, nf);
}

void fwd_pool_estimate_mode(const fwd_state *s, int mode, int n, int64_t *nq, int64_t *nf)
{
    /* the global layers' units: the window layers are reserved per slot */
    *nq = *nf = 0;
    if (s->has_global && cfg_kv_has_mode(&s->p.kv, mode)) {
        cfg_kv c = cfg_kv_with_mode(&s->p.kv, mode);
        kvc_plan_estimate(&c, n, nq, nf);
        if (s->shared) {
            /* the units' slab shares in bytes (fwd_pool_free_units) */
            *nq = kvp_plan_cost(&s->gcfg, &s->gdims, mode, *nq, *nf);
            *nf = 0;
        }
    }
}

double fwd_pool_usage(const fwd_state *s)
{
    return s->ops->pool_usage(s->be);
}

int fwd_pool_stats(fwd_state *s, kvc_stats *out, char *err, size_t errlen)
{
    return s->ops->pool_stats(s->be, out, err, errlen);
}

/* ---- the layer sequence -------------------------------------------------------------- */

/* Runs an op, adds its wall time to *acc, returns from the caller on error. */
#define OP(acc, call)                                                                       \
    do {                                                                                    \
        double t0_ = now_s();                                                               \
        int rc_ = (call);                                                                   \
        (acc) += now_s() - t0_;                                                             \
        if (rc_ < 0)                                                                        \
            return rc_;                                                                     \
    } while (0)

/* One step over the n rows of s->slices[0..n_sl) (tokens in s->tok_buf,
 * every slice's KV step open): every layer's K/V of each slice is stored
 * into its sequence. Logits of the n_head rows listed in s->head_rows go
 * to s->logits_b rows row0 .. row0+n_head-1 (backend memory; fwd_eval's
 * all-token logits put each piece at its own rows, since on a host-memory
 * backend logits_b is the host logits: rows 0.. would overwrite the earlier
 * pieces' rows). */
static int step(fwd_state *s, int n, int n_sl, int n_head, int row0, char *err, size_t errlen)
{
    const bk_ops *o = s->ops;
    void *be = s->be;
    const mdl_hparams *hp = &s->hp;
    const int D = hp->dim, H = hp->hidden_dim, hd = hp->head_dim;
    const int Q = hp->n_heads * hd, KV = hp->n_kv_heads * hd;
    const float eps = hp->norm_eps;
    fwd_profile *pr = &s->prof;
    const bk_step st = {s->tok_buf, n, s->slices, n_sl};
    const float escale = hp->embd_scale > 0 ? hp->embd_scale : 1.0f;
    const float ascale = hp->attn_scale > 0 ? hp->attn_scale : 1.0f / sqrtf((float)hd);
    const float fscale = hp->rope_freq_scale > 0 ? hp->rope_freq_scale : 1.0f;

    OP(pr->other_s, o->step_begin(be, &st, err, errlen));
    OP(pr->other_s, o->embed(be, s->tok_embd, escale, s->x, err, errlen));
    for (int l = 0; l < hp->n_layers; l++) {
        const gr_layer *L = &s->layers[l];
        const bk_rope rq = {hp->n_heads, hd, hp->n_rot, hp->rope_type == MDL_ROPE_NEOX,
                            L->rope_theta, fscale, s->rope_freqs};
        bk_rope rk = rq;
        rk.n_heads = hp->n_kv_heads;
        const bk_attn at = {hp->n_heads, hp->n_kv_heads, hd, ascale, L->window};

        /* attention block */
        OP(pr->other_s, o->rmsnorm(be, s->xb, s->x, L->attn_norm, n, D, eps, err, errlen));
        OP(pr->matmul_s, o->matmul(be, L->wq, s->xb, s->q, n, err, errlen));
        OP(pr->matmul_s, o->matmul(be, L->wk, s->xb, s->k, n, err, errlen));
        OP(pr->matmul_s, o->matmul(be, L->wv, s->xb, s->v, n, err, errlen));
        if (hp->qkv_bias) {
            OP(pr->other_s, o->add_bias(be, s->q, L->bq, n, Q, err, errlen));
            OP(pr->other_s, o->add_bias(be, s->k, L->bk, n, KV, err, errlen));
            OP(pr->other_s, o->add_bias(be, s->v, L->bv, n, KV, err, errlen));
        }
        if (hp->qk_norm) { /* per head: rows of head_dim */
            OP(pr->other_s, o->rmsnorm(be, s->q, s->q, L->q_norm, n * hp->n_heads, hd, eps,
                                       err, errlen));
            OP(pr->other_s, o->rmsnorm(be, s->k, s->k, L->k_norm, n * hp->n_kv_heads, hd, eps,
                                       err, errlen));
        }
        OP(pr->other_s, o->rope(be, s->q, (size_t)Q, &rq, err, errlen));
        OP(pr->other_s, o->rope(be, s->k, (size_t)KV, &rk, err, errlen));
        if (s->p.kv.kv_rotate) { /* q.k = (qH).(kH): K cached rotated, q rotated alike */
            OP(pr->other_s, o->hadamard(be, s->q, n * hp->n_heads, hd, err, errlen));
            OP(pr->other_s, o->hadamard(be, s->k, n * hp->n_kv_heads, hd, err, errlen));
            if (s->p.kv.kv_rotate == 2) /* V cached rotated: the output rotates back */
                OP(pr->other_s, o->hadamard(be, s->v, n * hp->n_kv_heads, hd, err, errlen));
        }
        OP(pr->attn_s, o->attention(be, l, &at, s->q, s->att, s->k, s->v, err, errlen));
        OP(pr->kv_store_s, o->kv_store(be, l, s->k, s->v, err, errlen));
        if (s->p.kv.kv_rotate == 2) /* sum p_i (v_i H) = (sum p_i v_i) H; H H = I */
            OP(pr->other_s, o->hadamard(be, s->att, n * hp->n_heads, hd, err, errlen));
        OP(pr->matmul_s, o->matmul(be, L->wo, s->att, s->xb2, n, err, errlen));
        if (hp->sandwich_norm)
            OP(pr->other_s, o->rmsnorm(be, s->xb2, s->xb2, L->post_attn_norm, n, D, eps, err,
                                       errlen));
        OP(pr->other_s, o->add(be, s->x, s->xb2, (size_t)n * D, err, errlen));

        /* feed-forward block */
        OP(pr->other_s, o->rmsnorm(be, s->xb, s->x, L->ffn_norm, n, D, eps, err, errlen));
        OP(pr->matmul_s, o->matmul(be, L->gate, s->xb, s->hb, n, err, errlen));
        OP(pr->matmul_s, o->matmul(be, L->up, s->xb, s->hb2, n, err, errlen));
        OP(pr->other_s, o->glu(be, s->hb, s->hb2, n, H, hp->act, err, errlen));
        OP(pr->matmul_s, o->matmul(be, L->down, s->hb, s->xb2, n, err, errlen));
        if (hp->sandwich_norm)
            OP(pr->other_s, o->rmsnorm(be, s->xb2, s->xb2, L->post_ffn_norm, n, D, eps, err,
                                       errlen));
        OP(pr->other_s, o->add(be, s->x, s->xb2, (size_t)n * D, err, errlen));
    }
    pr->steps++;
    pr->tokens += n;
    if (n_head == 0)
        return 0;
    /* the final norm of the head rows: one call per run of consecutive rows */
    for (int i = 0; i < n_head;) {
        int k = 1;
        while (i + k < n_head && s->head_rows[i + k] == s->head_rows[i] + k)
            k++;
        OP(pr->other_s, o->rmsnorm(be, s->xb + (size_t)i * D, s->x + (size_t)s->head_rows[i] * D,
                                   s->out_norm, k, D, eps, err, errlen));
        i += k;
    }
    float *lg = s->logits_b + (size_t)row0 * (size_t)hp->n_vocab;
    if (o->ctl) { /* where the head rows come from; a backend may not care */
        bk_head_rows hr = {s->head_rows, n_head};
        char ignore[8];
        (void)o->ctl(be, BK_CTL_HEAD_ROWS, &hr, ignore, sizeof ignore);
    }
    OP(pr->matmul_s, o->matmul(be, s->output, s->xb, lg, n_head, err, errlen));
    if (hp->final_softcap > 0)
        OP(pr->other_s, o->softcap(be, lg, (size_t)n_head * (size_t)hp->n_vocab,
                                   hp->final_softcap, err, errlen));
    return 0;
}

/* Reads n_head rows of logits from row `row` of s->logits_b to the same
 * row of s->logits (the same memory on a host-memory backend). */
static int read_logits(fwd_state *s, int row, int n_head, char *err, size_t errlen)
{
    const size_t V = (size_t)s->hp.n_vocab;
    return s->ops->read(s->be, s->logits + (size_t)row * V, s->logits_b + (size_t)row * V,
                        (size_t)n_head * V, err, errlen);
}

static int check_tokens(const fwd_state *s, const int32_t *tokens, int n, char *err,
                        size_t errlen)
{
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= s->hp.n_vocab)
            return lkq_err(err, errlen, -EINVAL, "token id %d out of range [0, %d)", tokens[i],
                        s->hp.n_vocab);
    return 0;
}

int fwd_eval(fwd_state *s, const int32_t *tokens, int n, int pos, int want_all,
             const float **logits, char *err, size_t errlen)
{
    const bk_ops *o = s->ops;
    void *q = s->own->b;
    *logits = NULL;
    if (n <= 0 || pos < 0)
        return lkq_err(err, errlen, -EINVAL, "nothing to evaluate (n %d, pos %d)", n, pos);
    if ((int64_t)pos + n > s->p.n_ctx)
        return lkq_err(err, errlen, -ENOSPC, "context full: %d + %d tokens exceed n_ctx %d", pos,
                    n, s->p.n_ctx);
    if (want_all && (!s->p.logits_all || n > s->p.max_batch))
        return lkq_err(err, errlen, -EINVAL, "all-token logits need logits_all and n <= %d",
                    s->p.max_batch);
    int rc = check_tokens(s, tokens, n, err, errlen);
    if (rc < 0)
        return rc;
    if (pos == 0 && o->seq_n_tokens(q) > 0)
        o->seq_reset(q);
    int have = o->seq_n_tokens(q);
    if (pos != have)
        return lkq_err(err, errlen, -EINVAL,
                    "position %d: the cache holds %d positions (continue at %d or restart at 0)",
                    pos, have, have);
    const int C = s->p.kv.chunk_size;
    const int cap = s->p.max_batch < C ? s->p.max_batch : C;
    int prefill = n > 1 || pos == 0;
    for (int done = 0; done < n;) {
        int at = pos + done;
        int b = n - done < cap ? n - done : cap;
        int to_boundary = C - at % C; /* chunks are aligned to multiples of C */
        if (b > to_boundary)
            b = to_boundary;
        rc = o->kv_begin(q, at, b, prefill, err, errlen);
        if (rc < 0)
            return rc;
        memcpy(s->tok_buf, tokens + done, (size_t)b * sizeof *tokens);
        s->slices[0] = (bk_slice){q, 0, b, at, prefill};
        int n_head = 0;
        if (want_all) {
            for (int i = 0; i < b; i++)
                s->head_rows[i] = i;
            n_head = b;
        } else if (done + b == n) {
            s->head_rows[0] = b - 1;
            n_head = 1;
        }
        rc = step(s, b, 1, n_head, want_all ? done : 0, err, errlen);
        /* all-token logits: this piece's rows (at rows done.. of logits_b,
         * so that no piece overwrites another's) */
        if (rc == 0 && n_head > 0)
            rc = read_logits(s, want_all ? done : 0, n_head, err, errlen);
        if (rc < 0) {
            o->kv_abort(q);
            return rc;
        }
        o->kv_commit(q);
        done += b;
    }
    *logits = s->logits;
    return 0;
}

/* Checks item i of a batched step: n tokens (ids in [0, n_vocab)) at
 * position pos, a prompt piece within one chunk or one decode token, the
 * context and the step's token budget (total tokens of the items before
 * it), a logits row free when it wants one (n_head taken before it). */
static int check_item(const fwd_state *s, int i, const fwd_item *it, int pos, int total,
                      int n_head, char *err, size_t errlen)
{
    const int C = s->p.kv.chunk_size, n = it->n;
    if (i >= s->p.max_seqs)
        return lkq_err(err, errlen, -EINVAL, "more than %d sequences in one step (max_seqs)",
                    s->p.max_seqs);
    if (!it->seq || it->seq->s != s)
        return lkq_err(err, errlen, -EINVAL, "item %d: a sequence of another state", i);
    if (n <= 0 || (!it->prefill && n != 1))
        return lkq_err(err, errlen, -EINVAL, "item %d: %d tokens (decode steps take one)", i, n);
    if (it->prefill && pos % C + n > C)
        return lkq_err(err, errlen, -EINVAL,
                    "item %d: %d prompt tokens at position %d cross a chunk boundary "
                    "(chunk_size %d)", i, n, pos, C);
    if ((int64_t)pos + n > s->p.n_ctx)
        return lkq_err(err, errlen, -ENOSPC, "context full: %d + %d tokens exceed n_ctx %d", pos,
                    n, s->p.n_ctx);
    if (total + n > s->p.max_batch)
        return lkq_err(err, errlen, -EINVAL, "batch of more than %d tokens", s->p.max_batch);
    if (it->want_logits && n_head >= s->logit_rows)
        return lkq_err(err, errlen, -EINVAL, "more than %d sequences want logits", s->logit_rows);
    return check_tokens(s, it->tokens, n, err, errlen);
}

int fwd_eval_batch(fwd_state *s, fwd_item *items, int n_items, int *failed, char *err,
                   size_t errlen)
{
    const bk_ops *o = s->ops;
    const size_t V = (size_t)s->hp.n_vocab;
    int total = 0, n_head = 0;
    if (failed)
        *failed = -1;
    for (int i = 0; i < n_items; i++) {
        fwd_item *it = &items[i];
        it->out_logits = NULL;
        int pos = it->seq && it->seq->s == s ? o->seq_n_tokens(it->seq->b) : 0;
        int rc = check_item(s, i, it, pos, total, n_head, err, errlen);
        if (rc < 0) {
            if (failed)
                *failed = i;
            return rc;
        }
        memcpy(s->tok_buf + total, it->tokens, (size_t)it->n * sizeof *it->tokens);
        s->slices[i] = (bk_slice){it->seq->b, total, it->n, pos, it->prefill};
        total += it->n;
        if (it->want_logits)
            s->head_rows[n_head++] = total - 1;
    }
    for (int i = 0; i < n_items; i++) {
        int rc = o->kv_begin(s->slices[i].seq, s->slices[i].pos0, items[i].n, items[i].prefill,
                             err, errlen);
        if (rc < 0) {
            for (int j = 0; j < i; j++)
                o->kv_abort(s->slices[j].seq);
            if (failed)
                *failed = i;
            return rc;
        }
    }
    int rc = 0;
    if (total > 0)
        rc = step(s, total, n_items, n_head, 0, err, errlen);
    if (rc == 0 && n_head > 0)
        rc = read_logits(s, 0, n_head, err, errlen);
    if (rc < 0) { /* a device error: the step is undone on the host side */
        for (int i = 0; i < n_items; i++)
            o->kv_abort(s->slices[i].seq);
        return rc;
    }
    int h = 0;
    for (int i = 0; i < n_items; i++) {
        o->kv_commit(s->slices[i].seq);
        if (items[i].want_logits)
            items[i].out_logits = s->logits + (size_t)h++ * V;
    }
    return 0;
}

void fwd_profile_get(const fwd_state *s, fwd_profile *out)
{
    *out = s->prof;
}

void fwd_profile_reset(fwd_state *s)
{
    memset(&s->prof, 0, sizeof s->prof);
}
