/*
 * backend.h - the device interface of the engine: a table of operations
 * (bk_ops) that the one layer graph (engine/graph/forward.c) calls, and
 * the registry that finds a device's table. Each backend lives in its own
 * files and owns everything device-specific: backend_cpu.c (kernels/cpu or
 * kernels/ref, the KV executor kv/kvcache.c) and backend_cuda.c
 * (kernels/cuda, cuBLAS, the KV executor kv/kvcache_cuda.c). The graph
 * never sees what is behind a table; the one #ifdef is the registry's
 * (backend.c: the CUDA table exists only in builds with nvcc).
 *
 * Memory: every activation / vector pointer the graph passes to an op is
 * backend memory (host for cpu, device for cuda) obtained from the
 * backend (alloc, upload_vector). The graph computes row offsets
 * (p + row * stride) but never dereferences them unless the table says
 * host_memory. Tokens and positions reach the backend with step_begin;
 * logits come back through read.
 *
 * A step (one call of the graph): the graph reserves KV for every slice
 * (kv_begin, all-or-nothing), calls step_begin with the step's tokens and
 * slices, then per layer the ops below, then kv_commit per slice (kv_abort
 * on any failure). Ops run in order; a backend may run them
 * asynchronously, and read waits for them.
 *
 * Errors: ops return 0 or a negative errno value (-EINVAL, -ENOSPC,
 * -ENOMEM, -EIO for a device fault, -ENOTSUP for a feature the backend
 * lacks) with a one-line reason in err (err may be NULL).
 * Threading: an instance and its sequences are used by one thread at a
 * time (the engine thread).
 */
#ifndef LKQ_BACKEND_H
#define LKQ_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "config/kvq_config.h"
#include "engine/kv/kvcache.h"
#include "engine/model/model.h"

typedef enum { BK_DEVICE_CPU = 0, BK_DEVICE_CUDA = 1 } bk_device;

/* "cpu" or "cuda" (also "gpu") -> *out; returns 0, or -1 for anything else. */
int bk_parse_device(const char *s, bk_device *out);
const char *bk_device_str(bk_device d);
/* 1 when this build has the CUDA backend compiled in. */
int bk_cuda_built(void);

/* What an instance is created for (the graph's plan). */
typedef struct {
    const mdl_hparams *hp; /* the model descriptor (borrowed for the call) */
    int max_batch;         /* rows of a step */
    int max_seqs;          /* slices of a step (>= 1) */
    int logit_rows;        /* rows the output head computes at most */
    int n_ctx;             /* positions of a sequence at most */
    int n_threads;         /* cpu: worker threads (>= 1) */
    int use_ref;           /* cpu: kernels/ref, single-threaded (the oracle) */
    int device_index;      /* cuda: GPU ordinal */
    int exact;             /* 1: exact evaluation mode - every matmul in f32 over the
                            * dequantized weights (no 8-bit activations, no f16 GEMM
                            * inputs), so two runs that differ only in their KV cache
                            * differ only by f32 rounding (eval.h); costs 4 bytes per
                            * weight and the speed of the integer kernels */
} bk_config;

/* A weight matrix held by the backend (rows x cols, y = x @ W^T). */
typedef struct bk_weight bk_weight;

/* One sequence's rows in a step: rows [off, off + n) at positions
 * pos0 .. pos0 + n - 1 of sequence seq (a backend sequence). prefill: the
 * rows are prompt tokens (else one decode token); a backend may pick its
 * matmul kernel by it, never by the step's size, so that a row's result
 * does not depend on what else is batched with it. */
typedef struct {
    void *seq;
    int off, n, pos0;
    int prefill;
} bk_slice;

typedef struct {
    const int32_t *tokens; /* host [n]: the step's tokens, slices in order */
    int n;
    const bk_slice *slices;
    int n_slices;
} bk_step;

/* RoPE of one layer over the step's rows (positions from the slices). */
typedef struct {
    int n_heads, head_dim, n_rot;
    int neox;            /* MDL_ROPE_NEOX pairing */
    float theta;         /* the layer's base */
    float freq_scale;    /* linear scaling */
    const float *freqs;  /* backend memory [n_rot/2] divisors, or NULL */
} bk_rope;

/* Attention of one layer: each slice's queries over its sequence's
 * committed history plus the slice's own K/V (causal).
 * window: 0 for a global layer (a query at position p sees [0, p]); W > 0
 * for a sliding-window layer (mdl_layer.window; Gemma-3: 512): a query at
 * p sees exactly [p - W + 1, p], the step's own rows included, each query
 * on its own bound. Every backend implements both (kernels/ref, /cpu and
 * /cuda share the contract of kref_attn_seg); the KV pool keeps only the
 * positions a window layer can still see (engine/kv/kv_plan.h). */
