/*
 * backend.c - dispatch of the forward pass and its KV pool to the CPU or
 * the GPU (see backend.h). The CUDA half is compiled only with
 * LKQ_HAVE_CUDA (set by engine/meson.build when the CUDA backend is built).
 * Threading: as backend.h (one thread at a time per state; the pool
 * estimate reads the configuration only).
 */
#include "engine/backend/backend.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/kcpu.h"
#ifdef LKQ_HAVE_CUDA
#include "engine/backend/forward_cuda.h"
#endif

struct bk_state {
    bk_device dev;
    fwd_state *cpu;
    kvc_pool *pool; /* the CPU state's pool */
    fwd_item *fitems;
#ifdef LKQ_HAVE_CUDA
    fwdc_state *gpu;
    fwdc_item *gitems;
#endif
    int cap_items;  /* of fitems / gitems: max_batch */
    char desc[320];
};

struct bk_seq {
    kvc_seq *cpu;
#ifdef LKQ_HAVE_CUDA
    kvcd_seq *gpu;
#endif
};

int bk_parse_device(const char *s, bk_device *out)
{
    if (!strcmp(s, "cpu")) {
        *out = BK_DEVICE_CPU;
        return 0;
    }
    if (!strcmp(s, "cuda") || !strcmp(s, "gpu")) {
        *out = BK_DEVICE_CUDA;
        return 0;
    }
    return -1;
}

const char *bk_device_str(bk_device d)
{
    return d == BK_DEVICE_CUDA ? "cuda" : "cpu";
}

int bk_cuda_built(void)
{
#ifdef LKQ_HAVE_CUDA
    return 1;
#else
    return 0;
#endif
}

int bk_create(const mdl_model *m, const fwd_params *p, bk_device dev, bk_state **out,
              char *err, size_t errlen)
{
    *out = NULL;
    bk_state *s = calloc(1, sizeof *s);
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    s->dev = dev;
    int rc;
    if (dev == BK_DEVICE_CPU) {
        rc = fwd_create(m, p, &s->cpu, err, errlen);
        if (rc == 0)
            snprintf(s->desc, sizeof s->desc, "cpu (%s, %d threads)",
                     p && p->use_ref ? "ref" : kcpu_simd_name(), fwd_n_threads(s->cpu));
    } else {
#ifdef LKQ_HAVE_CUDA
        rc = fwdc_create(m, p, 0, &s->gpu, err, errlen);
        if (rc == 0)
            snprintf(s->desc, sizeof s->desc, "cuda (%s)", fwdc_device_name(s->gpu));
#else
        snprintf(err, errlen, "this build has no CUDA backend (nvcc was not found when it "
                              "was configured; rebuild with -Dcuda=enabled on a machine with "
                              "the CUDA toolkit)");
        rc = -ENOTSUP;
#endif
    }
    if (rc == 0) {
        s->cap_items = bk_max_batch(s);
        if (s->cpu) {
            s->pool = fwd_kv_pool(s->cpu);
            s->fitems = calloc((size_t)s->cap_items, sizeof *s->fitems);
        }
#ifdef LKQ_HAVE_CUDA
        if (s->gpu)
            s->gitems = calloc((size_t)s->cap_items, sizeof *s->gitems);
        if (s->gpu && !s->gitems)
            rc = -ENOMEM;
#endif
        if (s->cpu && !s->fitems)
            rc = -ENOMEM;
        if (rc < 0) {
            snprintf(err, errlen, "out of memory");
            bk_destroy(s);
            return rc;
        }
    }
    if (rc < 0) {
        free(s);
        return rc;
    }
    *out = s;
    return 0;
}

void bk_destroy(bk_state *s)
{
    if (!s)
        return;
    fwd_destroy(s->cpu);
    free(s->fitems);
#ifdef LKQ_HAVE_CUDA
    fwdc_destroy(s->gpu);
    free(s->gitems);
#endif
    free(s);
}

int bk_eval(bk_state *s, const int32_t *tokens, int n, int pos, int want_all,
            const float **logits, char *err, size_t errlen)
{
#ifdef LKQ_HAVE_CUDA
    if (s->gpu)
        return fwdc_eval(s->gpu, tokens, n, pos, want_all, logits, err, errlen);
#endif
    return fwd_eval(s->cpu, tokens, n, pos, want_all, logits, err, errlen);
}

int bk_finish_prefill(bk_state *s, char *err, size_t errlen)
{
#ifdef LKQ_HAVE_CUDA
    if (s->gpu)
        return fwdc_finish_prefill(s->gpu, err, errlen);
#endif
    return fwd_finish_prefill(s->cpu, err, errlen);
}

void bk_reset(bk_state *s)
{
#ifdef LKQ_HAVE_CUDA
    if (s->gpu) {
        fwdc_reset(s->gpu);
        return;
    }
#endif
    fwd_reset(s->cpu);
}

int bk_kv_stats(bk_state *s, kvc_stats *out, char *err, size_t errlen)
{
#ifdef LKQ_HAVE_CUDA
    if (s->gpu)
        return fwdc_kv_stats(s->gpu, out, err, errlen);
#endif
    (void)err;
    (void)errlen;
    fwd_kv_stats(s->cpu, out);
    return 0;
}

int32_t bk_n_ctx(const bk_state *s)
{
#ifdef LKQ_HAVE_CUDA
    if (s->gpu)
        return fwdc_n_ctx(s->gpu);
#endif
    return fwd_n_ctx(s->cpu);
}

const char *bk_describe(const bk_state *s)
{
    return s->desc;
}

