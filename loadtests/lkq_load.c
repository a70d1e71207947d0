/*
 * lkq_load.c - load generator for livekvq-server (or any OpenAI-compatible
 * streaming server): closed-loop concurrency sweeps and open-loop Poisson
 * arrivals of streamed completions with long prompts sliced from a corpus,
 * reporting latency percentiles, throughput, failures by status and kind, and
 * the server's own KV / queue gauges scraped from /metrics while it runs.
 *
 * Before any load it probes GET /health (and /v1/models for the model id and
 * the context length), and refuses with one line when the server cannot be
 * reached, is not ready, rejects the API key, or the prompt cannot fit.
 *
 * Threading: one thread; every transfer (requests and scrapes) is driven by
 * one libcurl multi handle. SIGINT stops launching and lets the in-flight
 * requests finish (a second SIGINT kills the process).
 */
#include <curl/curl.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>

#include "loadtests/lkq_args.h"
#include "loadtests/lkq_prom.h"
#include "loadtests/lkq_prompt.h"
#include "loadtests/lkq_sse.h"
#include "loadtests/lkq_stats.h"

#define ERRBODY_MAX 2048
#define SCRAPE_MAX ((size_t)16 << 20)
#define MAX_FAIL_LINES 5

static volatile sig_atomic_t g_interrupted;

