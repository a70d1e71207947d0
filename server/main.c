/*
 * main.c - livekvq-server: loads the model, starts the engine thread and
 * the HTTP front end, and shuts down gracefully on SIGTERM/SIGINT (stop
 * admitting, let running requests finish for up to --shutdown-grace
 * seconds, fail the rest with 503, then exit 0). A second signal skips the
 * grace period.
 *
 * Options come from the command line and an optional --config file of
 * "key = value" lines (server keys and every KV cache knob); the command
 * line wins.
 *
 * Threading: signals are blocked in every thread and taken by sigwait on
 * the main thread.
 */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "config/kvq_config.h"
#include "engine/backend/backend.h"
#include "engine/util/log.h"
#include "engine/model/model.h"
#include "engine/sched/scheduler.h"
#include "server/http.h"

typedef struct {
    const char *model, *tokenizer, *alias, *config;
    char host[64];
    int port;
    int threads, http_threads;
    int n_ctx, max_seqs, max_seqs_per_req, max_queue, max_batch, max_n, max_prompt_tokens;
    int prefix_cache;
    char *api_key, *metrics_key;
    double read_timeout_s;
    size_t max_body;
    double grace_s;
    bk_device device;
    cfg_kv kv;
} srv_opts;

static void usage(FILE *f)
{
    fprintf(f,
        "usage: livekvq-server -m MODEL [options] [cache knobs]\n"
        "\n"
        "OpenAI-compatible HTTP server (POST /v1/completions, /v1/chat/completions,\n"
        "/tokenize, /detokenize; GET /v1/models, /health, /metrics) with continuous\n"
        "batching over chunked prefill and the LiveKVQuant-P KV cache.\n"
        "\n"
        "  -m, --model PATH          GGUF or llama2.c model (required)\n"
        "      --tokenizer PATH      tokenizer for a llama2.c model\n"
        "      --host ADDR           bind address (default 127.0.0.1)\n"
        "      --port N              port (default 8080; 0 = any free port)\n"
        "      --device cpu|cuda     where the model runs and the KV cache lives\n"
        "                            (default cpu; cuda: GPU 0, needs a CUDA build)\n"
        "  -t, --threads N           compute threads (default: online CPUs)\n"
        "      --http-threads N      HTTP worker threads (default 4)\n"
        "  -c, --ctx-size N          positions per sequence (default: the model's, max 8192)\n"
        "      --max-seqs N          sequences running at once (default 16)\n"
        "      --max-seqs-per-request N  sequences one request may run at once\n"
        "                            (default max-seqs - max-seqs/4: room for others)\n"
        "      --max-queue N         waiting sequences before 429 (default 64)\n"
        "      --prefix-cache N      prompt prefixes kept for reuse (default 128; 0: off;\n"
        "                            a request opts out with \"cache_prompt\": false)\n"
        "      --max-batch N         tokens per step (default chunk_size + max_seqs)\n"
        "      --max-n N             choices per request (default 16)\n"
        "      --max-prompt-tokens N prompt limit (default ctx-size - 1)\n"
        "      --max-body BYTES      request body limit (default 8388608)\n"
        "      --api-key KEY         require 'Authorization: Bearer KEY' on /v1/*,\n"
        "                            /tokenize, /detokenize (or $LKQ_API_KEY;\n"
        "                            --api-key-file PATH); /health stays open\n"
        "      --metrics-key KEY     require 'Authorization: Bearer KEY' on /metrics\n"
        "                            (or $LKQ_METRICS_KEY; --metrics-key-file PATH;\n"
        "                            default: /metrics is open)\n"
        "      --read-timeout S      a request's headers and body must arrive within S\n"
        "                            seconds of the connection opening or the previous\n"
        "                            answer (default 30; answers are never cut)\n"
        "      --served-model-name NAME  model id in the API (default: file name)\n"
        "      --shutdown-grace S    seconds running requests get at SIGTERM (default 30)\n"
        "      --log-level L         debug|info|warn|error\n"
        "      --config FILE         'key = value' lines: the options above without\n"
        "                            dashes (host, port, threads, ...) and cache knobs\n"
        "Cache knobs (as for livekvq perplexity):\n"
        "      --kv-cache fp16|int2|int3|int4|int8 (default int4)  --k-bits N --v-bits N\n"
        "                            (2|3|4|8, K and V apart)\n"
        "      --kv-budget BYTES|Nt  (0 = fit max-seqs sequences of ctx-size)\n"
        "      --chunk-size --block-tokens --warmup-chunks --ema-decay --ema-clip\n"
        "      --clip-quantile --v-group --outlier-budget --sink-tokens\n"
        "      --keep-warmup-fp16 --k-quant\n"
        "      --window-kv fp16|int2|int3|int4|int8  sliding-window layers (Gemma-3):\n"
        "                            FP16 pages or LiveKVQuant-P with codes of that\n"
        "                            width (default fp16)\n"
        "      --window-clip-quantile A|auto  quantized window layers' clip_quantile\n"
        "                            (auto: 0 at int8, else --clip-quantile)\n"
        "      --kv-rotate auto|0|1|2  Walsh-Hadamard rotation of K (1) or K and V (2)\n"
        "                            per head before the cache (default auto: 2 on a\n"
        "                            power-of-two head_dim with a quantized mode, else 0)\n"
        "      --kv-modes fp16,int4,int3  modes requests may pick with \"kv_cache\"\n"
        "                            (fp16, int2, int3, int4, int8, kNvM; one shared pool\n"
        "                            holds them all and memory moves between them;\n"
        "                            --kv-cache is the default; all = fp16,int8,int4,int3,\n"
        "                            int2,k8v4,k4v2,k4v3,k3v2). Default: --kv-cache only\n");
}