bk_device bk_state_device(const bk_state *s)
{
    return s->dev;
}

/* ---- sequences on the shared pool ----------------------------------------- */

int32_t bk_max_batch(const bk_state *s)
{
#ifdef LKQ_HAVE_CUDA
    if (s->gpu)
        return fwdc_max_batch(s->gpu);
#endif
    return fwd_max_batch(s->cpu);
}

int64_t bk_pool_capacity_bytes(const bk_state *s)
{
#ifdef LKQ_HAVE_CUDA
    if (s->gpu)
        return (int64_t)kvcd_pool_bytes(fwdc_kv_pool(s->gpu));
#endif
    return kvc_pool_capacity_bytes(s->pool);
}

void bk_pool_free_units(const bk_state *s, int64_t *qfree, int64_t *ffree)
{
#ifdef LKQ_HAVE_CUDA
    if (s->gpu) {
        kvcd_pool_free_units(fwdc_kv_pool(s->gpu), qfree, ffree);
        return;
    }
#endif
    kvc_pool_free_units(s->pool, qfree, ffree);
}

void bk_pool_estimate(const bk_state *s, int n, int64_t *nq, int64_t *nf)
{
#ifdef LKQ_HAVE_CUDA
    if (s->gpu) {
        kvcd_pool_estimate(fwdc_kv_pool(s->gpu), n, nq, nf);
        return;
    }
#endif
    kvc_pool_estimate(s->pool, n, nq, nf);
}

double bk_pool_usage(const bk_state *s)
{
#ifdef LKQ_HAVE_CUDA
    if (s->gpu)
        return kvcd_pool_usage(fwdc_kv_pool(s->gpu));
#endif
    return kvc_pool_usage(s->pool);
}

int bk_pool_stats(bk_state *s, kvc_stats *out, char *err, size_t errlen)
{
#ifdef LKQ_HAVE_CUDA
    if (s->gpu)
        return kvcd_pool_stats(fwdc_kv_pool(s->gpu), out, err, errlen);
#endif
    (void)err;
    (void)errlen;
    kvc_pool_stats(s->pool, out);
    return 0;
}

int bk_seq_create(bk_state *s, int max_tokens, bk_seq **out, char *err, size_t errlen)
{
    *out = NULL;
    bk_seq *q = calloc(1, sizeof *q);
    if (!q) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    int rc;
#ifdef LKQ_HAVE_CUDA
    if (s->gpu)
        rc = kvcd_seq_create(fwdc_kv_pool(s->gpu), max_tokens, &q->gpu, err, errlen);
    else
#endif
        rc = kvc_seq_create(s->pool, max_tokens, &q->cpu, err, errlen);
    if (rc < 0) {
        free(q);
        return rc;
    }
    *out = q;
    return 0;
}

void bk_seq_destroy(bk_seq *q)
{
    if (!q)
        return;
    kvc_seq_destroy(q->cpu);
#ifdef LKQ_HAVE_CUDA
    kvcd_seq_destroy(q->gpu);
#endif
    free(q);
}

void bk_seq_reset(bk_seq *q)
{
#ifdef LKQ_HAVE_CUDA
    if (q->gpu) {
        kvcd_seq_reset(q->gpu);
        return;
    }
#endif
    kvc_seq_reset(q->cpu);
}

int bk_seq_n_tokens(const bk_seq *q)
{
#ifdef LKQ_HAVE_CUDA
    if (q->gpu)
        return kvcd_seq_n_tokens(q->gpu);
#endif
    return kvc_seq_n_tokens(q->cpu);
}

int bk_seq_ema(bk_seq *q, int layer, int tensor, float *lo, float *hi)
{
#ifdef LKQ_HAVE_CUDA
    if (q->gpu)
        return kvcd_seq_ema_mean(q->gpu, layer, tensor, lo, hi);
#endif
    return kvc_seq_ema(q->cpu, layer, tensor, lo, hi);
}

int bk_seq_warming(const bk_seq *q)
{
#ifdef LKQ_HAVE_CUDA
    if (q->gpu)
        return kvcd_seq_warming(q->gpu);
#endif
    return kvc_seq_warming(q->cpu);
}

int bk_eval_batch(bk_state *s, bk_item *items, int n_items, int *failed, char *err,
                  size_t errlen)
{
    if (n_items > s->cap_items) { /* more items than tokens a step holds */
        if (failed)
            *failed = s->cap_items;
        if (err && errlen)
            snprintf(err, errlen, "batch of more than %d tokens", s->cap_items);
        return -EINVAL;
    }
    int rc;
#ifdef LKQ_HAVE_CUDA
    if (s->gpu) {
        for (int i = 0; i < n_items; i++)
            s->gitems[i] = (fwdc_item){items[i].seq->gpu, items[i].tokens, items[i].n,
                                       items[i].prefill, items[i].want_logits, NULL};
        rc = fwdc_eval_batch(s->gpu, s->gitems, n_items, failed, err, errlen);
        for (int i = 0; i < n_items; i++)
            items[i].out_logits = s->gitems[i].out_logits;
        return rc;
    }
#endif
    for (int i = 0; i < n_items; i++)
        s->fitems[i] = (fwd_item){items[i].seq->cpu, items[i].tokens, items[i].n,
                                  items[i].prefill, items[i].want_logits, NULL};
    rc = fwd_eval_batch(s->cpu, s->fitems, n_items, failed, err, errlen);
    for (int i = 0; i < n_items; i++)
        items[i].out_logits = s->fitems[i].out_logits;
    return rc;
}