static void on_sigint(int sig)
{
    (void)sig;
    g_interrupted = 1;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* One streamed completion in flight. */
typedef struct req {
    CURL *h;
    int live_idx;            /* position in runner.live */
    struct curl_slist *hdrs; /* borrowed from the runner */
    char *body;
    double t_start;
    long status;
    int status_known;
    lkq_sse sse;
    lkq_stream st;
    int sse_failed;
    char sse_err[128];
    char errbody[ERRBODY_MAX];
    size_t errlen;
    char request_id[64];
    char curl_err[CURL_ERROR_SIZE];
} req;

/* The periodic /metrics scrape. */
typedef struct scrape {
    CURL *h;
    char *buf;
    size_t len, cap;
    int busy;
    int overflow;
    double next_t;
    int n_fail;
    char curl_err[CURL_ERROR_SIZE];
} scrape;

typedef struct runner {
    const lkq_args *a;
    CURLM *multi;
    struct curl_slist *hdrs;
    char endpoint[640];
    char model[256];
    lkq_corpus corpus;
    size_t nchars;
    uint64_t next_index; /* global request counter: a new slice every request */
    int inflight;
    req **live;          /* the requests in flight (inflight of them) */
    int live_cap;
    int fail_lines;
    lkq_level *lvl;
    scrape sc;
    FILE *scrape_log;    /* --scrape-log, or NULL */
    double t_level0;
    /* --until-saturated: since when the server has queued with every running
     * request decoding (-1: not now) */
    double t_full;
    int saturated;
} runner;

/* --- request lifecycle ------------------------------------------------- */

/* SSE event -> stream interpreter, stamped with the arrival time. */
static int on_sse_event(void *user, const char *event, const char *data, size_t len)
{
    req *r = user;
    (void)event;
    lkq_stream_event(&r->st, data, len, now_s());
    return 0; /* keep parsing: data after the end is itself reported */
}

static size_t on_write(char *ptr, size_t size, size_t nmemb, void *user)
{
    req *r = user;
    size_t n = size * nmemb;
    if (!r->status_known) {
        curl_easy_getinfo(r->h, CURLINFO_RESPONSE_CODE, &r->status);
        r->status_known = 1;
    }
    if (r->status != 200) {
        size_t k = n < ERRBODY_MAX - 1 - r->errlen ? n : ERRBODY_MAX - 1 - r->errlen;
        memcpy(r->errbody + r->errlen, ptr, k);
        r->errlen += k;
        r->errbody[r->errlen] = '\0';
        return n;
    }
    if (!r->sse_failed &&
        lkq_sse_feed(&r->sse, ptr, n, on_sse_event, r, r->sse_err, sizeof r->sse_err) < 0)
        r->sse_failed = 1;
    return n;
}

static size_t on_header(char *ptr, size_t size, size_t nmemb, void *user)
{
    req *r = user;
    size_t n = size * nmemb;
    static const char key[] = "x-request-id:";
    if (n > sizeof key - 1 && strncasecmp(ptr, key, sizeof key - 1) == 0) {
        const char *v = ptr + sizeof key - 1;
        size_t vl = n - (sizeof key - 1);
        while (vl > 0 && (*v == ' ' || *v == '\t'))
            v++, vl--;
        while (vl > 0 && (v[vl - 1] == '\r' || v[vl - 1] == '\n' || v[vl - 1] == ' '))
            vl--;
        if (vl >= sizeof r->request_id)
            vl = sizeof r->request_id - 1;
        memcpy(r->request_id, v, vl);
        r->request_id[vl] = '\0';
    }
    return n;
}

static void req_destroy(req *r)
{
    if (!r)
        return;
    if (r->h)
        curl_easy_cleanup(r->h);
    free(r->body);
    lkq_sse_free(&r->sse);
    lkq_stream_free(&r->st);
    free(r);
}

/* Starts one request: slices the next prompt, builds the body, adds the easy
 * handle to the multi. 0 or -1 (out of memory / curl refused). */
static int launch(runner *R)
{
    const lkq_args *a = R->a;
    size_t off, len;
    if (lkq_corpus_slice(&R->corpus, a->seed, R->next_index++, R->nchars, &off, &len) != 0)
        return -1;
    req *r = calloc(1, sizeof *r);
    if (!r)
        return -1;
    lkq_sse_init(&r->sse, 0);
    lkq_stream_init(&r->st);
    r->body = lkq_request_body(a, R->model, R->corpus.text + off, len);
    r->h = curl_easy_init();
    if (!r->body || !r->h) {
        req_destroy(r);
        return -1;
    }
    CURL *h = r->h;
    curl_easy_setopt(h, CURLOPT_URL, R->endpoint);
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, r->body);
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long)strlen(r->body));
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, R->hdrs);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(h, CURLOPT_PRIVATE, r);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, r->curl_err);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, 10000L);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)(a->timeout * 1000.0));
    curl_easy_setopt(h, CURLOPT_ACCEPT_ENCODING, NULL);
    if (R->inflight == R->live_cap) {
        int nc = R->live_cap ? R->live_cap * 2 : 64;
        req **nl = realloc(R->live, (size_t)nc * sizeof *nl);
        if (!nl) {
            req_destroy(r);
            return -1;
        }
        R->live = nl;
        R->live_cap = nc;
    }
    r->t_start = now_s();
    if (curl_multi_add_handle(R->multi, h) != CURLM_OK) {
        req_destroy(r);
        return -1;
    }
    r->live_idx = R->inflight;
    R->live[R->inflight] = r;
    R->inflight++;
    R->lvl->sent++;
    if (R->inflight > R->lvl->max_inflight_seen)
        R->lvl->max_inflight_seen = R->inflight;
    return 0;
}

/* Prints the first few failures of a level on stderr (one line each). */
static void fail_line(runner *R, const req *r, const char *what)
{
    if (R->a->quiet || R->fail_lines >= MAX_FAIL_LINES)
        return;
    R->fail_lines++;
    fprintf(stderr, "lkq_load: request %s failed: %s\n", r->request_id[0] ? r->request_id : "-", what);
}

