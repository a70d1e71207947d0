/*
 * kcu_rt.cuh - the CUDA runtime layer of kernels/cuda, callable from C:
 * device discovery, a context (device, one stream, one cuBLAS handle),
 * device memory, copies, synchronization, the weight GEMM through cuBLAS
 * and event timers. Every CUDA and cuBLAS call is checked: a failure
 * returns a negative value with a message in err ("what: cudaErrorX:
 * description"); nothing here exits or aborts.
 *
 * All work of a context is issued on its stream, in order; functions that
 * return results to the host (kcu_d2h, kcu_sync, kcu_timer_ms) wait for it.
 * Errors of asynchronous work surface at the next kcu_sync / kcu_d2h (or the
 * next launch); after a device fault the context stays unusable and every
 * later call fails with the fault's message.
 *
 * Threading: a context is used by one thread at a time.
 */
#ifndef LKQ_KCU_RT_CUH
#define LKQ_KCU_RT_CUH

#include <stddef.h>
#include <stdint.h>

#include "kernels/ktypes.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kcu_ctx kcu_ctx;
typedef struct kcu_timer kcu_timer;

/* Number of usable CUDA devices; 0 when there is none or no driver (the
 * reason, if any, goes to why). Never fails. */
int kcu_device_count(char *why, size_t whylen);

/* Opens device `device`: a stream and a cuBLAS handle bound to it. Returns
 * 0 and *out (caller frees with kcu_ctx_destroy) or negative with a reason. */
int kcu_ctx_create(int device, kcu_ctx **out, char *err, size_t errlen);
void kcu_ctx_destroy(kcu_ctx *c); /* NULL is a no-op; waits for pending work */

/* "NVIDIA H200, 132 SMs, 139.8 GiB" style description. */
const char *kcu_ctx_name(const kcu_ctx *c);
int kcu_ctx_sm_count(const kcu_ctx *c);
/* Free and total device memory in bytes. */
int kcu_mem_info(kcu_ctx *c, size_t *free_b, size_t *total_b, char *err, size_t errlen);

/* Device memory (cudaMalloc; never managed memory). *p is NULL on failure. */
int kcu_malloc(kcu_ctx *c, void **p, size_t bytes, char *err, size_t errlen);
void kcu_free(kcu_ctx *c, void *p); /* NULL is a no-op */

/* Host -> device copy on the stream; returns once src may be reused. */
int kcu_h2d(kcu_ctx *c, void *dst, const void *src, size_t bytes, char *err,
            size_t errlen);
/* Device -> host copy; waits for it (and for all earlier work). */
int kcu_d2h(kcu_ctx *c, void *dst, const void *src, size_t bytes, char *err,
            size_t errlen);
int kcu_d2d(kcu_ctx *c, void *dst, const void *src, size_t bytes, char *err,
            size_t errlen);
int kcu_memset(kcu_ctx *c, void *dst, int byte, size_t bytes, char *err, size_t errlen);
/* Waits for all work issued on the context; reports any asynchronous error. */
int kcu_sync(kcu_ctx *c, char *err, size_t errlen);

/* y [n_tok, n_rows] (f32) = x [n_tok, n_cols] @ W^T with W (n_rows, n_cols)
 * row-major of type wt (KT_F32, KT_F16 or KT_BF16) and x of the same type;
 * cuBLAS with FP32 accumulation (no TF32 for F32 weights). */
int kcu_gemm(kcu_ctx *c, kt_type wt, const void *W, const void *x, float *y,
             int n_rows, int n_cols, int n_tok, char *err, size_t errlen);

/* Event timer on the context's stream: start, stop, then kcu_timer_ms
 * (waits for the stop event) gives the milliseconds between them. */
int kcu_timer_create(kcu_ctx *c, kcu_timer **out, char *err, size_t errlen);
void kcu_timer_destroy(kcu_timer *t); /* NULL is a no-op */
int kcu_timer_start(kcu_timer *t, char *err, size_t errlen);
int kcu_timer_stop(kcu_timer *t, char *err, size_t errlen);
int kcu_timer_ms(kcu_timer *t, double *ms, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
