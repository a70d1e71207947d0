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
#include "engine/graph/forward.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kernels/cpu/kcpu.h"
#include "kernels/ref/kref.h"

/* One sequence's slice of a batched step. */
typedef struct {
    kvc_seq *seq;
    int off;  /* first row of the step's activations */
    int n;    /* tokens */
    int pos0; /* position of the first token */
} fwd_slice;

struct fwd_state {
    const mdl_model *m;
    fwd_params p;
    kcpu_pool *pool;
    float *x, *xb, *xb2, *q, *k, *v, *att, *hb, *hb2, *logits;
    int logit_rows;     /* rows of logits */
    int32_t *tok_buf;   /* [max_batch] the step's tokens, all sequences */
    fwd_slice *slices;  /* [max_batch] */
    int *head_rows;     /* [max_batch] rows that get logits */
    fwd_profile prof;
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
                    .logits_all = 0, .use_ref = 0, .max_seqs = 1,
                    .kv = cfg_kv_default()};
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
    s->logit_rows = p.logits_all ? p.max_batch : 1;
    if (s->logit_rows < p.max_seqs)
        s->logit_rows = p.max_seqs < p.max_batch ? p.max_seqs : p.max_batch;
    s->logits = malloc((size_t)s->logit_rows * V * sizeof(float));
    s->tok_buf = malloc(B * sizeof *s->tok_buf);
    s->slices = malloc(B * sizeof *s->slices);
    s->head_rows = malloc(B * sizeof *s->head_rows);
    if (!s->x || !s->xb || !s->xb2 || !s->q || !s->k || !s->v || !s->att ||
        !s->hb || !s->hb2 || !s->logits || !s->tok_buf || !s->slices || !s->head_rows)
        goto oom;

    /* KV pool sized for this one sequence (or the configured budget) */
    kvc_dims kd = {hp->n_layers, (int32_t)KV, hp->head_dim};
    int64_t nq = 0, nf = 0;
    int rc = kvc_pool_plan(&p.kv, &kd, p.n_ctx, p.max_seqs, &nq, &nf, err, errlen);
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
    free(s->tok_buf);
    free(s->slices);
    free(s->head_rows);
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

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* y [n, w.n_rows] = x [n, w.n_cols] @ w^T, timed as matmul */
static void matmul_t(fwd_state *s, const mdl_weight *w, const float *x, float *y, int n)
{
    double t = now_s();
    matmul(s, w, x, y, n);
    s->prof.matmul_s += now_s() - t;
}

/* Attention for slice c (its n queries at pos0.. of layer l): over the
 * sequence's cached history plus the slice's own exact K/V (an F32
 * segment, causal). */
static void attention(fwd_state *s, int l, const fwd_slice *c)
{
    const mdl_hparams *hp = &s->m->hp;
    const size_t KV = (size_t)hp->n_kv_heads * (size_t)hp->head_dim;
    const size_t Q = (size_t)hp->n_heads * (size_t)hp->head_dim;
    const size_t off = (size_t)c->off;
    int ns = kvc_segments(c->seq, l, s->segs, s->cap_segs - 1);
    s->segs[ns++] = (kvs_seg){KVS_F32, c->pos0, c->n, s->k + off * KV, s->v + off * KV, KV};
    const kvq_layout *L = kvc_pool_layout(s->kvp);
    float scale = 1.0f / sqrtf((float)hp->head_dim);
    float *att = s->att + off * Q;
    const float *q = s->q + off * Q;
    if (s->p.use_ref) {
        for (int i = 0; i < c->n; i++)
            kref_attn_seg(att + (size_t)i * Q, q + (size_t)i * Q, c->pos0 + i, s->segs,
                          ns, L, hp->n_heads, hp->n_kv_heads, hp->head_dim, scale,
                          s->ref_scratch);
    } else {
        kcpu_attn_seg(s->pool, att, q, c->pos0, c->n, s->segs, ns, L, hp->n_heads,
                      hp->n_kv_heads, hp->head_dim, scale, s->ws_attn);
    }
}

/* One step over the n = sum of slice lengths (<= max_batch) tokens in
 * s->tok_buf, n_sl slices (one per sequence, each with an open kvc_begin).
 * Every layer's K/V of each slice is stored into its sequence. Logits of
 * the n_head rows listed in s->head_rows are written to out [n_head, V]. */
