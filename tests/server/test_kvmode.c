/*
 * test_kvmode.c - the per-request KV mode (issue 13 item 2) end to end: a
 * real livekvq-server on a loopback port, real libcurl clients, the
 * stories260K checkpoint with small chunks so that INT4 blocks are made
 * within a short prompt.
 *   - one server started with --kv-modes fp16,int4 serves a "kv_cache":
 *     "fp16" and a "kv_cache": "int4" request at the same time, and each
 *     gives the greedy text of a server started with that --kv-cache alone;
 *     no "kv_cache" is the server's --kv-cache; /metrics counts the
 *     sequences, bytes and tokens of each mode (INT4 holds fewer bytes per
 *     token);
 *   - an unknown value, a value of the wrong type, and a mode the server
 *     was not started with are 400s naming "kv_cache" (both endpoints);
 *   - a pool filled by FP16 sequences (preemptions) leaves an INT4
 *     sequence's text as it is alone, and the other way round.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "tests/server/server_util.h"
#include "tests/test_util.h"

#define TEXT_CAP 4096

typedef struct {
    const tsrv *s;
    char body[8192];
    long status;
    char text[TEXT_CAP];
    char param[64];
} kjob;

static const char *prompt =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in "
    "the park with her friends. One day, she saw a big red ball under a tree. She ran to "
    "the ball and kicked it high into the sky. Her friend Tom laughed and ran after it. ";

/* stories260K, 2 threads, chunks of 32 tokens in blocks of 16: a prompt of
 * ~120 tokens has its warm-up quantized and live INT4 blocks. */
#define BASE_ARGS                                                                         \
    "-m", tu_shared("models/stories260K/stories260K.bin"), "--tokenizer",                 \
        tu_shared("models/stories260K/tok512.bin"), "-t", "2", "--chunk-size", "32",     \
        "--block-tokens", "16"

static void *run_job(void *a)
{
    kjob *j = a;
    char url[256];
    snprintf(url, sizeof url, "%s/v1/completions", j->s->base);
    ts_buf b = {0};
    j->status = ts_http(url, "POST", j->body, NULL, &b, 120);
    j->text[0] = j->param[0] = '\0';
    json_error_t je;
    json_t *o = b.data ? json_loads(b.data, 0, &je) : NULL;
    if (o && j->status == 200) {
        const char *t = json_string_value(
            json_object_get(json_array_get(json_object_get(o, "choices"), 0), "text"));
        snprintf(j->text, sizeof j->text, "%s", t ? t : "");
    } else if (o) {
        const char *p = json_string_value(json_object_get(json_object_get(o, "error"), "param"));
        snprintf(j->param, sizeof j->param, "%s", p ? p : "");
    }
    json_decref(o);
    free(b.data);
    return NULL;
}

/* A greedy completion of the prompt; kv NULL leaves "kv_cache" out. */
static void set_body(kjob *j, const tsrv *s, const char *kv, int max_tokens)
{
    char field[64] = "";
    if (kv)
        snprintf(field, sizeof field, ", \"kv_cache\": %s", kv);
    j->s = s;
    snprintf(j->body, sizeof j->body,
             "{\"prompt\": \"%s\", \"max_tokens\": %d, \"temperature\": 0, "
             "\"ignore_eos\": true%s}", prompt, max_tokens, field);
}

static void greedy(const tsrv *s, const char *kv, int max_tokens, char *out)
{
    kjob j;
    set_body(&j, s, kv, max_tokens);
    run_job(&j);
    cr_assert_eq(j.status, 200, "kv_cache %s: status %ld", kv ? kv : "(none)", j.status);
    /* some text came back: more than 20 characters, or more than one per
     * token for a short answer (stories260K's 8 greedy tokens after the
     * prompt are "\nLily's mom saw her", 19 characters, with K and V
     * rotated, kv_rotate's default since) */
    size_t least = max_tokens < 20 ? (size_t)max_tokens : 20;
    cr_assert_gt(strlen(j.text), least, "kv_cache %s: '%s'", kv ? kv : "(none)", j.text);
    snprintf(out, TEXT_CAP, "%s", j.text);
}

static char *metrics(const tsrv *s)
{
    char *m = ts_get_metrics(s);
    cr_assert_not_null(m, "GET /metrics failed");
    return m;
}

