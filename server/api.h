/*
 * api.h - the OpenAI-compatible JSON surface (../shared/DESIGN.md §5): a
 * request body becomes a native api_request (validated, tokenized, chat
 * template applied) and scheduler output becomes response objects or SSE
 * chunks. JSON (jansson) stays in this file and server/http.c; nothing
 * below the HTTP layer sees it.
 *
 * Thread-safety: every function is pure over its arguments (the model and
 * tokenizer are read-only), so HTTP worker threads call them concurrently.
 */
#ifndef LKQ_API_H
#define LKQ_API_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/model/model.h"
#include "engine/sched/scheduler.h"

#define API_MAX_PROMPTS 16
#define API_MAX_STOP_BYTES 256   /* per stop sequence */
#define API_MAX_LOGIT_BIAS 1024  /* logit_bias entries */
#define API_MAX_TOKENIZE (1 << 20) /* tokens in a /tokenize or /detokenize answer */

typedef enum { API_COMPLETIONS = 0, API_CHAT = 1 } api_kind;

/* What the server tells the parser. */
typedef struct {
    const mdl_model *m;
    const char *model_id;   /* the name /v1/models lists */
    int n_ctx;              /* positions per sequence */
    int max_n;              /* n (choices) limit */
    int max_prompt_tokens;  /* 0: n_ctx - 1 */
    int max_seq_tokens;     /* longest prompt + completion the KV pool holds
                               (0: n_ctx); bounds the default max_tokens */
} api_ctx;

typedef struct {
    int status;             /* HTTP status */
    char type[48];          /* OpenAI error type */
    char code[48];          /* "" or e.g. "context_length_exceeded" */
    char param[48];         /* "" or the offending field */
    char message[640];
} api_error;

typedef struct {
    api_kind kind;
    int stream, include_usage, echo;
    int n;
    int max_tokens;
    int logprobs;           /* -1: none; else top alternatives */
    int ignore_eos;
    int cache_prompt;       /* 1 (default): prefix reuse; "cache_prompt": false opts out */
    smp_params sp;
    char *stop[SCHED_MAX_STOP];
    int n_stop;
    int n_prompts;
    int32_t *ids[API_MAX_PROMPTS];   /* token ids per prompt */
    int n_ids[API_MAX_PROMPTS];
    char *text[API_MAX_PROMPTS];     /* prompt text (for echo) */
    size_t text_len[API_MAX_PROMPTS];
    smp_bias *bias;                  /* logit_bias entries (sp.logit_bias points here) */
    int n_bias;
} api_request;

/* Parses and validates a body. Returns 0 and fills r (free with
 * api_request_free), or negative with e filled (status 400/404). */
int api_parse(api_kind kind, const char *body, size_t len, const api_ctx *ctx,
              api_request *r, api_error *e);
void api_request_free(api_request *r);

/* POST /tokenize (llama.cpp's shape): {"content": string or an array of
 * strings and token ids, "add_special": false, "parse_special": true,
 * "with_pieces": false} -> {"tokens": [ids]} or, with pieces, {"tokens":
 * [{"id": 123, "piece": "text" or [bytes] when not UTF-8}]}. Returns 0 and
 * *out (caller frees) or negative with e (400). */
int api_tokenize(const char *body, size_t len, const api_ctx *ctx, char **out, api_error *e);
/* POST /detokenize: {"tokens": [ids]} -> {"content": text} (special tokens
 * rendered, invalid UTF-8 as U+FFFD). Returns 0 and *out or negative with e. */
int api_detokenize(const char *body, size_t len, const api_ctx *ctx, char **out, api_error *e);

/* Sets an error. */
void api_set_error(api_error *e, int status, const char *type, const char *code,
                   const char *param, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 6, 7)))
#endif
    ;
/* {"error": {...}} as a newly allocated string (caller frees). */
char *api_error_json(const api_error *e);

/* One choice's piece of output for the formatters. */
typedef struct {
    int index;              /* choice index in the response */
    const char *text;       /* new text (may be NULL) */
    size_t len;
    const sched_tok *toks;  /* new token records (logprobs) */
    int n_toks;
    int64_t prev_end;       /* text_end of the record before toks[0] (0: none) */
    int64_t text_shift;     /* added to text offsets (echoed prompt length) */
    const char *finish;     /* NULL, "stop", "length" */
    int role;               /* chat streaming: 1 = emit the role delta */
} api_piece;

/* A complete non-streaming response (caller frees). */
char *api_response_json(api_kind kind, const char *id, const char *model, long created,
                        const api_piece *ch, int n_ch, int logprobs, const mdl_model *m,
                        int64_t prompt_tokens, int64_t completion_tokens);
/* One SSE chunk object for a stream (caller frees); pieces may be empty
 * (then usage, when usage_prompt >= 0, is the only content). */
char *api_chunk_json(api_kind kind, const char *id, const char *model, long created,
                     const api_piece *ch, int n_ch, int logprobs, const mdl_model *m,
                     int64_t usage_prompt, int64_t usage_completion);

#endif
