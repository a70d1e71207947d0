/*
 * test_server.c - the HTTP server end to end: a real livekvq-server on a
 * free loopback port, real libcurl clients.
 *   - completions (plain and streaming) equal the CLI's text for the same
 *     seed and sampling, usage counts, stop sequences, n > 1, logprobs;
 *   - batch invariance: with the FP16 cache a greedy request gives the
 *     same text alone and beside 7 concurrent others;
 *   - bad input: each case gets its status and an OpenAI-shaped error and
 *     the server keeps serving;
 *   - load and faults: 32 concurrent streaming clients over a small KV
 *     budget all finish or get 429/503, never a malformed stream; clients
 *     that vanish mid-stream give their KV blocks back (seen in /metrics);
 *     SIGTERM under load exits 0.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "tests/server/server_util.h"
#include "tests/test_util.h"

static const char *m260(void)
{
    return tu_shared("models/stories260K/stories260K.bin");
}

static const char *tok260(void)
{
    return tu_shared("models/stories260K/tok512.bin");
}

static void start_or_die(tsrv *s, const char *const *args)
{
    cr_assert_eq(ts_start(s, args), 0, "the server did not start");
}

static void stop_ok(tsrv *s)
{
    int rc = ts_stop(s, 30);
    cr_assert_eq(rc, 0, "server exit status %d", rc);
}

/* Runs the CLI and returns its stdout (caller frees). */
static char *run_cli(const char *args)
{
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "%s %s 2>/dev/null", ts_bin("livekvq"), args);
    FILE *f = popen(cmd, "r");
    cr_assert_not_null(f);
    char *out = calloc(1, 65536);
    size_t n = fread(out, 1, 65535, f);
    out[n] = '\0';
    if (n > 0 && out[n - 1] == '\n')
        out[n - 1] = '\0'; /* the CLI ends its output with a newline */
    cr_assert_eq(pclose(f), 0, "CLI failed: %s", cmd);
    return out;
}

static json_t *post_json(const tsrv *s, const char *path, const char *body, long *status)
{
    char url[256];
    snprintf(url, sizeof url, "%s%s", s->base, path);
    ts_buf b = {0};
    *status = ts_http(url, "POST", body, NULL, &b, 120);
    json_error_t je;
    json_t *o = b.data ? json_loads(b.data, 0, &je) : NULL;
    cr_assert_not_null(o, "not JSON (status %ld): %s", *status, b.data ? b.data : "(none)");
    free(b.data);
    return o;
}

static const char *choice_text(json_t *o, int i)
{
    json_t *c = json_array_get(json_object_get(o, "choices"), (size_t)i);
    json_t *t = json_object_get(c, "text");
    if (!t)
        t = json_object_get(json_object_get(c, "message"), "content");
    return json_string_value(t);
}

