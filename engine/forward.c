/*
 * forward.c - Llama forward pass on the CPU (see forward.h).
 *
 * Shapes (B = tokens in this step, D = dim, Q = n_heads*head_dim,
 * KV = n_kv_heads*head_dim, H = hidden_dim, V = n_vocab):
 *   x [B, D] residual stream; xb [B, D] normed input; q [B, Q];
 *   k, v [B, KV]; att [B, Q]; hb, hb2 [B, H]; logits [B or 1, V].
 *   KV cache: kc, vc [n_layers][n_ctx][KV] fp16, K stored after RoPE.
 * Threading: matmuls and attention run on the state's kcpu_pool; the small
 * per-token ops (norms, RoPE, SwiGLU) run on the calling thread.
 */
#include "engine/forward.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels/cpu/kcpu.h"
#include "kernels/ref/kref.h"

struct fwd_state {
    const mdl_model *m;
    fwd_params p;
    kcpu_pool *pool;
    float *x, *xb, *xb2, *q, *k, *v, *att, *hb, *hb2, *logits;
    kvc_pool *kvp;
    kvc_seq *seq;
    kvs_seg *segs;      /* [max segments + 1] */
    int cap_segs;
    void *ws_mm;
    void *ws_attn;
    float *ref_scratch; /* kref_attn_seg scratch (use_ref only) */
    size_t ref_scratch_floats;
};

fwd_params fwd_default_params(void)
{
    fwd_params p = {.n_ctx = 0, .max_batch = 512, .n_threads = 0,
                    .logits_all = 0, .use_ref = 0, .kv = cfg_kv_default()};
    return p;
}

static size_t mm_scratch(const mdl_weight *w, int n_tok)
{
    return kcpu_matmul_scratch_bytes(w->type, (int)w->n_cols, n_tok);
}

static size_t max_sz(size_t a, size_t b)
{
    return a > b ? a : b;
}

