/*
 * forward.h - the Llama forward pass on the CPU: token embedding, per layer
 * RMSNorm -> Q/K/V -> RoPE -> causal GQA attention over the KV cache ->
 * output projection -> residual -> RMSNorm -> SwiGLU FFN -> residual, then
 * the final norm and the output head.
 *
 * A fwd_state owns every buffer the pass needs (activations for a batch of
 * up to max_batch tokens, a paged KV pool and one sequence of n_ctx
 * positions in the chosen KV mode (FP16, or LiveKVQuant-P INT4 quantized
 * live during chunked prefill), kernel scratch, the thread pool), all
 * allocated by fwd_create: fwd_eval allocates nothing. A fwd_state is used
 * by one thread at a time (the engine thread). The model is borrowed and
 * must outlive the state.
 *
 * Two ways to drive it: fwd_eval runs the state's own sequence (CLI,
 * evaluation); fwd_eval_batch runs one step over several sequences created
 * on the state's pool (fwd_kv_pool) - the server's continuous batching. The
 * matmuls see all tokens of the step at once; attention and the KV cache
 * work per sequence. A token's result does not depend on what else is in
 * the batch (rows are computed independently), so batching never changes
 * outputs.
 *
 * Prompt tokens run in chunks aligned to multiples of kv.chunk_size; each
 * chunk attends to its own exact K/V and to the cached history (INT4 blocks
 * dequantized inside the attention), then its K/V enter the cache.
 */
#ifndef LKQ_FORWARD_H
#define LKQ_FORWARD_H

#include "config/kvq_config.h"
#include "engine/kv/kvcache.h"
#include "engine/model/model.h"

typedef struct {
    int32_t n_ctx;      /* KV cache positions (<= 0: the model's n_ctx_train) */
    int32_t max_batch;  /* tokens per internal step (<= 0: 512) */
    int32_t n_threads;  /* <= 0: number of online CPUs */
    int logits_all;     /* 1: fwd_eval can return logits for every token */
    int use_ref;        /* 1: run kernels/ref (single-threaded oracle) */
    int32_t max_seqs;   /* sequences the KV pool is planned for (<= 0: 1);
                           with > 1, max_batch may exceed chunk_size */
    cfg_kv kv;          /* KV cache mode and knobs (cfg_kv_default()) */
} fwd_params;

typedef struct fwd_state fwd_state;

fwd_params fwd_default_params(void);

/* Allocates the state for model m. Returns 0 and *out (caller frees with
 * fwd_destroy) or negative with a reason in err. */
int fwd_create(const mdl_model *m, const fwd_params *p, fwd_state **out,
               char *err, size_t errlen);
void fwd_destroy(fwd_state *s); /* NULL is a no-op */

int32_t fwd_n_ctx(const fwd_state *s);
int32_t fwd_n_threads(const fwd_state *s);
/* Bytes held by the KV cache (both K and V, all layers, all overheads). */
size_t fwd_kv_bytes(const fwd_state *s);
/* Exact accounting of the sequence's KV cache. */
void fwd_kv_stats(const fwd_state *s, kvc_stats *out);
/* The sequence (for EMA ranges and warm-up state); owned by the state. */
const kvc_seq *fwd_seq(const fwd_state *s);
/* Empties the cache (the next fwd_eval starts at position 0). */
void fwd_reset(fwd_state *s);
/* Ends the prefill explicitly (quantizes staged warm-up chunks if the
 * prompt ended during warm-up); the first single-token fwd_eval does it
 * implicitly. */
int fwd_finish_prefill(fwd_state *s, char *err, size_t errlen);

/* Runs n tokens at positions pos .. pos+n-1. pos must be 0 (the cache is
 * emptied first) or the number of positions already cached (append). A call
 * with n > 1 (or the first call) is prompt prefill; a call with n == 1
 * after that is decode. On success *logits points into the state (valid
 * until the next call): [n_vocab] for the last token, or [n, n_vocab] when
 * the state was created with logits_all and want_all is 1 (then n <=
 * max_batch). Returns 0, or negative with a reason in err (bad token id,
 * context full, KV pool exhausted: -ENOSPC); on error nothing of the failed
 * step is in the cache (earlier steps of the same call are). */
int fwd_eval(fwd_state *s, const int32_t *tokens, int n, int pos, int want_all,
             const float **logits, char *err, size_t errlen);

/* The KV pool (sequences for fwd_eval_batch are created on it). */
kvc_pool *fwd_kv_pool(fwd_state *s);
int32_t fwd_max_batch(const fwd_state *s);

/* One sequence's part of a batched step. */
typedef struct {
    kvc_seq *seq;          /* borrowed; created on fwd_kv_pool(s) */
    const int32_t *tokens; /* n tokens, at positions kvc_seq_n_tokens(seq).. */
    int n;
    int prefill;           /* 1: prompt tokens (must not cross a multiple of
                              chunk_size); 0: one decode token */
    int want_logits;       /* 1: logits of the last token */
    const float *out_logits; /* out: [n_vocab] into the state, valid until
                                the next call, when want_logits */
} fwd_item;

/* One step over n_items distinct sequences (total tokens <= max_batch, at
 * most max(1, max_seqs) of them want logits). Reserves every sequence's
 * blocks first: if one cannot (e.g. -ENOSPC, the pool is full), nothing
 * runs, nothing changes, *failed is its index and its error is returned.
 * Invalid items (-EINVAL) are refused the same way. Returns 0 on success,
 * with every sequence advanced by its n tokens. */
int fwd_eval_batch(fwd_state *s, fwd_item *items, int n_items, int *failed, char *err,
                   size_t errlen);

/* What a batched step's items are checked against (fwd_eval_batch and
 * the GPU's fwdc_eval_batch share the checks). */
typedef struct {
    int chunk_size, n_ctx, max_batch, logit_rows, n_vocab;
} fwd_batch_limits;

/* Checks item i of a batched step: n tokens (ids in [0, n_vocab)) at
 * position pos, a prompt piece within one chunk or one decode token, the
 * context and the step's token budget (total tokens of the items before
 * it), a logits row free when it wants one (n_head taken before it).
 * Returns 0, or -EINVAL with a reason in err (err must not be NULL). */
int fwd_batch_check_item(const fwd_batch_limits *lim, int i, const int32_t *tokens, int n,
                         int prefill, int want_logits, int pos, int total, int n_head, char *err,
                         size_t errlen);

/* Time per phase since creation or the last reset (wall seconds on the
 * calling thread; attn_s includes the fused dequantization of INT4 history,
 * kv_store_s the EMA update and live quantization). */
typedef struct {
    double matmul_s, attn_s, kv_store_s, other_s;
    int64_t steps, tokens;
} fwd_profile;
void fwd_profile_get(const fwd_state *s, fwd_profile *out);
void fwd_profile_reset(fwd_state *s);

#endif