static void same_as_cli(const char *model, const char *extra_srv, const char *cli_model_args)
{
    const char *args[] = {"-m", model, "-t", "2", extra_srv ? "--tokenizer" : NULL,
                          extra_srv, NULL};
    tsrv s;
    start_or_die(&s, args);
    const char *prompt = "Once upon a time, there was a little dog";
    char cmd[1024];
    snprintf(cmd, sizeof cmd,
             "generate %s -p '%s' -n 24 -s 1234 --temp 0.8 --top-k 40 --top-p 0.95 "
             "--min-p 0.05 -t 2 -q", cli_model_args, prompt);
    char *cli = run_cli(cmd);
    char body[1024];
    snprintf(body, sizeof body,
             "{\"prompt\": \"%s\", \"max_tokens\": 24, \"seed\": 1234, \"temperature\": 0.8, "
             "\"top_k\": 40, \"top_p\": 0.95, \"min_p\": 0.05}", prompt);
    long st;
    json_t *o = post_json(&s, "/v1/completions", body, &st);
    cr_assert_eq(st, 200);
    cr_assert_str_eq(choice_text(o, 0), cli, "server:\n%s\ncli:\n%s", choice_text(o, 0), cli);
    /* usage: the CLI's tokenization of the prompt */
    snprintf(cmd, sizeof cmd, "tokenize %s -p '%s'", cli_model_args, prompt);
    char *ids = run_cli(cmd);
    int n_ids = 0;
    for (char *p = strtok(ids, " \n"); p; p = strtok(NULL, " \n"))
        n_ids++;
    json_t *u = json_object_get(o, "usage");
    cr_assert_eq(json_integer_value(json_object_get(u, "prompt_tokens")), n_ids);
    long ct = (long)json_integer_value(json_object_get(u, "completion_tokens"));
    const char *fin = json_string_value(json_object_get(
        json_array_get(json_object_get(o, "choices"), 0), "finish_reason"));
    cr_assert(ct == 24 ? strcmp(fin, "length") == 0 : strcmp(fin, "stop") == 0, "%ld %s", ct, fin);
    cr_assert_eq(json_integer_value(json_object_get(u, "total_tokens")), n_ids + ct);

    /* streaming gives the same text and usage */
    char sbody[1200];
    snprintf(sbody, sizeof sbody, "%.*s, \"stream\": true, \"stream_options\": "
             "{\"include_usage\": true}}", (int)strlen(body) - 1, body);
    char url[256];
    snprintf(url, sizeof url, "%s/v1/completions", s.base);
    ts_buf b = {0};
    cr_assert_eq(ts_http(url, "POST", sbody, NULL, &b, 120), 200);
    char text[16][4096];
    memset(text, 0, sizeof text);
    int done;
    long usage;
    char why[256];
    cr_assert_gt(ts_sse(b.data, text, &done, &usage, NULL, why, sizeof why), 0, "%s", why);
    cr_assert(done);
    cr_assert_str_eq(text[0], cli);
    cr_assert_eq(usage, ct);
    free(b.data);
    json_decref(o);
    free(cli);
    free(ids);
    stop_ok(&s);
}

Test(server, completions_equal_cli_stories260k, .timeout = 120)
{
    char margs[1100];
    snprintf(margs, sizeof margs, "-m %s --tokenizer %s", m260(), tok260());
    same_as_cli(m260(), tok260(), margs);
}

Test(server, completions_equal_cli_smollm2, .timeout = 240)
{
    const char *p = tu_smollm2();
    if (!p)
        cr_skip_test("SmolLM2 not fetched");
    char margs[1100];
    snprintf(margs, sizeof margs, "-m %s", p);
    same_as_cli(p, NULL, margs);
}

