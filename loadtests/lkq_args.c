/*
 * lkq_args.c - command-line parsing and up-front refusals of the load
 * generator (see lkq_args.h). Threading: none (getopt state is global).
 */
#include "loadtests/lkq_args.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

void lkq_args_usage(FILE *f)
{
    fprintf(f,
        "usage: lkq_load [--url URL] (--concurrency LIST | --rate LIST) (--duration S | --requests N) [options]\n"
        "\n"
        "Streams completions from an OpenAI-compatible server (livekvq-server) and\n"
        "reports, per load level, TTFT / inter-token / end-to-end latency p50 p90\n"
        "p99, throughput, failures by HTTP status and by kind, and the server's KV\n"
        "and queue gauges scraped from /metrics during the level.\n"
        "\n"
        "Load:\n"
        "  -u, --url URL             server base URL (default http://127.0.0.1:8080)\n"
        "  -c, --concurrency LIST    closed loop: N requests always in flight, one level\n"
        "                            per value, e.g. 1,2,4,8 (strictly increasing)\n"
        "  -r, --rate LIST           open loop: Poisson arrivals at R requests/s per level\n"
        "      --max-inflight N      open loop: arrivals beyond N in flight are dropped\n"
        "                            and counted, not as failures (default 256)\n"
        "  -d, --duration S          seconds per level (no new request after S)\n"
        "  -n, --requests N          requests per level (whichever bound comes first)\n"
        "      --pause S             idle seconds between levels (default 1)\n"
        "      --seed N              arrivals and prompt offsets (default 1)\n"
        "      --timeout S           per-request limit (default 600)\n"
        "      --keep-going          run every level even after real failures\n"
        "      --cutoff S            end each level after S seconds, cancelling what is\n"
        "                            still in flight (counted as cancelled, not failed)\n"
        "      --until-saturated S   capacity probe (needs --scrape-metrics): end the level,\n"
        "                            cancelling what is in flight, once for S seconds\n"
        "                            requests have waited while every request the server\n"
        "                            runs was past its prefill: it holds all it can\n"
        "Requests:\n"
        "  -p, --prompt-tokens N     approximate prompt length (default 256), sliced from\n"
        "                            the corpus at a different offset per request\n"
        "      --chars-per-token F   corpus bytes per token (default 3.8: SmolLM2 BPE on\n"
        "                            Moby-Dick; the usage chunk reports the real count)\n"
        "      --prompt-file PATH    corpus (default $LKQ_SHARED/data/moby-dick.txt,\n"
        "                            else ../shared/data/moby-dick.txt)\n"
        "  -m, --max-tokens N        tokens to generate per request (default 32)\n"
        "      --temperature T       (default 0)\n"
        "      --ignore-eos          generate exactly --max-tokens (vLLM's ignore_eos)\n"
        "      --kv-cache MODE       send \"kv_cache\": MODE (fp16, int4, int3, k4v2 ...: a KV\n"
        "                            mode for these requests; default: the server's)\n"
        "      --chat                use /v1/chat/completions (default /v1/completions)\n"
        "      --model NAME          model field (default: first id of /v1/models)\n"
        "      --api-key KEY         bearer token (or $LKQ_API_KEY)\n"
        "Server metrics:\n"
        "      --scrape-metrics URL  scrape this /metrics during each level ('auto' =\n"
        "                            URL/metrics)\n"
        "      --scrape-interval S   seconds between scrapes (default 1)\n"
        "      --scrape-log PATH     append every scrape as a CSV row (label, level, t,\n"
        "                            running, waiting, kv_usage, kv_bytes, prompt_tokens)\n"
        "Output:\n"
        "      --label NAME          tag every row (e.g. fp16, int4)\n"
        "      --csv PATH            append one CSV row per level (header when new)\n"
        "      --json PATH           append one JSON object per level and line\n"
        "  -q, --quiet               no progress lines on stderr\n"
        "      --allow-remote        permit a non-loopback URL\n"
        "\n"
        "Exit status: 0 every request succeeded, was refused with 429/503 or was\n"
        "dropped at --max-inflight; 1 the server is unreachable or not ready, or an\n"
        "I/O error; 2 bad arguments; 3 some request failed for another reason (see\n"
        "the errors column).\n");
}

