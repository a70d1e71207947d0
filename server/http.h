/*
 * http.h - the libmicrohttpd front end: routes, limits, API key, request
 * ids, access log, JSON responses and SSE streams over the scheduler,
 * /tokenize and /detokenize, and a watcher that closes connections whose
 * request does not arrive in time and cancels requests whose client left.
 *
 * Threading: MHD runs an internal polling thread plus a pool of worker
 * threads with suspend/resume; a connection waiting for tokens is
 * suspended (never a blocked thread) and resumed by the engine thread's
 * notify callback. One watcher thread looks at the sockets a few times a
 * second. Nothing here runs the model.
 */
#ifndef LKQ_HTTP_H
#define LKQ_HTTP_H

#include <stddef.h>
#include <stdint.h>

#include "engine/model/model.h"
#include "engine/sched/scheduler.h"

typedef struct {
    const char *host;        /* bind address, e.g. "127.0.0.1" or "0.0.0.0" */
    int port;                /* 0: any free port (http_port tells which) */
    int http_threads;        /* MHD worker threads */
    const char *api_key;     /* NULL: no key; else every route but /health and
                                /metrics needs it */
    const char *metrics_key; /* NULL: /metrics is open; else it needs this key */
    double read_timeout_s;   /* a request's headers and body must arrive within
                                this many seconds of the connection opening or
                                of the previous answer ending (<= 0: 30) */
    size_t max_body;         /* bytes; larger bodies get 413 */
    int max_n;               /* choices per request */
    int max_prompt_tokens;   /* 0: context - 1 */
    const char *model_id;    /* name in /v1/models and responses */
    int max_connections;
} http_config;

typedef struct http_server http_server;

/* Starts serving. m and s are borrowed and must outlive the server.
 * Returns 0 and *out, or negative with a reason (e.g. port in use). */
int http_start(const http_config *c, const mdl_model *m, sched *s, http_server **out,
               char *err, size_t errlen);
/* The port actually bound. */
int http_port(const http_server *h);
/* Requests in progress (connections with a request not yet completed). */
int http_n_requests(http_server *h);
/* /health answers 503 from now on (shutdown in progress). */
void http_set_draining(http_server *h);
/* Stops the daemon (every request must have ended: the scheduler fails
 * what is left first) and frees. NULL is a no-op. */
void http_stop(http_server *h);

#endif
