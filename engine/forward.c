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
    uint16_t *kc, *vc;
    void *ws_mm;
    void *ws_attn;
    float *ref_scratch; /* [n_ctx] for kref_attn_f16 */
    size_t kv_bytes;
};

fwd_params fwd_default_params(void)
{
    fwd_params p = {.n_ctx = 0, .max_batch = 512, .n_threads = 0,
                    .logits_all = 0, .use_ref = 0};
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
    size_t kv_elems = (size_t)hp->n_layers * (size_t)p.n_ctx * KV;
    s->kc = malloc(kv_elems * sizeof(uint16_t));
    s->vc = malloc(kv_elems * sizeof(uint16_t));
    s->kv_bytes = 2 * kv_elems * sizeof(uint16_t);
    s->ref_scratch = malloc((size_t)p.n_ctx * sizeof(float));
    if (!s->x || !s->xb || !s->xb2 || !s->q || !s->k || !s->v || !s->att ||
        !s->hb || !s->hb2 || !s->logits || !s->kc || !s->vc || !s->ref_scratch)
        goto oom;

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
    s->ws_attn = malloc(max_sz(kcpu_attn_scratch_bytes(p.n_threads, p.n_ctx), 1));
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
    free(s->kc);
    free(s->vc);
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
    return s->kv_bytes;
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

/* Attention for n queries at pos0.. of layer l; caches already hold them. */
static void attention(fwd_state *s, int l, int pos0, int n)
{
    const mdl_hparams *hp = &s->m->hp;
    const size_t KV = (size_t)hp->n_kv_heads * (size_t)hp->head_dim;
    const size_t Q = (size_t)hp->n_heads * (size_t)hp->head_dim;
    const uint16_t *kc = s->kc + (size_t)l * (size_t)s->p.n_ctx * KV;
    const uint16_t *vc = s->vc + (size_t)l * (size_t)s->p.n_ctx * KV;
    float scale = 1.0f / sqrtf((float)hp->head_dim);
    if (s->p.use_ref) {
        for (int i = 0; i < n; i++)
            kref_attn_f16(s->att + (size_t)i * Q, s->q + (size_t)i * Q, kc, vc,
                          KV, pos0 + i + 1, hp->n_heads, hp->n_kv_heads,
                          hp->head_dim, scale, s->ref_scratch);
    } else {
        kcpu_attn_f16(s->pool, s->att, s->q, kc, vc, KV, pos0, n, hp->n_heads,
                      hp->n_kv_heads, hp->head_dim, scale, s->ws_attn);
    }
}

/* One step over n <= max_batch tokens at pos0. */
static void step(fwd_state *s, const int32_t *tok, int n, int pos0, int all)
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
        uint16_t *kc = s->kc + ((size_t)l * (size_t)s->p.n_ctx + (size_t)pos0) * KV;
        uint16_t *vc = s->vc + ((size_t)l * (size_t)s->p.n_ctx + (size_t)pos0) * KV;
        for (int i = 0; i < n; i++) {
            rope(s, s->q + (size_t)i * Q, hp->n_heads, pos0 + i);
            rope(s, s->k + (size_t)i * KV, hp->n_kv_heads, pos0 + i);
        }
        kcpu_f32_to_f16(kc, s->k, (int64_t)n * (int64_t)KV);
        kcpu_f32_to_f16(vc, s->v, (int64_t)n * (int64_t)KV);
        attention(s, l, pos0, n);
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

    /* Output head: all tokens, or only the last. */
    int first = all ? 0 : n - 1;
    int cnt = n - first;
    for (int i = 0; i < cnt; i++)
        rmsnorm(s, s->xb + (size_t)i * D, s->x + (size_t)(first + i) * D,
                m->out_norm, D);
    matmul(s, &m->output, s->xb, s->logits, cnt);
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
    for (int done = 0; done < n;) {
        int b = n - done < s->p.max_batch ? n - done : s->p.max_batch;
        step(s, tokens + done, b, pos + done, want_all);
        done += b;
    }
    *logits = s->logits;
    return 0;
}