static int parse_long(const char *name, const char *v, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || end == v || *end || x < lo || x > hi) {
        fprintf(stderr, "livekvq-server: %s '%s' must be an integer in [%ld, %ld]\n", name, v,
                lo, hi);
        return -1;
    }
    *out = x;
    return 0;
}

/* Applies one option given as key (no leading dashes, '-' or '_') and
 * value. Returns 0, or -1 with a message. */
static int set_opt(srv_opts *o, const char *key, const char *val)
{
    char k[64];
    snprintf(k, sizeof k, "%s", key);
    for (char *p = k; *p; p++)
        if (*p == '-')
            *p = '_';
    long v;
    if (!strcmp(k, "m") || !strcmp(k, "model")) {
        o->model = strdup(val);
    } else if (!strcmp(k, "tokenizer")) {
        o->tokenizer = strdup(val);
    } else if (!strcmp(k, "host")) {
        snprintf(o->host, sizeof o->host, "%s", val);
    } else if (!strcmp(k, "port")) {
        if (parse_long("--port", val, 0, 65535, &v) < 0) return -1;
        o->port = (int)v;
    } else if (!strcmp(k, "device")) {
        if (bk_parse_device(val, &o->device) < 0) {
            fprintf(stderr, "livekvq-server: --device '%s': cpu|cuda\n", val);
            return -1;
        }
    } else if (!strcmp(k, "t") || !strcmp(k, "threads")) {
        if (parse_long("--threads", val, 1, 256, &v) < 0) return -1;
        o->threads = (int)v;
    } else if (!strcmp(k, "http_threads")) {
        if (parse_long("--http-threads", val, 1, 256, &v) < 0) return -1;
        o->http_threads = (int)v;
    } else if (!strcmp(k, "c") || !strcmp(k, "ctx_size")) {
        if (parse_long("--ctx-size", val, 16, 1 << 20, &v) < 0) return -1;
        o->n_ctx = (int)v;
    } else if (!strcmp(k, "max_seqs")) {
        if (parse_long("--max-seqs", val, 1, 1024, &v) < 0) return -1;
        o->max_seqs = (int)v;
    } else if (!strcmp(k, "prefix_cache")) {
        if (parse_long("--prefix-cache", val, 0, 1 << 20, &v) < 0) return -1;
        o->prefix_cache = (int)v;
    } else if (!strcmp(k, "max_seqs_per_request") || !strcmp(k, "max_seqs_per_req")) {
        if (parse_long("--max-seqs-per-request", val, 1, 1024, &v) < 0) return -1;
        o->max_seqs_per_req = (int)v;
    } else if (!strcmp(k, "read_timeout")) {
        if (parse_long("--read-timeout", val, 1, 86400, &v) < 0) return -1;
        o->read_timeout_s = (double)v;
    } else if (!strcmp(k, "max_queue")) {
        if (parse_long("--max-queue", val, 1, 1 << 20, &v) < 0) return -1;
        o->max_queue = (int)v;
    } else if (!strcmp(k, "max_batch")) {
        if (parse_long("--max-batch", val, 1, 1 << 16, &v) < 0) return -1;
        o->max_batch = (int)v;
    } else if (!strcmp(k, "max_n")) {
        if (parse_long("--max-n", val, 1, SCHED_MAX_N, &v) < 0) return -1;
        o->max_n = (int)v;
    } else if (!strcmp(k, "max_prompt_tokens")) {
        if (parse_long("--max-prompt-tokens", val, 1, 1 << 20, &v) < 0) return -1;
        o->max_prompt_tokens = (int)v;
    } else if (!strcmp(k, "max_body")) {
        if (parse_long("--max-body", val, 1024, LONG_MAX, &v) < 0) return -1;
        o->max_body = (size_t)v;
    } else if (!strcmp(k, "api_key") || !strcmp(k, "metrics_key")) {
        char **dst = !strcmp(k, "api_key") ? &o->api_key : &o->metrics_key;
        free(*dst);
        *dst = strdup(val);
    } else if (!strcmp(k, "api_key_file") || !strcmp(k, "metrics_key_file")) {
        int api = !strcmp(k, "api_key_file");
        FILE *f = fopen(val, "r");
        char buf[512] = "";
        if (!f || !fgets(buf, sizeof buf, f)) {
            fprintf(stderr, "livekvq-server: cannot read the %s key from '%s'\n",
                    api ? "API" : "metrics", val);
            if (f)
                fclose(f);
            return -1;
        }
        fclose(f);
        buf[strcspn(buf, "\r\n")] = '\0';
        char **dst = api ? &o->api_key : &o->metrics_key;
        free(*dst);
        *dst = strdup(buf);
    } else if (!strcmp(k, "served_model_name") || !strcmp(k, "alias")) {
        o->alias = strdup(val);
    } else if (!strcmp(k, "shutdown_grace")) {
        if (parse_long("--shutdown-grace", val, 0, 86400, &v) < 0) return -1;
        o->grace_s = (double)v;
    } else if (!strcmp(k, "log_level")) {
        log_level lv;
        if (log_parse_level(val, &lv) < 0) {
            fprintf(stderr, "livekvq-server: --log-level '%s': debug|info|warn|error|off\n", val);
            return -1;
        }
        log_set_level(lv);
    } else if (cfg_kv_is_key(k)) {
        char err[256];
        if (cfg_kv_set(&o->kv, k, val, err, sizeof err) < 0) {
            fprintf(stderr, "livekvq-server: %s\n", err);
            return -1;
        }
    } else {
        fprintf(stderr, "livekvq-server: unknown option '%s' (see --help)\n", key);
        return -1;
    }
    return 0;
}