int fwd_create(const mdl_model *m, const fwd_params *pp, fwd_state **out,
               char *err, size_t errlen)
{
    *out = NULL;
    fwd_params p = pp ? *pp : fwd_default_params();
    const mdl_hparams *hp = &m->hp;
    if (p.n_ctx <= 0)
        p.n_ctx = hp->n_ctx_train > 0 ? hp->n_ctx_train : 2048;
    if (p.max_batch <= 0)
        p.max_batch = 512;
    if (p.max_batch > p.kv.chunk_size)
        p.max_batch = p.kv.chunk_size; /* a step never spans two chunks */
    if (p.max_batch > p.n_ctx)
        p.max_batch = p.n_ctx;
    if (p.n_threads <= 0) {
        long nc = sysconf(_SC_NPROCESSORS_ONLN);
        p.n_threads = nc > 0 ? (int)nc : 1;
    }
    if (p.n_threads > 256)
        p.n_threads = 256;

    fwd_state *s = calloc(1, sizeof *s);
    if (!s)
        goto oom;
    s->m = m;
    s->p = p;
    const size_t B = (size_t)p.max_batch;
    const size_t D = (size_t)hp->dim, H = (size_t)hp->hidden_dim;
    const size_t Q = (size_t)hp->n_heads * (size_t)hp->head_dim;
    const size_t KV = (size_t)hp->n_kv_heads * (size_t)hp->head_dim;
    const size_t V = (size_t)hp->n_vocab;
    s->x = malloc(B * D * sizeof(float));
    s->xb = malloc(B * max_sz(D, Q) * sizeof(float));
    s->xb2 = malloc(B * D * sizeof(float));
    s->q = malloc(B * Q * sizeof(float));
    s->k = malloc(B * KV * sizeof(float));
    s->v = malloc(B * KV * sizeof(float));
    s->att = malloc(B * Q * sizeof(float));
    s->hb = malloc(B * H * sizeof(float));
    s->hb2 = malloc(B * H * sizeof(float));
    s->logits = malloc((p.logits_all ? B : 1) * V * sizeof(float));
    if (!s->x || !s->xb || !s->xb2 || !s->q || !s->k || !s->v || !s->att ||
        !s->hb || !s->hb2 || !s->logits)
        goto oom;

    /* KV pool sized for this one sequence (or the configured budget) */
    kvc_dims kd = {hp->n_layers, (int32_t)KV, hp->head_dim};
    int64_t nq = 0, nf = 0;
    int rc = kvc_pool_plan(&p.kv, &kd, p.n_ctx, 1, &nq, &nf, err, errlen);
    if (rc == 0)
        rc = kvc_pool_create(&p.kv, &kd, nq, nf, &s->kvp, err, errlen);
    if (rc == 0)
        rc = kvc_seq_create(s->kvp, p.n_ctx, &s->seq, err, errlen);
    if (rc < 0) {
        fwd_destroy(s);
        return -1;
    }
    s->cap_segs = kvc_max_segments(s->seq) + 1;
    s->segs = malloc((size_t)s->cap_segs * sizeof *s->segs);
    if (!s->segs)
        goto oom;
    if (p.use_ref) {
        /* dequantize-then-attend needs the whole history as f32 */
        s->ref_scratch_floats = ((size_t)p.n_ctx + (size_t)p.kv.block_tokens) * KV * 2 +
                                (size_t)p.n_ctx + 64;
        s->ref_scratch = malloc(s->ref_scratch_floats * sizeof(float));
        if (!s->ref_scratch)
            goto oom;
    }

    size_t ws = mm_scratch(&m->output, (int)B);
    ws = max_sz(ws, mm_scratch(&m->tok_embd, (int)B));
    for (int l = 0; l < hp->n_layers; l++) {
        const mdl_layer *L = &m->layers[l];
        const mdl_weight *ws_list[] = {&L->wq, &L->wk, &L->wv, &L->wo,
                                       &L->ffn_gate, &L->ffn_down, &L->ffn_up};
        for (size_t i = 0; i < sizeof ws_list / sizeof ws_list[0]; i++)
            ws = max_sz(ws, mm_scratch(ws_list[i], (int)B));
    }
    s->ws_mm = malloc(ws > 0 ? ws : 1);
    s->ws_attn = malloc(max_sz(kcpu_attn_seg_scratch_bytes(p.n_threads,
                                                           kvc_pool_layout(s->kvp),
                                                           hp->head_dim), 1));
    if (!s->ws_mm || !s->ws_attn)
        goto oom;
    if (kcpu_pool_create(p.n_threads, &s->pool) < 0) {
        if (err && errlen)
            snprintf(err, errlen, "cannot start %d worker threads", p.n_threads);
        fwd_destroy(s);
        return -1;
    }
    *out = s;
    return 0;
oom:
    fwd_destroy(s);
    if (err && errlen)
        snprintf(err, errlen,
                 "out of memory allocating the forward state (n_ctx %d, batch %d)",
                 p.n_ctx, p.max_batch);
    return -1;
}

void fwd_destroy(fwd_state *s)
{
    if (!s)
        return;
    kcpu_pool_destroy(s->pool);
    kvc_seq_destroy(s->seq);
    kvc_pool_destroy(s->kvp);
    free(s->segs);
    free(s->x);
    free(s->xb);
    free(s->xb2);
    free(s->q);
    free(s->k);
    free(s->v);
    free(s->att);
    free(s->hb);
    free(s->hb2);
    free(s->logits);
    free(s->ws_mm);
    free(s->ws_attn);
    free(s->ref_scratch);
    free(s);
}

int32_t fwd_n_ctx(const fwd_state *s)
{
    return s->p.n_ctx;
}

int32_t fwd_n_threads(const fwd_state *s)
{
    return s->p.n_threads;
}

size_t fwd_kv_bytes(const fwd_state *s)
{
    kvc_stats st;
    kvc_seq_stats(s->seq, &st);
    return (size_t)st.bytes_total;
}

void fwd_kv_stats(const fwd_state *s, kvc_stats *out)
{
    kvc_seq_stats(s->seq, out);
}

const kvc_seq *fwd_seq(const fwd_state *s)
{
    return s->seq;
}

void fwd_reset(fwd_state *s)
{
    kvc_seq_reset(s->seq);
}

int fwd_finish_prefill(fwd_state *s, char *err, size_t errlen)
{
    return kvc_finish_prefill(s->seq, err, errlen);
}

