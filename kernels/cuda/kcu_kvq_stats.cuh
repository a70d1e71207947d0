/*
 * kcu_kvq_stats.cuh - the LiveKVQuant-P range statistics on the GPU: chunk
 * quantiles (Eq. 3-2) and the clipped-EMA update (Eq. 3-2, 3-3), bit for
 * bit what kvq_chunk_quantiles and kvq_ema_update (kernels/ref/kvq_ref.c)
 * compute: the quantiles are exact order statistics (a radix select on the
 * float bit patterns) interpolated in double, the EMA uses the same f32
 * operations with no contraction. C-callable launcher; kernels in
 * kcu_kvq_stats.cu. Device pointers throughout.
 */
#ifndef LKQ_KCU_KVQ_STATS_CUH
#define LKQ_KCU_KVQ_STATS_CUH

#include "kernels/cuda/kcu_rt.cuh"
#include "kernels/kvq.h"

#ifdef __cplusplus
extern "C" {
#endif

/* EMA state of one tensor of one layer in device memory ([D] each) and
 * the number of chunks folded in before this update (host-side; the caller
 * increments it after the call, as kvq_ema_update does). */
typedef struct {
    float *lo, *hi, *sum_a, *sum_b;
    int n_chunks;
} kcu_ema_dev;

/* Device bytes of scratch kcu_kvq_fold needs for n tokens of D channels. */
size_t kcu_kvq_fold_scratch_bytes(int n, int D);

/* For each tensor t in {0 = K, 1 = V} with x[t] != NULL: the chunk
 * quantiles a, b of x[t] [n][stride] (channels 0..D-1) at alpha (see
 * kvq_chunk_quantiles), written to a_out[t] / b_out[t] when those are not
 * NULL, and folded into e[t] with kvq_ema_update(p, weight) when e is not
 * NULL. n >= 1. */
int kcu_kvq_fold(kcu_ctx *c, const float *const x[2], int n, int D, size_t stride,
                 float alpha, float *const a_out[2], float *const b_out[2],
                 const kcu_ema_dev *e, const kvq_ema_params *p, float weight, void *scratch,
                 size_t scratch_bytes, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
