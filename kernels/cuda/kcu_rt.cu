/*
 * kcu_rt.cu - the CUDA runtime layer (see kcu_rt.cuh): context, memory,
 * copies, the cuBLAS weight GEMM, timers and the error helpers every
 * launcher uses. One context = one device, one stream, one cuBLAS handle.
 */
#include "kernels/cuda/kcu_compat.cuh"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

struct kcu_timer {
    kcu_ctx *c;
    cudaEvent_t a, b;
};

int kcu_failf(char *err, size_t errlen, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

int kcu_cuda_fail(char *err, size_t errlen, cudaError_t e, const char *what)
{
    return kcu_failf(err, errlen, "CUDA error in %s: %s: %s", what, cudaGetErrorName(e),
                     cudaGetErrorString(e));
}

int kcu_blas_fail(char *err, size_t errlen, cublasStatus_t s, const char *what)
{
    return kcu_failf(err, errlen, "cuBLAS error in %s: %s", what, cublasGetStatusString(s));
}

extern "C" int kcu_device_count(char *why, size_t whylen)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        if (why && whylen)
            snprintf(why, whylen, "%s: %s", cudaGetErrorName(e), cudaGetErrorString(e));
        (void)cudaGetLastError(); /* not sticky: clear it */
        return 0;
    }
    if (n == 0 && why && whylen)
        snprintf(why, whylen, "no CUDA device");
    return n;
}

extern "C" int kcu_ctx_create(int device, kcu_ctx **out, char *err, size_t errlen)
{
    *out = NULL;
    char why[256] = "";
    int n = kcu_device_count(why, sizeof why);
    if (device < 0 || device >= n)
        return kcu_failf(err, errlen, "CUDA device %d not available (%d device(s)%s%s)",
                         device, n, why[0] ? ": " : "", why);
    kcu_ctx *c = (kcu_ctx *)calloc(1, sizeof *c);
    if (!c)
        return kcu_failf(err, errlen, "out of memory");
    c->device = device;
    cudaError_t e = cudaSetDevice(device);
    cudaDeviceProp prop;
    if (e == cudaSuccess)
        e = cudaGetDeviceProperties(&prop, device);
    if (e == cudaSuccess)
        e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
        free(c);
        return kcu_cuda_fail(err, errlen, e, "opening the device");
    }
    cublasStatus_t s = cublasCreate(&c->blas);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasSetStream(c->blas, c->stream);
    /* F32 GEMMs stay F32 (no TF32 shortcut) */
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasSetMathMode(c->blas, CUBLAS_DEFAULT_MATH);
    if (s != CUBLAS_STATUS_SUCCESS) {
        if (c->blas)
            cublasDestroy(c->blas);
        cudaStreamDestroy(c->stream);
        free(c);
        return kcu_blas_fail(err, errlen, s, "creating the cuBLAS handle");
    }
    c->n_sm = prop.multiProcessorCount;
    c->smem_optin = prop.sharedMemPerBlockOptin;
    snprintf(c->name, sizeof c->name, "%.200s, sm_%d%d, %d SMs, %.1f GiB", prop.name, prop.major,
             prop.minor, prop.multiProcessorCount,
             (double)prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
    *out = c;
    return 0;
}

extern "C" void kcu_ctx_destroy(kcu_ctx *c)
{
    if (!c)
        return;
    cudaStreamSynchronize(c->stream);
    cublasDestroy(c->blas);
    cudaStreamDestroy(c->stream);
    free(c);
}

extern "C" const char *kcu_ctx_name(const kcu_ctx *c)
{
    return c->name;
}

extern "C" int kcu_ctx_sm_count(const kcu_ctx *c)
{
    return c->n_sm;
}

extern "C" int kcu_mem_info(kcu_ctx *c, size_t *free_b, size_t *total_b, char *err,
                            size_t errlen)
{
    (void)c;
    KCU_TRY(cudaMemGetInfo(free_b, total_b), err, errlen);
    return 0;
}

extern "C" int kcu_malloc(kcu_ctx *c, void **p, size_t bytes, char *err, size_t errlen)
{
    (void)c;
    *p = NULL;
    cudaError_t e = cudaMalloc(p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        *p = NULL;
        (void)cudaGetLastError(); /* an allocation failure is not sticky */
        return kcu_failf(err, errlen, "cannot allocate %.1f MiB of device memory: %s",
                         (double)bytes / (1024.0 * 1024.0), cudaGetErrorString(e));
    }
    return 0;
}

extern "C" void kcu_free(kcu_ctx *c, void *p)
{
    (void)c;
    if (p)
        cudaFree(p);
}

