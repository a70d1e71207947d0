/*
 * http.c - libmicrohttpd front end (see http.h).
 *
 * A connection's life: the access handler collects the body (413 past the
 * limit), then routes. Generation requests are parsed into native
 * structs (server/api.c) and submitted to the scheduler, one scheduler
 * request per prompt. Non-streaming: the connection is suspended until
 * the scheduler says the request is done, then one JSON response is
 * queued. Streaming: a callback response whose reader turns new output
 * into SSE chunks and suspends the connection when there is none; the
 * engine thread's notify resumes it. NOTIFY_COMPLETED releases the
 * scheduler requests (cancelling unfinished ones, which frees their KV
 * blocks) and writes the access log line (tokens generated and tokens
 * delivered: a slow reader may get fewer than were generated).
 *
 * The watcher: every socket is registered at accept (MHD's
 * NOTIFY_CONNECTION) with the time it started waiting for a request. A
 * socket still waiting for a complete request (headers and body) after
 * read_timeout_s is shut down - a slowloris client that sends a byte a
 * second never holds a connection for long, and a keep-alive connection
 * idle that long closes too. While a generation request is answered its
 * socket is peeked (recv MSG_PEEK): a client that closed it has its
 * requests cancelled at once (the engine frees their KV blocks at the next
 * step) - MHD itself cannot see a suspended connection's socket. Long
 * answers are never cut: the deadline covers receiving the request only.
 *
 * Locking: the connection's `suspended` flag is read and written only
 * under the scheduler's lock (in sched_poll's on_armed callback and in the
 * notify callback), so a resume always follows its suspend. The socket
 * list is under h->wmu; order h->wmu, then the scheduler's lock (the
 * watcher cancels under wmu; the engine thread never takes wmu). A socket
 * leaves the list in MHD's close notification, before MHD closes its fd,
 * so the watcher never touches a closed descriptor.
 */
#include "server/http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "engine/util/log.h"
#include "server/api.h"
#include "server/metrics.h"

typedef enum {
    R_NONE = 0,
    R_COMPLETIONS,
    R_CHAT,
    R_MODELS,
    R_HEALTH,
    R_METRICS,
    R_TOKENIZE,
    R_DETOKENIZE,
    R_MODEL_ONE,
    R_COUNT
} route;

static const char *const route_name[R_COUNT] = {"other", "/v1/completions",
                                                "/v1/chat/completions", "/v1/models",
                                                "/health", "/metrics", "/tokenize",
                                                "/detokenize", "/v1/models/{id}"};

/* The kernel send buffer of a streaming connection (the kernel doubles it:
 * 512 KiB in all). */
#define HTTP_SSE_SNDBUF (256 * 1024)

/* A socket, from accept to close (MHD's socket context). */
typedef enum {
    SK_READING = 0, /* waiting for a complete request (the deadline runs) */
    SK_BUSY,        /* the request is in; being answered */
    SK_CLOSING      /* shut down by the watcher */
} sock_phase;

struct conn;

typedef struct sock {
    struct sock *prev, *next;
    int fd;
    sock_phase phase;
    double t_idle;      /* when it started waiting for a request */
    struct conn *c;     /* a generation being answered (peeked), or NULL */
    int gone;           /* its client left; its requests were cancelled */
} sock;

struct http_server {
    http_config cfg;
    char host[64], model_id[256], api_key[512], metrics_key[512];
    const mdl_model *m;
    sched *s;
    struct MHD_Daemon *d;
    int port;
    volatile int draining;
    double t_start;
    long created;       /* wall clock at start */
    pthread_mutex_t mu; /* counters */
    metrics_http hm;
    uint64_t next_id;
    int n_conns;        /* open connections with state (under mu) */
    /* the watcher */
    pthread_mutex_t wmu;
    pthread_cond_t wcv;
    pthread_t wthr;
    int wthr_started, wquit;
    sock *socks;        /* every open socket (under wmu) */
};

typedef struct conn {
    http_server *h;
    struct MHD_Connection *mc;
    sock *sk;
    route rt;
    int routed;       /* the request is complete and routed */
    int is_get, is_post, bad_method;
    char *body;
    size_t len, cap;
    int too_big;
    char id[48];
    char method[16], url[160];
    double t0;
    int status;
    /* generation */
    api_request req;
    int have_req;
    sched_req *sr[API_MAX_PROMPTS];
    sched_out out[API_MAX_PROMPTS];
    int n_sr;
    int waiting;      /* non-streaming: submitted, response not yet queued */
    int suspended;    /* under the scheduler lock */
    long created;
    /* streaming */
    int streaming;
    char *pend;
    size_t pend_len, pend_off, pend_cap;
    int sent_done;
    int64_t pend_gen; /* tokens generated when pend was formatted */
    int64_t prev_end[API_MAX_PROMPTS][SCHED_MAX_N];
    int64_t gen_tokens, prompt_tokens;
    int64_t delivered; /* tokens whose output went to the socket */
    int client_gone;  /* cancelled because the client left (status 499) */
} conn;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void count(http_server *h, route rt, int code)
{
    pthread_mutex_lock(&h->mu);
    metrics_http *m = &h->hm;
    int i = 0;
    while (i < m->n && !(m->c[i].code == code && strcmp(m->c[i].endpoint, route_name[rt]) == 0))
        i++;
    if (i == m->n && m->n < METRICS_MAX_COUNTERS) {
        snprintf(m->c[i].endpoint, sizeof m->c[i].endpoint, "%s", route_name[rt]);
        m->c[i].code = code;
        m->c[i].n = 0;
        m->n++;
    }
    if (i < m->n)
        m->c[i].n++;
    pthread_mutex_unlock(&h->mu);
}

