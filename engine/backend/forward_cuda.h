/*
 * forward_cuda.h - the Llama forward pass on a CUDA GPU, same contract as
 * engine/forward.h (fwd_create / fwd_eval / fwd_kv_stats) for one sequence:
 * token embedding, per layer RMSNorm -> Q/K/V (cuBLAS) -> RoPE -> attention
 * over the LiveKVQuant-P cache in GPU memory (engine/kvcache_cuda.h) ->
 * output projection -> residual -> RMSNorm -> SwiGLU FFN -> residual, final
 * norm and the output head; the logits are copied to the host.
 *
 * Weights are uploaded once at creation: F32 stays F32 (cuBLAS in FP32, no
 * TF32), F16 / BF16 stay as they are, quantized types (Q4_0, Q4_1, Q8_0)
 * are dequantized once to F16; GEMMs accumulate in FP32. Activations,
 * the KV pool (allocated once with cudaMalloc) and all scratch are
 * allocated by fwdc_create; fwdc_eval allocates nothing. Every CUDA and
 * cuBLAS call is checked: an error fails the call with a message, never the
 * process (after a device fault the state only returns errors).
 *
 * Two ways to drive it, as engine/forward.h: fwdc_eval runs the state's
 * own sequence; fwdc_eval_batch runs one step over several sequences
 * created on the state's device KV pool (fwdc_kv_pool) - the server's
 * continuous batching on the GPU: the step's tokens of all sequences go
 * through each weight GEMM together, attention is one kcu_attn call with
 * an item per sequence, the KV store runs per sequence.
 *
 * Threading: one thread at a time per state. The model is borrowed (only
 * during fwdc_create; the state keeps no pointer into it afterwards except
 * the hyper-parameters it copies).
 */
#ifndef LKQ_FORWARD_CUDA_H
#define LKQ_FORWARD_CUDA_H

#include "engine/graph/forward.h"
#include "engine/kv/kvcache.h"
#include "engine/kv/kvcache_cuda.h"
#include "engine/model/model.h"

typedef struct fwdc_state fwdc_state;

/* Uploads model m to CUDA device `device` and allocates everything for
 * the parameters p (n_ctx, max_batch, logits_all, max_seqs, kv; n_threads
 * and use_ref are ignored; the KV pool is planned by kvc_pool_plan as the
 * CPU's). Returns 0 and *out (fwdc_destroy) or negative with a reason (no
 * device, out of device memory, unsupported shape). */
int fwdc_create(const mdl_model *m, const fwd_params *p, int device, fwdc_state **out,
                char *err, size_t errlen);

/* Same with random weights of type wtype (KT_F16 / KT_BF16 / KT_F32)
 * generated on the GPU from seed, for a model of shape hp (benchmarks:
 * throughput does not need trained weights). */
int fwdc_create_synthetic(const mdl_hparams *hp, kt_type wtype, uint64_t seed,
                          const fwd_params *p, int device, fwdc_state **out, char *err,
                          size_t errlen);

void fwdc_destroy(fwdc_state *s); /* NULL is a no-op */

int32_t fwdc_n_ctx(const fwdc_state *s);
/* "NVIDIA H200, sm_90, 132 SMs, 139.8 GiB" */
const char *fwdc_device_name(const fwdc_state *s);
/* Device bytes of weights, and of the KV pool. */
size_t fwdc_weight_bytes(const fwdc_state *s);
size_t fwdc_kv_pool_bytes(const fwdc_state *s);
/* Exact accounting of the sequence's KV cache (reads block headers: waits). */
int fwdc_kv_stats(fwdc_state *s, kvc_stats *out, char *err, size_t errlen);
void fwdc_reset(fwdc_state *s);
int fwdc_finish_prefill(fwdc_state *s, char *err, size_t errlen);

/* fwd_eval's contract: n tokens at positions pos .. pos+n-1 (pos 0 restarts,
 * else pos must equal the cached length); prefill in chunks aligned to
 * kv.chunk_size; *logits (host memory owned by the state, valid until the
 * next call) gets [n_vocab] for the last token or [n, n_vocab] when created
 * with logits_all and want_all (n <= max_batch). Returns 0 or negative with
 * a reason (-ENOSPC: KV pool exhausted). */
int fwdc_eval(fwdc_state *s, const int32_t *tokens, int n, int pos, int want_all,
              const float **logits, char *err, size_t errlen);

/* The device KV pool (sequences for fwdc_eval_batch are created on it
 * with kvcd_seq_create, at most n_ctx positions each). */
kvcd_pool *fwdc_kv_pool(fwdc_state *s);
int32_t fwdc_max_batch(const fwdc_state *s);

/* One sequence's part of a batched step (fwd_item with a device sequence). */
typedef struct {
    kvcd_seq *seq;           /* borrowed; created on fwdc_kv_pool(s) */
    const int32_t *tokens;   /* n tokens, at positions kvcd_seq_n_tokens(seq).. */
    int n;
    int prefill;             /* 1: prompt tokens (must not cross a multiple of
                                chunk_size); 0: one decode token */
    int want_logits;         /* 1: logits of the last token */
    const float *out_logits; /* out: [n_vocab] host memory of the state, valid
                                until the next call, when want_logits */
} fwdc_item;

/* fwd_eval_batch's contract on the GPU: one step over n_items distinct
 * sequences (total tokens <= max_batch, at most max(1, max_seqs) items -
 * the attention scratch is planned for that many). Reserves every
 * sequence's blocks first (kvcd_begin): if one cannot (-ENOSPC) or an item
 * is invalid (-EINVAL), nothing runs, nothing changes, *failed is its index
 * and its error is returned. A device error during the step returns
 * negative with *failed = -1; the sequences are then not advanced (their
 * device state may be partly written: reset them). On success every
 * sequence is advanced by its n tokens and the logits of those that want
 * them are on the host. A sequence's result does not depend on the rest of
 * the batch except through the weight GEMMs: cuBLAS may sum a row in
 * another order for another number of rows (see tests/gpu/test_gpu_batch.c
 * for the tolerance). */
int fwdc_eval_batch(fwdc_state *s, fwdc_item *items, int n_items, int *failed, char *err,
                    size_t errlen);

/* Attention kernel choice for tests and benchmarks: KCU_ATTN_AUTO (0,
 * default), KCU_ATTN_GENERIC (1), KCU_ATTN_MMA (2). */
void fwdc_set_attn_path(fwdc_state *s, int path);

/* Optional per-phase GPU timing (CUDA events around every layer's
 * attention and KV store), summed over fwdc_eval calls. */
typedef struct {
    double attn_ms; /* attention kernels */
    double kv_ms;   /* KV store: statistics, live quantization, FP16 pages */
    double step_ms; /* whole steps */
    int64_t steps, tokens;
} fwdc_profile;
int fwdc_set_profile(fwdc_state *s, int on, char *err, size_t errlen);
void fwdc_get_profile(const fwdc_state *s, fwdc_profile *out);
void fwdc_clear_profile(fwdc_state *s);

#endif
