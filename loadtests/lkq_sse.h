/*
 * lkq_sse.h - incremental Server-Sent Events parser and the OpenAI streaming
 * interpreter of the load generator.
 *
 * lkq_sse: bytes in (any split: a CR LF pair, a UTF-8 sequence or a field name
 * may straddle two reads), events out through a callback, following the
 * WHATWG event-stream rules that matter to a client: lines end with CR LF, LF
 * or CR; "data:" lines of one event are joined with '\n'; one optional space
 * after the colon is dropped; ':' lines are comments; a blank line dispatches
 * the event; an event without data is not dispatched; a leading UTF-8 BOM is
 * skipped. Events larger than max_event bytes are an error (a runaway stream
 * must not eat the client's memory).
 *
 * lkq_stream: what one OpenAI-style streamed response says: token-bearing
 * chunks with their arrival times (TTFT, inter-token gaps), the usage chunk,
 * finish_reason, an in-band {"error": ...} event, and whether "[DONE]" ended
 * it. Anything else (invalid JSON, data after [DONE], no choices) marks the
 * stream malformed.
 *
 * Threading: none; one parser per response, used by one thread.
 */
#ifndef LKQ_SSE_H
#define LKQ_SSE_H

#include <stddef.h>
#include <stdint.h>

/* Called once per dispatched event. event: the "event:" field or "" when
 * absent; data: NUL-terminated, len bytes (may contain '\n'). Return 0 to go
 * on, non-zero to stop parsing (lkq_sse_feed then returns that value). */
typedef int (*lkq_sse_cb)(void *user, const char *event, const char *data, size_t len);

typedef struct lkq_sse {
    char *line;          /* current partial line */
    size_t line_len, line_cap;
    char *data;          /* data field of the event being built */
    size_t data_len, data_cap;
    char event[64];      /* event field (truncated to 63 bytes) */
    int have_data;       /* a data line was seen for this event */
    int after_cr;        /* last byte was CR: a following LF belongs to it */
    int bom_state;       /* 0 = start of stream, 1..2 = BOM bytes matched, 3 = past */
    size_t max_event;    /* cap on line and data size in bytes */
    uint64_t n_events;   /* events dispatched so far */
} lkq_sse;

/* Initializes p (no allocation yet). max_event 0 means 1 MiB. */
void lkq_sse_init(lkq_sse *p, size_t max_event);

/* Frees p's buffers; p may be re-initialized. NULL is a no-op. */
void lkq_sse_free(lkq_sse *p);

/* Feeds n bytes. Returns 0, the callback's non-zero value, or -1 with a
 * reason in err (out of memory, event over max_event). */
int lkq_sse_feed(lkq_sse *p, const char *bytes, size_t n, lkq_sse_cb cb, void *user,
                 char *err, size_t errlen);

/* End of the byte stream. A partial line or an event whose blank line never
 * came is reported as -1 "truncated event" (the spec drops it; a load tester
 * wants to know). Returns 0 when the stream ended cleanly between events. */
int lkq_sse_finish(lkq_sse *p, char *err, size_t errlen);

/* --- OpenAI streaming responses ---------------------------------------- */

typedef enum {
    LKQ_STREAM_OPEN = 0,   /* still receiving */
    LKQ_STREAM_DONE,       /* "[DONE]" seen, nothing wrong */
    LKQ_STREAM_ERROR,      /* the server sent {"error": ...} in the stream */
    LKQ_STREAM_MALFORMED,  /* not what the OpenAI protocol allows */
} lkq_stream_state;

typedef struct lkq_stream {
    lkq_stream_state state;
    double t_first;          /* arrival of the first token-bearing chunk (-1: none) */
    double t_last;           /* arrival of the latest token-bearing chunk */
    double *gaps;            /* inter-token gaps in seconds (token chunks 2..n) */
    size_t n_gaps, gaps_cap;
    int64_t n_token_chunks;  /* chunks carrying text or a content delta */
    int64_t prompt_tokens;   /* from the usage chunk (-1: none seen) */
    int64_t completion_tokens;
    char finish_reason[32];  /* of choice 0 ("" until sent) */
    char reason[160];        /* why ERROR or MALFORMED */
} lkq_stream;

void lkq_stream_init(lkq_stream *s);
/* Frees s->gaps; NULL is a no-op. */
void lkq_stream_free(lkq_stream *s);

/* Interprets one SSE event's data, received at time t (seconds, any epoch).
 * Handles both /v1/completions (choices[].text) and /v1/chat/completions
 * (choices[].delta.content) chunks. Returns 0, or 1 once the stream is no
 * longer OPEN (so it can be used as an lkq_sse_cb return value). */
int lkq_stream_event(lkq_stream *s, const char *data, size_t len, double t);

#endif