/* The text of a server started with --kv-cache mode alone. */
static void single_mode_text(const char *mode, char *out)
{
    const char *args[] = {BASE_ARGS, "--kv-cache", mode, NULL};
    tsrv s;
    cr_assert_eq(ts_start(&s, args), 0, "the server did not start");
    greedy(&s, NULL, 60, out);
    cr_assert_eq(ts_stop(&s, 30), 0);
}

Test(kvmode, ab_on_one_server, .timeout = 240)
{
    static char t16[TEXT_CAP], t4[TEXT_CAP];
    single_mode_text("fp16", t16);
    single_mode_text("int4", t4);

    const char *args[] = {BASE_ARGS, "--kv-cache", "int4", "--kv-modes", "fp16,int4", NULL};
    tsrv s;
    cr_assert_eq(ts_start(&s, args), 0, "the server did not start");
    static kjob j[3];
    set_body(&j[0], &s, "\"fp16\"", 60);
    set_body(&j[1], &s, "\"int4\"", 60);
    set_body(&j[2], &s, NULL, 60);
    pthread_t th[3];
    for (int i = 0; i < 3; i++)
        pthread_create(&th[i], NULL, run_job, &j[i]);
    for (int i = 0; i < 3; i++) {
        pthread_join(th[i], NULL);
        cr_assert_eq(j[i].status, 200, "job %d: %ld", i, j[i].status);
    }
    cr_assert_str_eq(j[0].text, t16, "fp16 on the A/B server:\n%s\n--kv-cache fp16:\n%s",
                     j[0].text, t16);
    cr_assert_str_eq(j[1].text, t4, "int4 on the A/B server:\n%s\n--kv-cache int4:\n%s",
                     j[1].text, t4);
    cr_assert_str_eq(j[2].text, t4, "no kv_cache is the server's --kv-cache (int4)");

    char *m = metrics(&s);
    double n16 = ts_metric(m, "livekvq_kv_mode_finished_sequences_total{mode=\"fp16\"}");
    double n4 = ts_metric(m, "livekvq_kv_mode_finished_sequences_total{mode=\"int4\"}");
    double b16 = ts_metric(m, "livekvq_kv_mode_finished_bytes_total{mode=\"fp16\"}");
    double b4 = ts_metric(m, "livekvq_kv_mode_finished_bytes_total{mode=\"int4\"}");
    double k16 = ts_metric(m, "livekvq_kv_mode_finished_tokens_total{mode=\"fp16\"}");
    double k4 = ts_metric(m, "livekvq_kv_mode_finished_tokens_total{mode=\"int4\"}");
    double f16 = ts_metric(m, "livekvq_kv_mode_first_tokens_total{mode=\"fp16\"}");
    cr_assert_eq(n16, 1, "fp16 sequences: %g", n16);
    cr_assert_eq(n4, 2, "int4 sequences: %g", n4);
    cr_assert_eq(f16, 1, "fp16 first tokens: %g", f16);
    cr_assert_gt(k16, 100);
    cr_assert_gt(k4, 200);
    /* an FP16 sequence holds 4 bytes per position and channel (K and V);
     * INT4 less, even with this model's tiny heads (scales of 8 channels) */
    cr_assert_lt(b4 / k4, 0.8 * (b16 / k16), "bytes per token: int4 %g, fp16 %g", b4 / k4,
                 b16 / k16);
    cr_assert_eq(ts_metric(m, "livekvq_kv_mode_sequences{mode=\"fp16\"}"), 0);
    cr_assert_eq(ts_metric(m, "livekvq_kv_mode_bytes{mode=\"int4\"}"), 0);
    free(m);
    cr_assert_eq(ts_stop(&s, 30), 0);
}

Test(kvmode, bad_values_are_400s, .timeout = 120)
{
    const char *args[] = {BASE_ARGS, "--kv-cache", "int4", NULL};
    tsrv s;
    cr_assert_eq(ts_start(&s, args), 0, "the server did not start");
    /* unknown, wrong type, a mode this server was not started with */
    const char *bad[] = {"\"int5\"", "4", "[\"fp16\"]", "\"fp16\"", "\"\""};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        kjob j;
        set_body(&j, &s, bad[i], 8);
        run_job(&j);
        cr_assert_eq(j.status, 400, "kv_cache %s: status %ld", bad[i], j.status);
        cr_assert_str_eq(j.param, "kv_cache", "kv_cache %s: param '%s'", bad[i], j.param);
    }
    char url[256];
    snprintf(url, sizeof url, "%s/v1/chat/completions", s.base);
    ts_buf b = {0};
    long st = ts_http(url, "POST",
                      "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], "
                      "\"kv_cache\": \"int9\"}", NULL, &b, 30);
    cr_assert_eq(st, 400);
    cr_assert(b.data && strstr(b.data, "\"kv_cache\""), "%s", b.data ? b.data : "");
    free(b.data);
    /* null and another spelling of the server's mode are fine */
    static char t[TEXT_CAP], t4[TEXT_CAP];
    greedy(&s, "null", 8, t);
    greedy(&s, "\"INT4\"", 8, t4);
    cr_assert_str_eq(t, t4, "the server's own mode either way");
    cr_assert_eq(ts_stop(&s, 30), 0);
}

