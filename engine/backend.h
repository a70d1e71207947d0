/*
 * backend.h - the device switch of the engine: one sequence's forward pass
 * on the CPU (engine/forward.h) or on a CUDA GPU (engine/forward_cuda.h)
 * behind one small interface, used by the CLI (`--device cpu|cuda`) and the
 * evaluation (eval_params.device). The CPU path is fwd_* unchanged.
 *
 * In a build without CUDA (nvcc not found, or -Dcuda=disabled) creating a
 * CUDA state fails with a one-line reason; nothing else changes.
 * Threading: a bk_state is used by one thread at a time.
 */
#ifndef LKQ_BACKEND_H
#define LKQ_BACKEND_H

#include "engine/forward.h"
#include "engine/kvcache.h"
#include "engine/model.h"

typedef enum { BK_DEVICE_CPU = 0, BK_DEVICE_CUDA = 1 } bk_device;

/* "cpu" or "cuda" -> *out; returns 0, or -1 for anything else. */
int bk_parse_device(const char *s, bk_device *out);
const char *bk_device_str(bk_device d);
/* 1 when this build has the CUDA backend compiled in. */
int bk_cuda_built(void);

typedef struct bk_state bk_state;

/* A forward state for model m on device dev (CUDA: device 0). Returns 0
 * and *out (bk_destroy) or negative with a reason. */
int bk_create(const mdl_model *m, const fwd_params *p, bk_device dev, bk_state **out,
              char *err, size_t errlen);
void bk_destroy(bk_state *s); /* NULL is a no-op */

/* fwd_eval / fwd_finish_prefill / fwd_reset / fwd_kv_stats / fwd_n_ctx on
 * the chosen device (same contracts). */
int bk_eval(bk_state *s, const int32_t *tokens, int n, int pos, int want_all,
            const float **logits, char *err, size_t errlen);
int bk_finish_prefill(bk_state *s, char *err, size_t errlen);
void bk_reset(bk_state *s);
int bk_kv_stats(bk_state *s, kvc_stats *out, char *err, size_t errlen);
int32_t bk_n_ctx(const bk_state *s);
/* "cpu (avx2, 2 threads)" or "cuda (NVIDIA H200, ...)". */
const char *bk_describe(const bk_state *s);

#endif
