/*
 * kemu.h - a CPU emulator of the subset of CUDA (runtime API, device
 * intrinsics, cuda_fp16/bf16 conversions, mma.sync m16n8k16, cuBLAS GemmEx)
 * that kernels/cuda uses, so that the very same .cu sources can be compiled
 * as C++ with g++ (-DKCU_EMU) and executed on a machine without a GPU. The
 * tests in tests/gpu run against it in CI (suite gpu-emu) and against a real
 * device where there is one (suite gpu).
 *
 * Model: a launch runs its blocks one after another on the calling thread;
 * inside a block every CUDA thread is a coroutine with its own stack, and
 * __syncthreads() / warp collectives (shuffles, ballots, mma) switch between
 * them. So missing barriers, divergent barriers (reported as a deadlock)
 * and wrong warp-collective use show up here. `__shared__` variables are
 * function-scope statics (blocks never overlap); dynamic shared memory is a
 * per-launch buffer filled with a garbage pattern. Device memory is host
 * memory. Streams are ignored (everything is synchronous) and events read
 * the host clock. Not emulated: timing, memory-model subtleties between
 * blocks, anything not declared here.
 *
 * Threading: one host thread at a time may use the emulator.
 */
#ifndef LKQ_KEMU_H
#define LKQ_KEMU_H

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>

/* ---- language ----------------------------------------------------------- */

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)
#define __restrict__ __restrict

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct kemu_uint3 {
    unsigned x, y, z;
};
struct uint2 {
    unsigned x, y;
};
static inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }

const kemu_uint3 &kemu_thread_idx();
extern kemu_uint3 kemu_block_idx;
extern dim3 kemu_block_dim, kemu_grid_dim;
#define threadIdx (kemu_thread_idx())
#define blockIdx (kemu_block_idx)
#define blockDim (kemu_block_dim)
#define gridDim (kemu_grid_dim)
#define warpSize 32

void *kemu_dyn_smem();

/* ---- synchronization and warp collectives -------------------------------- */

void __syncthreads();
void __syncwarp(unsigned mask = 0xffffffffu);
/* Every live lane of the calling warp deposits `size` bytes; on return
 * all[lane * size ...] holds every lane's bytes (lanes that exited: zero). */
void kemu_warp_gather(const void *mine, size_t size, void *all);
int kemu_lane();

/* Every live lane deposits `size` bytes and receives lane src's (zero if
 * that lane exited). */
void kemu_warp_exchange(const void *mine, size_t size, int src, void *out);
template <class T> static inline T kemu_shfl_from(T v, int src)
{
    T r;
    kemu_warp_exchange(&v, sizeof v, src & 31, &r);
    return r;
}
template <class T> static inline T __shfl_sync(unsigned, T v, int src, int width = 32)
{
    int lane = kemu_lane();
    return kemu_shfl_from(v, (lane & ~(width - 1)) + (src & (width - 1)));
}
template <class T> static inline T __shfl_xor_sync(unsigned, T v, int m, int width = 32)
{
    int lane = kemu_lane();
    int src = lane ^ m;
    if ((src & ~(width - 1)) != (lane & ~(width - 1)))
        src = lane;
    return kemu_shfl_from(v, src);
}
template <class T> static inline T __shfl_up_sync(unsigned, T v, unsigned d, int width = 32)
{
    int lane = kemu_lane();
    int src = lane - (int)d;
    if (src < (lane & ~(width - 1)))
        src = lane;
    return kemu_shfl_from(v, src);
}
template <class T> static inline T __shfl_down_sync(unsigned, T v, unsigned d, int width = 32)
{
    int lane = kemu_lane();
    int src = lane + (int)d;
    if ((src & ~(width - 1)) != (lane & ~(width - 1)))
        src = lane;
    return kemu_shfl_from(v, src);
}
unsigned __ballot_sync(unsigned mask, int pred);
int __any_sync(unsigned mask, int pred);
int __all_sync(unsigned mask, int pred);

/* d[0..3] += A * B for one m16n8k16 f16 x f16 -> f32 tile held as PTX
 * fragments (a: 4 regs of f16x2, b: 2 regs). Warp-collective. */
void kemu_mma16816(float d[4], const uint32_t a[4], const uint32_t b[2]);

/* ---- atomics (the emulator runs one CUDA thread at a time) ---------------- */

template <class T> static inline T atomicAdd(T *p, T v) { T o = *p; *p = o + v; return o; }
template <class T> static inline T atomicMax(T *p, T v) { T o = *p; *p = v > o ? v : o; return o; }
template <class T> static inline T atomicMin(T *p, T v) { T o = *p; *p = v < o ? v : o; return o; }
template <class T> static inline T atomicOr(T *p, T v) { T o = *p; *p = o | v; return o; }
template <class T> static inline T atomicExch(T *p, T v) { T o = *p; *p = v; return o; }
static inline void __threadfence() {}
static inline void __threadfence_block() {}

/* ---- bit and float intrinsics --------------------------------------------- */