/* Queues a response with the common headers; takes ownership of body
 * (malloc'd). */
static enum MHD_Result respond(conn *c, int status, const char *ctype, char *body,
                               const char *extra_name, const char *extra_value)
{
    size_t n = body ? strlen(body) : 0;
    struct MHD_Response *r =
        MHD_create_response_from_buffer(n, body ? body : (char *)"", body ? MHD_RESPMEM_MUST_FREE
                                                                          : MHD_RESPMEM_PERSISTENT);
    if (!r) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, "Content-Type", ctype);
    MHD_add_response_header(r, "X-Request-Id", c->id);
    if (extra_name)
        MHD_add_response_header(r, extra_name, extra_value);
    enum MHD_Result rc = MHD_queue_response(c->mc, (unsigned)status, r);
    MHD_destroy_response(r);
    c->status = status;
    count(c->h, c->rt, status);
    return rc;
}

static enum MHD_Result respond_json(conn *c, int status, char *json)
{
    return respond(c, status, "application/json", json, NULL, NULL);
}

static enum MHD_Result respond_error(conn *c, const api_error *e)
{
    const char *rn = NULL, *rv = NULL;
    if (e->status == 429 || e->status == 503) {
        rn = "Retry-After";
        rv = "1";
    } else if (e->status == 401) {
        rn = "WWW-Authenticate";
        rv = "Bearer";
    } else if (e->status == 405) {
        rn = "Allow";
        rv = c->rt == R_COMPLETIONS || c->rt == R_CHAT || c->rt == R_TOKENIZE ||
                     c->rt == R_DETOKENIZE
                 ? "POST"
                 : "GET";
    }
    log_msg(e->status >= 500 ? LOG_LEVEL_WARN : LOG_LEVEL_DEBUG, c->id, "%d %s", e->status,
            e->message);
    char *j = api_error_json(e);
    return respond(c, e->status, "application/json", j, rn, rv);
}

static enum MHD_Result fail(conn *c, int status, const char *type, const char *code,
                            const char *fmt, const char *arg)
{
    api_error e;
    api_set_error(&e, status, type, code, NULL, fmt, arg);
    return respond_error(c, &e);
}

/* Constant-time comparison of the presented key with want ("" = none). */
static int key_ok(const char *want, const char *auth)
{
    if (!want[0])
        return 1;
    const char *k = "";
    if (auth && strncmp(auth, "Bearer ", 7) == 0)
        k = auth + 7;
    size_t a = strlen(k), b = strlen(want);
    unsigned diff = (unsigned)(a ^ b);
    for (size_t i = 0; i < b; i++)
        diff |= (unsigned char)(i < a ? k[i] : 0) ^ (unsigned char)want[i];
    return diff == 0;
}

/* ---- the socket watcher ------------------------------------------------------ */

/* 1 if the peer closed or reset the socket (a peek sees the end). */
static int peer_gone(int fd)
{
    char b;
    ssize_t r = recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (r == 0)
        return 1;
    return r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
}

/* The watcher thread: five times a second, under wmu, shuts down sockets
 * still waiting for a complete request after read_timeout_s and cancels
 * the requests of answered sockets whose client left. Stops at wquit. */
static void *watcher_main(void *arg)
{
    http_server *h = arg;
    pthread_mutex_lock(&h->wmu);
    while (!h->wquit) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 200 * 1000 * 1000;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&h->wcv, &h->wmu, &ts);
        double t = now_s();
        for (sock *k = h->socks; k && !h->wquit; k = k->next) {
            if (k->phase == SK_READING && t - k->t_idle > h->cfg.read_timeout_s) {
                /* MHD sees the end at its next read and closes it */
                shutdown(k->fd, SHUT_RDWR);
                k->phase = SK_CLOSING;
                pthread_mutex_lock(&h->mu);
                h->hm.read_timeouts++;
                pthread_mutex_unlock(&h->mu);
                log_msg(LOG_LEVEL_INFO, NULL, "closing a connection: no complete request "
                        "within %.0f s (--read-timeout)", h->cfg.read_timeout_s);
            } else if (k->c && !k->gone && peer_gone(k->fd)) {
                k->gone = 1;
                struct conn *c = k->c;
                c->client_gone = 1;
                for (int i = 0; i < c->n_sr; i++)
                    sched_req_cancel(h->s, c->sr[i]);
                pthread_mutex_lock(&h->mu);
                h->hm.client_gone++;
                pthread_mutex_unlock(&h->mu);
                log_msg(LOG_LEVEL_INFO, c->id, "the client went away: request cancelled");
            }
        }
    }
    pthread_mutex_unlock(&h->wmu);
    return NULL;
}

