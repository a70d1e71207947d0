/*
 * test_load_fake.c - the lkq_load binary end to end against a scripted fake
 * OpenAI server on a loopback port (a thread in this process): streams cut
 * into tiny writes with CRLF endings, 429 and 500 answers, a stream that
 * ends without [DONE], a stalled stream (timeout), /metrics scraping, the
 * probe refusals (/health not ready, API key refused), and the JSON and CSV
 * outputs. Needs no model and no real server.
 */
#include <criterion/criterion.h>
#include <jansson.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tests/test_util.h"

enum { FAKE_CYCLE, FAKE_NOT_READY, FAKE_NEED_KEY, FAKE_STALL, FAKE_SATURATE };

typedef struct {
    int lfd, port, mode;
    struct timespec t0;
    pthread_t th;
    atomic_int counter, active, max_active, stop;
} fake_server;

static fake_server F;

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static int send_all(int fd, const char *s, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, s, n, MSG_NOSIGNAL);
        if (w <= 0)
            return -1;
        s += w;
        n -= (size_t)w;
    }
    return 0;
}

static int send_str(int fd, const char *s)
{
    return send_all(fd, s, strlen(s));
}

static void reply(int fd, int status, const char *extra_hdr, const char *ctype, const char *body)
{
    char h[512];
    snprintf(h, sizeof h,
             "HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %zu\r\nConnection: close\r\n%s\r\n",
             status, ctype, strlen(body), extra_hdr ? extra_hdr : "");
    send_str(fd, h);
    send_str(fd, body);
}

static const char STREAM_HEAD[] =
    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n"
    "X-Request-Id: fake-1\r\n\r\n";

/* A good stream with CRLF line ends: 3 tokens, usage, [DONE]. */
static const char GOOD[] =
    ": comment\r\n\r\n"
    "data: {\"choices\":[{\"text\":\"Call\"}]}\r\n\r\n"
    "data: {\"choices\":[{\"text\":\" me\"}]}\r\n\r\n"
    "data: {\"choices\":[{\"text\":\" Ishmael\",\"finish_reason\":\"length\"}]}\r\n\r\n"
    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":64,\"completion_tokens\":3,\"total_tokens\":67}}\r\n\r\n"
    "data: [DONE]\r\n\r\n";

static void serve_completion(int fd, int k)
{
    if (F.mode == FAKE_SATURATE) {
        /* the first 3 are held and decode (a token every 50 ms after a 0.5 s
         * "prefill"), the others wait without a byte of output, until the
         * client leaves */
        send_str(fd, STREAM_HEAD);
        if (k < 3)
            sleep_ms(500);
        while (!atomic_load(&F.stop))
            if (k < 3 && send_str(fd, "data: {\"choices\":[{\"text\":\"x\"}]}\n\n") != 0)
                return;
            else
                sleep_ms(50);
        return;
    }
    if (F.mode == FAKE_STALL) {
        send_str(fd, STREAM_HEAD);
        send_str(fd, "data: {\"choices\":[{\"text\":\"x\"}]}\n\n");
        for (int i = 0; i < 50 && !atomic_load(&F.stop); i++)
            sleep_ms(100);
        return;
    }
    switch (k % 5) {
    case 0:
        reply(fd, 429, "Retry-After: 1\r\n", "application/json",
              "{\"error\":{\"message\":\"queue full\",\"type\":\"rate_limit\",\"param\":null,\"code\":429}}");
        break;
    case 1: { /* the good stream in writes of 1..7 bytes */
        send_str(fd, STREAM_HEAD);
        size_t n = strlen(GOOD), i = 0, step = 1;
        while (i < n) {
            size_t k2 = step < n - i ? step : n - i;
            if (send_all(fd, GOOD + i, k2) != 0)
                return;
            i += k2;
            step = step % 7 + 1;
            if (i % 16 == 0)
                sleep_ms(1);
        }
        break;
    }
    case 2: /* ends without [DONE] */
        send_str(fd, STREAM_HEAD);
        send_str(fd, "data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"choices\":[{\"text\":\"b\"}]}\n\n");
        break;
    case 3:
        sleep_ms(20);
        send_str(fd, STREAM_HEAD);
        send_str(fd, GOOD);
        break;
    default:
        reply(fd, 500, NULL, "application/json",
              "{\"error\":{\"message\":\"boom\",\"type\":\"server_error\",\"param\":null,\"code\":500}}");
    }
}

