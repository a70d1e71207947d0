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
 * allocated by fwd_create: fwd_eval allocates nothing. One fwd_state is one
 * sequence; it is used by one thread at a time. The model is borrowed and
 * must outlive the state.
 *
 * Prompt tokens run in chunks aligned to multiples of kv.chunk_size; each
 * chunk attends to its own exact K/V and to the cached history (INT4 blocks
 * dequantized inside the attention), then its K/V enter the cache.
 */
#ifndef LKQ_FORWARD_H
#define LKQ_FORWARD_H

#include "config/kvq_config.h"
#include "engine/kvcache.h"
#include "engine/model.h"

typedef struct {
    int32_t n_ctx;      /* KV cache positions (<= 0: the model's n_ctx_train) */
    int32_t max_batch;  /* tokens per internal step (<= 0: 512) */
    int32_t n_threads;  /* <= 0: number of online CPUs */
    int logits_all;     /* 1: fwd_eval can return logits for every token */
    int use_ref;        /* 1: run kernels/ref (single-threaded oracle) */
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

#endif