/* y [n, w.n_rows] = x [n, w.n_cols] @ w^T */
static void matmul(fwd_state *s, const mdl_weight *w, const float *x, float *y,
                   int n)
{
    if (s->p.use_ref)
        kref_matmul(w->type, w->data, x, y, (int)w->n_rows, (int)w->n_cols, n);
    else
        kcpu_matmul(s->pool, w->type, w->data, x, y, (int)w->n_rows,
                    (int)w->n_cols, n, s->ws_mm);
}

static void rmsnorm(fwd_state *s, float *out, const float *x, const float *w,
                    int n)
{
    if (s->p.use_ref)
        kref_rmsnorm(out, x, w, n, s->m->hp.norm_eps);
    else
        kcpu_rmsnorm(out, x, w, n, s->m->hp.norm_eps);
}

static void rope(fwd_state *s, float *x, int n_heads, int pos)
{
    const mdl_hparams *hp = &s->m->hp;
    if (s->p.use_ref)
        kref_rope(x, n_heads, hp->head_dim, hp->n_rot, pos, hp->rope_theta,
                  hp->rope_freq_scale);
    else
        kcpu_rope(x, n_heads, hp->head_dim, hp->n_rot, pos, hp->rope_theta,
                  hp->rope_freq_scale);
}

/* Attention for the step's n queries at pos0.. of layer l: over the cached
 * history plus the step's own exact K/V (an F32 segment, causal). */
static void attention(fwd_state *s, int l, int pos0, int n)
{
    const mdl_hparams *hp = &s->m->hp;
    const size_t KV = (size_t)hp->n_kv_heads * (size_t)hp->head_dim;
    const size_t Q = (size_t)hp->n_heads * (size_t)hp->head_dim;
    int ns = kvc_segments(s->seq, l, s->segs, s->cap_segs - 1);
    s->segs[ns++] = (kvs_seg){KVS_F32, pos0, n, s->k, s->v, KV};
    const kvq_layout *L = kvc_pool_layout(s->kvp);
    float scale = 1.0f / sqrtf((float)hp->head_dim);
    if (s->p.use_ref) {
        for (int i = 0; i < n; i++)
            kref_attn_seg(s->att + (size_t)i * Q, s->q + (size_t)i * Q, pos0 + i, s->segs,
                          ns, L, hp->n_heads, hp->n_kv_heads, hp->head_dim, scale,
                          s->ref_scratch);
    } else {
        kcpu_attn_seg(s->pool, s->att, s->q, pos0, n, s->segs, ns, L, hp->n_heads,
                      hp->n_kv_heads, hp->head_dim, scale, s->ws_attn);
    }
}

/* One step over n <= max_batch tokens at pos0. head: 0 no logits, 1 the
 * last token's, 2 every token's, written to out. The KV step (kvc_begin) is
 * open; this stores every layer's K/V into it. */
