/*
 * test_gpu_server.c - livekvq-server with --device cuda end to end, on
 * stories260K (../shared/models): the server binary is $LKQ_SERVER_BIN
 * (meson: the CUDA build's livekvq-server for suite gpu, the same sources
 * linked with the emulated engine for suite gpu-emu), started on a
 * loopback port (tests/server/server_util.h):
 *  - POST /v1/completions (greedy, FP16 cache) answers 200 with the same
 *    text as the same server with --device cpu, the usage counts the
 *    tokens; GET /health is 200 and GET /metrics reports the KV pool and
 *    the generated tokens on both devices; SIGTERM exits 0;
 *  - the config-file key: "device = cuda" starts, "device = tpu" is a
 *    startup error;
 *  - without a device (suite gpu on a machine without one): --device cuda
 *    fails at startup with one line naming the cause and a nonzero exit
 *    status, not a crash; then the program exits 77 (skipped).
 */
#include "tests/gpu/gpu_test.h"

#include "tests/gpu/gpu_models.h"
#include "tests/server/server_util.h"

static const char *server_bin(void)
{
    const char *b = getenv("LKQ_SERVER_BIN");
    return b && *b ? b : "./livekvq-server";
}

/* Runs the server with extra arguments expecting a startup failure: its
 * combined output to out, the exit status returned (-1 if not run). */
static int run_expect_fail(const char *extra, char *out, size_t cap)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "'%s' -m '%s' --port 0 %s 2>&1", server_bin(),
             gt_shared(GT_260K), extra);
    FILE *f = popen(cmd, "r");
    if (!f)
        return -1;
    size_t len = fread(out, 1, cap - 1, f);
    out[len] = '\0';
    int st = pclose(f);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 1000;
}

/* Starts the server on device dev (with the FP16 cache), asks one greedy
 * completion, checks /health and /metrics, stops it. Returns the text
 * (caller frees) or NULL. */
static char *complete_on(const char *dev, const char *config)
{
    tsrv s;
    memset(&s, 0, sizeof s);
    const char *args_dev[] = {"-m", gt_shared(GT_260K), "--device", dev, "--kv-cache", "fp16",
                              "-c", "256", "--max-seqs", "2", "--chunk-size", "64",
                              "--block-tokens", "32", "--log-level", "warn", NULL};
    const char *args_cfg[] = {"-m", gt_shared(GT_260K), "--config", config, "--log-level",
                              "warn", NULL};
    if (ts_start(&s, config ? args_cfg : args_dev) < 0) {
        GT_CHECK(0, "the server did not start with --device %s (exit %d)", dev,
                 ts_stop(&s, 10));
        return NULL;
    }
    char url[256], *text = NULL;
    snprintf(url, sizeof url, "%s/v1/completions", s.base);
    ts_buf b = {0};
    long st = ts_http(url, "POST",
                      "{\"prompt\": \"Once upon a time\", \"max_tokens\": 24, "
                      "\"temperature\": 0}",
                      NULL, &b, 240);
    GT_CHECK(st == 200, "%s: POST /v1/completions -> %ld: %s", dev, st,
             b.data ? b.data : "");
    json_error_t je;
    json_t *o = st == 200 && b.data ? json_loads(b.data, 0, &je) : NULL;
    if (o) {
        json_t *c = json_array_get(json_object_get(o, "choices"), 0);
        const char *t = json_string_value(json_object_get(c, "text"));
        json_t *u = json_object_get(o, "usage");
        long ct = (long)json_integer_value(json_object_get(u, "completion_tokens"));
        GT_CHECK(t && *t && ct > 0 && ct <= 24, "%s: text '%s', %ld tokens", dev, t ? t : "",
                 ct);
        text = t ? strdup(t) : NULL;
        json_decref(o);
    }
    free(b.data);
    memset(&b, 0, sizeof b);
    snprintf(url, sizeof url, "%s/health", s.base);
    GT_CHECK(ts_http(url, "GET", NULL, NULL, &b, 30) == 200, "%s: /health", dev);
    free(b.data);
    memset(&b, 0, sizeof b);
    snprintf(url, sizeof url, "%s/metrics", s.base);
    GT_CHECK(ts_http(url, "GET", NULL, NULL, &b, 30) == 200 && b.data, "%s: /metrics", dev);
    if (b.data) {
        GT_CHECK(ts_metric(b.data, "livekvq_kv_pool_bytes") > 0, "%s: pool bytes", dev);
        GT_CHECK(ts_metric(b.data, "livekvq_generation_tokens_total") > 0,
                 "%s: generated tokens", dev);
        GT_CHECK(ts_metric(b.data, "livekvq_kv_usage_ratio") == 0, "%s: usage after the run",
                 dev);
    }
    free(b.data);
    int rc = ts_stop(&s, 60);
    GT_CHECK(rc == 0, "%s: exit status %d after SIGTERM", dev, rc);
    return text;
}

static void case_completion(void)
{
    if (access(gt_shared(GT_260K), R_OK) != 0) {
        printf("     (%s absent: skipped)\n", GT_260K);
        return;
    }
    char *g = complete_on("cuda", NULL), *c = complete_on("cpu", NULL);
    if (g && c)
        GT_CHECK(strcmp(g, c) == 0, "texts differ:\ncuda: %s\ncpu:  %s", g, c);
    free(g);
    free(c);
}

static void case_config_key(void)
{
    if (access(gt_shared(GT_260K), R_OK) != 0)
        return;
    char path[] = "/tmp/lkq_gpu_server_XXXXXX";
    int fd = mkstemp(path);
    GT_CHECK(fd >= 0, "mkstemp");
    if (fd < 0)
        return;
    const char *cfg = "device = cuda\nkv_cache = fp16\nctx_size = 256\nmax_seqs = 2\n"
                      "chunk_size = 64\nblock_tokens = 32\n";
    GT_CHECK(write(fd, cfg, strlen(cfg)) == (ssize_t)strlen(cfg), "write");
    close(fd);
    char *t = complete_on("cuda (config)", path);
    free(t);
    FILE *f = fopen(path, "w");
    if (f) {
        fputs("device = tpu\n", f);
        fclose(f);
    }
    char out[4096], extra[256];
    snprintf(extra, sizeof extra, "--config %s", path);
    int st = run_expect_fail(extra, out, sizeof out);
    GT_CHECK(st != 0 && st < 1000 && strstr(out, "--device 'tpu'"),
             "device = tpu: exit %d, output: %s", st, out);
    unlink(path);
}

int main(void)
{
    char why[256] = "";
    if (kcu_device_count(why, sizeof why) <= 0) {
        /* no device: --device cuda must be a clean startup error */
        if (access(gt_shared(GT_260K), R_OK) == 0) {
            char out[4096];
            int st = run_expect_fail("--device cuda", out, sizeof out);
            int lines = 0;
            for (const char *p = out; *p; p++)
                lines += *p == '\n';
            if (!(st >= 1 && st < 128 && strstr(out, "--device cuda:") && lines == 1)) {
                fprintf(stderr, "FAIL: --device cuda without a device: exit %d, output:\n%s",
                        st, out);
                return 1;
            }
            printf("ok   no device: --device cuda exits %d with: %s", st, out);
        }
    }
    gt_begin("test_gpu_server");
    gt_case("completion", case_completion);
    gt_case("config_key", case_config_key);
    return gt_end();
}