static void step(fwd_state *s, int n, int n_sl, int n_head, float *out)
{
    const mdl_model *m = s->m;
    const mdl_hparams *hp = &m->hp;
    const int D = hp->dim, H = hp->hidden_dim;
    const size_t Q = (size_t)hp->n_heads * (size_t)hp->head_dim;
    const size_t KV = (size_t)hp->n_kv_heads * (size_t)hp->head_dim;
    const size_t row = kt_row_bytes(m->tok_embd.type, D);
    const int32_t *tok = s->tok_buf;
    double t;

    t = now_s();
    for (int i = 0; i < n; i++) {
        const uint8_t *src = (const uint8_t *)m->tok_embd.data + (size_t)tok[i] * row;
        if (s->p.use_ref)
            kref_dequant_row(m->tok_embd.type, src, s->x + (size_t)i * D, D);
        else
            kcpu_dequant_row(m->tok_embd.type, src, s->x + (size_t)i * D, D);
    }
    s->prof.other_s += now_s() - t;

    for (int l = 0; l < hp->n_layers; l++) {
        const mdl_layer *L = &m->layers[l];
        t = now_s();
        for (int i = 0; i < n; i++)
            rmsnorm(s, s->xb + (size_t)i * D, s->x + (size_t)i * D, L->attn_norm, D);
        s->prof.other_s += now_s() - t;
        matmul_t(s, &L->wq, s->xb, s->q, n);
        matmul_t(s, &L->wk, s->xb, s->k, n);
        matmul_t(s, &L->wv, s->xb, s->v, n);
        t = now_s();
        for (int c = 0; c < n_sl; c++) {
            const fwd_slice *sl = &s->slices[c];
            for (int i = 0; i < sl->n; i++) {
                size_t r = (size_t)(sl->off + i);
                rope(s, s->q + r * Q, hp->n_heads, sl->pos0 + i);
                rope(s, s->k + r * KV, hp->n_kv_heads, sl->pos0 + i);
            }
        }
        double t2 = now_s();
        s->prof.other_s += t2 - t;
        for (int c = 0; c < n_sl; c++)
            attention(s, l, &s->slices[c]);
        t = now_s();
        s->prof.attn_s += t - t2;
        for (int c = 0; c < n_sl; c++) {
            const fwd_slice *sl = &s->slices[c];
            kvc_store(sl->seq, l, s->k + (size_t)sl->off * KV, s->v + (size_t)sl->off * KV);
        }
        t2 = now_s();
        s->prof.kv_store_s += t2 - t;
        matmul_t(s, &L->wo, s->att, s->xb2, n);
        t = now_s();
        for (size_t i = 0; i < (size_t)n * (size_t)D; i++)
            s->x[i] += s->xb2[i];
        for (int i = 0; i < n; i++)
            rmsnorm(s, s->xb + (size_t)i * D, s->x + (size_t)i * D, L->ffn_norm, D);
        s->prof.other_s += now_s() - t;
        matmul_t(s, &L->ffn_gate, s->xb, s->hb, n);
        matmul_t(s, &L->ffn_up, s->xb, s->hb2, n);
        t = now_s();
        for (int i = 0; i < n; i++) {
            if (s->p.use_ref)
                kref_swiglu(s->hb + (size_t)i * H, s->hb2 + (size_t)i * H, H);
            else
                kcpu_swiglu(s->hb + (size_t)i * H, s->hb2 + (size_t)i * H, H);
        }
        s->prof.other_s += now_s() - t;
        matmul_t(s, &L->ffn_down, s->hb, s->xb2, n);
        t = now_s();
        for (size_t i = 0; i < (size_t)n * (size_t)D; i++)
            s->x[i] += s->xb2[i];
        s->prof.other_s += now_s() - t;
    }

    s->prof.steps++;
    s->prof.tokens += n;
    if (n_head == 0)
        return;
    t = now_s();
    for (int i = 0; i < n_head; i++)
        rmsnorm(s, s->xb + (size_t)i * D, s->x + (size_t)s->head_rows[i] * D,
                m->out_norm, D);
    s->prof.other_s += now_s() - t;
    matmul_t(s, &m->output, s->xb, out, n_head);
}

static int check_tokens(const fwd_state *s, const int32_t *tokens, int n, char *err,
                        size_t errlen)
{
    for (int i = 0; i < n; i++) {
        if (tokens[i] < 0 || tokens[i] >= s->m->hp.n_vocab) {
            if (err && errlen)
                snprintf(err, errlen, "token id %d out of range [0, %d)", tokens[i],
                         s->m->hp.n_vocab);
            return -EINVAL;
        }
    }
    return 0;
}