static int load_config(srv_opts *o, const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "livekvq-server: cannot open config '%s': %s\n", path, strerror(errno));
        return -1;
    }
    char line[1024];
    int ln = 0, rc = 0;
    while (rc == 0 && fgets(line, sizeof line, f)) {
        ln++;
        char *p = line + strspn(line, " \t");
        p[strcspn(p, "#\r\n")] = '\0';
        if (!*p)
            continue;
        char *eq = strchr(p, '=');
        if (!eq) {
            fprintf(stderr, "livekvq-server: %s:%d: expected 'key = value'\n", path, ln);
            rc = -1;
            break;
        }
        *eq = '\0';
        char *key = p, *val = eq + 1;
        for (char *e = key + strlen(key); e > key && (e[-1] == ' ' || e[-1] == '\t');)
            *--e = '\0';
        val += strspn(val, " \t");
        for (char *e = val + strlen(val); e > val && (e[-1] == ' ' || e[-1] == '\t');)
            *--e = '\0';
        if (set_opt(o, key, val) < 0) {
            fprintf(stderr, "livekvq-server: (in %s line %d)\n", path, ln);
            rc = -1;
        }
    }
    fclose(f);
    return rc;
}

/* Returns 0, 1 for --help, -1 on error. */
static int parse_args(int argc, char **argv, srv_opts *o)
{
    memset(o, 0, sizeof *o);
    snprintf(o->host, sizeof o->host, "127.0.0.1");
    o->port = 8080;
    o->http_threads = 4;
    o->max_seqs = 16;
    o->max_queue = 64;
    o->max_n = SCHED_MAX_N;
    o->prefix_cache = sched_default_params().prefix_nodes;
    o->max_body = 8u << 20;
    o->grace_s = 30;
    o->kv = cfg_kv_default();
    const char *env_key = getenv("LKQ_API_KEY");
    if (env_key && *env_key)
        o->api_key = strdup(env_key);
    env_key = getenv("LKQ_METRICS_KEY");
    if (env_key && *env_key)
        o->metrics_key = strdup(env_key);
    for (int i = 1; i < argc; i++) /* the config file first: flags override it */
        if (!strcmp(argv[i], "--config") && i + 1 < argc && load_config(o, argv[i + 1]) < 0)
            return -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help"))
            return 1;
        if (a[0] != '-' || !a[1]) {
            fprintf(stderr, "livekvq-server: unexpected argument '%s' (see --help)\n", a);
            return -1;
        }
        const char *key = a + (a[1] == '-' ? 2 : 1);
        char kbuf[64];
        const char *val = NULL;
        const char *eq = strchr(key, '=');
        if (eq) {
            snprintf(kbuf, sizeof kbuf, "%.*s", (int)(eq - key), key);
            key = kbuf;
            val = eq + 1;
        } else {
            if (i + 1 >= argc) {
                fprintf(stderr, "livekvq-server: option '%s' needs a value\n", a);
                return -1;
            }
            val = argv[++i];
        }
        if (!strcmp(key, "config"))
            continue;
        if (set_opt(o, key, val) < 0)
            return -1;
    }
    if (!o->model) {
        fprintf(stderr, "livekvq-server: -m MODEL is required (see --help)\n");
        return -1;
    }
    char err[256];
    if (cfg_kv_validate(&o->kv, err, sizeof err) < 0) {
        fprintf(stderr, "livekvq-server: %s\n", err);
        return -1;
    }
    return 0;
}

