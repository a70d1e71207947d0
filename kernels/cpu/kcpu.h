/*
 * kcpu.h - optimized CPU kernels: SIMD (AVX2+FMA+F16C, AVX-512 (+VNNI);
 * chosen at run time, with a scalar fallback) and multi-threaded through
 * kcpu_pool. Same contracts as kernels/ref/kref.h; tests/kernels compares
 * them.
 *
 * Threading: a kcpu_pool is created once at start-up; kcpu_* functions that
 * take a pool must be called from one thread at a time per pool (the engine
 * thread). Functions without a pool argument are thread-safe.
 * No allocation on any kcpu_* call except kcpu_pool_create / kcpu_scratch.
 */
#ifndef LKQ_KCPU_H
#define LKQ_KCPU_H

#include "kernels/ktypes.h"
#include "kernels/kvq.h"

typedef struct kcpu_pool kcpu_pool;

/* Work function run by every thread of a pool: ith in [0, nth). */
typedef void (*kcpu_task_fn)(void *ctx, int ith, int nth);

/* Creates a pool of n_threads (>= 1; the caller's thread is one of them).
 * Returns 0 and *out on success, negative on failure. Caller frees with
 * kcpu_pool_destroy(). */
int kcpu_pool_create(int n_threads, kcpu_pool **out);
void kcpu_pool_destroy(kcpu_pool *p); /* NULL is a no-op */
int kcpu_pool_size(const kcpu_pool *p);

/* Runs fn(ctx, ith, nth) on every thread (the caller runs ith 0) and
 * returns when all are done. p may be NULL: runs fn(ctx, 0, 1). */
void kcpu_pool_run(kcpu_pool *p, kcpu_task_fn fn, void *ctx);

/* The back ends, each a superset of the one before (a CPU that runs one
 * runs all below it). */
typedef enum {
    KCPU_PATH_AUTO = 0,    /* the best one this build and CPU have */
    KCPU_PATH_SCALAR,      /* portable C */
    KCPU_PATH_AVX2,        /* AVX2 + FMA + F16C */
    KCPU_PATH_AVX512,      /* + AVX-512 F/BW/VL/DQ: quantized matmul of Q5_0,
                            * Q5_1, Q4_K, Q5_K, Q6_K; the rest as AVX2 */
    KCPU_PATH_AVX512VNNI,  /* + AVX512_VNNI (vpdpbusd) */
} kcpu_path;

/* Name of the SIMD path in use: "scalar", "avx2", "avx512", "avx512vnni". */
const char *kcpu_simd_name(void);
const char *kcpu_path_name(kcpu_path p);
/* Selects back end p for every later call (tests and benchmarks check each
 * path with it; KCPU_PATH_AUTO returns to the run-time choice). Returns 0,
 * or -ENOTSUP when this build or CPU cannot run p (selection unchanged).
 * Not meant to race with running kernels. */
int kcpu_force_path(kcpu_path p);
/* kcpu_force_path(on ? KCPU_PATH_SCALAR : KCPU_PATH_AUTO). */
void kcpu_force_scalar(int on);

/* Same contract as kref_matmul (f32 accumulation). Quantized weights (every
 * type but F32/F16/BF16) quantize x to int8 per 32-element block on the way,
 * as llama.cpp does, and take integer dot products against the weight codes;
 * the error this adds is bounded by sum_b (amax_b / 254) sum_{j in b} |w_j|
 * (tests/kernels/test_kernels.c), where amax_b is the block's largest |x|,
 * or with the split (below) its second largest.
 * ws: scratch of at least kcpu_matmul_scratch_bytes(t, n_cols, n_tok) bytes,
 * allocated once by the caller. */
size_t kcpu_matmul_scratch_bytes(kt_type t, int n_cols, int n_tok);
void kcpu_matmul(kcpu_pool *p, kt_type t, const void *W, const float *x,
                 float *y, int n_rows, int n_cols, int n_tok, void *ws);

/* The split of activation outliers. A block of 32 activations whose largest
 * |x| exceeds `ratio` times every other one (a lone outlier: the massive
 * channels of LLM hidden states) loses it before the int8 step - the other
 * 31 take the scale of the second largest - and the outlier is multiplied
 * in f32 with the weight's column afterwards (y[t][r] += W[r][c] * x[t][c],
 * per token in ascending column order, so a row's result depends on its own
 * values only). The test is on the int8 codes: the block splits when only
 * its largest value's code reaches ceil(127 / ratio) (kcpu_impl.h). At the
 * default ratio 3 SmolLM2's prompt matmuls split about 1.5 blocks per token
 * and the int8 error energy of its activations falls several-fold, which
 * is what makes two runs that differ slightly (e.g. in the KV cache) differ
 * little (docs/kvquant.md, "Activation outliers"); the backend uses it for
 * prompt rows only. 0 turns it off. The ratio is
 * process-wide: KCPU_XSPLIT_DEFAULT, or LKQ_CPU_XSPLIT=R in the
 * environment, or kcpu_set_xsplit_ratio (tests; a negative value restores
 * the default; not meant to race with running kernels). */
float kcpu_xsplit_ratio(void);
void kcpu_set_xsplit_ratio(float r);