static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline int __float_as_int(float f) { int u; memcpy(&u, &f, 4); return u; }
static inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
static inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s)
{
    unsigned char b[8];
    memcpy(b, &x, 4);
    memcpy(b + 4, &y, 4);
    unsigned r = 0;
    for (int i = 0; i < 4; i++)
        r |= (unsigned)b[(s >> (4 * i)) & 7] << (8 * i);
    return r;
}
template <class T> static inline T __ldg(const T *p) { return *p; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __frcp_rn(float a) { return 1.0f / a; }
static inline float __fsqrt_rn(float a) { return std::sqrt(a); }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline float __double2float_rn(double a) { return (float)a; }
static inline int __float2int_rz(float a) { return (int)a; }
static inline float kemu_expf(float a) { return std::exp(a); }
static inline float kemu_logf(float a) { return std::log(a); }
#define __expf kemu_expf /* glibc declares its own __expf / __logf */
#define __logf kemu_logf
static inline float __fdividef(float a, float b) { return a / b; }
static inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
static inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }
using std::isfinite;
using std::isnan;
using std::isinf;

/* ---- fp16 / bf16 (storage types; arithmetic is done in float) ------------- */

struct __half {
    unsigned short kemu_bits;
};
struct __nv_bfloat16 {
    unsigned short kemu_bits;
};
unsigned short kemu_f32_to_f16(float f);
float kemu_f16_to_f32(unsigned short h);
static inline __half __float2half_rn(float f) { return __half{kemu_f32_to_f16(f)}; }
static inline __half __float2half(float f) { return __float2half_rn(f); }
static inline float __half2float(__half h) { return kemu_f16_to_f32(h.kemu_bits); }
static inline unsigned short __half_as_ushort(__half h) { return h.kemu_bits; }
static inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
static inline __nv_bfloat16 __float2bfloat16_rn(float f)
{
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return __nv_bfloat16{(unsigned short)((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(unsigned short)(u >> 16)};
}
static inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((unsigned)h.kemu_bits << 16); }
static inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.kemu_bits; }
static inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }

/* ---- runtime API ------------------------------------------------------------ */

typedef enum {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorLaunchFailure = 719,
} cudaError_t;
typedef enum {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
} cudaMemcpyKind;
typedef enum {
    cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
} cudaFuncAttribute;
typedef struct kemu_stream *cudaStream_t;
typedef struct kemu_event *cudaEvent_t;
struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem;
    size_t sharedMemPerBlock;
    size_t sharedMemPerBlockOptin;
    int multiProcessorCount;
    int major, minor;
    int maxThreadsPerBlock;
};

cudaError_t cudaGetDeviceCount(int *n);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaGetDevice(int *d);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int d);
cudaError_t cudaDriverGetVersion(int *v);
cudaError_t cudaRuntimeGetVersion(int *v);
cudaError_t cudaMalloc(void **p, size_t n);
cudaError_t cudaFree(void *p);
cudaError_t cudaMallocHost(void **p, size_t n);
cudaError_t cudaFreeHost(void *p);
cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total_b);
cudaError_t cudaMemcpy(void *d, const void *s, size_t n, cudaMemcpyKind k);
cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, cudaMemcpyKind k,
                            cudaStream_t st = 0);
cudaError_t cudaMemset(void *d, int v, size_t n);
cudaError_t cudaMemsetAsync(void *d, int v, size_t n, cudaStream_t st = 0);
cudaError_t cudaStreamCreate(cudaStream_t *s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaEventCreate(cudaEvent_t *e);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = 0);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char *cudaGetErrorString(cudaError_t e);
const char *cudaGetErrorName(cudaError_t e);
cudaError_t kemu_func_set_attribute(const void *f, cudaFuncAttribute a, int v);
template <class F> static inline cudaError_t cudaFuncSetAttribute(F f, cudaFuncAttribute a, int v)
{
    return kemu_func_set_attribute((const void *)f, a, v);
}
#define cudaStreamNonBlocking 1u

/* Runs body once per CUDA thread of every block (see the file comment). */
void kemu_launch(const void *fn, const char *name, dim3 grid, dim3 block, size_t smem,
                 cudaStream_t st, const std::function<void()> &body);

/* ---- cuBLAS (GemmEx only) --------------------------------------------------- */

typedef struct kemu_cublas *cublasHandle_t;
typedef enum {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
} cublasStatus_t;
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 } cublasOperation_t;
typedef enum { CUDA_R_32F = 0, CUDA_R_16F = 2, CUDA_R_16BF = 14 } cudaDataType;
typedef enum { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_PEDANTIC = 69 } cublasComputeType_t;
typedef enum { CUBLAS_GEMM_DEFAULT = -1 } cublasGemmAlgo_t;
typedef enum { CUBLAS_DEFAULT_MATH = 0, CUBLAS_PEDANTIC_MATH = 2 } cublasMath_t;

cublasStatus_t cublasCreate(cublasHandle_t *h);
cublasStatus_t cublasDestroy(cublasHandle_t h);
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s);
cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m);
const char *cublasGetStatusString(cublasStatus_t s);
cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb,
                            int m, int n, int k, const void *alpha, const void *A,
                            cudaDataType at, int lda, const void *B, cudaDataType bt, int ldb,
                            const void *beta, void *C, cudaDataType ct, int ldc,
                            cublasComputeType_t comp, cublasGemmAlgo_t algo);

#endif
