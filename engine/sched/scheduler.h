/*
 * scheduler.h - the engine thread and its scheduler: continuous batching over
 * chunked prefill (../shared/DESIGN.md §1, §6).
 * Room: engine/sched. Owns the request queue, admission, the step plan of
 * every engine step and the published metrics. May call: engine/graph
 * (fwd_*: the forward state, its sequences and pool), engine/sample,
 * engine/util; never a backend or a KV executor directly.
 *
 * The HTTP layer turns a request into native parameters (token ids,
 * sampling, limits), submits it, and polls its output; it never touches
 * the model. One engine thread owns the forward state, the shared KV pool
 * and every sequence, on the CPU or a CUDA GPU (sched_params.device,
 * engine/backend/backend.h). Each step packs the decode token of every running
 * sequence plus chunk-aligned prefill pieces of new ones within a token
 * budget (max_batch); a sequence is admitted when a slot is free and the
 * pool's free blocks cover its prompt. When the pool runs out mid-flight,
 * the youngest sequence of the request holding the most slots is
 * preempted (its blocks freed) and recomputed later from its prompt plus
 * the tokens it had produced; output already delivered is never repeated.
 * Waiting requests sit in a bounded queue; a full queue is refused at
 * submit (the HTTP layer answers 429).
 *
 * Fairness: a request is a group of sequences (its n choices, and with
 * sched_submit_group its several prompts). Admission takes the waiting
 * sequence of the group with the fewest sequences running (round robin
 * between requests, oldest request first on ties), a group runs at most
 * max_seqs_per_req sequences at once, and a request with nothing running
 * that finds no free slot (or no room in the pool) preempts one sequence of
 * the group holding the most slots - the one with the least computed, so
 * the recomputation is cheap. Prefill pieces of different sequences take
 * turns (the one served longest ago first), so a short prompt is never
 * queued behind every chunk of a long one; every step still carries the
 * decode token of every running sequence.
 *
 * Prefix reuse (sched_params.prefix_nodes, sched_req_params.cache_prompt;
 * engine/kv/kv_plan.h, the prefix cache): an admitted sequence continues
 * from the longest cached prefix of its prompt (whole chunks, with the EMA
 * state at that boundary: what a cold run computes, bit for bit), every
 * committed prompt chunk is offered to the cache, and the other choices of
 * an n > 1 request wait until choice 0 has prefilled the prompt, then fork
 * its sequence and sample from the same logits. Cached blocks no sequence
 * holds count as free for admission and are evicted least recently used.
 *
 * Output: per choice, the text (UTF-8, stop sequences cut, text that could
 * still become a stop sequence held back) and per-token records; the HTTP
 * side copies what is new with sched_req_poll and is told by its notify
 * callback (called on the engine thread, with the scheduler lock held)
 * when there is more. A request is shared between the two sides by
 * reference counting; sched_req_release drops the HTTP side's reference
 * (cancelling it first if it is still running), which frees its KV blocks
 * at the next step.
 *
 * Threading: sched_* functions may be called from any thread except where
 * noted; all state is behind one mutex held only briefly (never during a
 * forward step).
 */
#ifndef LKQ_SCHED_H
#define LKQ_SCHED_H

#include <stddef.h>
#include <stdint.h>

#include "engine/backend/backend.h"
#include "engine/graph/forward.h"
#include "engine/kv/kvcache.h"
#include "engine/model/model.h"
#include "engine/sample/sampler.h"

#define SCHED_MAX_N 16        /* choices per request */
#define SCHED_MAX_LOGPROBS 20 /* top alternatives per token */
#define SCHED_MAX_STOP 8      /* stop sequences per request */
#define SCHED_HIST_BUCKETS 16

typedef struct sched sched;
typedef struct sched_req sched_req;