extern "C" int kcu_h2d(kcu_ctx *c, void *dst, const void *src, size_t bytes, char *err,
                       size_t errlen)
{
    if (bytes == 0)
        return 0;
    KCU_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->stream), err, errlen);
    return 0;
}

extern "C" int kcu_d2h(kcu_ctx *c, void *dst, const void *src, size_t bytes, char *err,
                       size_t errlen)
{
    if (bytes > 0)
        KCU_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->stream), err,
                errlen);
    KCU_TRY(cudaStreamSynchronize(c->stream), err, errlen);
    return 0;
}

extern "C" int kcu_d2d(kcu_ctx *c, void *dst, const void *src, size_t bytes, char *err,
                       size_t errlen)
{
    if (bytes == 0)
        return 0;
    KCU_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, c->stream), err,
            errlen);
    return 0;
}

extern "C" int kcu_memset(kcu_ctx *c, void *dst, int byte, size_t bytes, char *err,
                          size_t errlen)
{
    if (bytes == 0)
        return 0;
    KCU_TRY(cudaMemsetAsync(dst, byte, bytes, c->stream), err, errlen);
    return 0;
}

extern "C" int kcu_sync(kcu_ctx *c, char *err, size_t errlen)
{
    KCU_TRY(cudaStreamSynchronize(c->stream), err, errlen);
    KCU_TRY(cudaGetLastError(), err, errlen);
    return 0;
}

extern "C" int kcu_gemm(kcu_ctx *c, kt_type wt, const void *W, const void *x, float *y,
                        int n_rows, int n_cols, int n_tok, char *err, size_t errlen)
{
    cudaDataType t;
    switch (wt) {
    case KT_F32: t = CUDA_R_32F; break;
    case KT_F16: t = CUDA_R_16F; break;
    case KT_BF16: t = CUDA_R_16BF; break;
    default:
        return kcu_failf(err, errlen, "kcu_gemm: weight type %s is not a GPU weight type",
                         kt_name(wt));
    }
    if (n_rows <= 0 || n_cols <= 0 || n_tok <= 0)
        return kcu_failf(err, errlen, "kcu_gemm: bad shape %d x %d x %d", n_rows, n_cols,
                         n_tok);
    /* Row-major y [n_tok][n_rows] is column-major y^T (n_rows x n_tok):
     * y^T = W (n_rows x n_cols) * x^T, where row-major W is column-major
     * W^T (lda = n_cols, so op T) and row-major x is column-major x^T. */
    const float one = 1.0f, zero = 0.0f;
    cublasStatus_t s = cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, n_rows, n_tok, n_cols,
                                    &one, W, t, n_cols, x, t, n_cols, &zero, y, CUDA_R_32F,
                                    n_rows,
                                    wt == KT_F32 ? CUBLAS_COMPUTE_32F_PEDANTIC
                                                 : CUBLAS_COMPUTE_32F,
                                    CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS)
        return kcu_blas_fail(err, errlen, s, "cublasGemmEx");
    return 0;
}

extern "C" int kcu_timer_create(kcu_ctx *c, kcu_timer **out, char *err, size_t errlen)
{
    *out = NULL;
    kcu_timer *t = (kcu_timer *)calloc(1, sizeof *t);
    if (!t)
        return kcu_failf(err, errlen, "out of memory");
    t->c = c;
    cudaError_t e = cudaEventCreate(&t->a);
    if (e == cudaSuccess) {
        e = cudaEventCreate(&t->b);
        if (e != cudaSuccess)
            cudaEventDestroy(t->a);
    }
    if (e != cudaSuccess) {
        free(t);
        return kcu_cuda_fail(err, errlen, e, "cudaEventCreate");
    }
    *out = t;
    return 0;
}

extern "C" void kcu_timer_destroy(kcu_timer *t)
{
    if (!t)
        return;
    cudaEventDestroy(t->a);
    cudaEventDestroy(t->b);
    free(t);
}

extern "C" int kcu_timer_start(kcu_timer *t, char *err, size_t errlen)
{
    KCU_TRY(cudaEventRecord(t->a, t->c->stream), err, errlen);
    return 0;
}

extern "C" int kcu_timer_stop(kcu_timer *t, char *err, size_t errlen)
{
    KCU_TRY(cudaEventRecord(t->b, t->c->stream), err, errlen);
    return 0;
}

extern "C" int kcu_timer_ms(kcu_timer *t, double *ms, char *err, size_t errlen)
{
    float f = 0.0f;
    KCU_TRY(cudaEventSynchronize(t->b), err, errlen);
    KCU_TRY(cudaEventElapsedTime(&f, t->a, t->b), err, errlen);
    *ms = f;
    return 0;
}
