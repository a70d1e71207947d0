/*
 * lkq_stats.h - what one load level (one concurrency or one arrival rate)
 * measured: latency samples with percentiles (ITL is the gap between SSE
 * chunks, which carry several tokens when the server coalesces; TPOT, the
 * time per output token after the first, is per token whatever the
 * chunking), token and request counts,
 * failures by HTTP status and by kind, the server's scraped metrics; and the
 * three ways it is written out (a table row, a CSV row, a JSON line).
 *
 * Threading: none.
 */
#ifndef LKQ_STATS_H
#define LKQ_STATS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "loadtests/lkq_prom.h"

/* A growable array of samples (seconds). */
typedef struct lkq_samples {
    double *v;
    size_t n, cap;
    int sorted;
} lkq_samples;

/* Appends x; 0 or -1 (out of memory). */
int lkq_samples_add(lkq_samples *s, double x);
/* Frees the array; NULL is a no-op. */
void lkq_samples_free(lkq_samples *s);
/* p-th percentile (p in [0,100]) with linear interpolation between closest
 * ranks (numpy's default); sorts s in place. NAN when empty. */
double lkq_samples_pct(lkq_samples *s, double p);
double lkq_samples_mean(const lkq_samples *s);

/* Why a request failed when the HTTP status does not say. */
typedef enum {
    LKQ_FAIL_HTTP = 0,  /* a non-2xx status: counted by status */
    LKQ_FAIL_CONNECT,   /* connection refused / reset before a response */
    LKQ_FAIL_TIMEOUT,   /* no complete response within --timeout */
    LKQ_FAIL_TRANSPORT, /* the connection broke mid-response */
    LKQ_FAIL_STREAM,    /* 200 but the stream was malformed or ended early */
    LKQ_FAIL_INBAND,    /* 200 but the stream carried an error event */
    LKQ_FAIL_DROPPED,   /* open loop: arrival while --max-inflight were in flight */
    LKQ_FAIL_N
} lkq_fail_kind;

const char *lkq_fail_name(lkq_fail_kind k);

#define LKQ_STATUS_MAX 600

typedef struct lkq_level {
    char label[64];        /* --label, e.g. "int4" */
    int open_loop;         /* 0: closed loop at `concurrency`; 1: Poisson at `rate` */
    int concurrency;
    double rate;
    int64_t sent, ok, failed;
    int64_t cancelled;     /* in flight when the level was cut off (not failures) */
    int saturated;         /* --until-saturated: the server stopped admitting */
    double saturated_at;   /* seconds into the level when that was seen */
    int64_t by_status[LKQ_STATUS_MAX]; /* failed requests by HTTP status */
    int64_t by_kind[LKQ_FAIL_N];
    int64_t prompt_tokens, completion_tokens; /* summed from usage chunks */
    int64_t token_chunks;  /* token-bearing SSE chunks received */
    lkq_samples ttft, itl, e2e;
    lkq_samples tpot;      /* per request: (e2e - ttft) / (completion tokens - 1) */
    double wall_s;         /* first send to last completion */
    int max_inflight_seen;
    lkq_prom_agg prom;
} lkq_level;

void lkq_level_init(lkq_level *l);
void lkq_level_free(lkq_level *l);

/* Failed requests other than 429 and 503 (the server's deliberate "busy"
 * answers) and open-loop arrivals the client itself dropped at
 * --max-inflight (they never reached the server): what a load test calls a
 * real failure. */
int64_t lkq_level_unexpected(const lkq_level *l);

/* "429:3 503:1 timeout:2" (or "-" when nothing failed) into buf. */
void lkq_level_errors_str(const lkq_level *l, char *buf, size_t len);

/* Human-readable table: header once, then one row per level. */
void lkq_level_print_header(FILE *f);
void lkq_level_print_row(FILE *f, lkq_level *l);

/* CSV: a header line and one row per level (fixed columns, documented in
 * docs/loadtest.md). */
void lkq_level_csv_header(FILE *f);
void lkq_level_csv_row(FILE *f, lkq_level *l);

/* One JSON object per level on one line. 0 or -1 (out of memory). */
int lkq_level_json_line(FILE *f, lkq_level *l);

#endif