/* Strict integer: whole string, in [lo, hi]. */
static int parse_i64(const char *s, long long lo, long long hi, long long *out)
{
    if (!s || !*s)
        return -1;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

/* Strict finite double: whole string, in [lo, hi]. */
static int parse_dbl(const char *s, double lo, double hi, double *out)
{
    if (!s || !*s)
        return -1;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || end == s || !isfinite(v) || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

/* Splits a comma-separated list of at most max strictly increasing numbers
 * in [lo, hi] (integers when is_int; positive when !is_int) into out.
 * Returns the count or -1 with a one-line reason. */
static int parse_list(const char *s, double *out, int max, int is_int, double lo, double hi,
                      char *err, size_t errlen)
{
    char tok[64];
    int n = 0;
    const char *p = s;
    if (!s || !*s) {
        snprintf(err, errlen, "empty list");
        return -1;
    }
    for (;;) {
        const char *c = strchr(p, ',');
        size_t len = c ? (size_t)(c - p) : strlen(p);
        if (len == 0 || len >= sizeof tok) {
            snprintf(err, errlen, "malformed list '%s' (empty or overlong item)", s);
            return -1;
        }
        memcpy(tok, p, len);
        tok[len] = '\0';
        double v;
        long long iv;
        if (is_int) {
            if (parse_i64(tok, (long long)lo, (long long)hi, &iv) != 0) {
                snprintf(err, errlen, "'%s' in '%s' is not an integer in [%.0f, %.0f]", tok, s, lo, hi);
                return -1;
            }
            v = (double)iv;
        } else if (parse_dbl(tok, lo, hi, &v) != 0 || v <= 0) {
            snprintf(err, errlen, "'%s' in '%s' is not a number in (0, %g]", tok, s, hi);
            return -1;
        }
        if (n > 0 && v <= out[n - 1]) {
            snprintf(err, errlen, "list '%s' must strictly increase", s);
            return -1;
        }
        if (n == max) {
            snprintf(err, errlen, "list '%s' has more than %d items", s, max);
            return -1;
        }
        out[n++] = v;
        if (!c)
            break;
        p = c + 1;
    }
    return n;
}

int lkq_parse_int_list(const char *s, int *out, int max, int lo, int hi, char *err, size_t errlen)
{
    double v[LKQ_MAX_LEVELS];
    if (max > LKQ_MAX_LEVELS)
        max = LKQ_MAX_LEVELS;
    int n = parse_list(s, v, max, 1, lo, hi, err, errlen);
    for (int i = 0; i < n; i++)
        out[i] = (int)v[i];
    return n;
}

int lkq_parse_double_list(const char *s, double *out, int max, double lo, double hi,
                          char *err, size_t errlen)
{
    return parse_list(s, out, max, 0, lo, hi, err, errlen);
}

int lkq_url_is_loopback(const char *url)
{
    const char *p = url;
    if (strncasecmp(p, "http://", 7) == 0)
        p += 7;
    else if (strncasecmp(p, "https://", 8) == 0)
        p += 8;
    else
        return 0;
    const char *at = strchr(p, '@'); /* user:pass@host */
    const char *slash = strchr(p, '/');
    if (at && (!slash || at < slash))
        p = at + 1;
    if (strncmp(p, "[::1]", 5) == 0)
        return p[5] == '\0' || p[5] == ':' || p[5] == '/';
    size_t hl = strcspn(p, ":/");
    if (hl == 9 && strncasecmp(p, "localhost", 9) == 0)
        return 1;
    if (hl >= 4 && strncmp(p, "127.", 4) == 0) {
        for (size_t i = 4; i < hl; i++)
            if (!((p[i] >= '0' && p[i] <= '9') || p[i] == '.'))
                return 0;
        return 1;
    }
    return 0;
}

/* Copies a base URL without trailing slashes; -1 when it does not fit or is
 * not http(s). */
static int set_url(char *dst, size_t cap, const char *src)
{
    if (strncasecmp(src, "http://", 7) != 0 && strncasecmp(src, "https://", 8) != 0)
        return -1;
    size_t n = strlen(src);
    while (n > 0 && src[n - 1] == '/')
        n--;
    if (n + 1 > cap || n <= 8)
        return -1;
    memcpy(dst, src, n);
    dst[n] = '\0';
    return 0;
}

enum {
    OPT_MAX_INFLIGHT = 256, OPT_PAUSE, OPT_SEED, OPT_TIMEOUT, OPT_KEEP_GOING,
    OPT_CPT, OPT_PROMPT_FILE, OPT_TEMP, OPT_CHAT, OPT_MODEL, OPT_API_KEY,
    OPT_SCRAPE, OPT_SCRAPE_INT, OPT_LABEL, OPT_CSV, OPT_JSON, OPT_REMOTE,
    OPT_CUTOFF, OPT_SATURATED, OPT_IGNORE_EOS, OPT_SCRAPE_LOG, OPT_KV_CACHE,
};

static const struct option long_opts[] = {
    {"url", required_argument, NULL, 'u'},
    {"concurrency", required_argument, NULL, 'c'},
    {"rate", required_argument, NULL, 'r'},
    {"duration", required_argument, NULL, 'd'},
    {"requests", required_argument, NULL, 'n'},
    {"prompt-tokens", required_argument, NULL, 'p'},
    {"max-tokens", required_argument, NULL, 'm'},
    {"quiet", no_argument, NULL, 'q'},
    {"help", no_argument, NULL, 'h'},
    {"max-inflight", required_argument, NULL, OPT_MAX_INFLIGHT},
    {"pause", required_argument, NULL, OPT_PAUSE},
    {"seed", required_argument, NULL, OPT_SEED},
    {"timeout", required_argument, NULL, OPT_TIMEOUT},
    {"keep-going", no_argument, NULL, OPT_KEEP_GOING},
    {"chars-per-token", required_argument, NULL, OPT_CPT},
    {"prompt-file", required_argument, NULL, OPT_PROMPT_FILE},
    {"temperature", required_argument, NULL, OPT_TEMP},
    {"chat", no_argument, NULL, OPT_CHAT},
    {"model", required_argument, NULL, OPT_MODEL},
    {"api-key", required_argument, NULL, OPT_API_KEY},
    {"scrape-metrics", required_argument, NULL, OPT_SCRAPE},
    {"scrape-interval", required_argument, NULL, OPT_SCRAPE_INT},
    {"label", required_argument, NULL, OPT_LABEL},
    {"csv", required_argument, NULL, OPT_CSV},
    {"json", required_argument, NULL, OPT_JSON},
    {"allow-remote", no_argument, NULL, OPT_REMOTE},
    {"cutoff", required_argument, NULL, OPT_CUTOFF},
    {"until-saturated", required_argument, NULL, OPT_SATURATED},
    {"ignore-eos", no_argument, NULL, OPT_IGNORE_EOS},
    {"scrape-log", required_argument, NULL, OPT_SCRAPE_LOG},
    {"kv-cache", required_argument, NULL, OPT_KV_CACHE},
    {NULL, 0, NULL, 0},
};

/* Name of the option in argv[idx] for messages ("--rate", "-c"). */
static const char *opt_name(int c, char *buf, size_t len)
{
    for (const struct option *o = long_opts; o->name; o++)
        if (o->val == c) {
            snprintf(buf, len, "--%s", o->name);
            return buf;
        }
    snprintf(buf, len, "-%c", c);
    return buf;
}

int lkq_args_parse(int argc, char **argv, lkq_args *a, char *err, size_t errlen)
{
    memset(a, 0, sizeof *a);
    snprintf(a->url, sizeof a->url, "http://127.0.0.1:8080");
    a->scrape_interval = 1.0;
    a->max_inflight = 256;
    a->prompt_tokens = 256;
    a->chars_per_token = 3.8;
    a->max_tokens = 32;
    a->seed = 1;
    a->timeout = 600;
    a->pause = 1;
    a->label = "";
    a->api_key = getenv("LKQ_API_KEY");
    if (a->api_key && !*a->api_key)
        a->api_key = NULL;
    const char *conc = NULL, *rate = NULL, *scrape = NULL;
    int have_duration = 0, have_requests = 0;
    char nb[48];

    optind = 0; /* glibc: full re-initialization, so parsing can be repeated */
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, "+:u:c:r:d:n:p:m:qh", long_opts, NULL)) != -1) {
        long long iv;
        double dv;
        switch (c) {
        case 'u':
            if (set_url(a->url, sizeof a->url, optarg) != 0) {
                snprintf(err, errlen, "--url '%s' is not an http(s):// URL", optarg);
                return -1;
            }
            break;
        case 'c': conc = optarg; break;
        case 'r': rate = optarg; break;
        case 'd':
            if (parse_dbl(optarg, 0, LKQ_MAX_DURATION_S, &dv) != 0 || dv <= 0) {
                snprintf(err, errlen, "--duration '%s' must be seconds in (0, %g]", optarg,
                         LKQ_MAX_DURATION_S);
                return -1;
            }
            a->duration = dv;
            have_duration = 1;
            break;
        case 'n':
            if (parse_i64(optarg, 1, LKQ_MAX_REQUESTS, &iv) != 0) {
                snprintf(err, errlen, "--requests '%s' must be an integer in [1, %d]", optarg,
                         LKQ_MAX_REQUESTS);
                return -1;
            }
            a->requests = iv;
            have_requests = 1;
            break;
        case 'p':
            if (parse_i64(optarg, 1, 1000000, &iv) != 0) {
                snprintf(err, errlen, "--prompt-tokens '%s' must be an integer in [1, 1000000]", optarg);
                return -1;
            }
            a->prompt_tokens = (int)iv;
            break;
        case 'm':
            if (parse_i64(optarg, 1, 1000000, &iv) != 0) {
                snprintf(err, errlen, "--max-tokens '%s' must be an integer in [1, 1000000]", optarg);
                return -1;
            }
            a->max_tokens = (int)iv;
            break;
        case 'q': a->quiet = 1; break;
        case 'h':
            lkq_args_usage(stdout);
            return 1;
        case OPT_MAX_INFLIGHT:
            if (parse_i64(optarg, 1, LKQ_MAX_CONCURRENCY, &iv) != 0) {
                snprintf(err, errlen, "--max-inflight '%s' must be an integer in [1, %d]", optarg,
                         LKQ_MAX_CONCURRENCY);
                return -1;
            }
            a->max_inflight = (int)iv;
            break;
        case OPT_PAUSE:
            if (parse_dbl(optarg, 0, 3600, &a->pause) != 0) {
                snprintf(err, errlen, "--pause '%s' must be seconds in [0, 3600]", optarg);
                return -1;
            }
            break;
        case OPT_SEED:
            if (parse_i64(optarg, 0, INT64_MAX, &iv) != 0) {
                snprintf(err, errlen, "--seed '%s' must be a non-negative integer", optarg);
                return -1;
            }
            a->seed = (uint64_t)iv;
            break;
        case OPT_TIMEOUT:
            if (parse_dbl(optarg, 0.001, LKQ_MAX_DURATION_S, &a->timeout) != 0) {
                snprintf(err, errlen, "--timeout '%s' must be seconds in (0, %g]", optarg,
                         LKQ_MAX_DURATION_S);
                return -1;
            }
            break;
        case OPT_KEEP_GOING: a->keep_going = 1; break;
        case OPT_CPT:
            if (parse_dbl(optarg, 0.5, 64, &a->chars_per_token) != 0) {
                snprintf(err, errlen, "--chars-per-token '%s' must be in [0.5, 64]", optarg);
                return -1;
            }
            break;
        case OPT_PROMPT_FILE: a->prompt_file = optarg; break;
        case OPT_TEMP:
            if (parse_dbl(optarg, 0, 10, &a->temperature) != 0) {
                snprintf(err, errlen, "--temperature '%s' must be in [0, 10]", optarg);
                return -1;
            }
            break;
        case OPT_CHAT: a->chat = 1; break;
        case OPT_MODEL: a->model = optarg; break;
        case OPT_API_KEY: a->api_key = optarg; break;
        case OPT_SCRAPE: scrape = optarg; break;
        case OPT_SCRAPE_INT:
            if (parse_dbl(optarg, 0.05, 3600, &a->scrape_interval) != 0) {
                snprintf(err, errlen, "--scrape-interval '%s' must be seconds in [0.05, 3600]", optarg);
                return -1;
            }
            break;
        case OPT_LABEL:
            if (strlen(optarg) >= 64 || strpbrk(optarg, ",\"\n\r")) {
                snprintf(err, errlen, "--label must be under 64 characters without , \" or newlines");
                return -1;
            }
            a->label = optarg;
            break;
        case OPT_CSV: a->csv = optarg; break;
        case OPT_JSON: a->json = optarg; break;
        case OPT_REMOTE: a->allow_remote = 1; break;
        case OPT_CUTOFF:
            if (parse_dbl(optarg, 0, LKQ_MAX_DURATION_S, &a->cutoff) != 0 || a->cutoff <= 0) {
                snprintf(err, errlen, "--cutoff '%s' must be seconds in (0, %g]", optarg,
                         LKQ_MAX_DURATION_S);
                return -1;
            }
            break;
        case OPT_SATURATED:
            if (parse_dbl(optarg, 0, 3600, &a->until_saturated) != 0 || a->until_saturated <= 0) {
                snprintf(err, errlen, "--until-saturated '%s' must be seconds in (0, 3600]", optarg);
                return -1;
            }
            break;
        case OPT_IGNORE_EOS: a->ignore_eos = 1; break;
        case OPT_SCRAPE_LOG: a->scrape_log = optarg; break;
        case OPT_KV_CACHE: a->kv_cache = optarg; break;
        case ':':
            snprintf(err, errlen, "option %s needs a value", optopt ? opt_name(optopt, nb, sizeof nb)
                                                                    : argv[optind - 1]);
            return -1;
        default:
            if (optopt)
                snprintf(err, errlen, "unknown option '-%c' (see --help)", optopt);
            else
                snprintf(err, errlen, "unknown option '%s' (see --help)", argv[optind - 1]);
            return -1;
        }
    }
    if (optind < argc) {
        snprintf(err, errlen, "unexpected argument '%s' (see --help)", argv[optind]);
        return -1;
    }

    /* --- the sweep ------------------------------------------------------ */
    char lerr[200];
    if (conc && rate) {
        snprintf(err, errlen, "--concurrency (closed loop) and --rate (open loop) are exclusive");
        return -1;
    }
    if (rate) {
        a->open_loop = 1;
        a->n_levels = lkq_parse_double_list(rate, a->rate, LKQ_MAX_LEVELS, 0, 1e6, lerr, sizeof lerr);
        if (a->n_levels < 0) {
            snprintf(err, errlen, "--rate: %s", lerr);
            return -1;
        }
    } else {
        a->n_levels = lkq_parse_int_list(conc ? conc : "1", a->concurrency, LKQ_MAX_LEVELS, 1,
                                         LKQ_MAX_CONCURRENCY, lerr, sizeof lerr);
        if (a->n_levels < 0) {
            snprintf(err, errlen, "--concurrency: %s", lerr);
            return -1;
        }
    }

    /* --- budgets that cannot be met ---------------------------------------- */
    if (!have_duration && !have_requests) {
        snprintf(err, errlen, "no bound: give --duration S and/or --requests N per level");
        return -1;
    }
    if (!a->open_loop && have_requests) {
        int top = a->concurrency[a->n_levels - 1];
        if (a->requests < top) {
            snprintf(err, errlen,
                     "impossible budget: --requests %lld cannot keep concurrency %d busy",
                     (long long)a->requests, top);
            return -1;
        }
    }
    if (a->scrape_log && !scrape) {
        snprintf(err, errlen, "--scrape-log needs --scrape-metrics");
        return -1;
    }
    if (a->until_saturated > 0 && !scrape) {
        snprintf(err, errlen, "--until-saturated needs --scrape-metrics (it watches the server's gauges)");
        return -1;
    }
    if (a->cutoff > 0 && a->duration > a->cutoff) {
        snprintf(err, errlen, "impossible budget: --duration %g is longer than --cutoff %g",
                 a->duration, a->cutoff);
        return -1;
    }
    if (a->n_levels * (a->duration + a->pause) > LKQ_MAX_DURATION_S) {
        snprintf(err, errlen, "impossible budget: %d levels x %gs exceed %gs", a->n_levels,
                 a->duration + a->pause, LKQ_MAX_DURATION_S);
        return -1;
    }
    if (have_duration && a->timeout < 1e-3) {
        snprintf(err, errlen, "--timeout must be positive");
        return -1;
    }
    if ((double)a->prompt_tokens * a->chars_per_token > 1e9) {
        snprintf(err, errlen, "impossible budget: --prompt-tokens %d is too long", a->prompt_tokens);
        return -1;
    }

    /* --- where --------------------------------------------------------------- */
    if (!a->allow_remote && !lkq_url_is_loopback(a->url)) {
        snprintf(err, errlen, "--url %s is not a loopback address (add --allow-remote to load a remote server)",
                 a->url);
        return -1;
    }
    if (scrape) {
        if (strcmp(scrape, "auto") == 0) {
            if (snprintf(a->metrics_url, sizeof a->metrics_url, "%s/metrics", a->url) >=
                (int)sizeof a->metrics_url) {
                snprintf(err, errlen, "--scrape-metrics: URL too long");
                return -1;
            }
        } else if (set_url(a->metrics_url, sizeof a->metrics_url, scrape) != 0) {
            snprintf(err, errlen, "--scrape-metrics '%s' is not an http(s):// URL", scrape);
            return -1;
        } else if (!a->allow_remote && !lkq_url_is_loopback(a->metrics_url)) {
            snprintf(err, errlen, "--scrape-metrics %s is not a loopback address (add --allow-remote)",
                     a->metrics_url);
            return -1;
        }
    }
    return 0;
}