typedef struct {
    int32_t n_ctx;       /* positions per sequence (<= 0: the model's, max 8192) */
    int32_t max_seqs;    /* sequences running at once (slots) */
    int32_t max_seqs_per_req; /* sequences one request (group) may run at once
                            (<= 0: max_seqs - max_seqs / 4, at least 1: a
                            quarter of the slots stays free for others) */
    int32_t max_queue;   /* waiting requests before submit refuses (-EBUSY) */
    int32_t max_batch;   /* tokens per step (<= 0: chunk_size + max_seqs) */
    int32_t n_threads;   /* compute threads (<= 0: online CPUs) */
    cfg_kv kv;           /* cache mode, knobs and budget */
    int32_t prefix_nodes; /* prompt prefixes the KV pool may keep cached for
                            reuse (engine/kv/kv_plan.h, the prefix cache);
                            0: no prefix reuse. Where the backend or model
                            cannot share blocks it is off (logged). */
    bk_device device;    /* where the forward pass and the KV pool live:
                            BK_DEVICE_CPU (default) or BK_DEVICE_CUDA (device 0;
                            sched_create fails with a reason when the build has
                            no CUDA backend or there is no device) */
} sched_params;

sched_params sched_default_params(void);

/* Native request parameters (everything validated by the caller except
 * what depends on the model: token ids and lengths are checked here). */
typedef struct {
    const int32_t *prompt; /* copied */
    int n_prompt;
    int max_tokens;        /* >= 1; prompt + max_tokens must fit the context and
                              the KV pool (sched_max_seq_tokens) */
    int n;                 /* choices, 1..SCHED_MAX_N; choice i uses seed + i */
    smp_params sp;
    int logprobs;          /* -1: none; else top alternatives (0..20) */
    const char *stop[SCHED_MAX_STOP]; /* copied */
    int n_stop;
    int ignore_eos;
    int cache_prompt;      /* 1: continue from a cached prefix of the prompt
                              and cache its whole chunks for later requests;
                              its n choices share the prompt's blocks
                              (prefilled once). 0: computed from scratch */
    const char *id;        /* request id for logs (copied) */
    /* Called on the engine thread with the scheduler lock held when the
     * request has new output or finished; must not call sched_* functions
     * (MHD_resume_connection is fine). */
    void (*notify)(void *ctx);
    void *notify_ctx;
    int notify_final;      /* 1: notify only when the request has ended (a
                              non-streaming client has nothing to do before) */
    int kv_mode;           /* 0: the server's KV mode (kv.mode); else
                              SCHED_KV_MODE(m), m a cfg_kv_mode the pool holds
                              (sched_kv_has_mode; else -EINVAL) */
} sched_req_params;

/* sched_req_params.kv_mode of cfg_kv_mode m (0 stays "the default"). */
#define SCHED_KV_MODE(m) ((int)(m) + 1)

/* One generated token (for logprobs). */
typedef struct {
    int32_t token;
    float logprob;        /* log-probability under the model (raw logits) */
    int32_t n_top;
    int32_t top_id[SCHED_MAX_LOGPROBS];
    float top_lp[SCHED_MAX_LOGPROBS];
    int64_t text_end;     /* byte offset in the choice's text after this token */
} sched_tok;

/* What sched_req_poll copies out: per choice the new text and tokens. */
typedef struct {
    char *text;
    size_t len, cap;
    sched_tok *toks;
    int n_toks, cap_toks;
    int64_t text_off;     /* offset of text[0] in the whole choice text */
    const char *finish;   /* "stop" / "length" when the choice ended (set
                             once, with its last text) */
} sched_choice_out;

typedef struct {
    int n_choices;
    sched_choice_out ch[SCHED_MAX_N];
    int done;              /* every choice ended and was delivered */
    int cancelled;         /* the request was cancelled (sched_req_cancel) */
    int status;            /* 0, or an HTTP status when the request failed */
    char error[256];       /* the reason, when status != 0 */
    int n_prompt;
    int64_t n_generated;   /* all choices, so far */
} sched_out;

void sched_out_free(sched_out *o); /* frees the buffers; o itself is the caller's */

