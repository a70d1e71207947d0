/*
 * kcu_hadamard.cu - Walsh-Hadamard rotation kernel and launcher (see
 * kcu_hadamard.cuh): one block of 128 threads per row, the row in shared
 * memory, log2(dim) butterfly passes (each thread takes pairs (i, i + h)),
 * a barrier between passes, then the 1/sqrt(dim) scale on the way out.
 */
#include "kernels/cuda/kcu_compat.cuh"
#include "kernels/cuda/kcu_hadamard.cuh"

#define HAD_THREADS 128

static __global__ void __launch_bounds__(HAD_THREADS)
    kcu_hadamard_kernel(float *x, int dim, float norm)
{
    __shared__ float buf[KCU_HADAMARD_MAX_DIM];
    float *xr = x + (size_t)blockIdx.x * (size_t)dim;
    for (int i = (int)threadIdx.x; i < dim; i += HAD_THREADS)
        buf[i] = xr[i];
    __syncthreads();
    for (int h = 1; h < dim; h <<= 1) {
        for (int p = (int)threadIdx.x; p < dim / 2; p += HAD_THREADS) {
            int i = (p / h) * 2 * h + p % h;
            float a = buf[i], c = buf[i + h];
            buf[i] = __fadd_rn(a, c);
            buf[i + h] = __fsub_rn(a, c);
        }
        __syncthreads();
    }
    for (int i = (int)threadIdx.x; i < dim; i += HAD_THREADS)
        xr[i] = __fmul_rn(buf[i], norm);
}

extern "C" int kcu_hadamard(kcu_ctx *c, float *x, int rows, int dim, char *err, size_t errlen)
{
    if (dim < 1 || dim > KCU_HADAMARD_MAX_DIM || (dim & (dim - 1)))
        return kcu_failf(err, errlen, "kcu_hadamard: dim %d is not a power of two in [1, %d]",
                         dim, KCU_HADAMARD_MAX_DIM);
    if (rows <= 0)
        return 0;
    KCU_LAUNCH(kcu_hadamard_kernel, dim3((unsigned)rows), dim3(HAD_THREADS), 0, c->stream, x,
               dim, 1.0f / sqrtf((float)dim));
    KCU_CHECK_LAUNCH(err, errlen, "kcu_hadamard");
    return 0;
}
