/*
 * kcu_rmsnorm.cuh - RMSNorm on the GPU, same contract as kref_rmsnorm
 * (kernels/ref/kref.h), over n_rows rows at once. C-callable launcher; the
 * kernel is in kcu_rmsnorm.cu. Runs on the context's stream.
 */
#ifndef LKQ_KCU_RMSNORM_CUH
#define LKQ_KCU_RMSNORM_CUH

#include "kernels/cuda/kcu_rt.cuh"

#ifdef __cplusplus
extern "C" {
#endif

/* out [n_rows][n] = x / sqrt(mean(x^2) + eps) * w, row by row; the sum of
 * squares and the scaling are carried in double like the oracle. out may
 * alias x. All pointers are device memory. */
int kcu_rmsnorm(kcu_ctx *c, float *out, const float *x, const float *w, int n_rows, int n,
                float eps, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