/* Sequences of one mode (crowd) fill a small pool while one of the other
 * mode, admitted first, runs: the pool preempts the youngest sequences,
 * never the oldest, so the other's text is its text alone; an FP16 crowd's
 * texts too (recomputation is exact), an INT4 crowd's may not be (a
 * recomputed sequence quantizes its generated tokens as a prompt). */
static void full_pool(const char *crowd, const char *other, int crowd_exact,
                      const char *budget)
{
    const char *args[] = {BASE_ARGS, "--kv-cache", "int4", "--kv-modes", "fp16,int4",
                          "--max-seqs", "6", "--kv-budget", budget, NULL};
    tsrv s;
    cr_assert_eq(ts_start(&s, args), 0, "the server did not start");
    static char alone_c[TEXT_CAP], alone_o[TEXT_CAP];
    greedy(&s, crowd, 300, alone_c);
    greedy(&s, other, 300, alone_o);
    enum { N = 6 };
    static kjob j[N];
    pthread_t th[N];
    set_body(&j[0], &s, other, 300);
    pthread_create(&th[0], NULL, run_job, &j[0]);
    char gauge[96];
    snprintf(gauge, sizeof gauge, "livekvq_kv_mode_sequences{mode=%s}", other);
    for (int t = 0; t < 500; t++) { /* until it runs (the gauge refreshes every 0.2 s) */
        char *m = metrics(&s);
        double running = ts_metric(m, gauge);
        free(m);
        if (running >= 1)
            break;
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    for (int i = 1; i < N; i++) {
        set_body(&j[i], &s, crowd, 300);
        pthread_create(&th[i], NULL, run_job, &j[i]);
    }
    for (int i = 0; i < N; i++)
        pthread_join(th[i], NULL);
    cr_assert_eq(j[0].status, 200, "%s beside a full pool: %ld", other, j[0].status);
    cr_assert_str_eq(j[0].text, alone_o, "%s beside %s:\n%s\nalone:\n%s", other, crowd,
                     j[0].text, alone_o);
    for (int i = 1; i < N; i++) {
        cr_assert_eq(j[i].status, 200, "%s job %d: %ld", crowd, i, j[i].status);
        cr_assert_gt(strlen(j[i].text), 20);
        if (crowd_exact)
            cr_assert_str_eq(j[i].text, alone_c, "%s job %d under pressure", crowd, i);
    }
    char *m = metrics(&s);
    double pre = ts_metric(m, "livekvq_preemptions_total");
    cr_assert_gt(pre, 0, "the pool was never full (no preemption)");
    free(m);
    cr_assert_eq(ts_stop(&s, 30), 0);
}

Test(kvmode, full_fp16_pool_leaves_int4_intact, .timeout = 240)
{
    full_pool("\"fp16\"", "\"int4\"", 1, "512K");
}

Test(kvmode, full_int4_pool_leaves_fp16_intact, .timeout = 240)
{
    /* the pool is shared: INT4 sequences fill what the FP16 one leaves */
    full_pool("\"int4\"", "\"fp16\"", 0, "400K");
}

/* A server of another code width serves, and names its mode in /metrics'
 * build_info (not "int4" for every quantized width). */
Test(kvmode, other_width_named_in_build_info, .timeout = 120)
{
    const char *args[] = {BASE_ARGS, "--kv-cache", "k3v2", NULL};
    tsrv s;
    cr_assert_eq(ts_start(&s, args), 0, "the server did not start");
    char t[TEXT_CAP];
    greedy(&s, NULL, 40, t);
    char *m = metrics(&s);
    cr_assert_not_null(strstr(m, "kv_cache=\"k3v2\"} 1"), "build_info:\n%.400s", m);
    free(m);
    cr_assert_eq(ts_stop(&s, 30), 0);
}

/* Every width per request (fp16, int3, k4v2 beside the default int4 in one
 * shared pool): each request's text is the text of a server started with
 * that --kv-cache alone (bit-identical: a sequence's blocks do not depend
 * on where in the arena they live), /metrics labels every mode, fewer bits
 * hold fewer bytes per token, and a width this server was not started
 * with is a 400 that names "kv_cache" and lists the enabled modes. */
Test(kvmode, widths_per_request_match_single_mode, .timeout = 300)
{
    static const char *const modes[] = {"int3", "k4v2", "fp16"};
    enum { NM = 3 };
    static char alone[NM][TEXT_CAP];
    for (int i = 0; i < NM; i++)
        single_mode_text(modes[i], alone[i]);

    const char *args[] = {BASE_ARGS, "--kv-cache", "int4", "--kv-modes", "fp16,int3,k4v2",
                          NULL};
    tsrv s;
    cr_assert_eq(ts_start(&s, args), 0, "the server did not start");
    static kjob j[NM + 1];
    char kv[NM][16];
    pthread_t th[NM + 1];
    for (int i = 0; i < NM; i++) {
        snprintf(kv[i], sizeof kv[i], "\"%s\"", modes[i]);
        set_body(&j[i], &s, kv[i], 60);
    }
    set_body(&j[NM], &s, "\"int4\"", 60);
    for (int i = 0; i <= NM; i++)
        pthread_create(&th[i], NULL, run_job, &j[i]);
    for (int i = 0; i <= NM; i++) {
        pthread_join(th[i], NULL);
        cr_assert_eq(j[i].status, 200, "job %d: %ld", i, j[i].status);
    }
    for (int i = 0; i < NM; i++)
        cr_assert_str_eq(j[i].text, alone[i], "%s on the shared pool:\n%s\nalone:\n%s",
                         modes[i], j[i].text, alone[i]);
    char *m = metrics(&s);
    double bpt[NM + 1];
    const char *lab[NM + 1] = {"int3", "k4v2", "fp16", "int4"};
    for (int i = 0; i <= NM; i++) {
        char q[128];
        snprintf(q, sizeof q, "livekvq_kv_mode_finished_sequences_total{mode=\"%s\"}", lab[i]);
        cr_assert_eq(ts_metric(m, q), 1, "%s sequences", lab[i]);
        snprintf(q, sizeof q, "livekvq_kv_mode_finished_bytes_total{mode=\"%s\"}", lab[i]);
        double b = ts_metric(m, q);
        snprintf(q, sizeof q, "livekvq_kv_mode_finished_tokens_total{mode=\"%s\"}", lab[i]);
        double t = ts_metric(m, q);
        cr_assert_gt(t, 100, "%s tokens", lab[i]);
        bpt[i] = b / t;
    }
    cr_assert_lt(bpt[0], bpt[3], "int3 %g < int4 %g bytes per token", bpt[0], bpt[3]);
    cr_assert_lt(bpt[1], bpt[3], "k4v2 %g < int4 %g bytes per token", bpt[1], bpt[3]);
    cr_assert_lt(bpt[3], bpt[2], "int4 %g < fp16 %g bytes per token", bpt[3], bpt[2]);
    cr_assert_null(strstr(m, "mode=\"int8\""), "only the enabled modes are labelled");
    double c16 = ts_metric(m, "livekvq_kv_mode_capacity_sequences{mode=\"fp16\"}");
    double c3 = ts_metric(m, "livekvq_kv_mode_capacity_sequences{mode=\"int3\"}");
    cr_assert(c16 >= 1 && c3 > c16, "the shared pool holds more int3 than fp16: %g %g", c3,
              c16);
    cr_assert_gt(ts_metric(m, "livekvq_kv_shared_free_bytes"), 0);
    free(m);
    kjob b;
    set_body(&b, &s, "\"int2\"", 8);
    char url[256];
    snprintf(url, sizeof url, "%s/v1/completions", s.base);
    ts_buf r = {0};
    long st = ts_http(url, "POST", b.body, NULL, &r, 30);
    cr_assert_eq(st, 400);
    cr_assert(r.data && strstr(r.data, "\"kv_cache\"") &&
                  strstr(r.data, "fp16,int4,int3,k4v2"),
              "names the field and the enabled modes: %s", r.data ? r.data : "");
    free(r.data);
    cr_assert_eq(ts_stop(&s, 30), 0);
}