/* MHD_OPTION_NOTIFY_CONNECTION (an MHD worker thread): a new socket joins
 * the watcher's list, waiting for its first request; a closing one leaves
 * it (before MHD closes the descriptor) and is freed. */
static void on_connection(void *cls, struct MHD_Connection *mc, void **socket_context,
                          enum MHD_ConnectionNotificationCode code)
{
    http_server *h = cls;
    if (code == MHD_CONNECTION_NOTIFY_STARTED) {
        sock *k = calloc(1, sizeof *k);
        if (!k)
            return; /* unwatched: the idle timeout still applies */
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(mc, MHD_CONNECTION_INFO_CONNECTION_FD);
        k->fd = ci ? ci->connect_fd : -1;
        k->t_idle = now_s();
        k->phase = k->fd >= 0 ? SK_READING : SK_BUSY;
        pthread_mutex_lock(&h->wmu);
        k->next = h->socks;
        if (h->socks)
            h->socks->prev = k;
        h->socks = k;
        pthread_mutex_unlock(&h->wmu);
        *socket_context = k;
    } else if (code == MHD_CONNECTION_NOTIFY_CLOSED) {
        sock *k = *socket_context;
        if (!k)
            return;
        pthread_mutex_lock(&h->wmu);
        if (k->prev)
            k->prev->next = k->next;
        else
            h->socks = k->next;
        if (k->next)
            k->next->prev = k->prev;
        pthread_mutex_unlock(&h->wmu);
        free(k);
        *socket_context = NULL;
    }
}

/* The request is complete: the receive deadline stops. */
static void sock_busy(conn *c)
{
    if (!c->sk)
        return;
    pthread_mutex_lock(&c->h->wmu);
    if (c->sk->phase == SK_READING)
        c->sk->phase = SK_BUSY;
    pthread_mutex_unlock(&c->h->wmu);
}

/* Watch c's socket for a client that leaves while c is answered. */
static void sock_watch(conn *c)
{
    if (!c->sk)
        return;
    pthread_mutex_lock(&c->h->wmu);
    c->sk->c = c;
    pthread_mutex_unlock(&c->h->wmu);
}

/* c is done: the socket waits for the next request (keep-alive). */
static void sock_idle(conn *c)
{
    if (!c->sk)
        return;
    pthread_mutex_lock(&c->h->wmu);
    c->sk->c = NULL;
    c->sk->gone = 0;
    if (c->sk->phase != SK_CLOSING) {
        c->sk->phase = SK_READING;
        c->sk->t_idle = now_s();
    }
    pthread_mutex_unlock(&c->h->wmu);
}

/* ---- scheduler callbacks (engine / HTTP threads, scheduler lock held) ----- */

static void on_notify(void *ctx)
{
    conn *c = ctx;
    if (c->suspended) {
        c->suspended = 0;
        MHD_resume_connection(c->mc);
    }
}

static void on_armed(void *ctx)
{
    conn *c = ctx;
    if (!c->suspended) {
        c->suspended = 1;
        MHD_suspend_connection(c->mc);
    }
}

/* ---- generation ------------------------------------------------------------- */

static void pend_add(conn *c, const char *s, size_t n)
{
    if (c->pend_len + n + 1 > c->pend_cap) {
        size_t nc = c->pend_cap ? c->pend_cap : 4096;
        while (nc < c->pend_len + n + 1)
            nc *= 2;
        char *t = realloc(c->pend, nc);
        if (!t)
            return;
        c->pend = t;
        c->pend_cap = nc;
    }
    memcpy(c->pend + c->pend_len, s, n);
    c->pend_len += n;
}

static void pend_event(conn *c, char *json)
{
    if (!json)
        return;
    pend_add(c, "data: ", 6);
    pend_add(c, json, strlen(json));
    pend_add(c, "\n\n", 2);
    free(json);
}

/* Turns the new output of every scheduler request into SSE events (one
 * chunk per choice with something new), then empties the buffers. When
 * everything is done: an error event if a request failed, the usage chunk
 * if asked for, and [DONE]. */
static void stream_format(conn *c)
{
    const api_request *q = &c->req;
    int all_done = 1;
    c->pend_gen = 0;
    for (int k = 0; k < c->n_sr; k++)
        c->pend_gen += c->out[k].n_generated;
    for (int k = 0; k < c->n_sr; k++) {
        sched_out *o = &c->out[k];
        for (int i = 0; i < o->n_choices; i++) {
            sched_choice_out *ch = &o->ch[i];
            if (ch->len == 0 && ch->n_toks == 0 && !ch->finish)
                continue;
            api_piece p = {k * q->n + i, ch->text, ch->len, ch->toks, ch->n_toks,
                           c->prev_end[k][i], q->echo ? (int64_t)q->text_len[k] : 0,
                           ch->finish, 0};
            pend_event(c, api_chunk_json(q->kind, c->id, c->h->model_id, c->created, &p, 1,
                                         q->logprobs, c->h->m, -1, 0));
            if (ch->n_toks > 0)
                c->prev_end[k][i] = ch->toks[ch->n_toks - 1].text_end;
            ch->len = 0;
            ch->n_toks = 0;
            ch->finish = NULL;
        }
        all_done &= o->done;
    }
    if (!all_done)
        return;
    int64_t gen = 0, prompt = 0;
    for (int k = 0; k < c->n_sr; k++) {
        gen += c->out[k].n_generated;
        prompt += c->out[k].n_prompt;
        if (c->out[k].status && c->status == 200) {
            api_error e;
            api_set_error(&e, c->out[k].status, c->out[k].status >= 500 ? "server_error" : NULL,
                          NULL, NULL, "%s", c->out[k].error);
            pend_event(c, api_error_json(&e));
            c->status = c->out[k].status; /* for the access log */
        }
    }
    c->gen_tokens = gen;
    c->prompt_tokens = prompt;
    if (q->include_usage)
        pend_event(c, api_chunk_json(q->kind, c->id, c->h->model_id, c->created, NULL, 0,
                                     q->logprobs, c->h->m, prompt, gen));
    pend_add(c, "data: [DONE]\n\n", 14);
    c->sent_done = 1;
}