typedef struct {
    int n_heads, n_kv_heads, head_dim;
    float scale;  /* multiplies q.k */
    int window;   /* 0: global; W > 0: a query at p sees [p - W + 1, p] */
} bk_attn;

/* Backend-specific controls (ctl): what is not part of the graph. */
enum {
    BK_CTL_ATTN_PATH = 1,     /* arg int*: cuda attention kernel (0 auto, 1 generic, 2 mma) */
    BK_CTL_PROFILE_ON = 2,    /* arg int*: 1 / 0 device timers per phase */
    BK_CTL_PROFILE_GET = 3,   /* arg bk_dev_profile* */
    BK_CTL_PROFILE_CLEAR = 4, /* arg NULL */
    BK_CTL_WEIGHT_BYTES = 5,  /* arg size_t*: bytes of uploaded weights */
    BK_CTL_POOL_BYTES = 6,    /* arg size_t*: bytes of the KV pool's arenas */
    BK_CTL_HEAD_ROWS = 7,     /* arg bk_head_rows*: the step rows the next output-head
                               * matmul's rows come from, in order (cpu: prompt rows
                               * split activation outliers, decode rows do not) */
};

typedef struct {
    const int *rows; /* [n] rows of the current step */
    int n;
} bk_head_rows;

/* Device-timed phases (BK_CTL_PROFILE_GET; cuda events). */
typedef struct {
    double attn_ms, kv_ms, step_ms;
    int64_t steps, tokens;
} bk_dev_profile;

