/*
 * metrics.h - Prometheus text exposition (format 0.0.4) of the scheduler's
 * snapshot, the KV cache accounting and the HTTP counters
 * (../shared/DESIGN.md §6). Pure formatting; thread-safe.
 */
#ifndef LKQ_METRICS_H
#define LKQ_METRICS_H

#include <stdint.h>

#include "engine/sched/scheduler.h"

#define METRICS_MAX_COUNTERS 64

/* requests_total{endpoint, code} */
typedef struct {
    char endpoint[32];
    int code;
    uint64_t n;
} metrics_counter;

typedef struct {
    metrics_counter c[METRICS_MAX_COUNTERS];
    int n;
    uint64_t rejected_queue_full, rejected_shutdown, rejected_invalid;
    uint64_t client_gone;      /* clients that left before their answer (cancelled) */
    uint64_t read_timeouts;    /* connections closed: no complete request in time */
} metrics_http;

/* Renders everything; returns a malloc'd NUL-terminated string (caller
 * frees) or NULL when out of memory. */
char *metrics_render(const sched_metrics *sm, const metrics_http *hm, const char *model_id,
                     const char *kv_mode, double uptime_s);

#endif