static ssize_t sse_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    conn *c = cls;
    (void)pos;
    for (;;) {
        if (c->pend_off < c->pend_len) {
            size_t n = c->pend_len - c->pend_off;
            if (n > max)
                n = max;
            memcpy(buf, c->pend + c->pend_off, n);
            c->pend_off += n;
            if (c->pend_off == c->pend_len)
                c->delivered = c->pend_gen; /* all of it handed to the socket */
            return (ssize_t)n;
        }
        c->pend_len = c->pend_off = 0;
        if (c->sent_done)
            return MHD_CONTENT_READER_END_OF_STREAM;
        int any = sched_poll(c->h->s, c->sr, c->out, c->n_sr, 1, on_armed, c);
        int all_done = 1;
        for (int k = 0; k < c->n_sr; k++) {
            all_done &= c->out[k].done;
            if (c->out[k].cancelled)
                return MHD_CONTENT_READER_END_WITH_ERROR; /* the client left */
        }
        if (!any && !all_done)
            return 0; /* suspended until the engine has more */
        stream_format(c);
    }
}

/* The complete non-streaming response from the accumulated output. */
static enum MHD_Result respond_final(conn *c)
{
    const api_request *q = &c->req;
    for (int k = 0; k < c->n_sr; k++) {
        if (c->out[k].status) {
            api_error e;
            api_set_error(&e, c->out[k].status, c->out[k].status >= 500 ? "server_error" : NULL,
                          NULL, NULL, "%s", c->out[k].error);
            return respond_error(c, &e);
        }
    }
    int n_ch = c->n_sr * q->n;
    api_piece *p = calloc((size_t)n_ch, sizeof *p);
    char **joined = calloc((size_t)n_ch, sizeof *joined);
    if (!p || !joined) {
        free(p);
        free(joined);
        return fail(c, 500, "server_error", NULL, "%s", "out of memory");
    }
    int64_t gen = 0, prompt = 0;
    for (int k = 0; k < c->n_sr; k++) {
        gen += c->out[k].n_generated;
        prompt += c->out[k].n_prompt;
        for (int i = 0; i < q->n; i++) {
            sched_choice_out *ch = &c->out[k].ch[i];
            api_piece *x = &p[k * q->n + i];
            *x = (api_piece){k * q->n + i, ch->text, ch->len, ch->toks, ch->n_toks, 0, 0,
                             ch->finish ? ch->finish : "stop", 0};
            if (q->echo) {
                size_t pl = q->text_len[k];
                joined[k * q->n + i] = malloc(pl + ch->len + 1);
                if (joined[k * q->n + i]) {
                    memcpy(joined[k * q->n + i], q->text[k], pl);
                    if (ch->len)
                        memcpy(joined[k * q->n + i] + pl, ch->text, ch->len);
                    x->text = joined[k * q->n + i];
                    x->len = pl + ch->len;
                    x->text_shift = (int64_t)pl;
                }
            }
        }
    }
    c->gen_tokens = gen;
    c->prompt_tokens = prompt;
    char *json = api_response_json(q->kind, c->id, c->h->model_id, c->created, p, n_ch,
                                   q->logprobs, c->h->m, prompt, gen);
    for (int i = 0; i < n_ch; i++)
        free(joined[i]);
    free(joined);
    free(p);
    if (!json)
        return fail(c, 500, "server_error", NULL, "%s", "out of memory");
    return respond_json(c, 200, json);
}

