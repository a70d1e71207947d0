/*
 * server_util.h - test helpers: start build/livekvq-server on a free
 * loopback port as a child process (waiting for its "listening on" line),
 * stop it with SIGTERM and collect its exit status, and small libcurl
 * wrappers for JSON requests and SSE streams.
 */
#ifndef LKQ_SERVER_UTIL_H
#define LKQ_SERVER_UTIL_H

#include <curl/curl.h>
#include <errno.h>
#include <jansson.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    pid_t pid;
    int port;
    int out_fd;
    char base[64];
} tsrv;

/* Path of a built program ($LKQ_BUILDDIR/name). */
static inline const char *ts_bin(const char *name)
{
    static char buf[2][1024];
    static int k;
    const char *d = getenv("LKQ_BUILDDIR");
    char *b = buf[k++ & 1];
    snprintf(b, sizeof buf[0], "%s/%s", d ? d : ".", name);
    return b;
}

/* Starts the server ($LKQ_SERVER_BIN if set, else $LKQ_BUILDDIR/
 * livekvq-server) with args (NULL-terminated, after the program name);
 * --port 0 is added; its stderr (the log) goes to log_path when not NULL.
 * Returns 0 when it printed its URL within 60 s. */
static inline int ts_start_log(tsrv *s, const char *const *args, const char *log_path)
{
    int pfd[2];
    if (pipe(pfd) < 0)
        return -1;
    const char *argv[64];
    int n = 0;
    const char *bin = getenv("LKQ_SERVER_BIN");
    argv[n++] = bin && *bin ? bin : ts_bin("livekvq-server");
    for (int i = 0; args[i] && n < 60; i++)
        argv[n++] = args[i];
    argv[n++] = "--port";
    argv[n++] = "0";
    argv[n] = NULL;
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* never outlive a failed test */
        dup2(pfd[1], 1);
        if (log_path) {
            FILE *lf = fopen(log_path, "w");
            if (lf)
                dup2(fileno(lf), 2);
        }
        close(pfd[0]);
        close(pfd[1]);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    close(pfd[1]);
    s->pid = pid;
    s->out_fd = pfd[0];
    s->port = 0;
    char line[512];
    size_t len = 0;
    for (int waited = 0; waited < 60000;) {
        struct pollfd p = {pfd[0], POLLIN, 0};
        int r = poll(&p, 1, 200);
        waited += 200;
        if (r > 0) {
            ssize_t k = read(pfd[0], line + len, sizeof line - 1 - len);
            if (k <= 0)
                return -1; /* exited */
            len += (size_t)k;
            line[len] = '\0';
            char *u = strstr(line, "http://");
            if (u && strchr(u, '\n')) {
                char *colon = strrchr(u + 7, ':');
                s->port = colon ? atoi(colon + 1) : 0;
                snprintf(s->base, sizeof s->base, "http://127.0.0.1:%d", s->port);
                return s->port > 0 ? 0 : -1;
            }
        }
    }
    return -1;
}

static inline int ts_start(tsrv *s, const char *const *args)
{
    return ts_start_log(s, args, NULL);
}

/* The whole of a file (caller frees), "" if it cannot be read. */
static inline char *ts_slurp(const char *path)
{
    FILE *f = fopen(path, "r");
    char *b = calloc(1, 1);
    size_t n = 0;
    if (!f)
        return b;
    char chunk[4096];
    size_t k;
    while ((k = fread(chunk, 1, sizeof chunk, f)) > 0) {
        char *t = realloc(b, n + k + 1);
        if (!t)
            break;
        b = t;
        memcpy(b + n, chunk, k);
        n += k;
        b[n] = '\0';
    }
    fclose(f);
    return b;
}

/* SIGTERM, then waits up to timeout_s; returns the exit status (0..255),
 * 1000 + signal if killed by one, or -1 on timeout (then SIGKILLs it). */
