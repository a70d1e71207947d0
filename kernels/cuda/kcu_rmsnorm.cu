/*
 * kcu_rmsnorm.cu - RMSNorm kernel and launcher (see kcu_rmsnorm.cuh): one
 * block of 256 threads per row; the sum of squares is reduced in double
 * (warp shuffles, then the warps' partial sums in shared memory).
 */
#include "kernels/cuda/kcu_compat.cuh"
#include "kernels/cuda/kcu_rmsnorm.cuh"

#define RMS_THREADS 256

static __global__ void __launch_bounds__(RMS_THREADS)
    kcu_rmsnorm_kernel(float *out, const float *x, const float *w, int n, float eps)
{
    __shared__ double part[RMS_THREADS / 32];
    __shared__ double inv_s;
    const float *xr = x + (size_t)blockIdx.x * (size_t)n;
    float *yr = out + (size_t)blockIdx.x * (size_t)n;
    double ss = 0.0;
    for (int i = (int)threadIdx.x; i < n; i += RMS_THREADS)
        ss += (double)xr[i] * (double)xr[i];
    for (int o = 16; o > 0; o >>= 1)
        ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if ((threadIdx.x & 31) == 0)
        part[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int i = 0; i < RMS_THREADS / 32; i++)
            t += part[i];
        inv_s = 1.0 / sqrt(t / n + (double)eps);
    }
    __syncthreads();
    double inv = inv_s;
    for (int i = (int)threadIdx.x; i < n; i += RMS_THREADS)
        yr[i] = (float)(__dmul_rn(__dmul_rn((double)xr[i], inv), (double)w[i]));
}

extern "C" int kcu_rmsnorm(kcu_ctx *c, float *out, const float *x, const float *w, int n_rows,
                           int n, float eps, char *err, size_t errlen)
{
    if (n_rows <= 0 || n <= 0)
        return 0;
    KCU_LAUNCH(kcu_rmsnorm_kernel, dim3((unsigned)n_rows), dim3(RMS_THREADS), 0, c->stream,
               out, x, w, n, eps);
    KCU_CHECK_LAUNCH(err, errlen, "kcu_rmsnorm");
    return 0;
}