/* Parses, submits and starts answering a generation request. */
static enum MHD_Result start_generation(conn *c)
{
    http_server *h = c->h;
    api_ctx ax = {h->m, h->model_id, sched_n_ctx(h->s), h->cfg.max_n, h->cfg.max_prompt_tokens,
                  sched_max_seq_tokens(h->s), 0, {0}};
    for (int m = 0; m < CFG_KV_MODES; m++) {
        ax.kv_modes |= (uint32_t)sched_kv_has_mode(h->s, m) << m;
        ax.max_seq_kv[m] = sched_max_seq_tokens_mode(h->s, m);
    }
    api_error e;
    if (api_parse(c->rt == R_CHAT ? API_CHAT : API_COMPLETIONS, c->body ? c->body : "",
                  c->len, &ax, &c->req, &e) < 0) {
        pthread_mutex_lock(&h->mu);
        h->hm.rejected_invalid++;
        pthread_mutex_unlock(&h->mu);
        return respond_error(c, &e);
    }
    c->have_req = 1;
    c->created = (long)time(NULL);
    sched_req_params sp[API_MAX_PROMPTS];
    memset(sp, 0, sizeof sp);
    for (int k = 0; k < c->req.n_prompts; k++) {
        sp[k].prompt = c->req.ids[k];
        sp[k].n_prompt = c->req.n_ids[k];
        sp[k].max_tokens = c->req.max_tokens;
        sp[k].n = c->req.n;
        sp[k].sp = c->req.sp;
        sp[k].logprobs = c->req.logprobs;
        for (int i = 0; i < c->req.n_stop; i++)
            sp[k].stop[i] = c->req.stop[i];
        sp[k].n_stop = c->req.n_stop;
        sp[k].ignore_eos = c->req.ignore_eos;
        sp[k].kv_mode = c->req.kv_mode;
        sp[k].cache_prompt = c->req.cache_prompt;
        sp[k].id = c->id;
        sp[k].notify = on_notify;
        sp[k].notify_ctx = c;
        sp[k].notify_final = !c->req.stream;
    }
    /* all prompts as one group: queued all or none, and fair-shared as one
     * client request */
    char err[512];
    int rc = sched_submit_group(h->s, sp, c->req.n_prompts, c->sr, err, sizeof err);
    if (rc < 0) {
        int st = rc == -EBUSY ? 429 : rc == -ESHUTDOWN ? 503 : rc == -ENOMEM ? 500 : 400;
        pthread_mutex_lock(&h->mu);
        if (rc == -EBUSY)
            h->hm.rejected_queue_full++;
        else if (rc == -ESHUTDOWN)
            h->hm.rejected_shutdown++;
        else
            h->hm.rejected_invalid++;
        pthread_mutex_unlock(&h->mu);
        api_set_error(&e, st,
                      st == 429   ? "rate_limit_exceeded"
                      : st == 400 ? "invalid_request_error"
                                  : "server_error",
                      rc == -E2BIG ? "context_length_exceeded" : NULL,
                      rc == -EOVERFLOW ? "n" : rc == -E2BIG ? "max_tokens" : NULL, "%s", err);
        return respond_error(c, &e);
    }
    c->n_sr = c->req.n_prompts;
    sock_watch(c);
    if (c->req.stream) {
        c->streaming = 1;
        /* a stream's kernel send buffer is capped: a client that stops
         * reading holds at most this much, and back-pressure reaches the
         * reader (and the access log's delivered count) instead of
         * megabytes vanishing into an autotuned buffer */
        if (c->sk && c->sk->fd >= 0) {
            int sndbuf = HTTP_SSE_SNDBUF;
            (void)setsockopt(c->sk->fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
        }
        /* first events: the assistant role (chat) or the echoed prompt */
        for (int k = 0; k < c->n_sr; k++) {
            for (int i = 0; i < c->req.n; i++) {
                api_piece p = {k * c->req.n + i, "", 0, NULL, 0, 0, 0, NULL,
                               c->req.kind == API_CHAT};
                if (c->req.echo) {
                    p.text = c->req.text[k];
                    p.len = c->req.text_len[k];
                } else if (c->req.kind != API_CHAT) {
                    continue;
                }
                pend_event(c, api_chunk_json(c->req.kind, c->id, h->model_id, c->created, &p, 1,
                                             -1, h->m, -1, 0));
            }
        }
        struct MHD_Response *r =
            MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, sse_reader, c, NULL);
        if (!r)
            return MHD_NO;
        MHD_add_response_header(r, "Content-Type", "text/event-stream");
        MHD_add_response_header(r, "Cache-Control", "no-cache");
        MHD_add_response_header(r, "X-Accel-Buffering", "no");
        MHD_add_response_header(r, "X-Request-Id", c->id);
        enum MHD_Result rc = MHD_queue_response(c->mc, 200, r);
        MHD_destroy_response(r);
        c->status = 200;
        count(h, c->rt, 200);
        return rc;
    }
    c->waiting = 1;
    if (sched_poll(h->s, c->sr, c->out, c->n_sr, 1, on_armed, c) == 0) {
        int all_done = 1;
        for (int k = 0; k < c->n_sr; k++)
            all_done &= c->out[k].done;
        if (!all_done)
            return MHD_YES; /* suspended */
    }
    return MHD_YES; /* the handler is called again and checks */
}

static enum MHD_Result continue_generation(conn *c)
{
    int any = sched_poll(c->h->s, c->sr, c->out, c->n_sr, 1, on_armed, c);
    (void)any;
    int all_done = 1, cancelled = 0;
    for (int k = 0; k < c->n_sr; k++) {
        all_done &= c->out[k].done;
        cancelled |= c->out[k].cancelled;
    }
    if (!all_done)
        return MHD_YES; /* suspended (or resumed again: called once more) */
    c->waiting = 0;
    if (cancelled) {
        /* the client went away (the watcher cancelled it): nobody to answer */
        c->status = 499;
        count(c->h, c->rt, 499);
        return MHD_NO;
    }
    return respond_final(c);
}