typedef struct bk_ops {
    const char *name; /* "cpu", "cuda" */
    int host_memory;  /* 1: backend memory is host memory */

    /* ---- instance ---- */
    int (*create)(const bk_config *c, void **be, char *err, size_t errlen);
    void (*destroy)(void *be); /* frees everything it handed out; NULL no-op */
    const char *(*describe)(void *be); /* "cpu (avx2, 2 threads)", "cuda (NVIDIA H200 ...)" */
    int (*ctl)(void *be, int what, void *arg, char *err, size_t errlen); /* -ENOTSUP if unknown */

    /* ---- memory (owned by the instance, freed by destroy) ---- */
    int (*alloc)(void *be, size_t bytes, void **out, char *err, size_t errlen);
    /* w stays borrowed by a host-memory backend (the model outlives it). */
    int (*upload_weight)(void *be, const mdl_weight *w, bk_weight **out, char *err,
                         size_t errlen);
    int (*upload_vector)(void *be, const float *v, size_t n, float **out, char *err,
                         size_t errlen);
    /* Benchmarks: random weights of type t (uniform, variance 1/cols, or
     * amplitude amp > 0) and constant vectors; NULL where unsupported. */
    int (*synth_weight)(void *be, kt_type t, int rows, int cols, uint64_t seed, float amp,
                        bk_weight **out, char *err, size_t errlen);
    int (*synth_vector)(void *be, size_t n, float value, float **out, char *err,
                        size_t errlen);
    /* Copies n floats of backend memory to the host (waits for the ops). */
    int (*read)(void *be, float *dst, const float *src, size_t n, char *err, size_t errlen);

    /* ---- the ops of a step (rows contiguous, row-major) ---- */
    int (*step_begin)(void *be, const bk_step *st, char *err, size_t errlen);
    /* x [n][cols] = table[tokens[i]] * scale */
    int (*embed)(void *be, const bk_weight *table, float scale, float *x, char *err,
                 size_t errlen);
    /* y [n][w.rows] = x [n][w.cols] @ W^T */
    int (*matmul)(void *be, const bk_weight *w, const float *x, float *y, int n, char *err,
                  size_t errlen);
    /* out [rows][dim] = rmsnorm(x [rows][dim]) * w [dim] (out may be x) */
    int (*rmsnorm)(void *be, float *out, const float *x, const float *w, int rows, int dim,
                   float eps, char *err, size_t errlen);
    /* y [rows][cols] += b [cols] */
    int (*add_bias)(void *be, float *y, const float *b, int rows, int cols, char *err,
                    size_t errlen);
    /* x [n][row_stride]: the heads at the start of each step row rotate */
    int (*rope)(void *be, float *x, size_t row_stride, const bk_rope *r, char *err,
                size_t errlen);
    /* gate [rows][cols] = act(gate) * up (row by row: a SIMD kernel's tail
     * falls at the same elements whatever the number of rows) */
    int (*glu)(void *be, float *gate, const float *up, int rows, int cols, mdl_act act,
               char *err, size_t errlen);
    /* y [n] += x [n] */
    int (*add)(void *be, float *y, const float *x, size_t n, char *err, size_t errlen);
    /* x [n] = cap * tanh(x / cap) */
    int (*softcap)(void *be, float *x, size_t n, float cap, char *err, size_t errlen);
    /* x [rows][dim] = x H / sqrt(dim) in place, row by row: the Walsh-Hadamard
     * rotation of kv_rotate (dim = head_dim, a power of two; kref_hadamard) */
    int (*hadamard)(void *be, float *x, int rows, int dim, char *err, size_t errlen);
    /* out [n][n_heads*head_dim] for q of the same shape; k, v [n][kv_dim]
     * are the step's own rows (after RoPE) */
    int (*attention)(void *be, int layer, const bk_attn *a, const float *q, float *out,
                     const float *k, const float *v, char *err, size_t errlen);
    /* each slice's rows of k, v [n][kv_dim] into its sequence (layer l) */
    int (*kv_store)(void *be, int layer, const float *k, const float *v, char *err,
                    size_t errlen);

    /* ---- the KV pool (one per instance) and its sequences ---- */
    /* d->layer_window (borrowed for the call) splits the layers into the
     * global and the window group, sz sizes each (kvc_pool_plan). */
    int (*pool_create)(void *be, const cfg_kv *cfg, const kvc_dims *d, const kvc_pool_sizes *sz,
                       char *err, size_t errlen);
    int64_t (*pool_capacity_bytes)(void *be);
    /* units of the global layers free now (admission; kvc_pool_free_units) */
    void (*pool_free_units)(void *be, int64_t *qfree, int64_t *ffree);
    /* free bytes of the global layers (kvc_pool_free_bytes): what a shared
     * pool of several KV modes admits by */
    int64_t (*pool_free_bytes)(void *be);
    double (*pool_usage)(void *be);
    int (*pool_stats)(void *be, kvc_stats *out, char *err, size_t errlen);
    const kvq_layout *(*pool_layout)(void *be); /* NULL in fp16 mode */
    int (*seq_create)(void *be, int max_tokens, void **seq, char *err, size_t errlen);
    void (*seq_destroy)(void *seq); /* NULL no-op */
    void (*seq_reset)(void *seq);
    int (*seq_n_tokens)(const void *seq);
    /* the KV mode of an empty sequence (kvc_seq_set_mode) and its mode */
    int (*seq_set_mode)(void *seq, int mode, char *err, size_t errlen);
    int (*seq_mode)(const void *seq);
    /* units, bytes and positions held (kvc_seq_held: host bookkeeping only) */
    void (*seq_held)(const void *seq, kvc_stats *out);
    int (*seq_stats)(void *seq, kvc_stats *out, char *err, size_t errlen);
    int (*seq_ema)(void *seq, int layer, int tensor, float *lo, float *hi);
    int (*seq_warming)(const void *seq);
    int (*seq_layer_counts)(void *seq, int layer, kvc_layer_counts *out, char *err,
                            size_t errlen);
    int (*seq_finish_prefill)(void *seq, char *err, size_t errlen);
    int (*kv_begin)(void *seq, int pos0, int n, int prefill, char *err, size_t errlen);
    void (*kv_commit)(void *seq);
    void (*kv_abort)(void *seq);

    /* ---- prefix reuse (optional: NULL where the device cannot share
     * blocks yet; the graph then answers -ENOTSUP) ---- */
    /* turns the pool's prefix cache on (kvc_pool_prefix_enable) */
    int (*prefix_enable)(void *be, int max_nodes, char *err, size_t errlen);
    void (*prefix_stats)(void *be, kvc_prefix_stats *out);
    /* an empty sequence continues from the longest cached prefix of
     * toks[0, n): returns the positions taken (kvc_seq_prefix_adopt) */
    int (*seq_prefix_adopt)(void *seq, const int32_t *toks, int n);
    void (*seq_prefix_store)(void *seq, const int32_t *toks);
    int (*seq_fork)(void *dst, const void *src, char *err, size_t errlen);
} bk_ops;

/* The table of device d, or NULL (with a one-line reason) when this build
 * lacks it. */
const bk_ops *bk_find(bk_device d, char *err, size_t errlen);

/* The backends (each in its own file). */
extern const bk_ops bk_cpu_ops;
extern const bk_ops bk_cuda_ops; /* only in builds with the CUDA backend */

#endif
