/*
 * kcu_hadamard.cuh - per-row Walsh-Hadamard rotation on the GPU (the KV
 * rotation of kv_rotate), same contract as kref_hadamard. C-callable
 * launcher; kernel in kcu_hadamard.cu.
 */
#ifndef LKQ_KCU_HADAMARD_CUH
#define LKQ_KCU_HADAMARD_CUH

#include "kernels/cuda/kcu_rt.cuh"

#ifdef __cplusplus
extern "C" {
#endif

/* x [rows][dim] (device memory) in place: each row becomes x H / sqrt(dim),
 * dim a power of two in [1, KCU_HADAMARD_MAX_DIM]; the butterfly order of
 * kcpu_hadamard. */
#define KCU_HADAMARD_MAX_DIM 512
int kcu_hadamard(kcu_ctx *c, float *x, int rows, int dim, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
