/*
 * test_load_smoke.c - lkq_load against the real livekvq-server on a loopback
 * port (stories260K, so it takes a second or two): a small closed-loop sweep
 * with metrics scraping succeeds and agrees with the server's own counters;
 * an overloaded server (one slot, a queue of one) answers the excess with
 * 429/503, which lkq_load reports by status without calling the run failed.
 * Skips when the server, the load generator or the model is missing.
 */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <jansson.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "tests/test_util.h"

static const char *build_path(const char *rel)
{
    static char buf[2][1024];
    static int k;
    const char *bd = getenv("LKQ_BUILDDIR");
    char *b = buf[k++ & 1];
    snprintf(b, sizeof buf[0], "%s/%s", bd ? bd : "build", rel);
    return b;
}

typedef struct {
    pid_t pid;
    int port;
} server;

/* Starts livekvq-server on stories260K with extra args (NULL-terminated) and
 * --port 0; reads the port from its "listening on" line. Skips the test
 * when a piece is missing. */
static void server_start(server *s, const char *const *extra)
{
    const char *bin = build_path("livekvq-server");
    const char *model = tu_shared("models/stories260K/stories260K.bin");
    const char *tok = tu_shared("models/stories260K/tok512.bin");
    if (access(bin, X_OK) != 0)
        cr_skip_test("no %s", bin);
    if (access(build_path("loadtests/lkq_load"), X_OK) != 0)
        cr_skip_test("lkq_load not built (no libcurl)");
    if (access(model, R_OK) != 0 || access(tok, R_OK) != 0)
        cr_skip_test("no stories260K model");
    const char *argv[40];
    int n = 0;
    argv[n++] = bin;
    argv[n++] = "-m";
    argv[n++] = model;
    argv[n++] = "--tokenizer";
    argv[n++] = tok;
    argv[n++] = "--threads";
    argv[n++] = "1";
    argv[n++] = "--port";
    argv[n++] = "0";
    for (int i = 0; extra[i] && n < 38; i++)
        argv[n++] = extra[i];
    argv[n] = NULL;
    int pfd[2];
    cr_assert_eq(pipe(pfd), 0);
    s->pid = fork();
    cr_assert_geq(s->pid, 0);
    if (s->pid == 0) {
        dup2(pfd[1], 1);
        int dn = open("/dev/null", O_WRONLY);
        dup2(dn, 2);
        close(pfd[0]);
        close(pfd[1]);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    close(pfd[1]);
    char out[1024];
    size_t len = 0;
    s->port = 0;
    for (int waited = 0; waited < 30000 && !s->port; waited += 100) {
        struct pollfd p = {pfd[0], POLLIN, 0};
        if (poll(&p, 1, 100) > 0) {
            ssize_t k = read(pfd[0], out + len, sizeof out - 1 - len);
            if (k <= 0)
                break;
            len += (size_t)k;
            out[len] = '\0';
            const char *u = strstr(out, "http://127.0.0.1:");
            if (u && strchr(u, '\n'))
                s->port = atoi(u + 17);
        }
    }
    close(pfd[0]);
    cr_assert_gt(s->port, 0, "the server did not report its port: %s", out);
}

static void server_stop(server *s)
{
    kill(s->pid, SIGTERM);
    int st;
    waitpid(s->pid, &st, 0);
}

/* GET path from 127.0.0.1:port into buf (whole response, headers included). */
static void http_get(int port, const char *path, char *buf, size_t cap)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    cr_assert_eq(connect(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    char req[256];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", path);
    cr_assert_eq(write(fd, req, (size_t)n), n);
    size_t len = 0;
    ssize_t k;
    while (len < cap - 1 && (k = read(fd, buf + len, cap - 1 - len)) > 0)
        len += (size_t)k;
    buf[len] = '\0';
    close(fd);
}

/* Runs lkq_load against the server; returns its exit status and the first
 * JSON line it wrote (caller json_decref). */
static int run_load(const server *s, const char *args, json_t **first)
{
    char js[] = "/tmp/lkq_smoke_jsonXXXXXX";
    close(mkstemp(js));
    unlink(js);
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s --url http://127.0.0.1:%d --json %s -q %s >/dev/null",
             build_path("loadtests/lkq_load"), s->port, js, args);
    int st = system(cmd);
    *first = NULL;
    FILE *f = fopen(js, "r");
    if (f) {
        char line[16384];
        if (fgets(line, sizeof line, f))
            *first = json_loads(line, 0, NULL);
        fclose(f);
    }
    unlink(js);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

Test(smoke, sweep_through_real_server, .timeout = 120)
{
    server s;
    const char *extra[] = {"--max-seqs", "4", NULL};
    server_start(&s, extra);
    json_t *j;
    int rc = run_load(&s, "-c 3 -n 9 -p 48 -m 8 --chars-per-token 1.7 --ignore-eos "
                          "--scrape-metrics auto --scrape-interval 0.05", &j);
    char metrics[65536];
    http_get(s.port, "/metrics", metrics, sizeof metrics);
    server_stop(&s);
    cr_assert_eq(rc, 0, "lkq_load exit %d", rc);
    cr_assert_not_null(j);
    cr_assert_eq(json_integer_value(json_object_get(j, "ok")), 9);
    cr_assert_eq(json_integer_value(json_object_get(j, "completion_tokens")), 9 * 8,
                 "ignore_eos: exactly max_tokens each");
    int64_t pt = json_integer_value(json_object_get(j, "prompt_tokens"));
    cr_assert(pt > 9 * 30 && pt < 9 * 70, "usage carried ~48-token prompts: %lld", (long long)pt);
    cr_assert_eq(json_integer_value(json_object_get(json_object_get(j, "ttft_s"), "n")), 9);
    /* the server may put several tokens in one chunk when it runs ahead */
    int64_t n_itl = json_integer_value(json_object_get(json_object_get(j, "itl_s"), "n"));
    cr_assert(n_itl >= 0 && n_itl <= 9 * 7, "%lld chunk gaps", (long long)n_itl);
    cr_assert_eq(json_integer_value(json_object_get(json_object_get(j, "tpot_s"), "n")), 9);
    json_t *srv = json_object_get(j, "server");
    cr_assert_gt(json_integer_value(json_object_get(srv, "scrapes")), 0);
    cr_assert(json_is_number(json_object_get(srv, "max_kv_usage")), "KV usage scraped");
    json_decref(j);
    /* the server counted what the client saw */
    const char *c = strstr(metrics, "livekvq_requests_total{endpoint=\"/v1/completions\",code=\"200\"}");
    cr_assert_not_null(c, "%s", metrics);
    cr_assert_eq(atoi(strchr(c, '}') + 1), 9);
}

Test(smoke, overload_gets_deliberate_429_or_503, .timeout = 120)
{
    server s;
    const char *extra[] = {"--max-seqs", "1", "--max-queue", "1", NULL};
    server_start(&s, extra);
    json_t *j;
    int rc = run_load(&s, "-c 8 -n 16 -p 200 -m 32 --chars-per-token 1.7 --ignore-eos", &j);
    server_stop(&s);
    cr_assert_eq(rc, 0, "429/503 are not failures of the run (exit %d)", rc);
    cr_assert_not_null(j);
    json_t *bs = json_object_get(j, "errors_by_status");
    int64_t busy = json_integer_value(json_object_get(bs, "429")) +
                   json_integer_value(json_object_get(bs, "503"));
    cr_assert_gt(busy, 0, "8 clients on one slot and a queue of one: some are turned away");
    cr_assert_eq(json_integer_value(json_object_get(j, "unexpected_failures")), 0);
    cr_assert_eq(json_integer_value(json_object_get(j, "ok")) + busy, 16);
    json_decref(j);
}