/* A quantized weight repacked for the integer GEMM of prompt batches
 * (layout in kcpu_impl.h): 16 rows x 4 columns per vpdpbusd, codes as
 * bytes, an f32 scale and bias per row and 32 (Q6_K: 16) columns - about
 * 10 (Q6_K 12) bits per weight, kept beside the model's own tensor, which
 * single-token calls still use. kcpu_rp_wanted: whether repacking pays on
 * this CPU (the path in use is AVX-512 VNNI; elsewhere kcpu_matmul_rp runs
 * a portable loop). kcpu_rp_create: NULL when t is not quantized, cols is
 * not a whole number of blocks, or memory runs out. */
typedef struct kcpu_rp kcpu_rp;
int kcpu_rp_wanted(void);
kcpu_rp *kcpu_rp_create(kt_type t, const void *W, int n_rows, int n_cols);
void kcpu_rp_destroy(kcpu_rp *rp); /* NULL is a no-op */
size_t kcpu_rp_bytes(const kcpu_rp *rp);
/* kcpu_matmul's contract for the repacked weight (y [n_tok][n_rows]); the
 * same int8 activations, so the same error bound. ws: at least
 * kcpu_rp_scratch_bytes(n_cols, n_tok). */
size_t kcpu_rp_scratch_bytes(int n_cols, int n_tok);
void kcpu_matmul_rp(kcpu_pool *p, const kcpu_rp *rp, const float *x, float *y, int n_tok,
                    void *ws);
/* kcpu_matmul with the split's ratio for this call (xsplit; negative: the
 * process-wide one, 0: off), taking its weight columns from rp_cols (the
 * same weight repacked: 16 rows per load) when that is not NULL and
 * matches. */
void kcpu_matmul_ex(kcpu_pool *p, kt_type t, const void *W, const kcpu_rp *rp_cols,
                    float xsplit, const float *x, float *y, int n_rows, int n_cols, int n_tok,
                    void *ws);

void kcpu_rmsnorm(float *out, const float *x, const float *w, int n, float eps);
void kcpu_rope(float *x, int n_heads, int head_dim, int n_rot, int pos,
               float theta, float freq_scale);
/* kref_rope_ex's contract (neox pairing, per-frequency divisors). */
void kcpu_rope_ex(float *x, int n_heads, int head_dim, int n_rot, int pos, float theta,
                  float freq_scale, const float *freqs, int neox);
void kcpu_softmax(float *x, int n);
/* kref_geglu / kref_softcap (float math; tolerance in tests/kernels). */
void kcpu_geglu(float *gate, const float *up, int n);
void kcpu_softcap(float *x, int n, float cap);
void kcpu_swiglu(float *gate, const float *up, int n);
/* gate[i] = act(gate[i]) * up[i] for i < n (act: gelu_tanh when gelu, else
 * silu), split in ranges of whole 8-element groups over the pool's
 * threads; each range is the single-threaded kernel's work, so the result
 * is the same for any thread count. */
void kcpu_glu(kcpu_pool *p, int gelu, float *gate, const float *up, size_t n);
/* kref_hadamard's contract (dim a power of two, at most 4096) through the
 * fast transform: log2(dim) butterfly passes in f32, then the 1/sqrt(dim)
 * scale (the same operation order as kcu_hadamard). */
void kcpu_hadamard(float *x, int rows, int dim);
/* Row-wise dequantize (used for the token embedding lookup). */
void kcpu_dequant_row(kt_type t, const void *row, float *out, int64_t n);

/* Attention for n_q query tokens at positions pos0..pos0+n_q-1 (causal:
 * query j sees positions 0..pos0+j), parallel over (token, head).
 * q [n_q, n_head, head_dim], out [n_q, n_head, head_dim]; caches as
 * kref_attn_f16. ws: at least kcpu_attn_scratch_bytes(n_threads, n_ctx). */
size_t kcpu_attn_scratch_bytes(int n_threads, int n_ctx);
void kcpu_attn_f16(kcpu_pool *p, float *out, const float *q,
                   const uint16_t *k, const uint16_t *v, size_t kv_stride,
                   int pos0, int n_q, int n_head, int n_kv_head, int head_dim,
                   float scale, void *ws);

/* Attention for n_q query tokens at absolute positions pos0..pos0+n_q-1
 * over a segmented history (kernels/kvq.h; same contract as kref_attn_seg
 * per query: query j sees every position <= pos0 + j and, with a sliding
 * window W = window > 0, > pos0 + j - W). Segments wholly before every
 * query's window are skipped, partly covered ones masked per query.
 * KVS_Q4 segments are
 * read in place with the dequantization fused into the dot products (and
 * the outlier lists applied as corrections), never expanded to a full
 * buffer. q, out [n_q, n_head, head_dim]. ws: at least
 * kcpu_attn_seg_scratch_bytes(n_threads, L, head_dim) bytes. */
size_t kcpu_attn_seg_scratch_bytes(int n_threads, const kvq_layout *L,
                                   int head_dim);
void kcpu_attn_seg(kcpu_pool *p, float *out, const float *q, int pos0,
                   int n_q, int window, const kvs_seg *segs, int n_segs,
                   const kvq_layout *L, int n_head, int n_kv_head,
                   int head_dim, float scale, void *ws);

/* f32 -> f16 for n values (KV cache writes). */
void kcpu_f32_to_f16(uint16_t *dst, const float *src, int64_t n);

#endif
