/*
 * eval.c - perplexity / KL-divergence / top-1 evaluation of a KV cache
 * configuration against the FP16 cache (see eval.h).
 */
#include "engine/eval/eval.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/backend/backend.h"
#include "engine/graph/forward.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* out[V] = log-softmax(x[V]); returns the argmax. */
static int log_softmax(const float *x, float *out, int V)
{
    int am = 0;
    float mx = x[0];
    for (int i = 1; i < V; i++)
        if (x[i] > mx) {
            mx = x[i];
            am = i;
        }
    double s = 0;
    for (int i = 0; i < V; i++)
        s += exp((double)x[i] - mx);
    float lse = mx + (float)log(s);
    for (int i = 0; i < V; i++)
        out[i] = x[i] - lse;
    return am;
}

static int make_state(const mdl_model *m, const eval_params *p, const cfg_kv *kv,
                      fwd_state **out, char *err, size_t errlen)
{
    fwd_params fp = fwd_default_params();
    fp.n_ctx = p->n_ctx;
    fp.max_batch = kv->chunk_size;
    fp.n_threads = p->n_threads;
    fp.logits_all = 1;
    fp.use_ref = p->use_ref;
    fp.kv = *kv;
    fp.device = (bk_device)p->device;
    fp.exact = p->exact;
    return fwd_create(m, &fp, out, err, errlen);
}

int eval_perplexity(const mdl_model *m, const int32_t *tokens, int64_t n_tokens,
                    const eval_params *p, eval_result *r, char *err, size_t errlen)
{
    memset(r, 0, sizeof *r);
    const int V = m->hp.n_vocab;
    if (p->n_ctx < 2 || p->n_windows < 1) {
        snprintf(err, errlen, "context must be >= 2 tokens and windows >= 1");
        return -1;
    }
    if ((int64_t)p->n_ctx * p->n_windows > n_tokens) {
        snprintf(err, errlen, "the text has %lld tokens; %d windows of %d need %lld",
                 (long long)n_tokens, p->n_windows, p->n_ctx,
                 (long long)p->n_ctx * p->n_windows);
        return -1;
    }
    if (p->n_ctx > m->hp.n_ctx_train && m->hp.n_ctx_train > 0) {
        snprintf(err, errlen, "context %d exceeds the model's training context %d",
                 p->n_ctx, m->hp.n_ctx_train);
        return -1;
    }
    /* the resolved rotation: auto on an FP16 cache is 0, the reference itself */
    int compare = p->compare && (p->kv.mode != CFG_KV_FP16 ||
                                 cfg_kv_rotate_resolve(&p->kv, m->hp.head_dim,
                                                       m->hp.qk_norm));
    cfg_kv ref_kv = p->kv;
    ref_kv.mode = CFG_KV_FP16;
    ref_kv.kv_rotate = 0; /* the reference is the plain FP16 cache */
    fwd_state *test = NULL, *ref = NULL;
    float *lp_ref = NULL, *lp = NULL;
    int rc = -1;
    const int C = p->kv.chunk_size;
    if (make_state(m, p, &p->kv, &test, err, errlen) < 0)
        goto done;
    if (compare && make_state(m, p, &ref_kv, &ref, err, errlen) < 0)
        goto done;
    lp_ref = malloc((size_t)C * (size_t)V * sizeof(float));
    lp = malloc((size_t)V * sizeof(float));
    if (!lp_ref || !lp) {
        snprintf(err, errlen, "out of memory for %d x %d log-probabilities", C, V);
        goto done;
    }
    double nll = 0, nll_ref = 0, kld = 0, kld_max = 0;
    int64_t n = 0, agree = 0;
    int32_t *am_ref = malloc((size_t)C * sizeof(int32_t));
    if (!am_ref)
        goto done;
    double t0 = now_s();
    const int n_chunks = (p->n_ctx + C - 1) / C;
    for (int w = 0; w < p->n_windows; w++) {
        const int32_t *win = tokens + (int64_t)w * p->n_ctx;
        for (int c = 0; c < n_chunks; c++) {
            int pos = c * C;
            int len = p->n_ctx - pos < C ? p->n_ctx - pos : C;
            const float *lg;
            double ta = now_s();
            if (compare) {
                if (fwd_eval(ref, win + pos, len, pos, 1, &lg, err, errlen) < 0)
                    goto fail;
                r->t_ref_s += now_s() - ta;
                for (int i = 0; i < len; i++)
                    am_ref[i] = log_softmax(lg + (size_t)i * V, lp_ref + (size_t)i * V, V);
                ta = now_s();
            }
            if (fwd_eval(test, win + pos, len, pos, 1, &lg, err, errlen) < 0)
                goto fail;
            r->t_test_s += now_s() - ta;
            for (int i = 0; i < len; i++) {
                if (pos + i + 1 >= p->n_ctx)
                    break; /* no next token to score */
                int32_t next = win[pos + i + 1];
                int am = log_softmax(lg + (size_t)i * V, lp, V);
                nll -= lp[next];
                if (compare) {
                    const float *lr = lp_ref + (size_t)i * V;
                    nll_ref -= lr[next];
                    double k = 0;
                    for (int v = 0; v < V; v++)
                        k += exp((double)lr[v]) * ((double)lr[v] - lp[v]);
                    k = k < 0 ? 0 : k; /* rounding */
                    kld += k;
                    kld_max = k > kld_max ? k : kld_max;
                    agree += am == am_ref[i];
                } else {
                    nll_ref -= lp[next];
                    agree++;
                }
                n++;
            }
            if (p->progress)
                p->progress(p->progress_ctx, w, p->n_windows, c, n_chunks,
                            exp(nll / (double)(n ? n : 1)), kld / (double)(n ? n : 1),
                            now_s() - t0);
        }
        if (fwd_finish_prefill(test, err, errlen) < 0 || fwd_kv_stats(test, &r->kv, err, errlen) < 0)
            goto fail;
    }
    r->n_scored = n;
    r->ppl = exp(nll / (double)n);
    r->ppl_ref = exp(nll_ref / (double)n);
    r->kld = kld / (double)n;
    r->kld_max = kld_max;
    r->top1_agree = (double)agree / (double)n;
    r->bits_per_element = kvc_stats_bits(&r->kv);
    rc = 0;
fail:
    free(am_ref);
done:
    free(lp_ref);
    free(lp);
    fwd_destroy(test);
    fwd_destroy(ref);
    return rc;
}
