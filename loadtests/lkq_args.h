/*
 * lkq_args.h - the load generator's command line: what it accepts, the
 * checks that refuse a run before it starts (malformed sweeps, unknown
 * options, budgets that cannot be met), each with a one-line reason.
 *
 * Threading: none.
 */
#ifndef LKQ_ARGS_H
#define LKQ_ARGS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define LKQ_MAX_LEVELS 64
#define LKQ_MAX_CONCURRENCY 1024
#define LKQ_MAX_DURATION_S 86400.0
#define LKQ_MAX_REQUESTS 10000000

typedef struct lkq_args {
    char url[512];           /* base URL, no trailing '/', e.g. http://127.0.0.1:8080 */
    char metrics_url[512];   /* "" = no scraping */
    double scrape_interval;  /* seconds between scrapes */
    const char *api_key;     /* borrowed from argv (or NULL) */
    const char *model;       /* "model" field; NULL = first id of /v1/models */
    const char *label;       /* written in every output row */
    int chat;                /* 1: /v1/chat/completions, 0: /v1/completions */
    int open_loop;           /* 1: --rate given */
    int n_levels;
    int concurrency[LKQ_MAX_LEVELS];
    double rate[LKQ_MAX_LEVELS];
    double duration;         /* seconds per level; 0 = unbounded by time */
    int64_t requests;        /* requests per level; 0 = unbounded by count */
    int max_inflight;        /* open loop cap on requests in flight */
    int prompt_tokens;       /* approximate prompt length in tokens */
    double chars_per_token;  /* how many corpus bytes make one token */
    int max_tokens;
    double temperature;
    const char *prompt_file; /* corpus; NULL = $LKQ_SHARED/data/moby-dick.txt */
    uint64_t seed;
    double timeout;          /* per-request limit in seconds */
    double pause;            /* seconds between levels (lets the server drain) */
    double cutoff;           /* hard end of a level in seconds, in-flight cancelled; 0 = none */
    double until_saturated;  /* end a level once the server has queued this long
                              * with every running request decoding; 0 = off */
    int ignore_eos;          /* send "ignore_eos": true (generate max_tokens) */
    const char *kv_cache;    /* send "kv_cache": this (the KV mode); NULL: leave it out */
    const char *csv;         /* append rows here (header when new) */
    const char *json;        /* append JSON lines here */
    const char *scrape_log;  /* append every scrape as a CSV row here */
    int quiet;
    int allow_remote;
    int keep_going;          /* do not stop the sweep after a level with real failures */
} lkq_args;

/* Parses argv into a (defaults first). Returns 0 to run, 1 when --help was
 * printed to stdout, -1 with a one-line reason in err (unknown option,
 * malformed list, value out of range, impossible budget). */
int lkq_args_parse(int argc, char **argv, lkq_args *a, char *err, size_t errlen);

void lkq_args_usage(FILE *f);

/* Comma-separated integer list "1,2,4" into out[0..max). Values must lie in
 * [lo, hi] and strictly increase; max is at most LKQ_MAX_LEVELS. Returns
 * the count or -1 with err. */
int lkq_parse_int_list(const char *s, int *out, int max, int lo, int hi, char *err, size_t errlen);

/* Comma-separated list of positive finite numbers, strictly increasing. */
int lkq_parse_double_list(const char *s, double *out, int max, double lo, double hi,
                          char *err, size_t errlen);

/* 1 when url is http://127.x.x.x, http://[::1] or http://localhost (any
 * port/path), 0 otherwise. */
int lkq_url_is_loopback(const char *url);

#endif
