/*
 * test_load_args.c - the load generator without a server: argument parsing
 * and its refusals (malformed sweeps, unknown options, impossible budgets,
 * non-loopback URLs), percentiles, prompt slicing from Moby-Dick (distinct
 * offsets, UTF-8 boundaries, determinism), request bodies, Poisson gaps; and
 * the binary itself: one-line refusals with exit status 2, an unreachable
 * server with exit status 1.
 */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "loadtests/lkq_args.h"
#include "loadtests/lkq_prompt.h"
#include "loadtests/lkq_stats.h"
#include "tests/test_util.h"

/* Parses a space-separated command line. */
static int parse(const char *line, lkq_args *a, char *err, size_t errlen)
{
    static char buf[2048];
    char *argv[64];
    int argc = 0;
    snprintf(buf, sizeof buf, "%s", line);
    argv[argc++] = "lkq_load";
    for (char *t = strtok(buf, " "); t && argc < 63; t = strtok(NULL, " "))
        argv[argc++] = t;
    argv[argc] = NULL;
    return lkq_args_parse(argc, argv, a, err, errlen);
}

Test(args, defaults_and_closed_sweep)
{
    lkq_args a;
    char err[256] = "";
    cr_assert_eq(parse("--concurrency 1,2,4,8 --duration 30 --prompt-tokens 4096 -m 8 --label int4 "
                       "--scrape-metrics auto --url http://127.0.0.1:18080/", &a, err, sizeof err), 0, "%s", err);
    cr_assert_eq(a.open_loop, 0);
    cr_assert_eq(a.n_levels, 4);
    cr_assert_eq(a.concurrency[3], 8);
    cr_assert_float_eq(a.duration, 30, 0);
    cr_assert_eq(a.requests, 0);
    cr_assert_eq(a.prompt_tokens, 4096);
    cr_assert_eq(a.max_tokens, 8);
    cr_assert_str_eq(a.url, "http://127.0.0.1:18080");
    cr_assert_str_eq(a.metrics_url, "http://127.0.0.1:18080/metrics");
    cr_assert_str_eq(a.label, "int4");
    cr_assert_eq(a.chat, 0);
    cr_assert_eq(a.seed, 1);
}

Test(args, open_loop)
{
    lkq_args a;
    char err[256] = "";
    cr_assert_eq(parse("--rate 0.5,1,2.5 -n 100 --max-inflight 16 --seed 7 --chat", &a, err, sizeof err), 0, "%s", err);
    cr_assert_eq(a.open_loop, 1);
    cr_assert_eq(a.n_levels, 3);
    cr_assert_float_eq(a.rate[2], 2.5, 0);
    cr_assert_eq(a.max_inflight, 16);
    cr_assert_eq(a.seed, 7);
    cr_assert_eq(a.chat, 1);
}