/* The model id: --served-model-name, else the file name without .gguf/.bin. */
static void model_id(const srv_opts *o, char *out, size_t cap)
{
    if (o->alias) {
        snprintf(out, cap, "%s", o->alias);
        return;
    }
    const char *base = strrchr(o->model, '/');
    base = base ? base + 1 : o->model;
    snprintf(out, cap, "%s", base);
    char *dot = strrchr(out, '.');
    if (dot && (!strcmp(dot, ".gguf") || !strcmp(dot, ".bin")))
        *dot = '\0';
}

static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    srv_opts o;
    int pr = parse_args(argc, argv, &o);
    if (pr != 0) {
        usage(pr > 0 ? stdout : stderr);
        return pr > 0 ? 0 : 2;
    }
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);
    srand((unsigned)time(NULL) ^ (unsigned)getpid());

    if (o.device == BK_DEVICE_CUDA && !bk_cuda_built()) {
        fprintf(stderr, "livekvq-server: --device cuda: this build has no CUDA backend "
                        "(configure with -Dcuda=enabled where the CUDA toolkit is installed)\n");
        return 1;
    }
    char err[512];
    double t0 = mono_s();
    mdl_model *m = NULL;
    if (mdl_load(o.model, o.tokenizer, &m, err, sizeof err) < 0) {
        fprintf(stderr, "livekvq-server: %s\n", err);
        return 1;
    }
    sched_params sp = sched_default_params();
    sp.n_ctx = o.n_ctx;
    sp.max_seqs = o.max_seqs;
    sp.max_seqs_per_req = o.max_seqs_per_req;
    sp.prefix_nodes = o.prefix_cache;
    sp.max_queue = o.max_queue;
    sp.max_batch = o.max_batch;
    sp.n_threads = o.threads;
    sp.kv = o.kv;
    sp.device = o.device;
    sched *s = NULL;
    if (sched_create(m, &sp, &s, err, sizeof err) < 0) {
        fprintf(stderr, "livekvq-server: %s%s\n",
                o.device == BK_DEVICE_CUDA ? "--device cuda: " : "", err);
        mdl_free(m);
        return 1;
    }
    char id[256];
    model_id(&o, id, sizeof id);
    http_config hc = {.host = o.host,
                      .port = o.port,
                      .http_threads = o.http_threads,
                      .api_key = o.api_key,
                      .metrics_key = o.metrics_key,
                      .read_timeout_s = o.read_timeout_s,
                      .max_body = o.max_body,
                      .max_n = o.max_n,
                      .max_prompt_tokens = o.max_prompt_tokens,
                      .model_id = id,
                      .max_connections = 0};
    http_server *h = NULL;
    if (http_start(&hc, m, s, &h, err, sizeof err) < 0) {
        fprintf(stderr, "livekvq-server: %s\n", err);
        sched_destroy(s);
        mdl_free(m);
        return 1;
    }
    sched_metrics sm;
    sched_get_metrics(s, &sm);
    log_info("model %s (%s): %d layers, ctx %d per sequence, %d sequences; KV cache %s, "
             "pool %.1f MiB; device %s; loaded in %.2f s",
             id, m->format, m->hp.n_layers, sched_n_ctx(s), o.max_seqs,
             cfg_kv_mode_name(&o.kv),
             (double)sm.kv_budget_bytes / (1024.0 * 1024.0), sched_describe(s), mono_s() - t0);
    /* what the pool holds, so an operator knows before the first request */
    sched_capacity cap;
    sched_get_capacity(s, &cap);
    if (cap.kv_modes & (cap.kv_modes - 1)) {
        /* one shared pool: what it holds when all sequences are of one mode */
        char per[512];
        size_t at = 0;
        per[0] = 0;
        for (int m = 0; m < CFG_KV_MODES && at < sizeof per; m++)
            if ((cap.kv_modes >> m) & 1u) {
                int w = snprintf(per + at, sizeof per - at, "%s%lld in %s", at ? ", " : "",
                                 (long long)cap.seqs_mode[m], cfg_kv_mode_str(m));
                at += w > 0 ? (size_t)w : 0;
            }
        log_info("KV pool %.1f MiB, shared by the KV modes: holds sequences of %d tokens: %s "
                 "(any mix in between: memory moves between modes; \"kv_cache\" per "
                 "request, default %s); one sequence up to %d tokens; %d slots, at most %d "
                 "per request; queue %d",
                 (double)cap.pool_bytes / (1024.0 * 1024.0), cap.n_ctx, per,
                 cfg_kv_mode_str(cap.kv_mode), cap.max_seq_tokens, cap.max_seqs,
                 cap.max_seqs_per_req, cap.max_queue);
    } else if (cap.kv_int4)
        log_info("KV pool %.1f MiB holds %lld sequences of %d tokens in int4 (the same bytes "
                 "would hold %lld in fp16); one sequence up to %d tokens; %d slots, at most %d "
                 "per request; queue %d", (double)cap.pool_bytes / (1024.0 * 1024.0),
                 (long long)cap.seqs_int4, cap.n_ctx, (long long)cap.seqs_fp16,
                 cap.max_seq_tokens, cap.max_seqs, cap.max_seqs_per_req, cap.max_queue);
    else
        log_info("KV pool %.1f MiB holds %lld sequences of %d tokens in fp16 (--kv-cache int4 "
                 "holds more: its startup line says how many); one sequence up to %d tokens; "
                 "%d slots, at most %d per request; queue %d",
                 (double)cap.pool_bytes / (1024.0 * 1024.0), (long long)cap.seqs_fp16,
                 cap.n_ctx, cap.max_seq_tokens, cap.max_seqs, cap.max_seqs_per_req,
                 cap.max_queue);
    if (o.api_key && !o.metrics_key)
        log_info("/metrics is open (it shows the model name and KV statistics): "
                 "--metrics-key KEY protects it");
    /* the line scripts and tests wait for */
    printf("livekvq-server: listening on http://%s:%d\n", o.host, http_port(h));
    fflush(stdout);

    int sig = 0;
    sigwait(&sigs, &sig);
    log_info("signal %d: draining (no new requests; up to %.0f s for running ones)", sig,
             o.grace_s);
    http_set_draining(h);
    sched_stop_admitting(s);
    double deadline = mono_s() + o.grace_s;
    struct timespec zero = {0, 0};
    while (sched_n_active(s) > 0 && mono_s() < deadline) {
        struct timespec ts = {0, 50 * 1000 * 1000};
        siginfo_t si;
        if (sigtimedwait(&sigs, &si, &zero) > 0) {
            log_info("second signal: not waiting any longer");
            break;
        }
        nanosleep(&ts, NULL);
    }
    if (sched_n_active(s) > 0) {
        log_info("failing %d requests still running", sched_n_active(s));
        sched_fail_all(s, 503, "the server is shutting down");
    }
    /* let the connections deliver their last bytes */
    double until = mono_s() + 5.0;
    while (http_n_requests(h) > 0 && mono_s() < until) {
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    http_stop(h);
    sched_destroy(s);
    mdl_free(m);
    free(o.api_key);
    free(o.metrics_key);
    free((void *)o.model);
    free((void *)o.tokenizer);
    free((void *)o.alias);
    log_info("stopped");
    return 0;
}