/* Books a finished request into the level. */
static void finish(runner *R, req *r, CURLcode res)
{
    lkq_level *l = R->lvl;
    double t_end = now_s();
    char why[300];
    lkq_fail_kind kind = LKQ_FAIL_HTTP;
    int failed = 1;
    if (!r->status_known)
        curl_easy_getinfo(r->h, CURLINFO_RESPONSE_CODE, &r->status);
    if (r->status != 0 && r->status != 200) {
        /* a status says it all, even if the connection then broke */
        long st = r->status;
        if (st < 0 || st >= LKQ_STATUS_MAX)
            st = 0;
        l->by_status[st]++;
        /* single-line excerpt of the error body */
        char ex[160];
        size_t k = 0;
        for (size_t i = 0; i < r->errlen && k + 1 < sizeof ex; i++)
            ex[k++] = (r->errbody[i] == '\n' || r->errbody[i] == '\r') ? ' ' : r->errbody[i];
        ex[k] = '\0';
        snprintf(why, sizeof why, "HTTP %ld %s", r->status, ex);
        if (r->status != 429 && r->status != 503)
            fail_line(R, r, why);
    } else if (res != CURLE_OK) {
        if (res == CURLE_COULDNT_CONNECT || res == CURLE_COULDNT_RESOLVE_HOST)
            kind = LKQ_FAIL_CONNECT;
        else if (res == CURLE_OPERATION_TIMEDOUT)
            kind = LKQ_FAIL_TIMEOUT;
        else
            kind = LKQ_FAIL_TRANSPORT;
        snprintf(why, sizeof why, "%s: %s", lkq_fail_name(kind),
                 r->curl_err[0] ? r->curl_err : curl_easy_strerror(res));
        fail_line(R, r, why);
    } else {
        char ferr[128];
        if (r->sse_failed) {
            kind = LKQ_FAIL_STREAM;
            snprintf(why, sizeof why, "malformed stream: %s", r->sse_err);
        } else if (lkq_sse_finish(&r->sse, ferr, sizeof ferr) != 0 &&
                   r->st.state == LKQ_STREAM_OPEN) {
            kind = LKQ_FAIL_STREAM;
            snprintf(why, sizeof why, "malformed stream: %s", ferr);
        } else if (r->st.state == LKQ_STREAM_DONE) {
            failed = 0;
        } else if (r->st.state == LKQ_STREAM_ERROR) {
            kind = LKQ_FAIL_INBAND;
            snprintf(why, sizeof why, "%s", r->st.reason);
        } else if (r->st.state == LKQ_STREAM_MALFORMED) {
            kind = LKQ_FAIL_STREAM;
            snprintf(why, sizeof why, "malformed stream: %s", r->st.reason);
        } else {
            kind = LKQ_FAIL_STREAM;
            snprintf(why, sizeof why, "malformed stream: ended without [DONE]");
        }
        if (failed)
            fail_line(R, r, why);
    }
    if (failed) {
        l->failed++;
        if (kind != LKQ_FAIL_HTTP)
            l->by_kind[kind]++;
    } else {
        l->ok++;
        lkq_samples_add(&l->e2e, t_end - r->t_start);
        if (r->st.n_token_chunks > 0)
            lkq_samples_add(&l->ttft, r->st.t_first - r->t_start);
        int64_t ntok = r->st.completion_tokens >= 0 ? r->st.completion_tokens : r->st.n_token_chunks;
        if (r->st.n_token_chunks > 0 && ntok > 1)
            lkq_samples_add(&l->tpot, (t_end - r->st.t_first) / (double)(ntok - 1));
        for (size_t i = 0; i < r->st.n_gaps; i++)
            lkq_samples_add(&l->itl, r->st.gaps[i]);
        l->token_chunks += r->st.n_token_chunks;
        if (r->st.prompt_tokens > 0)
            l->prompt_tokens += r->st.prompt_tokens;
        l->completion_tokens +=
            r->st.completion_tokens >= 0 ? r->st.completion_tokens : r->st.n_token_chunks;
    }
}

/* Takes r off the in-flight list (and the multi handle). */
static void unlink_req(runner *R, req *r)
{
    curl_multi_remove_handle(R->multi, r->h);
    int i = r->live_idx;
    R->live[i] = R->live[--R->inflight];
    R->live[i]->live_idx = i;
}

/* Cuts the level off: every request in flight is dropped (the server sees
 * the client go away and frees its KV blocks) and counted as cancelled. */
static void cancel_all(runner *R)
{
    while (R->inflight > 0) {
        req *r = R->live[R->inflight - 1];
        unlink_req(R, r);
        R->lvl->cancelled++;
        req_destroy(r);
    }
}

