/*
 * backend.c - dispatch of the forward pass to the CPU or the GPU (see
 * backend.h). The CUDA half is compiled only with LKQ_HAVE_CUDA (set by
 * engine/meson.build when the CUDA backend is built).
 */
#include "engine/backend.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/kcpu.h"
#ifdef LKQ_HAVE_CUDA
#include "engine/forward_cuda.h"
#endif

struct bk_state {
    bk_device dev;
    fwd_state *cpu;
#ifdef LKQ_HAVE_CUDA
    fwdc_state *gpu;
#endif
    char desc[320];
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
#ifdef LKQ_HAVE_CUDA
    fwdc_destroy(s->gpu);
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