static void *conn_main(void *arg)
{
    int fd = (int)(intptr_t)arg;
    char buf[65536];
    size_t len = 0;
    char *end = NULL;
    while (!end && len < sizeof buf - 1) {
        ssize_t r = recv(fd, buf + len, sizeof buf - 1 - len, 0);
        if (r <= 0)
            goto out;
        len += (size_t)r;
        buf[len] = '\0';
        end = strstr(buf, "\r\n\r\n");
    }
    if (!end)
        goto out;
    size_t head = (size_t)(end + 4 - buf);
    long clen = 0;
    char *cl = strcasestr(buf, "content-length:");
    if (cl && cl < end)
        clen = strtol(cl + 15, NULL, 10);
    size_t have = len - head;
    while ((long)have < clen) {
        char tmp[4096];
        ssize_t r = recv(fd, tmp, sizeof tmp, 0);
        if (r <= 0)
            goto out;
        have += (size_t)r;
    }
    int authed = strcasestr(buf, "authorization: bearer sekrit") != NULL;
    if (strncmp(buf, "GET /health ", 12) == 0) {
        if (F.mode == FAKE_NOT_READY)
            reply(fd, 503, NULL, "application/json", "{\"status\":\"loading\"}");
        else
            reply(fd, 200, NULL, "application/json", "{\"status\":\"ok\"}");
    } else if (strncmp(buf, "GET /v1/models ", 15) == 0) {
        if (F.mode == FAKE_NEED_KEY && !authed)
            reply(fd, 401, NULL, "application/json",
                  "{\"error\":{\"message\":\"bad key\",\"type\":\"auth\",\"param\":null,\"code\":401}}");
        else
            reply(fd, 200, NULL, "application/json",
                  "{\"object\":\"list\",\"data\":[{\"id\":\"fake-model\",\"object\":\"model\",\"max_model_len\":2048}]}");
    } else if (strncmp(buf, "GET /metrics ", 13) == 0) {
        char m[512];
        /* FAKE_SATURATE: 3 held, the rest waiting; prefill progresses for
         * 0.6 s (a step every 0.1 s), then stands still */
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        double el = (double)(now.tv_sec - F.t0.tv_sec) + (double)(now.tv_nsec - F.t0.tv_nsec) * 1e-9;
        int act = atomic_load(&F.active);
        int sat = F.mode == FAKE_SATURATE;
        snprintf(m, sizeof m,
                 "# TYPE livekvq_requests_running gauge\nlivekvq_requests_running %d\n"
                 "livekvq_requests_waiting %d\nlivekvq_kv_usage_ratio 0.25\n"
                 "vllm:kv_cache_usage_perc 0.25\nlivekvq_prompt_tokens_total %d\n",
                 sat ? (act < 3 ? act : 3) : act, sat ? (act > 3 ? act - 3 : 0) : 0,
                 sat ? 512 * (int)((el < 0.6 ? el : 0.6) * 10) : 0);
        reply(fd, 200, NULL, "text/plain; version=0.0.4", m);
    } else if (strncmp(buf, "POST /v1/completions ", 21) == 0) {
        int a = atomic_fetch_add(&F.active, 1) + 1;
        int mx = atomic_load(&F.max_active);
        while (a > mx && !atomic_compare_exchange_weak(&F.max_active, &mx, a))
            ;
        serve_completion(fd, atomic_fetch_add(&F.counter, 1));
        atomic_fetch_sub(&F.active, 1);
    } else {
        reply(fd, 404, NULL, "application/json", "{\"error\":{\"message\":\"no\"}}");
    }
out:
    shutdown(fd, SHUT_RDWR);
    close(fd);
    return NULL;
}