Test(args, refusals_are_one_line)
{
    struct {
        const char *line, *needle;
    } bad[] = {
        {"-c 1,,2 -d 5", "malformed"},
        {"-c 1,2,2 -d 5", "increase"},
        {"-c 4,2 -d 5", "increase"},
        {"-c 0 -d 5", "[1, 1024]"},
        {"-c 2000 -d 5", "[1, 1024]"},
        {"-c 1,x -d 5", "'x'"},
        {"-c 1, -d 5", "malformed"},
        {"-c 8 -n 4", "impossible budget"},
        {"-c 8", "no bound"},
        {"-r 1 -c 2 -d 5", "exclusive"},
        {"-r 0 -d 5", "(0,"},
        {"-r -1 -d 5", "(0,"},
        {"-r nan -d 5", "(0,"},
        {"-c 1 -d 0", "--duration"},
        {"-c 1 -d -3", "--duration"},
        {"-c 1 -d 1e9", "--duration"},
        {"-c 1 -n 0", "--requests"},
        {"-c 1 -n 5x", "--requests"},
        {"-c 1 -d 5 --max-tokens 0", "--max-tokens"},
        {"-c 1 -d 5 --prompt-tokens -4", "--prompt-tokens"},
        {"-c 1 -d 5 --kv-budget 1G", "unknown option '--kv-budget'"},
        {"-c 1 -d 5 -Z", "unknown option '-Z'"},
        {"-c 1 -d 5 stray", "unexpected argument 'stray'"},
        {"-c 1 -d", "needs a value"},
        {"-c 1 -d 5 --url ftp://127.0.0.1/", "not an http"},
        {"-c 1 -d 5 --url http://192.168.1.10:8080", "loopback"},
        {"-c 1 -d 5 --scrape-metrics http://example.com/metrics", "loopback"},
        {"-c 1 -d 5 --scrape-interval 0", "--scrape-interval"},
        {"-c 1 -d 5 --timeout 0", "--timeout"},
        {"-c 1 -d 5 --label a,b", "--label"},
        {"-r 1 -d 80000 --pause 10 -r 1,2", "impossible budget"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        lkq_args a;
        char err[256] = "";
        cr_assert_eq(parse(bad[i].line, &a, err, sizeof err), -1, "accepted: %s", bad[i].line);
        cr_assert(strstr(err, bad[i].needle), "'%s' -> '%s' (wanted '%s')", bad[i].line, err, bad[i].needle);
        cr_assert_null(strchr(err, '\n'), "one line: %s", err);
    }
    lkq_args a;
    char err[256];
    cr_assert_eq(parse("-c 1 -d 5 --url http://10.1.2.3:80 --allow-remote", &a, err, sizeof err), 0);
}

Test(args, lists)
{
    int v[4];
    double d[4];
    char err[128];
    cr_assert_eq(lkq_parse_int_list("1,2,3,4", v, 4, 1, 10, err, sizeof err), 4);
    cr_assert_eq(lkq_parse_int_list("1,2,3,4,5", v, 4, 1, 10, err, sizeof err), -1);
    cr_assert(strstr(err, "more than 4"));
    cr_assert_eq(lkq_parse_int_list("", v, 4, 1, 10, err, sizeof err), -1);
    cr_assert_eq(lkq_parse_int_list("3 ", v, 4, 1, 10, err, sizeof err), -1);
    cr_assert_eq(lkq_parse_int_list("99999999999999999999", v, 4, 1, 10, err, sizeof err), -1);
    cr_assert_eq(lkq_parse_double_list("0.25,1e1", d, 4, 0, 100, err, sizeof err), 2);
    cr_assert_float_eq(d[1], 10, 0);
    cr_assert_eq(lkq_parse_double_list("inf", d, 4, 0, 100, err, sizeof err), -1);
    cr_assert_eq(lkq_parse_double_list("1e200", d, 4, 0, 100, err, sizeof err), -1);
}

Test(args, loopback)
{
    cr_assert(lkq_url_is_loopback("http://127.0.0.1:8080"));
    cr_assert(lkq_url_is_loopback("http://127.1.2.3/x"));
    cr_assert(lkq_url_is_loopback("http://localhost"));
    cr_assert(lkq_url_is_loopback("https://LOCALHOST:1/"));
    cr_assert(lkq_url_is_loopback("http://[::1]:80"));
    cr_assert(lkq_url_is_loopback("http://u:p@127.0.0.1:80"));
    cr_assert_not(lkq_url_is_loopback("http://127.0.0.1.evil.com"));
    cr_assert_not(lkq_url_is_loopback("http://localhost.evil.com"));
    cr_assert_not(lkq_url_is_loopback("http://127.0.0.1@evil.com"));
    cr_assert_not(lkq_url_is_loopback("http://10.0.0.1"));
    cr_assert_not(lkq_url_is_loopback("127.0.0.1:80"));
}

Test(stats, percentiles_and_failures)
{
    lkq_samples s = {0};
    cr_assert(isnan(lkq_samples_pct(&s, 50)));
    for (int i = 10; i >= 1; i--)
        lkq_samples_add(&s, i);
    cr_assert_float_eq(lkq_samples_pct(&s, 0), 1, 1e-12);
    cr_assert_float_eq(lkq_samples_pct(&s, 50), 5.5, 1e-12);
    cr_assert_float_eq(lkq_samples_pct(&s, 90), 9.1, 1e-12);
    cr_assert_float_eq(lkq_samples_pct(&s, 99), 9.91, 1e-12);
    cr_assert_float_eq(lkq_samples_pct(&s, 100), 10, 1e-12);
    cr_assert_float_eq(lkq_samples_mean(&s), 5.5, 1e-12);
    lkq_samples_add(&s, 0); /* unsorted again */
    cr_assert_float_eq(lkq_samples_pct(&s, 0), 0, 0);
    lkq_samples_free(&s);

    lkq_level l;
    lkq_level_init(&l);
    l.failed = 6;
    l.by_status[429] = 2;
    l.by_status[503] = 1;
    l.by_status[500] = 1;
    l.by_kind[LKQ_FAIL_TIMEOUT] = 2;
    cr_assert_eq(lkq_level_unexpected(&l), 3);
    char buf[128];
    lkq_level_errors_str(&l, buf, sizeof buf);
    cr_assert_str_eq(buf, "429:2 500:1 503:1 timeout:2");
    /* CSV row has as many fields as the header */
    char *out = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&out, &len);
    lkq_level_csv_header(f);
    lkq_level_csv_row(f, &l);
    cr_assert_eq(lkq_level_json_line(f, &l), 0);
    fclose(f);
    char *nl1 = strchr(out, '\n'), *nl2 = strchr(nl1 + 1, '\n');
    int c1 = 0, c2 = 0;
    for (char *p = out; p < nl1; p++)
        c1 += *p == ',';
    for (char *p = nl1 + 1; p < nl2; p++)
        c2 += *p == ',';
    cr_assert_eq(c1, c2, "header %d commas, row %d", c1, c2);
    json_t *j = json_loads(nl2 + 1, 0, NULL);
    cr_assert_not_null(j, "JSON line parses");
    cr_assert_eq(json_integer_value(json_object_get(json_object_get(j, "errors_by_status"), "429")), 2);
    cr_assert_eq(json_integer_value(json_object_get(j, "unexpected_failures")), 3);
    json_decref(j);
    free(out);
    lkq_level_free(&l);
}

