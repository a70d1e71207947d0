/*
 * lkq_prom.h - reads the Prometheus text exposition format (0.0.4) that the
 * server's /metrics returns, and keeps the few series the load generator
 * reports (requests running / waiting, KV usage and bytes, rejections,
 * preemptions) as per-level maxima and means.
 *
 * Parsing rules: '#' lines (HELP, TYPE, comments) are skipped; a sample is
 * `name[{label="value",...}] value [timestamp]`; label values may contain
 * escaped '\"', '\\' and '\n' and any of ",}{ "; values may be +Inf, -Inf,
 * NaN. A malformed line is counted and skipped, never fatal (a scrape is
 * best-effort telemetry, not the thing under test).
 *
 * Threading: none.
 */
#ifndef LKQ_PROM_H
#define LKQ_PROM_H

#include <stddef.h>

/* One sample: name and raw label text (between the braces, unescaped
 * content left as is; "" when none), both NUL-terminated for the call only. */
typedef int (*lkq_prom_cb)(void *user, const char *name, const char *labels, double value);

/* Calls cb for every sample line of text[0..n). Returns the number of
 * malformed lines skipped (>= 0), or the callback's non-zero value if it
 * stopped the walk (as a negative number when the callback returned one). */
int lkq_prom_parse(const char *text, size_t n, lkq_prom_cb cb, void *user);

/* Value of label key in a raw label text into out (unescaped). Returns 0 when
 * found, -1 otherwise. */
int lkq_prom_label(const char *labels, const char *key, char *out, size_t outlen);

/* The series of one scrape, summed over labels where a metric has several
 * (kv bytes over kinds, blocks over kinds, rejections over reasons). A field
 * is -1 when the scrape did not carry it. */
typedef struct lkq_prom_snap {
    double running, waiting;          /* livekvq_requests_{running,waiting}, else vllm:num_requests_* */
    double kv_usage;                  /* livekvq_kv_usage_ratio, else vllm:kv_cache_usage_perc */
    double kv_bytes;                  /* sum of livekvq_kv_bytes{kind} */
    double kv_fp16_equiv;             /* livekvq_kv_fp16_equivalent_bytes */
    double bits_per_element;          /* livekvq_kv_bits_per_element */
    /* livekvq_kv_blocks_{used,total}{kind}: [0] int4 blocks, [1] fp16
     * blocks (fp16 mode) or staging pages (int4 mode) */
    double blocks_used[2], blocks_total[2];
    double rejected;                  /* sum of livekvq_requests_rejected_total{reason} */
    double preemptions;               /* livekvq_preemptions_total */
    double prompt_tokens;             /* livekvq_prompt_tokens_total (prefill progress) */
    int n_samples;                    /* sample lines read */
    int n_bad;                        /* malformed lines skipped */
} lkq_prom_snap;

/* Parses one /metrics body into snap (all fields reset first). Returns the
 * number of series of interest found (0: nothing useful in the text). */
int lkq_prom_snapshot(const char *text, size_t n, lkq_prom_snap *snap);

/* Aggregate over the scrapes of one level. */
typedef struct lkq_prom_agg {
    int n;                               /* scrapes taken */
    double max_running, max_waiting, mean_running, mean_waiting;
    double max_kv_usage, mean_kv_usage, max_kv_bytes;
    double max_blocks_used[2], blocks_total[2], bits_per_element; /* [0] int4, [1] fp16 */
    double rejected_first, rejected_last; /* counters at the first / last scrape */
    double preempt_first, preempt_last;
    /* max running while nothing was waiting: the concurrency the server
     * held before it started queueing */
    double max_running_no_queue;
    /* max running while requests were waiting: what the server holds once
     * it queues (KV-bound when --max-seqs is not the limit) */
    double max_running_queued;
} lkq_prom_agg;

void lkq_prom_agg_init(lkq_prom_agg *a);
void lkq_prom_agg_add(lkq_prom_agg *a, const lkq_prom_snap *s);

#endif