static inline int ts_stop(tsrv *s, double timeout_s)
{
    if (s->pid <= 0)
        return -1;
    kill(s->pid, SIGTERM);
    int st = 0;
    for (double t = 0; t < timeout_s; t += 0.05) {
        pid_t r = waitpid(s->pid, &st, WNOHANG);
        if (r == s->pid) {
            close(s->out_fd);
            s->pid = 0;
            return WIFEXITED(st) ? WEXITSTATUS(st) : 1000 + WTERMSIG(st);
        }
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    kill(s->pid, SIGKILL);
    waitpid(s->pid, &st, 0);
    close(s->out_fd);
    s->pid = 0;
    return -1;
}

typedef struct {
    char *data;
    size_t len;
    int n_events;      /* SSE "data:" events seen */
    int abort_after;   /* > 0: abort the transfer after this many events */
} ts_buf;

static inline size_t ts_write(char *p, size_t sz, size_t nm, void *ud)
{
    ts_buf *b = ud;
    size_t n = sz * nm;
    char *t = realloc(b->data, b->len + n + 1);
    if (!t)
        return 0;
    b->data = t;
    memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
    int ev = 0;
    for (char *q = b->data; (q = strstr(q, "data: ")); q += 6)
        ev++;
    b->n_events = ev;
    if (b->abort_after > 0 && ev >= b->abort_after)
        return 0; /* the client goes away */
    return n;
}

/* One request. method "GET"/"POST"; body may be NULL; auth may be NULL
 * (then no Authorization header) . Returns the HTTP status (0 on a
 * transport error); *out receives the body (caller frees out->data). */
static inline long ts_http(const char *url, const char *method, const char *body,
                           const char *auth, ts_buf *out, double timeout_s)
{
    CURL *c = curl_easy_init();
    struct curl_slist *h = NULL;
    h = curl_slist_append(h, "Content-Type: application/json");
    if (auth) {
        char a[600];
        snprintf(a, sizeof a, "Authorization: Bearer %s", auth);
        h = curl_slist_append(h, a);
    }
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    if (body) {
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
    }
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, ts_write);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, out);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, (long)(timeout_s * 1000));
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    long status = 0;
    if (curl_easy_perform(c) == CURLE_OK)
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    else if (out->abort_after > 0)
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    curl_slist_free_all(h);
    curl_easy_cleanup(c);
    return status;
}

/* Parses an SSE body: every event must be "data: <json>" or "data:
 * [DONE]" (last). Appends each choice's text (by index, up to 16) to
 * text[i]; returns the number of JSON events, or -1 if malformed (with a
 * reason in why). usage (if not NULL) gets the usage object's
 * completion_tokens or -1. error_seen is set if an error event came. */
static inline int ts_sse(const char *body, char text[][4096], int *done, long *usage,
                         int *error_seen, char *why, size_t whylen)
{
    *done = 0;
    if (usage)
        *usage = -1;
    if (error_seen)
        *error_seen = 0;
    int n = 0;
    const char *p = body;
    while (*p) {
        const char *end = strstr(p, "\n\n");
        if (!end) {
            snprintf(why, whylen, "event without a blank line after it: %.80s", p);
            return -1;
        }
        if (strncmp(p, "data: ", 6) != 0) {
            snprintf(why, whylen, "event does not start with 'data: ': %.80s", p);
            return -1;
        }
        if (*done) {
            snprintf(why, whylen, "event after [DONE]");
            return -1;
        }
        size_t len = (size_t)(end - p - 6);
        if (len == 6 && strncmp(p + 6, "[DONE]", 6) == 0) {
            *done = 1;
        } else {
            json_error_t je;
            json_t *o = json_loadb(p + 6, len, 0, &je);
            if (!o) {
                snprintf(why, whylen, "bad JSON in event: %s", je.text);
                return -1;
            }
            if (json_object_get(o, "error")) {
                if (error_seen)
                    *error_seen = 1;
            } else {
                json_t *ch = json_object_get(o, "choices");
                if (!json_is_array(ch)) {
                    snprintf(why, whylen, "chunk without choices");
                    json_decref(o);
                    return -1;
                }
                for (size_t i = 0; i < json_array_size(ch); i++) {
                    json_t *c = json_array_get(ch, i);
                    int idx = (int)json_integer_value(json_object_get(c, "index"));
                    json_t *t = json_object_get(c, "text");
                    if (!t)
                        t = json_object_get(json_object_get(c, "delta"), "content");
                    if (idx >= 0 && idx < 16 && json_is_string(t) && text)
                        strncat(text[idx], json_string_value(t),
                                4095 - strlen(text[idx]));
                }
                json_t *u = json_object_get(o, "usage");
                if (usage && json_is_object(u))
                    *usage = (long)json_integer_value(json_object_get(u, "completion_tokens"));
            }
            json_decref(o);
            n++;
        }
        p = end + 2;
    }
    return n;
}

/* GET /metrics: the text (caller frees), NULL unless the answer is 200. */
static inline char *ts_get_metrics(const tsrv *s)
{
    char url[256];
    snprintf(url, sizeof url, "%s/metrics", s->base);
    ts_buf b = {0};
    if (ts_http(url, "GET", NULL, NULL, &b, 30) != 200) {
        free(b.data);
        return NULL;
    }
    return b.data;
}

/* Value of the first metric line starting with prefix (name or
 * name{labels}), or -1 if absent. */
static inline double ts_metric(const char *text, const char *prefix)
{
    size_t n = strlen(prefix);
    for (const char *p = text; p && *p;) {
        if (strncmp(p, prefix, n) == 0 && (p[n] == ' ' || p[n] == '{'))
            return atof(strchr(p, ' ') + 1);
        p = strchr(p, '\n');
        if (p)
            p++;
    }
    return -1;
}

#endif