/* Creates the forward state, the pool and the slots, and starts the engine
 * thread. The model is borrowed and must outlive the scheduler. Returns 0
 * and *out (stop with sched_destroy) or negative with a reason. */
int sched_create(const mdl_model *m, const sched_params *p, sched **out, char *err,
                 size_t errlen);
/* Stops the engine thread (requests still running are failed with 503 and
 * notified) and frees everything. NULL is a no-op. */
void sched_destroy(sched *s);

int32_t sched_n_ctx(const sched *s);
/* The longest sequence (prompt + completion) the KV pool can hold alone:
 * min(n_ctx, what the pool's blocks cover). A request beyond it is
 * refused at submit (-E2BIG); it could never finish. */
int32_t sched_max_seq_tokens(const sched *s);
/* 1 if the pool holds sequences of cfg_kv_mode m (kv.mode, kv.modes);
 * sched_max_seq_tokens_mode: sched_max_seq_tokens for such a sequence (0
 * when the pool does not hold the mode). */
int sched_kv_has_mode(const sched *s, int m);
int32_t sched_max_seq_tokens_mode(const sched *s, int m);

/* The pool's capacity, for the startup line. */
typedef struct {
    int64_t pool_bytes;       /* the pool's arenas */
    int32_t n_ctx;            /* positions per sequence */
    int32_t max_seq_tokens;   /* sched_max_seq_tokens */
    int kv_int4;              /* the pool's mode: 1 int4, 0 fp16 */
    uint32_t kv_modes;        /* bit m: the pool holds KV mode id m */
    int shared;               /* several modes in one shared pool (kv_modes) */
    int32_t kv_mode;          /* the default mode id (--kv-cache) */
    int64_t seqs_mode[CFG_KV_MODES]; /* sequences of n_ctx tokens the pool holds
                                 when all of them are of mode id m (0: not held) */
    int64_t seqs_int4;        /* sequences of n_ctx tokens the pool holds in int4
                                 (-1: unknown, the pool is fp16) */
    int64_t seqs_fp16;        /* ... in fp16 (int4 pools: the same bytes as an
                                 FP16 cache: n_ctx x layers x kv_dim x 2 x 2 B, a
                                 sliding-window layer its window, not n_ctx) */
    int32_t max_seqs, max_seqs_per_req, max_queue;
} sched_capacity;
void sched_get_capacity(const sched *s, sched_capacity *out);
/* The engine's device: "cpu (avx2, 2 threads)" or "cuda (NVIDIA H200, ...)". */
const char *sched_describe(const sched *s);

/* Submits a request. Returns 0 and *out (one reference for the caller;
 * drop it with sched_req_release), or: -EBUSY the queue is full (429),
 * -EOVERFLOW the request has more sequences (n) than the queue holds at
 * all (400: it could never be queued), -ESHUTDOWN not admitting any more
 * (503), -E2BIG the prompt plus max_tokens exceed the context or cannot
 * fit the KV pool even alone (400), -EINVAL bad token id (400), -ENOMEM;
 * each with a reason in err. */
int sched_submit(sched *s, const sched_req_params *p, sched_req **out, char *err,
                 size_t errlen);
/* Submits n requests as one group (one client request with several
 * prompts): all or none are queued, and the scheduler shares slots
 * fairly between groups, not between the n requests. Errors as
 * sched_submit (-EOVERFLOW when the sum of their n exceeds the queue);
 * on success out[0..n) each hold one reference. */
int sched_submit_group(sched *s, const sched_req_params *p, int n, sched_req **out, char *err,
                       size_t errlen);

/* Copies the new output of n requests into o[0..n) (appending to their
 * buffers; the caller empties them between calls by setting len/n_toks to
 * 0), all under one lock. If none has anything new and none is done, and
 * arm is 1, each request's notify callback will be called when it has;
 * then, still under the scheduler lock, on_armed(ctx) is called once (the
 * HTTP layer suspends its connection there, so a resume cannot come
 * first). Returns 1 if something new was copied (text, tokens, a finish
 * reason, or a failure status - each reported once), 0 otherwise; o[i].done
 * says whether request i has ended and everything was delivered. */