static void step(fwd_state *s, const int32_t *tok, int n, int pos0, int head, float *out)
{
    const mdl_model *m = s->m;
    const mdl_hparams *hp = &m->hp;
    const int D = hp->dim, H = hp->hidden_dim;
    const size_t Q = (size_t)hp->n_heads * (size_t)hp->head_dim;
    const size_t KV = (size_t)hp->n_kv_heads * (size_t)hp->head_dim;
    const size_t row = kt_row_bytes(m->tok_embd.type, D);

    for (int i = 0; i < n; i++) {
        const uint8_t *src = (const uint8_t *)m->tok_embd.data + (size_t)tok[i] * row;
        if (s->p.use_ref)
            kref_dequant_row(m->tok_embd.type, src, s->x + (size_t)i * D, D);
        else
            kcpu_dequant_row(m->tok_embd.type, src, s->x + (size_t)i * D, D);
    }

    for (int l = 0; l < hp->n_layers; l++) {
        const mdl_layer *L = &m->layers[l];
        for (int i = 0; i < n; i++)
            rmsnorm(s, s->xb + (size_t)i * D, s->x + (size_t)i * D, L->attn_norm, D);
        matmul(s, &L->wq, s->xb, s->q, n);
        matmul(s, &L->wk, s->xb, s->k, n);
        matmul(s, &L->wv, s->xb, s->v, n);
        for (int i = 0; i < n; i++) {
            rope(s, s->q + (size_t)i * Q, hp->n_heads, pos0 + i);
            rope(s, s->k + (size_t)i * KV, hp->n_kv_heads, pos0 + i);
        }
        attention(s, l, pos0, n);
        kvc_store(s->seq, l, s->k, s->v);
        matmul(s, &L->wo, s->att, s->xb2, n);
        for (size_t i = 0; i < (size_t)n * (size_t)D; i++)
            s->x[i] += s->xb2[i];

        for (int i = 0; i < n; i++)
            rmsnorm(s, s->xb + (size_t)i * D, s->x + (size_t)i * D, L->ffn_norm, D);
        matmul(s, &L->ffn_gate, s->xb, s->hb, n);
        matmul(s, &L->ffn_up, s->xb, s->hb2, n);
        for (int i = 0; i < n; i++) {
            if (s->p.use_ref)
                kref_swiglu(s->hb + (size_t)i * H, s->hb2 + (size_t)i * H, H);
            else
                kcpu_swiglu(s->hb + (size_t)i * H, s->hb2 + (size_t)i * H, H);
        }
        matmul(s, &L->ffn_down, s->hb, s->xb2, n);
        for (size_t i = 0; i < (size_t)n * (size_t)D; i++)
            s->x[i] += s->xb2[i];
    }

    if (head == 0)
        return;
    int first = head == 2 ? 0 : n - 1;
    int cnt = n - first;
    for (int i = 0; i < cnt; i++)
        rmsnorm(s, s->xb + (size_t)i * D, s->x + (size_t)(first + i) * D,
                m->out_norm, D);
    matmul(s, &m->output, s->xb, out, cnt);
}

int fwd_eval(fwd_state *s, const int32_t *tokens, int n, int pos, int want_all,
             const float **logits, char *err, size_t errlen)
{
    const mdl_hparams *hp = &s->m->hp;
    *logits = NULL;
    if (n <= 0 || pos < 0) {
        if (err && errlen)
            snprintf(err, errlen, "nothing to evaluate (n %d, pos %d)", n, pos);
        return -1;
    }
    if ((int64_t)pos + n > s->p.n_ctx) {
        if (err && errlen)
            snprintf(err, errlen, "context full: %d + %d tokens exceed n_ctx %d",
                     pos, n, s->p.n_ctx);
        return -1;
    }
    if (want_all && (!s->p.logits_all || n > s->p.max_batch)) {
        if (err && errlen)
            snprintf(err, errlen, "all-token logits need logits_all and n <= %d",
                     s->p.max_batch);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= hp->n_vocab) {
            if (err && errlen)
                snprintf(err, errlen, "token id %d out of range [0, %d)",
                         tokens[i], hp->n_vocab);
            return -1;
        }
    }
    if (pos == 0 && kvc_seq_n_tokens(s->seq) > 0)
        kvc_seq_reset(s->seq);
    if (pos != kvc_seq_n_tokens(s->seq)) {
        if (err && errlen)
            snprintf(err, errlen,
                     "position %d: the cache holds %d positions (continue at %d or "
                     "restart at 0)", pos, kvc_seq_n_tokens(s->seq),
                     kvc_seq_n_tokens(s->seq));
        return -1;
    }
    const int C = s->p.kv.chunk_size;
    int prefill = n > 1 || pos == 0;
    for (int done = 0; done < n;) {
        int at = pos + done;
        int b = n - done < s->p.max_batch ? n - done : s->p.max_batch;
        int to_boundary = C - at % C; /* chunks are aligned to multiples of C */
        if (b > to_boundary)
            b = to_boundary;
        int rc = kvc_begin(s->seq, at, b, prefill, err, errlen);
        if (rc < 0)
            return rc;
        float *out = want_all ? s->logits + (size_t)done * (size_t)hp->n_vocab : s->logits;
        step(s, tokens + done, b, at, want_all ? 2 : done + b == n ? 1 : 0, out);
        kvc_commit(s->seq);
        done += b;
    }
    *logits = s->logits;
    return 0;
}
