/*
 * kcu_bias.cuh - bias add over rows on the GPU (the Q/K/V biases of Qwen2):
 * y [rows][cols] += b [cols], in f32 (one rounding per element, as the CPU
 * backend's loop). C-callable launcher; kernel in kcu_bias.cu.
 */
#ifndef LKQ_KCU_BIAS_CUH
#define LKQ_KCU_BIAS_CUH

#include "kernels/cuda/kcu_rt.cuh"

#ifdef __cplusplus
extern "C" {
#endif

/* y[r * cols + j] += b[j] for r < rows, j < cols (device memory). */
int kcu_add_bias(kcu_ctx *c, float *y, const float *b, int rows, int cols, char *err,
                 size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