Test(prompt, slices_of_moby_dick)
{
    lkq_corpus c;
    char err[256], pb[1024];
    const char *path = lkq_corpus_default_path(pb, sizeof pb);
    if (access(path, R_OK) != 0)
        cr_skip_test("no %s", path);
    cr_assert_eq(lkq_corpus_load(&c, path, err, sizeof err), 0, "%s", err);
    size_t want = 4096 * 38 / 10;
    size_t offs[64];
    for (uint64_t i = 0; i < 64; i++) {
        size_t off, len;
        cr_assert_eq(lkq_corpus_slice(&c, 1, i, want, &off, &len), 0);
        cr_assert_leq(off + len, c.len);
        cr_assert_geq(len, want - 3);
        /* starts after whitespace, at a character boundary */
        cr_assert(((unsigned char)c.text[off] & 0xC0) != 0x80);
        cr_assert(off == 0 || strchr(" \n\r\t", c.text[off - 1]) || ((unsigned char)c.text[off - 1] & 0x80),
                  "slice %llu starts mid-word", (unsigned long long)i);
        /* ends at a character boundary: the body must build (valid UTF-8) */
        lkq_args a;
        parse("-c 1 -d 1", &a, err, sizeof err);
        char *body = lkq_request_body(&a, "m", c.text + off, len);
        cr_assert_not_null(body, "slice %llu is valid UTF-8", (unsigned long long)i);
        free(body);
        offs[i] = off;
        size_t off2, len2;
        lkq_corpus_slice(&c, 1, i, want, &off2, &len2);
        cr_assert_eq(off, off2, "deterministic");
    }
    int same = 0;
    for (int i = 0; i < 64; i++)
        for (int j = i + 1; j < 64; j++)
            same += offs[i] == offs[j];
    cr_assert_eq(same, 0, "every request gets its own offset");
    size_t o1, l1, o2, l2;
    lkq_corpus_slice(&c, 1, 0, want, &o1, &l1);
    lkq_corpus_slice(&c, 2, 0, want, &o2, &l2);
    cr_assert_neq(o1, o2, "seed changes offsets");
    cr_assert_eq(lkq_corpus_slice(&c, 1, 0, c.len, &o1, &l1), -1, "longer than the corpus");
    lkq_corpus_free(&c);
}

Test(prompt, corpus_refusals)
{
    lkq_corpus c;
    char err[256];
    cr_assert_eq(lkq_corpus_load(&c, "/nonexistent/moby.txt", err, sizeof err), -1);
    cr_assert(strstr(err, "cannot open"));
    char path[] = "/tmp/lkq_corpusXXXXXX";
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, "ok \xC3\x28 bad", 9), 9);
    close(fd);
    cr_assert_eq(lkq_corpus_load(&c, path, err, sizeof err), -1);
    cr_assert(strstr(err, "UTF-8"), "%s", err);
    fd = open(path, O_WRONLY | O_TRUNC);
    close(fd);
    cr_assert_eq(lkq_corpus_load(&c, path, err, sizeof err), -1);
    cr_assert(strstr(err, "empty"), "%s", err);
    unlink(path);
}