Test(server, stop_n_logprobs_chat, .timeout = 120)
{
    const char *args[] = {"-m", m260(), "--tokenizer", tok260(), "-t", "2", NULL};
    tsrv s;
    start_or_die(&s, args);
    long st;
    json_t *g = post_json(&s, "/v1/completions",
                          "{\"prompt\": \"Once upon a time\", \"max_tokens\": 40, "
                          "\"temperature\": 0}", &st);
    cr_assert_eq(st, 200);
    const char *full = choice_text(g, 0);
    const char *cut = strstr(full, " the");
    cr_assert(cut && cut > full, "%s", full);
    /* n = 3 greedy choices with a stop sequence and logprobs = 3 */
    json_t *o = post_json(&s, "/v1/completions",
                          "{\"prompt\": \"Once upon a time\", \"max_tokens\": 40, \"temperature\": 0,"
                          " \"n\": 3, \"stop\": [\" the\", \"@@@\"], \"logprobs\": 3}", &st);
    cr_assert_eq(st, 200);
    json_t *ch = json_object_get(o, "choices");
    cr_assert_eq(json_array_size(ch), 3);
    long ct = (long)json_integer_value(json_object_get(json_object_get(o, "usage"),
                                                       "completion_tokens"));
    long sum = 0;
    for (int i = 0; i < 3; i++) {
        json_t *c = json_array_get(ch, (size_t)i);
        cr_assert_eq(json_integer_value(json_object_get(c, "index")), i);
        cr_assert_eq(strlen(choice_text(o, i)), (size_t)(cut - full));
        cr_assert(strncmp(choice_text(o, i), full, (size_t)(cut - full)) == 0);
        cr_assert_str_eq(json_string_value(json_object_get(c, "finish_reason")), "stop");
        json_t *lp = json_object_get(c, "logprobs");
        size_t nt = json_array_size(json_object_get(lp, "tokens"));
        cr_assert_gt(nt, 0);
        cr_assert_eq(json_array_size(json_object_get(lp, "token_logprobs")), nt);
        cr_assert_eq(json_array_size(json_object_get(lp, "text_offset")), nt);
        json_t *tops = json_object_get(lp, "top_logprobs");
        cr_assert_eq(json_array_size(tops), nt);
        for (size_t k = 0; k < nt; k++) {
            size_t nk = json_object_size(json_array_get(tops, k));
            cr_assert(nk >= 1 && nk <= 3, "%zu alternatives", nk);
            cr_assert(json_real_value(json_array_get(json_object_get(lp, "token_logprobs"), k))
                      <= 0.0);
        }
        sum += (long)nt;
    }
    cr_assert_geq(ct, sum - 3, "usage %ld vs logprob tokens %ld", ct, sum);
    /* chat */
    json_t *c = post_json(&s, "/v1/chat/completions",
                          "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"},"
                          " {\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": "
                          "\"Tell a story\"}]}], \"max_tokens\": 8, \"logprobs\": true, "
                          "\"top_logprobs\": 2}", &st);
    cr_assert_eq(st, 200);
    json_t *msg = json_object_get(json_array_get(json_object_get(c, "choices"), 0), "message");
    cr_assert_str_eq(json_string_value(json_object_get(msg, "role")), "assistant");
    cr_assert(json_is_string(json_object_get(msg, "content")));
    json_t *lc = json_object_get(json_object_get(json_array_get(json_object_get(c, "choices"), 0),
                                                 "logprobs"), "content");
    cr_assert_gt(json_array_size(lc), 0);
    cr_assert_eq(json_array_size(json_object_get(json_array_get(lc, 0), "top_logprobs")), 2);
    cr_assert_str_eq(json_string_value(json_object_get(c, "object")), "chat.completion");
    /* echo + token-array prompt + multiple prompts */
    json_t *e = post_json(&s, "/v1/completions",
                          "{\"prompt\": [\"Once upon\", [1, 403, 407]], \"max_tokens\": 3, "
                          "\"echo\": true, \"temperature\": 0}", &st);
    cr_assert_eq(st, 200);
    cr_assert_eq(json_array_size(json_object_get(e, "choices")), 2);
    cr_assert(strncmp(choice_text(e, 0), "Once upon", 9) == 0, "%s", choice_text(e, 0));
    json_decref(e);
    json_decref(c);
    json_decref(o);
    json_decref(g);
    stop_ok(&s);
}

typedef struct {
    const tsrv *s;
    char body[8192];
    long status;
    char text[16][4096];
    int ok_stream, done, error_seen;
    int abort_after;
    char why[256];
} job;

static void *run_job(void *arg)
{
    job *j = arg;
    char url[256];
    snprintf(url, sizeof url, "%s/v1/completions", j->s->base);
    ts_buf b = {0};
    b.abort_after = j->abort_after;
    j->status = ts_http(url, "POST", j->body, NULL, &b, 300);
    memset(j->text, 0, sizeof j->text);
    if (strstr(j->body, "\"stream\": true") && j->status == 200 && !j->abort_after) {
        long usage;
        j->ok_stream = ts_sse(b.data ? b.data : "", j->text, &j->done, &usage, &j->error_seen,
                              j->why, sizeof j->why) >= 0;
    } else if (j->status == 200 && b.data) {
        json_t *o = json_loads(b.data, 0, NULL);
        if (o && choice_text(o, 0))
            snprintf(j->text[0], sizeof j->text[0], "%s", choice_text(o, 0));
        json_decref(o);
    } else if (b.data && (j->status == 429 || j->status == 503)) {
        json_t *o = json_loads(b.data, 0, NULL);
        j->ok_stream = o && json_object_get(o, "error") != NULL;
        json_decref(o);
    }
    free(b.data);
    return NULL;
}

static const char *story =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in "
    "the park with her friends. One day, she saw a big red ball under a tree. ";