int sched_poll(sched *s, sched_req *const *r, sched_out *o, int n, int arm,
               void (*on_armed)(void *ctx), void *ctx);

/* Drops the caller's reference; a request not yet done is cancelled (its
 * KV blocks are freed at the next step). NULL is a no-op. */
void sched_req_release(sched *s, sched_req *r);
/* Cancels a request without dropping the reference (the client went
 * away): its sequences end at the next step, it reports done with
 * cancelled set, and its notify callback is called as for any end. */
void sched_req_cancel(sched *s, sched_req *r);
/* Tokens generated so far over all choices (the access log's count: what
 * was generated, whatever the client received). */
int64_t sched_req_generated(sched *s, const sched_req *r);

/* Stops admitting: new submits get -ESHUTDOWN; queued and running requests
 * continue. */
void sched_stop_admitting(sched *s);
/* Fails every running and waiting request with status and reason (their
 * connections are notified); used at shutdown after the grace period. */
void sched_fail_all(sched *s, int status, const char *why);
/* Requests running or waiting. */
int sched_n_active(sched *s);

/* Fixed-bucket histogram (Prometheus: cumulative at format time). */
typedef struct {
    double le[SCHED_HIST_BUCKETS]; /* upper bounds; +Inf implicit */
    int n_le;
    uint64_t count[SCHED_HIST_BUCKETS + 1];
    double sum;
    uint64_t total;
} sched_hist;

#define SCHED_MAX_LAYERS 128

/* A consistent snapshot for /metrics (taken under the lock). */
typedef struct {
    kvc_stats kv;
    double kv_usage;                 /* 0..1 of the pool's bytes */
    int n_layers;
    float ema_lo[SCHED_MAX_LAYERS][2], ema_hi[SCHED_MAX_LAYERS][2]; /* [layer][K/V],
                                                                        mean over sequences */
    int ema_valid[SCHED_MAX_LAYERS][2];
    int seqs_warming;
    int running, waiting;
    uint64_t prompt_tokens, generated_tokens, preemptions, steps;
    uint64_t preemptions_fair;        /* of those, to give a waiting request a slot */
    uint64_t finished_stop, finished_length, cancelled, failed;
    sched_hist ttft, itl, e2e, prefill_chunk, queue_time;
    int kv_int4;                      /* 1 in int4 mode */
    const char *kv_name;              /* the default mode's name (fp16, int4, k3v2, ...) */
    const char *kv_window_name;       /* the window layers' in it (fp16, int4, int8, ...) */
    uint32_t kv_modes;                /* bit m: the pool holds cfg_kv_mode m */
    struct {
        int seqs;                     /* running sequences of this mode */
        int64_t tokens, bytes, qblocks, fpages; /* what they hold */
        uint64_t finished;            /* sequences that ended (stop / length) */
        uint64_t finished_bytes, finished_tokens; /* what those held at their end */
        uint64_t ttft_count;          /* requests that got their first token */
        double ttft_sum;              /* their times to first token, seconds */
    } kv_mode[CFG_KV_MODES];          /* by the requests' KV mode ("kv_cache") */
    int64_t kv_mode_capacity[CFG_KV_MODES]; /* sequences of n_ctx the pool holds
                                         when all are of mode m (sched_capacity) */
    int kv_shared;                    /* several modes in one shared pool */
    int64_t kv_free_bytes;            /* a shared pool's free bytes (slab shares) */
    int max_seqs;
    int64_t kv_budget_bytes;          /* bytes of the pool's arenas */
    int prefix_on;                    /* prefix reuse is running */
    kvc_prefix_stats prefix;          /* its counters (tokens queried / hit,
                                         cached units, evictions) */
    uint64_t forks;                   /* choices that shared their prompt's
                                         prefill with choice 0 */
} sched_metrics;

void sched_get_metrics(sched *s, sched_metrics *out);

#endif