Test(prompt, request_body)
{
    lkq_args a;
    char err[256];
    cr_assert_eq(parse("-c 1 -d 1 -m 7", &a, err, sizeof err), 0);
    char *b = lkq_request_body(&a, "smol", "Call me \"Ishmael\".\n", 19);
    json_t *j = json_loads(b, 0, NULL);
    cr_assert_not_null(j);
    cr_assert_str_eq(json_string_value(json_object_get(j, "prompt")), "Call me \"Ishmael\".\n");
    cr_assert_str_eq(json_string_value(json_object_get(j, "model")), "smol");
    cr_assert_eq(json_integer_value(json_object_get(j, "max_tokens")), 7);
    cr_assert(json_is_true(json_object_get(j, "stream")));
    cr_assert(json_is_true(json_object_get(json_object_get(j, "stream_options"), "include_usage")));
    json_decref(j);
    free(b);
    a.chat = 1;
    b = lkq_request_body(&a, NULL, "hi", 2);
    j = json_loads(b, 0, NULL);
    cr_assert_null(json_object_get(j, "model"));
    json_t *m0 = json_array_get(json_object_get(j, "messages"), 0);
    cr_assert_str_eq(json_string_value(json_object_get(m0, "role")), "user");
    cr_assert_str_eq(json_string_value(json_object_get(m0, "content")), "hi");
    json_decref(j);
    free(b);
}

Test(prompt, poisson_gaps)
{
    uint64_t st = 42;
    double sum = 0;
    int n = 20000;
    for (int i = 0; i < n; i++) {
        double g = lkq_rng_exp(&st, 4.0);
        cr_assert(g >= 0 && isfinite(g));
        sum += g;
    }
    /* mean 1/4 with standard error 0.25/sqrt(n) ~ 0.0018 */
    cr_assert_float_eq(sum / n, 0.25, 0.01);
    uint64_t s1 = 9, s2 = 9;
    cr_assert_eq(lkq_rng_next(&s1), lkq_rng_next(&s2), "seeded");
}

/* --- the binary --------------------------------------------------------- */

typedef struct {
    int status;
    char err[4096];
} run_result;

static const char *load_bin(void)
{
    static char buf[1024];
    const char *bd = getenv("LKQ_BUILDDIR");
    snprintf(buf, sizeof buf, "%s/loadtests/lkq_load", bd ? bd : "build");
    return access(buf, X_OK) == 0 ? buf : NULL;
}

static void run_bin(run_result *r, const char *args)
{
    const char *bin = load_bin();
    if (!bin)
        cr_skip_test("lkq_load not built (no libcurl)");
    char e[] = "/tmp/lkq_load_errXXXXXX";
    int fe = mkstemp(e);
    cr_assert_geq(fe, 0);
    close(fe);
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "%s %s >/dev/null 2>%s", bin, args, e);
    int st = system(cmd);
    r->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    FILE *f = fopen(e, "r");
    size_t n = f ? fread(r->err, 1, sizeof r->err - 1, f) : 0;
    r->err[n] = '\0';
    if (f)
        fclose(f);
    unlink(e);
}

static int count_lines(const char *s)
{
    int n = 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

Test(binary, refuses_bad_arguments_with_one_line)
{
    const char *bad[] = {"--kv-budget 1G -c 1 -d 1", "-c 1,,4 -d 1", "-c 8 -n 2", "-c 1",
                         "-c 1 -d 1 --prompt-tokens 900000", "-c 1 -d 1 --prompt-file /nonexistent"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        run_result r;
        run_bin(&r, bad[i]);
        cr_assert_eq(r.status, 2, "%s -> %d: %s", bad[i], r.status, r.err);
        cr_assert_eq(count_lines(r.err), 1, "%s: %s", bad[i], r.err);
        cr_assert(strncmp(r.err, "lkq_load: ", 10) == 0, "%s", r.err);
    }
    run_result r;
    run_bin(&r, "--help");
    cr_assert_eq(r.status, 0);
}

Test(binary, unreachable_server)
{
    /* a port bound but never listening refuses connections */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    cr_assert_eq(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    socklen_t sl = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    char args[256];
    snprintf(args, sizeof args, "-c 1 -n 1 --url http://127.0.0.1:%d", ntohs(sa.sin_port));
    run_result r;
    run_bin(&r, args);
    close(fd);
    cr_assert_eq(r.status, 1, "%d: %s", r.status, r.err);
    cr_assert_eq(count_lines(r.err), 1, "%s", r.err);
    cr_assert(strstr(r.err, "cannot reach"), "%s", r.err);
}