/* ---- simple endpoints ------------------------------------------------------- */

static enum MHD_Result do_models(conn *c)
{
    http_server *h = c->h;
    json_t *model = json_pack("{s:s, s:s, s:I, s:s, s:i, s:s}", "id", h->model_id, "object",
                              "model", "created", (json_int_t)h->created, "owned_by",
                              "livekvquant", "max_model_len", sched_n_ctx(h->s), "root",
                              h->m->name);
    json_t *o;
    if (c->rt == R_MODEL_ONE) {
        const char *want = c->url + strlen("/v1/models/");
        if (strcmp(want, h->model_id) != 0 && strcmp(want, h->m->name) != 0) {
            json_decref(model);
            return fail(c, 404, "invalid_request_error", "model_not_found",
                        "The model '%s' does not exist", want);
        }
        o = model;
    } else {
        o = json_pack("{s:s, s:[o]}", "object", "list", "data", model);
    }
    char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (!s)
        return fail(c, 500, "server_error", NULL, "%s", "out of memory");
    return respond_json(c, 200, s);
}

static enum MHD_Result do_health(conn *c)
{
    http_server *h = c->h;
    const char *st = h->draining ? "{\"status\":\"shutting_down\"}" : "{\"status\":\"ok\"}";
    return respond_json(c, h->draining ? 503 : 200, strdup(st));
}

/* POST /tokenize and /detokenize (llama.cpp's shapes, server/api.c). */
static enum MHD_Result do_tokenize(conn *c)
{
    http_server *h = c->h;
    api_ctx ax = {h->m, h->model_id, sched_n_ctx(h->s), h->cfg.max_n, h->cfg.max_prompt_tokens,
                  sched_max_seq_tokens(h->s), 0, {0}};
    api_error e;
    char *out = NULL;
    int rc = c->rt == R_TOKENIZE ? api_tokenize(c->body ? c->body : "", c->len, &ax, &out, &e)
                                 : api_detokenize(c->body ? c->body : "", c->len, &ax, &out, &e);
    if (rc < 0)
        return respond_error(c, &e);
    return respond_json(c, 200, out);
}

static enum MHD_Result do_metrics(conn *c)
{
    http_server *h = c->h;
    sched_metrics sm;
    sched_get_metrics(h->s, &sm);
    metrics_http hm;
    pthread_mutex_lock(&h->mu);
    hm = h->hm;
    pthread_mutex_unlock(&h->mu);
    char *s = metrics_render(&sm, &hm, h->model_id, sm.kv_name ? sm.kv_name : "?",
                             now_s() - h->t_start);
    if (!s)
        return fail(c, 500, "server_error", NULL, "%s", "out of memory");
    count(h, c->rt, 200);
    return respond(c, 200, "text/plain; version=0.0.4; charset=utf-8", s, NULL, NULL);
}

/* ---- MHD callbacks ---------------------------------------------------------- */

static route route_of(const char *url)
{
    char path[160];
    snprintf(path, sizeof path, "%s", url);
    size_t n = strlen(path);
    while (n > 1 && path[n - 1] == '/')
        path[--n] = '\0';
    for (int r = 1; r < R_MODEL_ONE; r++)
        if (strcmp(path, route_name[r]) == 0)
            return (route)r;
    if (strcmp(path, "/completions") == 0)
        return R_COMPLETIONS;
    if (strcmp(path, "/chat/completions") == 0)
        return R_CHAT;
    if (strcmp(path, "/models") == 0)
        return R_MODELS;
    if (strncmp(path, "/v1/models/", 11) == 0)
        return R_MODEL_ONE;
    return R_NONE;
}

static void new_id(http_server *h, conn *c)
{
    const char *hdr = MHD_lookup_connection_value(c->mc, MHD_HEADER_KIND, "X-Request-Id");
    if (hdr && hdr[0] && strlen(hdr) < sizeof c->id) {
        int ok = 1;
        for (const char *p = hdr; *p; p++)
            ok &= (*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'z') ||
                  (*p >= 'A' && *p <= 'Z') || *p == '-' || *p == '_' || *p == '.';
        if (ok) {
            snprintf(c->id, sizeof c->id, "%s", hdr);
            return;
        }
    }
    pthread_mutex_lock(&h->mu);
    uint64_t n = ++h->next_id;
    pthread_mutex_unlock(&h->mu);
    snprintf(c->id, sizeof c->id, "%s-%08x%08llx", c->rt == R_CHAT ? "chatcmpl" : "cmpl",
             (unsigned)rand(), (unsigned long long)n);
}

/* libmicrohttpd's own messages go through the log module (debug level:
 * they are mostly clients that went away). */
static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char buf[512];
    vsnprintf(buf, sizeof buf, fmt, ap);
    buf[strcspn(buf, "\n")] = '\0';
    log_msg(LOG_LEVEL_DEBUG, NULL, "libmicrohttpd: %s", buf);
}