static void *accept_main(void *arg)
{
    (void)arg;
    while (!atomic_load(&F.stop)) {
        struct pollfd p = {F.lfd, POLLIN, 0};
        if (poll(&p, 1, 50) <= 0)
            continue;
        int fd = accept(F.lfd, NULL, NULL);
        if (fd < 0)
            continue;
        pthread_t t;
        if (pthread_create(&t, NULL, conn_main, (void *)(intptr_t)fd) == 0)
            pthread_detach(t);
        else
            close(fd);
    }
    return NULL;
}

static void fake_start(int mode)
{
    memset(&F, 0, sizeof F);
    F.mode = mode;
    clock_gettime(CLOCK_MONOTONIC, &F.t0);
    F.lfd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(F.lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    cr_assert_eq(bind(F.lfd, (struct sockaddr *)&sa, sizeof sa), 0);
    cr_assert_eq(listen(F.lfd, 64), 0);
    socklen_t sl = sizeof sa;
    getsockname(F.lfd, (struct sockaddr *)&sa, &sl);
    F.port = ntohs(sa.sin_port);
    cr_assert_eq(pthread_create(&F.th, NULL, accept_main, NULL), 0);
}

static void fake_stop(void)
{
    atomic_store(&F.stop, 1);
    pthread_join(F.th, NULL);
    close(F.lfd);
}

static const char *load_bin(void)
{
    static char buf[1024];
    const char *bd = getenv("LKQ_BUILDDIR");
    snprintf(buf, sizeof buf, "%s/loadtests/lkq_load", bd ? bd : "build");
    return access(buf, X_OK) == 0 ? buf : NULL;
}

/* Runs lkq_load with args (URL prepended) in the background of this process
 * (the fake server answers from its thread). Returns the exit status; the
 * stdout/stderr text in out/err. */
static int run_load(const char *args, char *out, size_t outlen, char *err, size_t errlen)
{
    const char *bin = load_bin();
    if (!bin)
        cr_skip_test("lkq_load not built (no libcurl)");
    char o[] = "/tmp/lkq_fake_outXXXXXX", e[] = "/tmp/lkq_fake_errXXXXXX";
    int fo = mkstemp(o), fe = mkstemp(e);
    close(fo);
    close(fe);
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "%s --url http://127.0.0.1:%d %s >%s 2>%s", bin, F.port, args, o, e);
    int st = system(cmd);
    FILE *f = fopen(o, "r");
    size_t n = fread(out, 1, outlen - 1, f);
    out[n] = '\0';
    fclose(f);
    f = fopen(e, "r");
    n = fread(err, 1, errlen - 1, f);
    err[n] = '\0';
    fclose(f);
    unlink(o);
    unlink(e);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static char OUT[65536], ERR[65536];

Test(fake, statuses_kinds_and_outputs, .timeout = 60)
{
    fake_start(FAKE_CYCLE);
    char js[] = "/tmp/lkq_fake_jsonXXXXXX", csv[] = "/tmp/lkq_fake_csvXXXXXX";
    close(mkstemp(js));
    close(mkstemp(csv));
    unlink(csv); /* a new CSV gets its header */
    char args[512];
    snprintf(args, sizeof args,
             "-c 1,3 -n 10 --keep-going --pause 0 -p 64 -m 3 --label fake --scrape-metrics auto "
             "--scrape-interval 0.05 --json %s --csv %s",
             js, csv);
    int rc = run_load(args, OUT, sizeof OUT, ERR, sizeof ERR);
    fake_stop();
    cr_assert_eq(rc, 3, "500s and a malformed stream are real failures (rc %d)\n%s", rc, ERR);
    cr_assert(strstr(ERR, "fake-model"), "model id taken from /v1/models: %s", ERR);
    cr_assert_eq(atomic_load(&F.counter), 20);
    cr_assert_geq(atomic_load(&F.max_active), 2, "concurrency 3 overlapped requests");

    FILE *f = fopen(js, "r");
    char line[8192];
    int levels = 0;
    while (fgets(line, sizeof line, f)) {
        json_t *j = json_loads(line, 0, NULL);
        cr_assert_not_null(j, "%s", line);
        levels++;
        cr_assert_str_eq(json_string_value(json_object_get(j, "label")), "fake");
        cr_assert_eq(json_integer_value(json_object_get(j, "sent")), 10);
        cr_assert_eq(json_integer_value(json_object_get(j, "ok")), 4);
        cr_assert_eq(json_integer_value(json_object_get(j, "failed")), 6);
        cr_assert_eq(json_integer_value(json_object_get(j, "unexpected_failures")), 4);
        json_t *bs = json_object_get(j, "errors_by_status");
        cr_assert_eq(json_integer_value(json_object_get(bs, "429")), 2);
        cr_assert_eq(json_integer_value(json_object_get(bs, "500")), 2);
        json_t *bk = json_object_get(j, "errors_by_kind");
        cr_assert_eq(json_integer_value(json_object_get(bk, "malformed_stream")), 2, "%s", line);
        cr_assert_eq(json_integer_value(json_object_get(j, "completion_tokens")), 12, "3 per good stream");
        cr_assert_eq(json_integer_value(json_object_get(j, "prompt_tokens")), 4 * 64);
        json_t *itl = json_object_get(j, "itl_s");
        cr_assert_eq(json_integer_value(json_object_get(itl, "n")), 8, "2 gaps per good stream");
        cr_assert_eq(json_integer_value(json_object_get(json_object_get(j, "ttft_s"), "n")), 4);
        cr_assert_eq(json_integer_value(json_object_get(json_object_get(j, "tpot_s"), "n")), 4);
        json_t *srv = json_object_get(j, "server");
        cr_assert_gt(json_integer_value(json_object_get(srv, "scrapes")), 0, "%s", line);
        cr_assert_float_eq(json_real_value(json_object_get(srv, "max_kv_usage")), 0.25, 1e-9);
        json_decref(j);
    }
    fclose(f);
    cr_assert_eq(levels, 2);
    f = fopen(csv, "r");
    cr_assert_not_null(f);
    int rows = 0;
    cr_assert_not_null(fgets(line, sizeof line, f));
    cr_assert(strncmp(line, "label,mode,concurrency", 22) == 0, "header: %s", line);
    while (fgets(line, sizeof line, f))
        rows++;
    fclose(f);
    cr_assert_eq(rows, 2);
    unlink(js);
    unlink(csv);
    /* the table on stdout names the failures */
    cr_assert(strstr(OUT, "429:2 500:2 malformed_stream:2"), "%s", OUT);
}

Test(fake, only_429_is_not_a_failure_of_the_run, .timeout = 60)
{
    /* open loop over the cycle, stopped before the 500 and malformed ones:
     * request 0 is a 429, 1 is good -> exit 0 */
    fake_start(FAKE_CYCLE);
    int rc = run_load("-r 20 -n 2 -p 32 -m 3", OUT, sizeof OUT, ERR, sizeof ERR);
    fake_stop();
    cr_assert_eq(rc, 0, "%s", ERR);
    cr_assert(strstr(OUT, "429:1"), "%s", OUT);
}

Test(fake, stalled_stream_times_out, .timeout = 60)
{
    fake_start(FAKE_STALL);
    int rc = run_load("-c 1 -n 1 --timeout 0.5 -p 32", OUT, sizeof OUT, ERR, sizeof ERR);
    fake_stop();
    cr_assert_eq(rc, 3, "%s", ERR);
    cr_assert(strstr(OUT, "timeout:1"), "%s", OUT);
}

Test(fake, until_saturated_cancels_held_requests, .timeout = 60)
{
    fake_start(FAKE_SATURATE);
    char js[] = "/tmp/lkq_fake_satXXXXXX", lg[] = "/tmp/lkq_fake_logXXXXXX";
    close(mkstemp(js));
    close(mkstemp(lg));
    unlink(lg);
    char args[256];
    snprintf(args, sizeof args,
             "-c 5 -n 5 -p 32 -m 2000 --ignore-eos --scrape-metrics auto --scrape-interval 0.05 "
             "--until-saturated 0.3 --json %s --scrape-log %s --label sat", js, lg);
    int rc = run_load(args, OUT, sizeof OUT, ERR, sizeof ERR);
    fake_stop();
    cr_assert_eq(rc, 0, "cancelled requests are not failures: %s", ERR);
    FILE *f = fopen(js, "r");
    char line[8192];
    cr_assert_not_null(fgets(line, sizeof line, f));
    fclose(f);
    unlink(js);
    json_t *j = json_loads(line, 0, NULL);
    cr_assert_eq(json_integer_value(json_object_get(j, "cancelled")), 5, "%s", line);
    cr_assert_eq(json_integer_value(json_object_get(j, "failed")), 0);
    double sat = json_real_value(json_object_get(j, "saturated_s"));
    cr_assert(sat > 0.75 && sat < 10, "saturated once the held ones decode, +0.3 s: %g", sat);
    json_t *srv = json_object_get(j, "server");
    cr_assert_float_eq(json_real_value(json_object_get(srv, "max_running_queued")), 3, 0, "%s", line);
    json_decref(j);
    cr_assert(strstr(ERR, "saturated"), "%s", ERR);
    f = fopen(lg, "r");
    cr_assert_not_null(f);
    cr_assert_not_null(fgets(line, sizeof line, f));
    cr_assert(strncmp(line, "label,level,t,running,waiting", 29) == 0, "%s", line);
    int rows = 0;
    while (fgets(line, sizeof line, f)) {
        rows++;
        cr_assert(strncmp(line, "sat,5,", 6) == 0, "%s", line);
    }
    fclose(f);
    unlink(lg);
    cr_assert_gt(rows, 5, "a row per scrape");
}

Test(fake, cutoff_cancels, .timeout = 60)
{
    fake_start(FAKE_SATURATE);
    int rc = run_load("-c 2 -n 2 -p 32 -m 2000 --cutoff 0.5", OUT, sizeof OUT, ERR, sizeof ERR);
    fake_stop();
    cr_assert_eq(rc, 0, "%s", ERR);
    cr_assert(strstr(OUT, "cancelled:2"), "%s", OUT);
}

Test(fake, probe_refusals, .timeout = 60)
{
    fake_start(FAKE_NOT_READY);
    int rc = run_load("-c 1 -n 1", OUT, sizeof OUT, ERR, sizeof ERR);
    fake_stop();
    cr_assert_eq(rc, 1);
    cr_assert(strstr(ERR, "not ready") && strstr(ERR, "503"), "%s", ERR);
    cr_assert_eq(atomic_load(&F.counter), 0, "no load sent");

    fake_start(FAKE_NEED_KEY);
    rc = run_load("-c 1 -n 1", OUT, sizeof OUT, ERR, sizeof ERR);
    cr_assert_eq(rc, 1);
    cr_assert(strstr(ERR, "API key"), "%s", ERR);
    rc = run_load("-c 1 -n 1 -p 32 --api-key sekrit --rate 1", OUT, sizeof OUT, ERR, sizeof ERR);
    cr_assert_eq(rc, 2, "--rate with --concurrency is refused: %s", ERR);
    rc = run_load("-n 1 -p 32 -m 2 --api-key sekrit", OUT, sizeof OUT, ERR, sizeof ERR);
    cr_assert_neq(rc, 1, "the key is sent: %s", ERR);
    /* the model's context (max_model_len 2048) cannot hold the prompt */
    rc = run_load("-n 1 -p 4000 --api-key sekrit", OUT, sizeof OUT, ERR, sizeof ERR);
    fake_stop();
    cr_assert_eq(rc, 1);
    cr_assert(strstr(ERR, "impossible budget") && strstr(ERR, "2048"), "%s", ERR);
}
