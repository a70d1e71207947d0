/*
 * kcu_softcap.cuh - logit soft-capping on the GPU (Gemma), same contract as
 * kref_softcap. C-callable launcher; kernel in kcu_softcap.cu.
 */
#ifndef LKQ_KCU_SOFTCAP_CUH
#define LKQ_KCU_SOFTCAP_CUH

#include "kernels/cuda/kcu_rt.cuh"

#ifdef __cplusplus
extern "C" {
#endif

/* x[i] = cap * tanh(x[i] / cap) for i < n (device memory; cap > 0;
 * computed in double like the oracle, rounded once). */
int kcu_softcap(kcu_ctx *c, float *x, size_t n, float cap, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