/* --- scraping ------------------------------------------------------------- */

static size_t on_scrape_write(char *ptr, size_t size, size_t nmemb, void *user)
{
    scrape *s = user;
    size_t n = size * nmemb;
    if (s->overflow || s->len + n + 1 > SCRAPE_MAX) {
        s->overflow = 1;
        return n;
    }
    if (s->len + n + 1 > s->cap) {
        size_t nc = s->cap ? s->cap : 65536;
        while (nc < s->len + n + 1)
            nc *= 2;
        char *nb = realloc(s->buf, nc);
        if (!nb) {
            s->overflow = 1;
            return n;
        }
        s->buf = nb;
        s->cap = nc;
    }
    memcpy(s->buf + s->len, ptr, n);
    s->len += n;
    return n;
}

static void scrape_start(runner *R)
{
    scrape *s = &R->sc;
    if (!s->h) {
        s->h = curl_easy_init();
        if (!s->h)
            return;
        curl_easy_setopt(s->h, CURLOPT_URL, R->a->metrics_url);
        curl_easy_setopt(s->h, CURLOPT_WRITEFUNCTION, on_scrape_write);
        curl_easy_setopt(s->h, CURLOPT_WRITEDATA, s);
        curl_easy_setopt(s->h, CURLOPT_ERRORBUFFER, s->curl_err);
        curl_easy_setopt(s->h, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(s->h, CURLOPT_TIMEOUT_MS, 10000L);
        curl_easy_setopt(s->h, CURLOPT_PRIVATE, NULL);
        if (R->a->api_key)
            curl_easy_setopt(s->h, CURLOPT_HTTPHEADER, R->hdrs);
    }
    s->len = 0;
    s->overflow = 0;
    if (curl_multi_add_handle(R->multi, s->h) == CURLM_OK)
        s->busy = 1;
}

static void scrape_done(runner *R, CURLcode res)
{
    scrape *s = &R->sc;
    long st = 0;
    curl_multi_remove_handle(R->multi, s->h);
    s->busy = 0;
    curl_easy_getinfo(s->h, CURLINFO_RESPONSE_CODE, &st);
    if (res != CURLE_OK || st != 200 || s->overflow) {
        if (s->n_fail++ == 0 && !R->a->quiet)
            fprintf(stderr, "lkq_load: scrape of %s failed (%s); continuing without it\n",
                    R->a->metrics_url,
                    res != CURLE_OK ? curl_easy_strerror(res) : s->overflow ? "body too large" : "bad status");
        return;
    }
    lkq_prom_snap snap;
    if (lkq_prom_snapshot(s->buf ? s->buf : "", s->len, &snap) == 0)
        return;
    lkq_prom_agg_add(&R->lvl->prom, &snap);
    double t = now_s();
    if (R->scrape_log) {
        const lkq_level *l = R->lvl;
        fprintf(R->scrape_log, "%s,%g,%.3f,%g,%g,%g,%g,%g\n", l->label,
                l->open_loop ? l->rate : (double)l->concurrency, t - R->t_level0, snap.running,
                snap.waiting, snap.kv_usage, snap.kv_bytes, snap.prompt_tokens);
        fflush(R->scrape_log);
    }
    /* saturation: requests wait, and every request the server runs has
     * finished its prefill (its first token reached us) -- continuously for
     * --until-saturated seconds. A server that still had room would have
     * admitted a waiting request at its next step. */
    int decoding = 0;
    for (int i = 0; i < R->inflight; i++)
        decoding += R->live[i]->st.n_token_chunks > 0;
    int full = snap.waiting > 0 && snap.running > 0 && decoding >= snap.running;
    if (!full)
        R->t_full = -1;
    else if (R->t_full < 0)
        R->t_full = t;
    if (R->a->until_saturated > 0 && !R->saturated && full && t - R->t_full >= R->a->until_saturated) {
        R->saturated = 1;
        R->lvl->saturated = 1;
        R->lvl->saturated_at = t - R->t_level0;
    }
}

/* --- the event loop -------------------------------------------------------- */

/* Drives transfers until nothing is pending for at most wait_s seconds,
 * booking completions. */
static void pump(runner *R, double wait_s)
{
    int running = 0;
    int ms = (int)(wait_s * 1000.0);
    if (ms < 0)
        ms = 0;
    curl_multi_poll(R->multi, NULL, 0, ms, NULL);
    curl_multi_perform(R->multi, &running);
    CURLMsg *m;
    int left;
    while ((m = curl_multi_info_read(R->multi, &left))) {
        if (m->msg != CURLMSG_DONE)
            continue;
        CURL *h = m->easy_handle;
        CURLcode res = m->data.result;
        if (h == R->sc.h) {
            scrape_done(R, res);
            continue;
        }
        req *r = NULL;
        curl_easy_getinfo(h, CURLINFO_PRIVATE, (char **)&r);
        unlink_req(R, r);
        finish(R, r, res);
        req_destroy(r);
    }
}

/* Runs one level (index li) of the sweep into l. */
static void run_level(runner *R, int li, lkq_level *l)
{
    const lkq_args *a = R->a;
    lkq_level_init(l);
    snprintf(l->label, sizeof l->label, "%s", a->label);
    l->open_loop = a->open_loop;
    if (a->open_loop)
        l->rate = a->rate[li];
    else
        l->concurrency = a->concurrency[li];
    R->lvl = l;
    R->fail_lines = 0;
    uint64_t arr_rng = a->seed ^ (0xA5A5A5A5ull + (uint64_t)li * 0x100000001B3ull);
    double t0 = now_s();
    double next_arrival = a->open_loop ? t0 + lkq_rng_exp(&arr_rng, l->rate) : t0;
    double next_progress = t0 + 10;
    int stop = 0;
    int64_t launched = 0;
    double last_done = t0;
    R->sc.next_t = t0;
    R->t_level0 = t0;
    R->t_full = -1;
    R->saturated = 0;
    for (;;) {
        double t = now_s();
        if (!stop && (g_interrupted || (a->duration > 0 && t - t0 >= a->duration) ||
                      (a->requests > 0 && launched >= a->requests)))
            stop = 1;
        if ((a->cutoff > 0 && t - t0 >= a->cutoff) || R->saturated) {
            stop = 1;
            if (R->inflight > 0) {
                if (!a->quiet)
                    fprintf(stderr, "lkq_load:   %.0fs: %s; cancelling %d request(s) in flight\n", t - t0,
                            R->saturated ? "the server holds all it can (saturated)" : "cutoff",
                            R->inflight);
                cancel_all(R);
                last_done = now_s();
            }
        }
        if (!stop && !a->open_loop) {
            while (R->inflight < l->concurrency && !(a->requests > 0 && launched >= a->requests)) {
                if (launch(R) != 0) {
                    fprintf(stderr, "lkq_load: cannot start a request (out of memory?)\n");
                    stop = 1;
                    break;
                }
                launched++;
            }
        }
        if (!stop && a->open_loop) {
            while (t >= next_arrival && !(a->requests > 0 && launched >= a->requests)) {
                if (R->inflight >= a->max_inflight) {
                    l->sent++;
                    l->failed++;
                    l->by_kind[LKQ_FAIL_DROPPED]++;
                } else if (launch(R) != 0) {
                    stop = 1;
                    break;
                }
                launched++;
                next_arrival += lkq_rng_exp(&arr_rng, l->rate);
            }
        }
        if (a->metrics_url[0] && !R->sc.busy && t >= R->sc.next_t) {
            scrape_start(R);
            R->sc.next_t = t + a->scrape_interval;
        }
        if (stop && R->inflight == 0 && !R->sc.busy)
            break;
        if (!a->quiet && t >= next_progress) {
            fprintf(stderr, "lkq_load:   %.0fs: sent %lld ok %lld failed %lld in flight %d\n", t - t0,
                    (long long)l->sent, (long long)l->ok, (long long)l->failed, R->inflight);
            next_progress = t + 10;
        }
        double wait = 0.25;
        if (!stop && a->open_loop && next_arrival - t < wait)
            wait = next_arrival - t;
        if (a->metrics_url[0] && !R->sc.busy && R->sc.next_t - t < wait)
            wait = R->sc.next_t - t;
        int64_t before = l->ok + l->failed;
        pump(R, wait);
        if (l->ok + l->failed != before)
            last_done = now_s();
    }
    l->wall_s = last_done - t0;
}

/* --- probing ------------------------------------------------------------- */

typedef struct {
    char *buf;
    size_t len, cap;
} membuf;

static size_t on_mem_write(char *ptr, size_t size, size_t nmemb, void *user)
{
    membuf *m = user;
    size_t n = size * nmemb;
    if (m->len + n + 1 > (1u << 20))
        return n; /* a probe needs the first MiB at most */
    if (m->len + n + 1 > m->cap) {
        size_t nc = m->cap ? m->cap * 2 : 4096;
        while (nc < m->len + n + 1)
            nc *= 2;
        char *nb = realloc(m->buf, nc);
        if (!nb)
            return 0;
        m->buf = nb;
        m->cap = nc;
    }
    memcpy(m->buf + m->len, ptr, n);
    m->len += n;
    m->buf[m->len] = '\0';
    return n;
}

/* Blocking GET of url into m; *status set. Returns 0 when an HTTP answer
 * came, -1 with a reason when none did. */
static int get(const char *url, struct curl_slist *hdrs, membuf *m, long *status, char *err, size_t errlen)
{
    CURL *h = curl_easy_init();
    char cerr[CURL_ERROR_SIZE] = "";
    if (!h) {
        snprintf(err, errlen, "curl_easy_init failed");
        return -1;
    }
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_mem_write);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, m);
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, cerr);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, 5000L);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 15000L);
    if (hdrs)
        curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
    CURLcode res = curl_easy_perform(h);
    *status = 0;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, status);
    curl_easy_cleanup(h);
    if (res != CURLE_OK) {
        snprintf(err, errlen, "%s", cerr[0] ? cerr : curl_easy_strerror(res));
        return -1;
    }
    return 0;
}