Test(server, batch_invariance_fp16, .timeout = 180)
{
    const char *args[] = {"-m", m260(), "--tokenizer", tok260(), "-t", "2", "--kv-cache",
                          "fp16", "--max-seqs", "8", "--chunk-size", "128",
                          "--block-tokens", "128", NULL};
    tsrv s;
    start_or_die(&s, args);
    static job jobs[8];
    memset(jobs, 0, sizeof jobs);
    char longp[4096] = "";
    for (int i = 0; i < 5; i++)
        strcat(longp, story);
    for (int i = 0; i < 8; i++) {
        jobs[i].s = &s;
        snprintf(jobs[i].body, sizeof jobs[i].body,
                 "{\"prompt\": \"%.*s\", \"max_tokens\": %d, \"temperature\": 0, "
                 "\"ignore_eos\": true}", i == 0 ? (int)strlen(longp) : 40 + 60 * i, longp,
                 i == 0 ? 60 : 20 + 10 * i);
    }
    run_job(&jobs[0]);
    cr_assert_eq(jobs[0].status, 200);
    char alone[4096];
    snprintf(alone, sizeof alone, "%s", jobs[0].text[0]);
    cr_assert_gt(strlen(alone), 20);
    pthread_t th[8];
    for (int i = 1; i < 8; i++)
        pthread_create(&th[i], NULL, run_job, &jobs[i]);
    run_job(&jobs[0]);
    for (int i = 1; i < 8; i++) {
        pthread_join(th[i], NULL);
        cr_assert_eq(jobs[i].status, 200);
    }
    cr_assert_eq(jobs[0].status, 200);
    cr_assert_str_eq(jobs[0].text[0], alone, "beside 7 others:\n%s\nalone:\n%s",
                     jobs[0].text[0], alone);
    stop_ok(&s);
}

typedef struct {
    const char *name, *method, *path, *body, *auth;
    long status;
    const char *param, *code;
} bad_case;

