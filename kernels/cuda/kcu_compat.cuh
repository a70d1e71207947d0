/*
 * kcu_compat.cuh - what every kernels/cuda source includes first (C++ only):
 * the CUDA headers (or, with -DKCU_EMU, the CPU emulator kernels/cuda/emu/
 * kemu.h, so the same sources run in CI without a GPU), the launch and
 * dynamic-shared-memory macros that work in both, the host error helpers,
 * and small device helpers shared by the kernels: exact FP16 conversions,
 * packed f16x2 arithmetic on 32-bit registers, warp reductions and the
 * m16n8k16 tensor-core MMA.
 *
 * Threading: device helpers are per thread / per warp as documented; host
 * helpers are pure.
 */
#ifndef LKQ_KCU_COMPAT_CUH
#define LKQ_KCU_COMPAT_CUH

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#ifdef KCU_EMU
#include "kernels/cuda/emu/kemu.h"
/* kern must be a plain identifier (a kernel or a pointer to one) */
#define KCU_LAUNCH(kern, grid, block, smem, stream, ...)                                \
    kemu_launch((const void *)(kern), #kern, (grid), (block), (smem), (stream),         \
                [=]() { kern(__VA_ARGS__); })
#define KCU_DYN_SMEM(T, name) T *name = reinterpret_cast<T *>(kemu_dyn_smem())
#else
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define KCU_LAUNCH(kern, grid, block, smem, stream, ...)                                \
    kern<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#define KCU_DYN_SMEM(T, name)                                                           \
    extern __shared__ __align__(16) unsigned char kcu_dyn_smem_[];                      \
    T *name = reinterpret_cast<T *>(kcu_dyn_smem_)
#endif

#include "kernels/cuda/kcu_rt.cuh"

/* Loop unrolling hints (nvcc); the emulator build ignores them. */
#ifdef KCU_EMU
#define KCU_UNROLL
#define KCU_NOUNROLL
#else
#define KCU_UNROLL _Pragma("unroll")
#define KCU_NOUNROLL _Pragma("unroll 1")
#endif

/* The context every launcher runs on (kcu_rt.cuh keeps it opaque for C). */
struct kcu_ctx {
    int device;
    cudaStream_t stream;
    cublasHandle_t blas;
    int n_sm;
    size_t smem_optin; /* largest dynamic shared memory a block may opt into */
    char name[256];
};

/* Writes "what: <CUDA error name>: <description>" to err; returns -1. */
int kcu_cuda_fail(char *err, size_t errlen, cudaError_t e, const char *what);
/* Same for a cuBLAS status. */
int kcu_blas_fail(char *err, size_t errlen, cublasStatus_t s, const char *what);
/* Writes a formatted reason to err; returns -1. */
int kcu_failf(char *err, size_t errlen, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* After a launch: reports a launch error (bad configuration, sticky fault). */
#define KCU_CHECK_LAUNCH(err, errlen, what)                                             \
    do {                                                                                \
        cudaError_t e_ = cudaGetLastError();                                            \
        if (e_ != cudaSuccess)                                                          \
            return kcu_cuda_fail((err), (errlen), e_, (what));                          \
    } while (0)
#define KCU_TRY(call, err, errlen)                                                      \
    do {                                                                                \
        cudaError_t e_ = (call);                                                        \
        if (e_ != cudaSuccess)                                                          \
            return kcu_cuda_fail((err), (errlen), e_, #call);                           \
    } while (0)

static inline unsigned kcu_cdiv(size_t a, size_t b)
{
    return (unsigned)((a + b - 1) / b);
}

/* ---- device helpers -------------------------------------------------------- */

/* IEEE half <-> float (round to nearest even), as kt_f16_to_f32 /
 * kt_f32_to_f16 for every finite value. */
static __device__ __forceinline__ float kcu_h2f(uint16_t h)
{
    return __half2float(__ushort_as_half(h));
}
static __device__ __forceinline__ uint16_t kcu_f2h(float f)
{
    return __half_as_ushort(__float2half_rn(f));
}
static __device__ __forceinline__ uint32_t kcu_pack_h2(float lo, float hi)
{
    return (uint32_t)kcu_f2h(lo) | ((uint32_t)kcu_f2h(hi) << 16);
}
static __device__ __forceinline__ float kcu_bf2f(uint16_t h)
{
    return __uint_as_float((uint32_t)h << 16);
}

/* f16x2 a - b and a * b, one rounding each (registers as uint32). */
static __device__ __forceinline__ uint32_t kcu_hsub2(uint32_t a, uint32_t b)
{
#ifdef KCU_EMU
    return kcu_pack_h2(kcu_h2f((uint16_t)(a & 0xffffu)) - kcu_h2f((uint16_t)(b & 0xffffu)),
                       kcu_h2f((uint16_t)(a >> 16)) - kcu_h2f((uint16_t)(b >> 16)));
#else
    uint32_t d;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
#endif
}
static __device__ __forceinline__ uint32_t kcu_hmul2(uint32_t a, uint32_t b)
{
#ifdef KCU_EMU
    return kcu_pack_h2(kcu_h2f((uint16_t)(a & 0xffffu)) * kcu_h2f((uint16_t)(b & 0xffffu)),
                       kcu_h2f((uint16_t)(a >> 16)) * kcu_h2f((uint16_t)(b >> 16)));
#else
    uint32_t d;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
#endif
}

/* d += A * B, mma.sync.m16n8k16.row.col f32 += f16 x f16 (warp-collective;
 * fragment layouts as in the PTX ISA, see kemu_mma16816). */
static __device__ __forceinline__ void kcu_mma16816(float d[4], const uint32_t a[4],
                                                    const uint32_t b[2])
{
#ifdef KCU_EMU
    kemu_mma16816(d, a, b);
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

static __device__ __forceinline__ float kcu_warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
static __device__ __forceinline__ float kcu_warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
static __device__ __forceinline__ int kcu_warp_isum(int v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* Exclusive prefix sum of v over the block (blockDim.x a multiple of 32,
 * at most 1024); every thread must call it. *total gets the block's sum.
 * ws: __shared__ int[33] scratch. Contains three __syncthreads (the last
 * one lets the next call reuse ws). */
static __device__ __forceinline__ int kcu_block_exscan(int v, int *ws, int *total)
{
    int lane = (int)(threadIdx.x & 31), warp = (int)(threadIdx.x >> 5);
    int nw = (int)(blockDim.x >> 5);
    int x = v;
    for (int o = 1; o < 32; o <<= 1) {
        int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o)
            x += y;
    }
    if (lane == 31)
        ws[warp] = x;
    __syncthreads();
    if (warp == 0) {
        int t = lane < nw ? ws[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
            int y = __shfl_up_sync(0xffffffffu, t, o);
            if (lane >= o)
                t += y;
        }
        if (lane < nw)
            ws[lane] = t; /* inclusive over warps */
        if (lane == 31)
            ws[32] = t;
    }
    __syncthreads();
    int before = warp > 0 ? ws[warp - 1] : 0;
    *total = ws[32];
    __syncthreads();
    return before + x - v;
}

#endif