/* Checks the server before loading it: /health must answer 200; /v1/models
 * gives the model id (unless --model) and, when advertised, the context
 * length the prompt must fit in. 0 or -1 with a one-line reason. */
static int probe(runner *R, char *err, size_t errlen)
{
    const lkq_args *a = R->a;
    char url[700], why[CURL_ERROR_SIZE + 64];
    membuf m = {0};
    long st;
    snprintf(url, sizeof url, "%s/health", a->url);
    if (get(url, R->hdrs, &m, &st, why, sizeof why) != 0) {
        snprintf(err, errlen, "cannot reach %s: %s", url, why);
        free(m.buf);
        return -1;
    }
    free(m.buf);
    if (st != 200) {
        snprintf(err, errlen, "server at %s is not ready: /health answered %ld", a->url, st);
        return -1;
    }
    memset(&m, 0, sizeof m);
    snprintf(url, sizeof url, "%s/v1/models", a->url);
    if (get(url, R->hdrs, &m, &st, why, sizeof why) != 0) {
        snprintf(err, errlen, "cannot reach %s: %s", url, why);
        free(m.buf);
        return -1;
    }
    if (st == 401 || st == 403) {
        snprintf(err, errlen, "server refused the API key (%ld on /v1/models)%s", st,
                 a->api_key ? "" : "; give --api-key or $LKQ_API_KEY");
        free(m.buf);
        return -1;
    }
    long long ctx = 0;
    if (st == 200 && m.buf) {
        json_t *root = json_loads(m.buf, 0, NULL);
        json_t *data = json_object_get(root, "data");
        json_t *first = json_array_get(data, 0);
        json_t *id = json_object_get(first, "id");
        if (!a->model && json_is_string(id))
            snprintf(R->model, sizeof R->model, "%s", json_string_value(id));
        json_t *ml = json_object_get(first, "max_model_len");
        if (!json_is_integer(ml))
            ml = json_object_get(first, "context_length");
        if (json_is_integer(ml))
            ctx = json_integer_value(ml);
        json_decref(root);
    }
    free(m.buf);
    if (ctx > 0 && (long long)a->prompt_tokens + a->max_tokens > ctx) {
        snprintf(err, errlen,
                 "impossible budget: --prompt-tokens %d + --max-tokens %d exceed the model's context of %lld",
                 a->prompt_tokens, a->max_tokens, ctx);
        return -1;
    }
    if (a->metrics_url[0]) {
        memset(&m, 0, sizeof m);
        if (get(a->metrics_url, R->hdrs, &m, &st, why, sizeof why) != 0) {
            snprintf(err, errlen, "cannot reach %s: %s", a->metrics_url, why);
            free(m.buf);
            return -1;
        }
        lkq_prom_snap snap;
        int found = (st == 200 && m.buf) ? lkq_prom_snapshot(m.buf, m.len, &snap) : 0;
        free(m.buf);
        if (st != 200 || found == 0) {
            snprintf(err, errlen, "%s answered %ld without the server's gauges", a->metrics_url, st);
            return -1;
        }
    }
    return 0;
}

