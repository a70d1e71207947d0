/*
 * kcu_elem.cuh - small element-wise GPU ops of the forward pass: residual
 * add, f32 -> f16 / bf16 conversion (GEMM inputs, KV copies), and the
 * token-embedding row gather. C-callable launchers; kernels in kcu_elem.cu.
 * All pointers are device memory; everything runs on the context's stream.
 */
#ifndef LKQ_KCU_ELEM_CUH
#define LKQ_KCU_ELEM_CUH

#include "kernels/cuda/kcu_rt.cuh"

#ifdef __cplusplus
extern "C" {
#endif

/* y[i] += x[i], i < n. */
int kcu_add(kcu_ctx *c, float *y, const float *x, size_t n, char *err, size_t errlen);

/* dst[i] = src[i] converted to t (KT_F32: copy; KT_F16 / KT_BF16: round to
 * nearest even, as kt_f32_to_f16 for every finite value), i < n. */
int kcu_convert(kcu_ctx *c, kt_type t, void *dst, const float *src, size_t n, char *err,
                size_t errlen);

/* out [n_tok][dim] = rows tokens[i] of table (n_vocab rows of dim elements
 * of type t: KT_F32, KT_F16 or KT_BF16) as f32. tokens: device int32 [n_tok],
 * already checked to be in range. */
int kcu_embed(kcu_ctx *c, kt_type t, const void *table, const int32_t *tokens, int n_tok,
              int dim, float *out, char *err, size_t errlen);

/* dst[i] = uniform in [lo, hi) as type t (KT_F32 / KT_F16 / KT_BF16),
 * from a counter-based hash of (seed, i): synthetic weights for benchmarks,
 * generated on the device. */
int kcu_fill_uniform(kcu_ctx *c, kt_type t, void *dst, size_t n, uint64_t seed, float lo,
                     float hi, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