static enum MHD_Result handler(void *cls, struct MHD_Connection *mc, const char *url,
                               const char *method, const char *version,
                               const char *upload_data, size_t *upload_size, void **con_cls)
{
    http_server *h = cls;
    (void)version;
    conn *c = *con_cls;
    if (!c) {
        c = calloc(1, sizeof *c);
        if (!c)
            return MHD_NO;
        c->h = h;
        c->mc = mc;
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(mc, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
        c->sk = ci ? ci->socket_context : NULL;
        c->t0 = now_s();
        c->rt = route_of(url);
        c->is_get = strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0;
        c->is_post = strcmp(method, "POST") == 0;
        snprintf(c->method, sizeof c->method, "%s", method);
        snprintf(c->url, sizeof c->url, "%s", url);
        new_id(h, c);
        *con_cls = c;
        pthread_mutex_lock(&h->mu);
        h->n_conns++;
        pthread_mutex_unlock(&h->mu);
        const char *cl = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Content-Length");
        if (cl && strtoull(cl, NULL, 10) > h->cfg.max_body) {
            c->too_big = 1;
            char lim[64];
            snprintf(lim, sizeof lim, "%zu", h->cfg.max_body);
            return fail(c, 413, "invalid_request_error", "request_too_large",
                        "the request body exceeds the limit of %s bytes", lim);
        }
        return MHD_YES;
    }
    if (*upload_size) {
        if (!c->too_big) {
            if (c->len + *upload_size > h->cfg.max_body) {
                c->too_big = 1;
            } else {
                if (c->len + *upload_size + 1 > c->cap) {
                    size_t nc = c->cap ? c->cap : 4096;
                    while (nc < c->len + *upload_size + 1)
                        nc *= 2;
                    char *t = realloc(c->body, nc);
                    if (!t)
                        return MHD_NO;
                    c->body = t;
                    c->cap = nc;
                }
                memcpy(c->body + c->len, upload_data, *upload_size);
                c->len += *upload_size;
                c->body[c->len] = '\0';
            }
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (c->status)
        return MHD_YES; /* a response is queued already */
    if (c->waiting)
        return continue_generation(c);
    if (!c->routed) {
        c->routed = 1;
        sock_busy(c); /* the whole request is in: the read deadline stops */
    }

    if (c->too_big) {
        char lim[64];
        snprintf(lim, sizeof lim, "%zu", h->cfg.max_body);
        return fail(c, 413, "invalid_request_error", "request_too_large",
                    "the request body exceeds the limit of %s bytes", lim);
    }
    if (c->rt == R_NONE)
        return fail(c, 404, "invalid_request_error", "not_found", "no route for %s", c->url);
    int wants_post = c->rt == R_COMPLETIONS || c->rt == R_CHAT || c->rt == R_TOKENIZE ||
                     c->rt == R_DETOKENIZE;
    if ((wants_post && !c->is_post) || (!wants_post && !c->is_get))
        return fail(c, 405, "invalid_request_error", "method_not_allowed",
                    "method %s is not allowed here", c->method);
    /* /health is always open; /metrics needs --metrics-key when one is set;
     * everything else (the API) the API key */
    const char *auth = MHD_lookup_connection_value(mc, MHD_HEADER_KIND, "Authorization");
    if (c->rt == R_METRICS ? !key_ok(h->metrics_key, auth)
                           : c->rt != R_HEALTH && !key_ok(h->api_key, auth))
        return fail(c, 401, "invalid_request_error", "invalid_api_key", "%s",
                    c->rt == R_METRICS
                        ? "missing or wrong metrics key (send 'Authorization: Bearer KEY' "
                          "with the --metrics-key)"
                        : "missing or wrong API key (send 'Authorization: Bearer KEY')");
    switch (c->rt) {
    case R_MODELS:
    case R_MODEL_ONE:
        return do_models(c);
    case R_HEALTH:
        return do_health(c);
    case R_METRICS:
        return do_metrics(c);
    case R_TOKENIZE:
    case R_DETOKENIZE:
        return do_tokenize(c);
    default:
        return start_generation(c);
    }
}

static void completed(void *cls, struct MHD_Connection *mc, void **con_cls,
                      enum MHD_RequestTerminationCode toe)
{
    http_server *h = cls;
    (void)mc;
    conn *c = *con_cls;
    if (!c)
        return;
    *con_cls = NULL;
    sock_idle(c); /* unwatched before the requests go; the next request's clock starts */
    int cancelled = 0;
    if (c->gen_tokens == 0 && c->prompt_tokens == 0) {
        for (int k = 0; k < c->n_sr; k++)
            c->prompt_tokens += c->out[k].n_prompt;
    }
    /* what the engine generated, whatever the client received */
    int64_t generated = 0;
    for (int k = 0; k < c->n_sr; k++) {
        if (!c->out[k].done)
            cancelled = 1;
        generated += sched_req_generated(h->s, c->sr[k]);
        sched_req_release(h->s, c->sr[k]);
    }
    if (!c->streaming)
        c->delivered = c->status == 200 && toe == MHD_REQUEST_TERMINATED_COMPLETED_OK
                           ? c->gen_tokens : 0;
    if (c->client_gone || (c->n_sr > 0 && cancelled && !c->streaming && c->status == 0)) {
        cancelled = 1;
        if (c->status == 0) { /* nothing was sent: nginx's "client closed request" */
            c->status = 499;
            count(h, c->rt, 499);
        }
    }
    if (c->rt != R_METRICS && c->rt != R_HEALTH)
        log_msg(LOG_LEVEL_INFO, c->id,
                "method=%s path=%s status=%d dur=%.3fs stream=%d prompt_tokens=%lld "
                "completion_tokens=%lld delivered_tokens=%lld%s%s",
                c->method, c->url, c->status, now_s() - c->t0, c->streaming,
                (long long)c->prompt_tokens, (long long)generated, (long long)c->delivered,
                toe != MHD_REQUEST_TERMINATED_COMPLETED_OK ? " closed_early=1" : "",
                cancelled ? " cancelled=1" : "");
    for (int k = 0; k < API_MAX_PROMPTS; k++)
        sched_out_free(&c->out[k]);
    if (c->have_req)
        api_request_free(&c->req);
    free(c->body);
    free(c->pend);
    free(c);
    pthread_mutex_lock(&h->mu);
    h->n_conns--;
    pthread_mutex_unlock(&h->mu);
}

int http_start(const http_config *cfg, const mdl_model *m, sched *s, http_server **out,
               char *err, size_t errlen)
{
    *out = NULL;
    http_server *h = calloc(1, sizeof *h);
    if (!h) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    h->cfg = *cfg;
    snprintf(h->host, sizeof h->host, "%s", cfg->host ? cfg->host : "127.0.0.1");
    snprintf(h->model_id, sizeof h->model_id, "%s", cfg->model_id ? cfg->model_id : m->name);
    if (cfg->api_key)
        snprintf(h->api_key, sizeof h->api_key, "%s", cfg->api_key);
    if (cfg->metrics_key)
        snprintf(h->metrics_key, sizeof h->metrics_key, "%s", cfg->metrics_key);
    h->cfg.host = h->host;
    h->cfg.model_id = h->model_id;
    h->cfg.api_key = h->api_key[0] ? h->api_key : NULL;
    h->cfg.metrics_key = h->metrics_key[0] ? h->metrics_key : NULL;
    if (h->cfg.read_timeout_s <= 0)
        h->cfg.read_timeout_s = 30;
    if (h->cfg.max_n < 1)
        h->cfg.max_n = SCHED_MAX_N;
    if (h->cfg.max_body == 0)
        h->cfg.max_body = 8u << 20;
    h->m = m;
    h->s = s;
    h->t_start = now_s();
    h->created = (long)time(NULL);
    pthread_mutex_init(&h->mu, NULL);
    pthread_mutex_init(&h->wmu, NULL);
    pthread_cond_init(&h->wcv, NULL);
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)cfg->port);
    if (inet_pton(AF_INET, h->host, &sa.sin_addr) != 1) {
        snprintf(err, errlen, "--host '%s' is not an IPv4 address", h->host);
        http_stop(h);
        return -EINVAL;
    }
    int threads = cfg->http_threads > 0 ? cfg->http_threads : 4;
    h->d = MHD_start_daemon(
        MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | MHD_USE_TURBO | MHD_ALLOW_SUSPEND_RESUME |
            MHD_USE_ERROR_LOG,
        (uint16_t)cfg->port, NULL, NULL, handler, h, MHD_OPTION_SOCK_ADDR,
        (struct sockaddr *)&sa, MHD_OPTION_THREAD_POOL_SIZE, (unsigned)threads,
        MHD_OPTION_NOTIFY_COMPLETED, completed, h, MHD_OPTION_NOTIFY_CONNECTION, on_connection,
        h, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)600, MHD_OPTION_CONNECTION_LIMIT,
        (unsigned)(cfg->max_connections > 0 ? cfg->max_connections : 1000),
        MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL, MHD_OPTION_END);
    if (!h->d) {
        snprintf(err, errlen, "cannot listen on %s:%d (%s)", h->host, cfg->port,
                 errno ? strerror(errno) : "address in use?");
        http_stop(h);
        return -EADDRINUSE;
    }
    if (pthread_create(&h->wthr, NULL, watcher_main, h) != 0) {
        snprintf(err, errlen, "cannot start the connection watcher thread");
        http_stop(h);
        return -EAGAIN;
    }
    h->wthr_started = 1;
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
    h->port = di ? di->port : cfg->port;
    *out = h;
    return 0;
}

int http_port(const http_server *h)
{
    return h->port;
}

int http_n_requests(http_server *h)
{
    pthread_mutex_lock(&h->mu);
    int n = h->n_conns;
    pthread_mutex_unlock(&h->mu);
    return n;
}

void http_set_draining(http_server *h)
{
    h->draining = 1;
}

void http_stop(http_server *h)
{
    if (!h)
        return;
    if (h->wthr_started) {
        pthread_mutex_lock(&h->wmu);
        h->wquit = 1;
        pthread_cond_signal(&h->wcv);
        pthread_mutex_unlock(&h->wmu);
        pthread_join(h->wthr, NULL);
    }
    if (h->d)
        MHD_stop_daemon(h->d);
    pthread_mutex_destroy(&h->mu);
    pthread_mutex_destroy(&h->wmu);
    pthread_cond_destroy(&h->wcv);
    free(h);
}