/* Opens path for appending; *is_new says whether it was empty. */
static FILE *open_append(const char *path, int *is_new)
{
    struct stat sb;
    *is_new = !(stat(path, &sb) == 0 && sb.st_size > 0);
    return fopen(path, "a");
}

int main(int argc, char **argv)
{
    lkq_args a;
    char err[2048];
    int rc = lkq_args_parse(argc, argv, &a, err, sizeof err);
    if (rc == 1)
        return 0;
    if (rc != 0) {
        fprintf(stderr, "lkq_load: %s\n", err);
        return 2;
    }
    runner R;
    memset(&R, 0, sizeof R);
    R.a = &a;
    if (a.model)
        snprintf(R.model, sizeof R.model, "%s", a.model);
    if (snprintf(R.endpoint, sizeof R.endpoint, "%s/v1/%s", a.url,
                 a.chat ? "chat/completions" : "completions") >= (int)sizeof R.endpoint) {
        fprintf(stderr, "lkq_load: URL too long\n");
        return 2;
    }

    /* the corpus first: a budget it cannot meet is a usage error */
    char pbuf[1024];
    const char *ppath = a.prompt_file ? a.prompt_file : lkq_corpus_default_path(pbuf, sizeof pbuf);
    if (lkq_corpus_load(&R.corpus, ppath, err, sizeof err) != 0) {
        fprintf(stderr, "lkq_load: %s\n", err);
        return 2;
    }
    R.nchars = (size_t)ceil(a.prompt_tokens * a.chars_per_token);
    if (R.corpus.len < R.nchars + 64) {
        fprintf(stderr, "lkq_load: impossible budget: --prompt-tokens %d needs ~%zu bytes of text, %s has %zu\n",
                a.prompt_tokens, R.nchars, ppath, R.corpus.len);
        lkq_corpus_free(&R.corpus);
        return 2;
    }

    if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0) {
        fprintf(stderr, "lkq_load: curl_global_init failed\n");
        lkq_corpus_free(&R.corpus);
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    R.hdrs = curl_slist_append(NULL, "Content-Type: application/json");
    R.hdrs = curl_slist_append(R.hdrs, "Accept: text/event-stream");
    R.hdrs = curl_slist_append(R.hdrs, "Expect:"); /* no 100-continue round trip */
    if (a.api_key) {
        char auth[600];
        snprintf(auth, sizeof auth, "Authorization: Bearer %s", a.api_key);
        R.hdrs = curl_slist_append(R.hdrs, auth);
    }
    int status = 0;
    lkq_level *levels = NULL;
    FILE *csv = NULL, *js = NULL;
    if (!R.hdrs) {
        fprintf(stderr, "lkq_load: out of memory\n");
        status = 1;
        goto done;
    }
    if (probe(&R, err, sizeof err) != 0) {
        fprintf(stderr, "lkq_load: %s\n", err);
        status = 1;
        goto done;
    }
    int csv_new = 0, js_new = 0;
    if (a.csv && !(csv = open_append(a.csv, &csv_new))) {
        fprintf(stderr, "lkq_load: cannot write %s\n", a.csv);
        status = 1;
        goto done;
    }
    if (a.json && !(js = open_append(a.json, &js_new))) {
        fprintf(stderr, "lkq_load: cannot write %s\n", a.json);
        status = 1;
        goto done;
    }
    if (csv && csv_new)
        lkq_level_csv_header(csv);
    int log_new = 0;
    if (a.scrape_log && !(R.scrape_log = open_append(a.scrape_log, &log_new))) {
        fprintf(stderr, "lkq_load: cannot write %s\n", a.scrape_log);
        status = 1;
        goto done;
    }
    if (R.scrape_log && log_new)
        fprintf(R.scrape_log, "label,level,t,running,waiting,kv_usage,kv_bytes,prompt_tokens\n");
    R.multi = curl_multi_init();
    levels = calloc((size_t)a.n_levels, sizeof *levels);
    if (!R.multi || !levels) {
        fprintf(stderr, "lkq_load: out of memory\n");
        status = 1;
        goto done;
    }
    curl_multi_setopt(R.multi, CURLMOPT_MAXCONNECTS, (long)(a.open_loop ? a.max_inflight : a.concurrency[a.n_levels - 1]) + 4);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sa.sa_flags = SA_RESETHAND;
    sigaction(SIGINT, &sa, NULL);

    if (!a.quiet)
        fprintf(stderr, "lkq_load: %s, model '%s', ~%d prompt tokens (%zu bytes of %s), max_tokens %d, %d level(s)\n",
                R.endpoint, R.model, a.prompt_tokens, R.nchars, ppath, a.max_tokens, a.n_levels);
    lkq_level_print_header(stdout);
    int ran = 0;
    for (int li = 0; li < a.n_levels && !g_interrupted; li++) {
        if (li > 0 && a.pause > 0) {
            double until = now_s() + a.pause;
            while (now_s() < until && !g_interrupted)
                pump(&R, until - now_s());
        }
        if (!a.quiet) {
            if (a.open_loop)
                fprintf(stderr, "lkq_load: level %d/%d: Poisson %.3g req/s\n", li + 1, a.n_levels, a.rate[li]);
            else
                fprintf(stderr, "lkq_load: level %d/%d: concurrency %d\n", li + 1, a.n_levels,
                        a.concurrency[li]);
        }
        run_level(&R, li, &levels[li]);
        ran++;
        lkq_level_print_row(stdout, &levels[li]);
        fflush(stdout);
        if (csv) {
            lkq_level_csv_row(csv, &levels[li]);
            fflush(csv);
        }
        if (js) {
            lkq_level_json_line(js, &levels[li]);
            fflush(js);
        }
        if (lkq_level_unexpected(&levels[li]) > 0) {
            status = 3;
            if (!a.keep_going && li + 1 < a.n_levels) {
                fprintf(stderr, "lkq_load: stopping the sweep after real failures (--keep-going runs on)\n");
                break;
            }
        }
    }
    if (g_interrupted)
        fprintf(stderr, "lkq_load: interrupted after %d level(s)\n", ran);
done:
    if (levels)
        for (int li = 0; li < a.n_levels; li++)
            lkq_level_free(&levels[li]);
    free(levels);
    if (R.sc.h) {
        if (R.sc.busy)
            curl_multi_remove_handle(R.multi, R.sc.h);
        curl_easy_cleanup(R.sc.h);
    }
    free(R.sc.buf);
    free(R.live);
    if (R.multi)
        curl_multi_cleanup(R.multi);
    curl_slist_free_all(R.hdrs);
    if (csv && fclose(csv) != 0 && status == 0)
        status = 1;
    if (js && fclose(js) != 0 && status == 0)
        status = 1;
    if (R.scrape_log && fclose(R.scrape_log) != 0 && status == 0)
        status = 1;
    lkq_corpus_free(&R.corpus);
    curl_global_cleanup();
    return status;
}