int fwd_eval(fwd_state *s, const int32_t *tokens, int n, int pos, int want_all,
             const float **logits, char *err, size_t errlen)
{
    const mdl_hparams *hp = &s->m->hp;
    *logits = NULL;
    if (n <= 0 || pos < 0) {
        if (err && errlen)
            snprintf(err, errlen, "nothing to evaluate (n %d, pos %d)", n, pos);
        return -EINVAL;
    }
    if ((int64_t)pos + n > s->p.n_ctx) {
        if (err && errlen)
            snprintf(err, errlen, "context full: %d + %d tokens exceed n_ctx %d",
                     pos, n, s->p.n_ctx);
        return -EINVAL;
    }
    if (want_all && (!s->p.logits_all || n > s->p.max_batch)) {
        if (err && errlen)
            snprintf(err, errlen, "all-token logits need logits_all and n <= %d",
                     s->p.max_batch);
        return -EINVAL;
    }
    int rc = check_tokens(s, tokens, n, err, errlen);
    if (rc < 0)
        return rc;
    if (pos == 0 && kvc_seq_n_tokens(s->seq) > 0)
        kvc_seq_reset(s->seq);
    if (pos != kvc_seq_n_tokens(s->seq)) {
        if (err && errlen)
            snprintf(err, errlen,
                     "position %d: the cache holds %d positions (continue at %d or "
                     "restart at 0)", pos, kvc_seq_n_tokens(s->seq),
                     kvc_seq_n_tokens(s->seq));
        return -EINVAL;
    }
    const int C = s->p.kv.chunk_size;
    int prefill = n > 1 || pos == 0;
    int cap = s->p.max_batch < C ? s->p.max_batch : C;
    for (int done = 0; done < n;) {
        int at = pos + done;
        int b = n - done < cap ? n - done : cap;
        int to_boundary = C - at % C; /* chunks are aligned to multiples of C */
        if (b > to_boundary)
            b = to_boundary;
        rc = kvc_begin(s->seq, at, b, prefill, err, errlen);
        if (rc < 0)
            return rc;
        float *out = want_all ? s->logits + (size_t)done * (size_t)hp->n_vocab : s->logits;
        memcpy(s->tok_buf, tokens + done, (size_t)b * sizeof *tokens);
        s->slices[0] = (fwd_slice){s->seq, 0, b, at};
        int n_head = 0;
        if (want_all) {
            for (int i = 0; i < b; i++)
                s->head_rows[i] = i;
            n_head = b;
        } else if (done + b == n) {
            s->head_rows[0] = b - 1;
            n_head = 1;
        }
        step(s, b, 1, n_head, out);
        kvc_commit(s->seq);
        done += b;
    }
    *logits = s->logits;
    return 0;
}

kvc_pool *fwd_kv_pool(fwd_state *s)
{
    return s->kvp;
}

int32_t fwd_max_batch(const fwd_state *s)
{
    return s->p.max_batch;
}

int fwd_batch_check_item(const fwd_batch_limits *lim, int i, const int32_t *tokens, int n,
                         int prefill, int want_logits, int pos, int total, int n_head, char *err,
                         size_t errlen)
{
    const int C = lim->chunk_size;
    if (n <= 0 || (!prefill && n != 1)) {
        snprintf(err, errlen, "item %d: %d tokens (decode steps take one)", i, n);
        return -EINVAL;
    }
    if (prefill && pos % C + n > C) {
        snprintf(err, errlen, "item %d: %d prompt tokens at position %d cross a chunk "
                 "boundary (chunk_size %d)", i, n, pos, C);
        return -EINVAL;
    }
    if ((int64_t)pos + n > lim->n_ctx) {
        snprintf(err, errlen, "context full: %d + %d tokens exceed n_ctx %d", pos, n,
                 lim->n_ctx);
        return -EINVAL;
    }
    if (total + n > lim->max_batch) {
        snprintf(err, errlen, "batch of more than %d tokens", lim->max_batch);
        return -EINVAL;
    }
    if (want_logits && n_head >= lim->logit_rows) {
        snprintf(err, errlen, "more than %d sequences want logits", lim->logit_rows);
        return -EINVAL;
    }
    for (int k = 0; k < n; k++) {
        if (tokens[k] < 0 || tokens[k] >= lim->n_vocab) {
            snprintf(err, errlen, "token id %d out of range [0, %d)", tokens[k], lim->n_vocab);
            return -EINVAL;
        }
    }
    return 0;
}

int fwd_eval_batch(fwd_state *s, fwd_item *items, int n_items, int *failed, char *err,
                   size_t errlen)
{
    const fwd_batch_limits lim = {s->p.kv.chunk_size, s->p.n_ctx, s->p.max_batch,
                                  s->logit_rows, s->m->hp.n_vocab};
    const size_t V = (size_t)s->m->hp.n_vocab;
    int total = 0, n_head = 0;
    char dummy[8];
    if (!err || !errlen) {
        err = dummy;
        errlen = sizeof dummy;
    }
    if (failed)
        *failed = -1;
    for (int i = 0; i < n_items; i++) {
        fwd_item *it = &items[i];
        it->out_logits = NULL;
        int pos = kvc_seq_n_tokens(it->seq);
        int rc = fwd_batch_check_item(&lim, i, it->tokens, it->n, it->prefill, it->want_logits,
                                      pos, total, n_head, err, errlen);
        if (rc < 0) {
            if (failed)
                *failed = i;
            return rc;
        }
        memcpy(s->tok_buf + total, it->tokens, (size_t)it->n * sizeof *it->tokens);
        s->slices[i] = (fwd_slice){it->seq, total, it->n, pos};
        total += it->n;
        if (it->want_logits)
            s->head_rows[n_head++] = total - 1;
    }
    for (int i = 0; i < n_items; i++) {
        int rc = kvc_begin(items[i].seq, s->slices[i].pos0, items[i].n, items[i].prefill,
                           err, errlen);
        if (rc < 0) {
            for (int j = 0; j < i; j++)
                kvc_abort(items[j].seq);
            if (failed)
                *failed = i;
            return rc;
        }
    }
    if (total > 0)
        step(s, total, n_items, n_head, s->logits);
    int h = 0;
    for (int i = 0; i < n_items; i++) {
        kvc_commit(items[i].seq);
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