Test(server, bad_input, .timeout = 120)
{
    const char *args[] = {"-m", m260(), "--tokenizer", tok260(), "-t", "2", "--api-key",
                          "sekrit", "--max-body", "4096", "-c", "256", NULL};
    tsrv s;
    start_or_die(&s, args);
    char big[6000];
    memset(big, 'a', sizeof big);
    memcpy(big, "{\"prompt\": \"", 12);
    strcpy(big + sizeof big - 4, "\"}");
    char longprompt[3000] = "{\"prompt\": [";
    for (int i = 0; i < 300; i++)
        strcat(longprompt, i ? ",400" : "1");
    strcat(longprompt, "]}");
    const bad_case cases[] = {
        {"malformed JSON", "POST", "/v1/completions", "{\"prompt\": ", "sekrit", 400, NULL, NULL},
        {"not an object", "POST", "/v1/completions", "[1, 2]", "sekrit", 400, NULL, NULL},
        {"prompt wrong type", "POST", "/v1/completions", "{\"prompt\": 5}", "sekrit", 400,
         "prompt", NULL},
        {"missing prompt", "POST", "/v1/completions", "{\"max_tokens\": 4}", "sekrit", 400,
         "prompt", NULL},
        {"max_tokens wrong type", "POST", "/v1/completions",
         "{\"prompt\": \"a\", \"max_tokens\": \"10\"}", "sekrit", 400, "max_tokens", NULL},
        {"negative max_tokens", "POST", "/v1/completions",
         "{\"prompt\": \"a\", \"max_tokens\": -5}", "sekrit", 400, "max_tokens", NULL},
        {"huge max_tokens", "POST", "/v1/completions",
         "{\"prompt\": \"a\", \"max_tokens\": 100000000000}", "sekrit", 400, "max_tokens",
         NULL},
        {"max_tokens over the context", "POST", "/v1/completions",
         "{\"prompt\": \"a\", \"max_tokens\": 1000}", "sekrit", 400, "max_tokens",
         "context_length_exceeded"},
        {"temperature out of range", "POST", "/v1/completions",
         "{\"prompt\": \"a\", \"temperature\": 3.5}", "sekrit", 400, "temperature", NULL},
        {"top_p zero", "POST", "/v1/completions", "{\"prompt\": \"a\", \"top_p\": 0}",
         "sekrit", 400, "top_p", NULL},
        {"n too big", "POST", "/v1/completions", "{\"prompt\": \"a\", \"n\": 99}", "sekrit",
         400, "n", NULL},
        {"stop wrong type", "POST", "/v1/completions", "{\"prompt\": \"a\", \"stop\": 7}",
         "sekrit", 400, "stop", NULL},
        {"token id out of range", "POST", "/v1/completions", "{\"prompt\": [1, 99999]}",
         "sekrit", 400, "prompt", NULL},
        {"unknown model", "POST", "/v1/completions", "{\"model\": \"gpt-9\", \"prompt\": \"a\"}",
         "sekrit", 404, "model", "model_not_found"},
        {"body over the limit", "POST", "/v1/completions", big, "sekrit", 413, NULL, NULL},
        {"prompt over the context", "POST", "/v1/completions", longprompt, "sekrit", 400,
         "prompt", "context_length_exceeded"},
        {"invalid UTF-8", "POST", "/v1/completions", "{\"prompt\": \"\xff\xfe bad\"}", "sekrit",
         400, NULL, NULL},
        {"messages missing", "POST", "/v1/chat/completions", "{\"prompt\": \"a\"}", "sekrit",
         400, "messages", NULL},
        {"bad role", "POST", "/v1/chat/completions",
         "{\"messages\": [{\"role\": \"wizard\", \"content\": \"hi\"}]}", "sekrit", 400,
         "messages", NULL},
        {"unknown route", "GET", "/v2/nothing", NULL, "sekrit", 404, NULL, NULL},
        {"wrong method", "GET", "/v1/completions", NULL, "sekrit", 405, NULL, NULL},
        {"wrong method 2", "POST", "/v1/models", "{}", "sekrit", 405, NULL, NULL},
        {"missing API key", "POST", "/v1/completions", "{\"prompt\": \"a\"}", NULL, 401, NULL,
         "invalid_api_key"},
        {"wrong API key", "POST", "/v1/completions", "{\"prompt\": \"a\"}", "sekrix", 401, NULL,
         "invalid_api_key"},
        {"wrong API key (longer)", "GET", "/v1/models", NULL, "sekrit2", 401, NULL,
         "invalid_api_key"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const bad_case *c = &cases[i];
        char url[256];
        snprintf(url, sizeof url, "%s%s", s.base, c->path);
        ts_buf b = {0};
        long st = ts_http(url, c->method, c->body, c->auth, &b, 30);
        cr_assert_eq(st, c->status, "%s: status %ld, want %ld (%s)", c->name, st, c->status,
                     b.data ? b.data : "");
        json_t *o = json_loads(b.data ? b.data : "", 0, NULL);
        cr_assert_not_null(o, "%s: body is not JSON: %s", c->name, b.data ? b.data : "");
        json_t *e = json_object_get(o, "error");
        cr_assert(json_is_string(json_object_get(e, "message")), "%s", c->name);
        cr_assert(json_is_string(json_object_get(e, "type")), "%s", c->name);
        cr_assert(json_object_get(e, "param") && json_object_get(e, "code"), "%s", c->name);
        if (c->param)
            cr_assert_str_eq(json_string_value(json_object_get(e, "param")), c->param, "%s",
                             c->name);
        if (c->code)
            cr_assert_str_eq(json_string_value(json_object_get(e, "code")), c->code, "%s",
                             c->name);
        json_decref(o);
        free(b.data);
    }
    /* still serving */
    char url[256];
    snprintf(url, sizeof url, "%s/v1/completions", s.base);
    ts_buf b = {0};
    cr_assert_eq(ts_http(url, "POST", "{\"prompt\": \"Once\", \"max_tokens\": 4}", "sekrit", &b,
                         30), 200);
    free(b.data);
    memset(&b, 0, sizeof b);
    snprintf(url, sizeof url, "%s/health", s.base);
    cr_assert_eq(ts_http(url, "GET", NULL, NULL, &b, 30), 200, "/health needs no key");
    free(b.data);
    stop_ok(&s);
}

static char *get_metrics(const tsrv *s)
{
    char url[256];
    snprintf(url, sizeof url, "%s/metrics", s->base);
    ts_buf b = {0};
    cr_assert_eq(ts_http(url, "GET", NULL, NULL, &b, 30), 200);
    return b.data;
}

Test(server, load_faults_and_sigterm, .timeout = 300)
{
    /* a pool of ~1200 tokens for sequences of up to ~380: it cannot hold
     * all 32 clients at once */
    const char *args[] = {"-m", m260(), "--tokenizer", tok260(), "-t", "2", "--max-seqs", "8",
                          "--max-queue", "12", "--kv-budget", "1200t", "--chunk-size", "128",
                          "-c", "512", NULL};
    tsrv s;
    start_or_die(&s, args);
    static job jobs[32];
    memset(jobs, 0, sizeof jobs);
    char longp[4096] = "";
    for (int i = 0; i < 6; i++)
        strcat(longp, story);
    pthread_t th[32];
    for (int i = 0; i < 32; i++) {
        jobs[i].s = &s;
        snprintf(jobs[i].body, sizeof jobs[i].body,
                 "{\"prompt\": \"%.*s\", \"max_tokens\": %d, \"stream\": true, "
                 "\"ignore_eos\": true, \"temperature\": 0.7, \"seed\": %d}",
                 (int)strlen(longp) - 7 * i, longp, 40 + i, i);
        pthread_create(&th[i], NULL, run_job, &jobs[i]);
    }
    int ok = 0, refused = 0;
    for (int i = 0; i < 32; i++) {
        pthread_join(th[i], NULL);
        cr_assert(jobs[i].status == 200 || jobs[i].status == 429 || jobs[i].status == 503,
                  "client %d: status %ld", i, jobs[i].status);
        cr_assert(jobs[i].ok_stream, "client %d: malformed response: %s", i, jobs[i].why);
        if (jobs[i].status == 200) {
            cr_assert(jobs[i].done, "client %d: stream without [DONE]", i);
            cr_assert(!jobs[i].error_seen, "client %d: error event", i);
            ok++;
        } else {
            refused++;
        }
    }
    cr_assert_gt(ok, 8, "only %d of 32 finished", ok);
    char *m = get_metrics(&s);
    cr_assert_eq(ts_metric(m, "livekvq_requests_running"), 0);
    cr_assert_eq(ts_metric(m, "livekvq_kv_blocks_used{kind=\"int4\"}"), 0);
    cr_assert_gt(ts_metric(m, "livekvq_generation_tokens_total"), 8 * 40);
    free(m);

    /* 6 clients read a few events and vanish: their blocks come back */
    static job gone[6];
    memset(gone, 0, sizeof gone);
    for (int i = 0; i < 6; i++) {
        gone[i].s = &s;
        gone[i].abort_after = 3;
        snprintf(gone[i].body, sizeof gone[i].body,
                 "{\"prompt\": \"%s\", \"max_tokens\": 300, \"stream\": true, "
                 "\"ignore_eos\": true}", story);
        pthread_create(&th[i], NULL, run_job, &gone[i]);
    }
    for (int i = 0; i < 6; i++)
        pthread_join(th[i], NULL);
    double used = -1, running = -1;
    for (int t = 0; t < 100; t++) {
        m = get_metrics(&s);
        used = ts_metric(m, "livekvq_kv_blocks_used{kind=\"int4\"}") +
               ts_metric(m, "livekvq_kv_blocks_used{kind=\"fp16\"}");
        running = ts_metric(m, "livekvq_requests_running");
        free(m);
        if (used == 0 && running == 0)
            break;
        usleep(100000);
    }
    cr_assert_eq(running, 0, "vanished clients still running");
    cr_assert_eq(used, 0, "vanished clients still hold %g KV blocks", used);

    /* SIGTERM while 8 streams run: clean exit, every stream well formed */
    static job last[8];
    memset(last, 0, sizeof last);
    for (int i = 0; i < 8; i++) {
        last[i].s = &s;
        snprintf(last[i].body, sizeof last[i].body,
                 "{\"prompt\": \"%s\", \"max_tokens\": %d, \"stream\": true, "
                 "\"ignore_eos\": true}", story, 20 + 10 * i);
        pthread_create(&th[i], NULL, run_job, &last[i]);
    }
    usleep(300000);
    int rc = ts_stop(&s, 60);
    for (int i = 0; i < 8; i++) {
        pthread_join(th[i], NULL);
        if (last[i].status == 200)
            cr_assert(last[i].ok_stream && last[i].done, "stream %d cut badly: %s", i,
                      last[i].why);
    }
    cr_assert_eq(rc, 0, "exit status %d after SIGTERM", rc);
}
