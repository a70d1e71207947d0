/*
 * livekvq.c - the command-line front end: `livekvq <command> [options]`.
 *   generate  text generation from a prompt (-p, -f FILE, or stdin; an
 *             interactive loop when stdin is a terminal)
 *   tokenize  print the token ids of a text
 * The continuation goes to stdout; diagnostics and timings go to stderr.
 * Exit status: 0 ok, 1 runtime error (bad model, prompt too long, ...),
 * 2 usage error. Single-threaded apart from the kernel thread pool.
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "config/kvq_config.h"
#include "engine/backend/backend.h"
#include "engine/sample/chat.h"
#include "engine/eval/eval.h"
#include "engine/graph/forward.h"
#include "engine/util/log.h"
#include "engine/model/model.h"
#include "engine/sample/sampler.h"
#include "kernels/cpu/kcpu.h"
#include "tools/eval_cmds.h"

#define LKQ_VERSION "0.1.0"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

#define KV_HELP \
    "\n" \
    "KV cache (LiveKVQuant-P; see config/kvq_config.h for every knob):\n" \
    "      --kv-cache fp16|int2|int3|int4|int8  KV cache mode (default int4)\n" \
    "      --k-bits N --v-bits N  code widths of K and V apart, 2|3|4|8 (4)\n" \
    "      --chunk-size N       prefill chunk (512)  --block-tokens N  (256)\n" \
    "      --warmup-chunks N    (2)   --ema-decay B (0.3)  --ema-clip G (4)\n" \
    "      --clip-quantile A    (0.005)  --v-group N (0 = head_dim)  --outlier-budget F (0.004)\n" \
    "      --sink-tokens N      (4)   --keep-warmup-fp16 0|1 (0)\n" \
    "      --k-quant channel|token (channel)  --kv-budget BYTES|Nt (0 = fit the context)\n" \
    "      --window-kv fp16|int2|int3|int4|int8  sliding-window layers' cache: FP16 pages or\n" \
    "                           LiveKVQuant-P codes of that width (fp16; intN needs a\n" \
    "                           quantized --kv-cache)\n" \
    "      --window-clip-quantile A|auto  their clip_quantile (auto: 0 at int8, else A)\n" \
    "      --kv-rotate auto|0|1|2  Walsh-Hadamard rotation of K (1) or K and V (2) per\n" \
    "                           head before the cache; 1 and 2 need a power-of-two\n" \
    "                           head_dim (auto: 2 on a power-of-two head_dim with a\n" \
    "                           quantized cache, else 0)\n" \
    "      --config FILE        'key = value' lines with the same keys\n"

static void usage_perplexity(FILE *f)
{
    fprintf(f,
        "usage: livekvq perplexity -m MODEL -f TEXT -c CTX [--kv-cache fp16|int2|int3|int4|int8] [knobs] [options]\n"
        "\n"
        "Cuts the text (from the first line starting with --start, default\n"
        "'CHAPTER 1.' when present) into windows of CTX tokens, prefills each in\n"
        "chunks with the configuration under test and with the FP16 cache side by\n"
        "side, and scores every position that has a next token. Prints progress on\n"
        "stderr and a summary; with --json the last line of stdout is one JSON\n"
        "object (ppl, ppl_fp16, ppl_rel, kld, kld_max, top1_agree,\n"
        "bits_per_element, kv_bytes, kv_bytes_fp16, n_tokens, ... and the config).\n"
        "\n"
        "  -f, --file PATH          text to evaluate (UTF-8)\n"
        "  -c, --ctx-size N         window length in tokens (e.g. 1024 .. 8192)\n"
        "      --windows N          consecutive windows to evaluate (default 1)\n"
        "      --start TEXT         start at the first line beginning with TEXT\n"
        "      --no-compare         skip the FP16 reference (no KLD / top-1)\n"
        "      --exact              exact mode: f32 matmuls over the dequantized weights\n"
        "                           in both runs, so they differ only in the KV cache\n"
        "                           (noise floor < 1e-5 KLD; slower, 4 B per weight)\n"
        "      --device cpu|cuda    where the forward pass runs (default cpu)\n"
        "      --json               last line of stdout: the result as JSON\n"
        "      --csv PATH           append the result as a CSV row (header if new)\n"
        "      --json-out PATH      append the result as one JSON line\n"
        "  -t, --threads N, --ref, -q, --config FILE, and every cache knob:\n"
        KV_HELP);
}

static void usage_main(FILE *f)
{
    fprintf(f,
        "usage: livekvq <command> [options]\n"
        "\n"
        "commands:\n"
        "  generate   generate text from a prompt\n"
        "  tokenize   print the token ids of a text\n"
        "  perplexity perplexity / KL divergence / top-1 agreement of a KV cache\n"
        "             configuration against the FP16 cache, on a text file\n"
        "  ablate     sweep cache knobs: quality, bits, memory and time per cell\n"
        "             (CSV/JSON, resumable)\n"
        "  needle     long-context retrieval (pass key at depths x lengths), FP16 vs\n"
        "             INT4 cache\n"
        "  profile    time per phase (matmul, attention, KV store, sampling) of a\n"
        "             prefill + decode run, peak KV bytes and memory\n"
        "  help       show this help (or: livekvq <command> --help)\n"
        "\n"
        "MODEL is a GGUF v3 file (architecture llama) or a llama2.c .bin\n"
        "checkpoint (its tokenizer is found beside it or given with --tokenizer).\n");
}

static void usage_generate(FILE *f)
{
    fprintf(f,
        "usage: livekvq generate -m MODEL [-p PROMPT | -f FILE] [options]\n"
        "\n"
        "Prints the continuation of the prompt to stdout. Without -p/-f the\n"
        "prompt is read from stdin; when stdin is a terminal, an interactive\n"
        "loop reads one prompt per line (empty line or EOF ends it).\n"
        "\n"
        "  -m, --model PATH         model file (required)\n"
        "      --tokenizer PATH     tokenizer for a llama2.c .bin model\n"
        "  -p, --prompt TEXT        prompt text\n"
        "  -f, --file PATH          read the prompt from a file\n"
        "  -n, --n-predict N        tokens to generate (default 128; -1 = until EOS\n"
        "                           or the context is full)\n"
        "  -c, --ctx-size N         context length (default: the model's, max 8192)\n"
        "  -t, --threads N          threads (default: online CPUs)\n"
        "  -b, --batch-size N       prompt tokens per forward step (default 512)\n"
        "      --temp T             temperature, 0 = greedy (default 0.8)\n"
        "      --top-k K            top-k, 0 = off (default 40)\n"
        "      --top-p P            nucleus sampling (default 0.95)\n"
        "      --min-p P            min-p (default 0.05)\n"
        "      --repeat-penalty R   repetition penalty (default 1.0 = off)\n"
        "      --repeat-last-n N    window of the repetition penalty (default 64)\n"
        "      --presence-penalty X OpenAI presence penalty (default 0)\n"
        "      --frequency-penalty X OpenAI frequency penalty (default 0)\n"
        "  -s, --seed S             random seed (default: from the clock)\n"
        "      --no-bos             do not prepend BOS\n"
        "      --chat               wrap the prompt in the model's chat template\n"
        "      --system TEXT        system message for --chat\n"
        "      --echo               print the prompt before the continuation\n"
        "      --ignore-eos         keep generating past end-of-generation tokens\n"
        "      --ref                run the plain-C reference kernels (slow)\n"
        "      --device cpu|cuda    where the forward pass runs (default cpu; cuda:\n"
        "                           the whole pass and the KV cache on GPU 0)\n"
        KV_HELP
        "  -q, --quiet              no timings on stderr\n"
        "  -h, --help               this help\n");
}

static void usage_tokenize(FILE *f)
{
    fprintf(f,
        "usage: livekvq tokenize -m MODEL [-p TEXT | -f FILE] [--no-bos] [--special]\n"
        "\n"
        "Prints the token ids of TEXT (or FILE, or stdin), space separated.\n"
        "  --pieces   print id:'piece' pairs, one per line\n"
        "  --special  parse special-token text such as <|im_start|>\n");
}

/* Parses a whole-string integer / float option; prints the reason. */
static int parse_int(const char *opt, const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "livekvq: %s expects an integer in [%ld, %ld], got '%s'\n",
                opt, lo, hi, s);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_float(const char *opt, const char *s, float *out)
{
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end || v != v) {
        fprintf(stderr, "livekvq: %s expects a number, got '%s'\n", opt, s);
        return -1;
    }
    *out = v;
    return 0;
}

/* Reads a whole stream into a NUL-terminated heap buffer (caller frees). */
static char *read_all(FILE *f, size_t *len_out)
{
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    if (!buf)
        return NULL;
    for (;;) {
        if (len + 1 >= cap) {
            if (cap > ((size_t)1 << 30)) { /* 1 GiB is more than any prompt */
                free(buf);
                errno = EFBIG;
                return NULL;
            }
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                return NULL;
            }
            buf = nb;
            cap *= 2;
        }
        size_t r = fread(buf + len, 1, cap - 1 - len, f);
        len += r;
        if (r == 0)
            break;
    }
    if (ferror(f)) {
        free(buf);
        return NULL;
    }
    buf[len] = '\0';
    *len_out = len;
    return buf;
}

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "livekvq: cannot open '%s': %s\n", path, strerror(errno));
        return NULL;
    }
    char *s = read_all(f, len);
    if (!s)
        fprintf(stderr, "livekvq: cannot read '%s': %s\n", path, strerror(errno));
    fclose(f);
    return s;
}

typedef struct {
    const char *model, *tokenizer, *prompt, *file, *system;
    long n_predict, n_ctx, n_threads, n_batch;
    smp_params sp;
    int seed_set, no_bos, chat, echo, ignore_eos, ref, quiet, special, pieces;
    bk_device device;    /* --device cpu|cuda */
    cfg_kv kv;           /* KV cache mode and knobs */
    /* perplexity */
    long n_windows;
    int json, no_compare, exact;
    const char *csv, *json_out, *start;
} cli_opts;

static int load_model(const cli_opts *o, mdl_model **m)
{
    char err[512];
    double t0 = now_s();
    if (mdl_load(o->model, o->tokenizer, m, err, sizeof err) < 0) {
        fprintf(stderr, "livekvq: %s\n", err);
        return -1;
    }
    if (!o->quiet)
        fprintf(stderr,
                "livekvq: loaded %s (%s): %d layers, dim %d, %d/%d heads, "
                "vocab %d, ctx %d in %.2f s; %s %s\n",
                (*m)->name, (*m)->format, (*m)->hp.n_layers, (*m)->hp.dim,
                (*m)->hp.n_heads, (*m)->hp.n_kv_heads, (*m)->hp.n_vocab,
                (*m)->hp.n_ctx_train, now_s() - t0,
                o->device == BK_DEVICE_CUDA ? "device" : "kernels",
                o->device == BK_DEVICE_CUDA ? "cuda" : o->ref ? "ref" : kcpu_simd_name());
    return 0;
}

/* Encodes text; returns a heap array (caller frees) or NULL with a message. */
static int32_t *encode(const mdl_model *m, const char *text, size_t len,
                       int add_bos, int special, int *n_out)
{
    int n = 0;
    (void)tok_encode(m->tok, text, len, add_bos, special, NULL, 0, &n);
    int32_t *ids = malloc(((size_t)n + 1) * sizeof *ids);
    if (!ids) {
        fprintf(stderr, "livekvq: out of memory tokenizing the prompt\n");
        return NULL;
    }
    if (tok_encode(m->tok, text, len, add_bos, special, ids, n + 1, n_out) < 0) {
        fprintf(stderr, "livekvq: cannot tokenize the prompt\n");
        free(ids);
        return NULL;
    }
    return ids;
}

/* Generates a continuation of text and streams it to stdout. */
static int generate_one(const cli_opts *o, const mdl_model *m, const char *text,
                        size_t len)
{
    char err[512];
    int rc = -1;
    int32_t *ids = NULL, *hist = NULL;
    fwd_state *fs = NULL;
    smp_sampler *smp = NULL;
    char *chat_buf = NULL;
    int add_bos = o->no_bos ? 0 : tok_default_add_bos(m->tok);
    int special = 0;

    if (o->chat) {
        chat_msg msgs[2];
        int nm = 0;
        if (o->system)
            msgs[nm++] = (chat_msg){"system", o->system};
        else if (m->default_system[0]) /* as the model's own template would */
            msgs[nm++] = (chat_msg){"system", m->default_system};
        msgs[nm++] = (chat_msg){"user", text};
        int has_bos = 0;
        long need = chat_format(m->chat_template, msgs, nm, 1, NULL, 0,
                                &has_bos, err, sizeof err);
        if (need < 0) {
            fprintf(stderr, "livekvq: %s\n", err);
            goto done;
        }
        chat_buf = malloc((size_t)need + 1);
        if (!chat_buf)
            goto done;
        chat_format(m->chat_template, msgs, nm, 1, chat_buf, (size_t)need + 1,
                    &has_bos, err, sizeof err);
        text = chat_buf;
        len = (size_t)need;
        if (has_bos)
            add_bos = 0;
        special = 1;
    }

    int n_prompt = 0;
    ids = encode(m, text, len, add_bos, special, &n_prompt);
    if (!ids)
        goto done;
    if (n_prompt == 0) {
        fprintf(stderr, "livekvq: the prompt is empty and the model has no BOS "
                        "token to start from\n");
        goto done;
    }
    long max_ctx = m->hp.n_ctx_train > 0 ? m->hp.n_ctx_train : 2048;
    long n_ctx = o->n_ctx > 0 ? o->n_ctx : (max_ctx < 8192 ? max_ctx : 8192);
    if (n_ctx > max_ctx)
        log_warn("context %ld exceeds the model's training context %ld", n_ctx,
                 max_ctx);
    if (n_prompt >= n_ctx) {
        fprintf(stderr,
                "livekvq: prompt is %d tokens but the context holds %ld "
                "(one more is needed to generate); shorten the prompt or raise -c\n",
                n_prompt, n_ctx);
        goto done;
    }
    long n_predict = o->n_predict < 0 ? n_ctx - n_prompt : o->n_predict;
    if (n_prompt + n_predict > n_ctx)
        n_predict = n_ctx - n_prompt;

    fwd_params fp = fwd_default_params();
    fp.n_ctx = (int32_t)n_ctx;
    fp.n_threads = (int32_t)o->n_threads;
    fp.max_batch = (int32_t)o->n_batch;
    fp.use_ref = o->ref;
    fp.kv = o->kv;
    fp.device = o->device;
    if (fwd_create(m, &fp, &fs, err, sizeof err) < 0) {
        fprintf(stderr, "livekvq: %s\n", err);
        goto done;
    }
    if (smp_create(&o->sp, m->hp.n_vocab, &smp, err, sizeof err) < 0) {
        fprintf(stderr, "livekvq: %s\n", err);
        goto done;
    }
    hist = malloc(((size_t)n_prompt + (size_t)n_predict + 1) * sizeof *hist);
    if (!hist)
        goto done;
    memcpy(hist, ids, (size_t)n_prompt * sizeof *hist);

    if (o->echo) {
        fwrite(text, 1, len, stdout);
        fflush(stdout);
    }
    const float *logits;
    double t0 = now_s();
    if (fwd_eval(fs, ids, n_prompt, 0, 0, &logits, err, sizeof err) < 0) {
        fprintf(stderr, "livekvq: %s\n", err);
        goto done;
    }
    double t_prompt = now_s() - t0;
    tok_decoder dec;
    tok_decoder_init(&dec, m->tok, 0);
    dec.first = 0; /* a continuation keeps its leading space */
    char piece[256];
    int n_gen = 0, pos = n_prompt;
    double t1 = now_s();
    while (n_gen < n_predict) {
        int32_t next = smp_sample(smp, logits, hist, pos, NULL);
        if (!o->ignore_eos && tok_is_eog(m->tok, next))
            break;
        hist[pos] = next;
        size_t w = tok_decoder_push(&dec, next, piece, sizeof piece);
        fwrite(piece, 1, w, stdout);
        fflush(stdout);
        n_gen++;
        if (n_gen >= n_predict || pos + 1 >= n_ctx)
            break;
        if (fwd_eval(fs, &next, 1, pos, 0, &logits, err, sizeof err) < 0) {
            fprintf(stderr, "\nlivekvq: %s\n", err);
            goto done;
        }
        pos++;
    }
    size_t w = tok_decoder_flush(&dec, piece, sizeof piece);
    fwrite(piece, 1, w, stdout);
    fputc('\n', stdout);
    fflush(stdout);
    double t_gen = now_s() - t1;
    if (!o->quiet)
        fprintf(stderr,
                "livekvq: prompt %d tokens in %.3f s (%.1f tok/s); generated %d "
                "tokens in %.3f s (%.1f tok/s); %s\n",
                n_prompt, t_prompt, n_prompt / (t_prompt > 0 ? t_prompt : 1e-9),
                n_gen, t_gen, n_gen > 0 ? n_gen / (t_gen > 0 ? t_gen : 1e-9) : 0.0,
                fwd_describe(fs));
    rc = 0;
done:
    free(ids);
    free(hist);
    free(chat_buf);
    smp_destroy(smp);
    fwd_destroy(fs);
    return rc;
}

enum {
    OPT_TOKENIZER = 256, OPT_TEMP, OPT_TOPK, OPT_TOPP, OPT_MINP, OPT_RPEN,
    OPT_RLAST, OPT_PPEN, OPT_FPEN, OPT_NOBOS, OPT_CHAT, OPT_SYSTEM, OPT_ECHO,
    OPT_IGNEOS, OPT_REF, OPT_SPECIAL, OPT_PIECES, OPT_CONFIG, OPT_JSON,
    OPT_CSV, OPT_JSON_OUT, OPT_WINDOWS, OPT_START, OPT_NO_COMPARE, OPT_EXACT, OPT_DEVICE,
    OPT_KV = 512, /* + index into cfg_kv_keys */
};

static const struct option base_opts[] = {
    {"model", required_argument, 0, 'm'},
    {"tokenizer", required_argument, 0, OPT_TOKENIZER},
    {"prompt", required_argument, 0, 'p'},
    {"file", required_argument, 0, 'f'},
    {"n-predict", required_argument, 0, 'n'},
    {"ctx-size", required_argument, 0, 'c'},
    {"threads", required_argument, 0, 't'},
    {"batch-size", required_argument, 0, 'b'},
    {"temp", required_argument, 0, OPT_TEMP},
    {"top-k", required_argument, 0, OPT_TOPK},
    {"top-p", required_argument, 0, OPT_TOPP},
    {"min-p", required_argument, 0, OPT_MINP},
    {"repeat-penalty", required_argument, 0, OPT_RPEN},
    {"repeat-last-n", required_argument, 0, OPT_RLAST},
    {"presence-penalty", required_argument, 0, OPT_PPEN},
    {"frequency-penalty", required_argument, 0, OPT_FPEN},
    {"seed", required_argument, 0, 's'},
    {"no-bos", no_argument, 0, OPT_NOBOS},
    {"chat", no_argument, 0, OPT_CHAT},
    {"system", required_argument, 0, OPT_SYSTEM},
    {"echo", no_argument, 0, OPT_ECHO},
    {"ignore-eos", no_argument, 0, OPT_IGNEOS},
    {"ref", no_argument, 0, OPT_REF},
    {"special", no_argument, 0, OPT_SPECIAL},
    {"pieces", no_argument, 0, OPT_PIECES},
    {"config", required_argument, 0, OPT_CONFIG},
    {"json", no_argument, 0, OPT_JSON},
    {"csv", required_argument, 0, OPT_CSV},
    {"json-out", required_argument, 0, OPT_JSON_OUT},
    {"windows", required_argument, 0, OPT_WINDOWS},
    {"start", required_argument, 0, OPT_START},
    {"no-compare", no_argument, 0, OPT_NO_COMPARE},
    {"exact", no_argument, 0, OPT_EXACT},
    {"device", required_argument, 0, OPT_DEVICE},
    {"quiet", no_argument, 0, 'q'},
    {"help", no_argument, 0, 'h'},
    {0, 0, 0, 0},
};

/* base_opts plus one --knob-name option per cache knob (cfg_kv_keys). */
static struct option long_opts[sizeof base_opts / sizeof base_opts[0] + 32];
static char kv_opt_names[32][32];

static void build_long_opts(void)
{
    size_t nb = sizeof base_opts / sizeof base_opts[0] - 1; /* without the terminator */
    memcpy(long_opts, base_opts, nb * sizeof *long_opts);
    size_t n = nb;
    for (int i = 0; cfg_kv_keys[i] && i < 32; i++) {
        snprintf(kv_opt_names[i], sizeof kv_opt_names[i], "%s", cfg_kv_keys[i]);
        for (char *c = kv_opt_names[i]; *c; c++)
            if (*c == '_')
                *c = '-';
        long_opts[n++] = (struct option){kv_opt_names[i], required_argument, 0, OPT_KV + i};
    }
    long_opts[n] = (struct option){0, 0, 0, 0};
}

/* Parses options shared by the subcommands. Returns 0, 1 for --help, or -1
 * for a usage error (message printed). Options apply in order, so flags
 * after --config FILE override the file. */
static int parse_opts(int argc, char **argv, cli_opts *o)
{
    memset(o, 0, sizeof *o);
    build_long_opts();
    o->kv = cfg_kv_default();
    o->n_windows = 1;
    char kerr[512];
    o->n_predict = 128;
    o->n_batch = 512;
    o->sp = smp_default_params();
    o->sp.temperature = 0.8f;
    o->sp.top_k = 40;
    o->sp.top_p = 0.95f;
    o->sp.min_p = 0.05f;
    long v;
    float f;
    optind = 1;
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":m:p:f:n:c:t:b:s:qh", long_opts, NULL)) != -1) {
        switch (c) {
        case 'm': o->model = optarg; break;
        case OPT_TOKENIZER: o->tokenizer = optarg; break;
        case 'p': o->prompt = optarg; break;
        case 'f': o->file = optarg; break;
        case 'n':
            if (parse_int("-n", optarg, -1, INT_MAX, &v) < 0) return -1;
            o->n_predict = v; break;
        case 'c':
            if (parse_int("-c", optarg, 1, 1 << 20, &v) < 0) return -1;
            o->n_ctx = v; break;
        case 't':
            if (parse_int("-t", optarg, 1, 256, &v) < 0) return -1;
            o->n_threads = v; break;
        case 'b':
            if (parse_int("-b", optarg, 1, 1 << 16, &v) < 0) return -1;
            o->n_batch = v; break;
        case 's':
            if (parse_int("--seed", optarg, 0, LONG_MAX, &v) < 0) return -1;
            o->sp.seed = (uint64_t)v; o->seed_set = 1; break;
        case OPT_TEMP: if (parse_float("--temp", optarg, &f) < 0) return -1; o->sp.temperature = f; break;
        case OPT_TOPK:
            if (parse_int("--top-k", optarg, 0, INT_MAX, &v) < 0) return -1;
            o->sp.top_k = (int32_t)v; break;
        case OPT_TOPP: if (parse_float("--top-p", optarg, &f) < 0) return -1; o->sp.top_p = f; break;
        case OPT_MINP: if (parse_float("--min-p", optarg, &f) < 0) return -1; o->sp.min_p = f; break;
        case OPT_RPEN: if (parse_float("--repeat-penalty", optarg, &f) < 0) return -1; o->sp.repeat_penalty = f; break;
        case OPT_RLAST:
            if (parse_int("--repeat-last-n", optarg, -1, INT_MAX, &v) < 0) return -1;
            o->sp.repeat_last_n = (int32_t)v; break;
        case OPT_PPEN: if (parse_float("--presence-penalty", optarg, &f) < 0) return -1; o->sp.presence_penalty = f; break;
        case OPT_FPEN: if (parse_float("--frequency-penalty", optarg, &f) < 0) return -1; o->sp.frequency_penalty = f; break;
        case OPT_NOBOS: o->no_bos = 1; break;
        case OPT_CHAT: o->chat = 1; break;
        case OPT_SYSTEM: o->system = optarg; break;
        case OPT_ECHO: o->echo = 1; break;
        case OPT_IGNEOS: o->ignore_eos = 1; break;
        case OPT_REF: o->ref = 1; break;
        case OPT_SPECIAL: o->special = 1; break;
        case OPT_PIECES: o->pieces = 1; break;
        case OPT_CONFIG:
            if (cfg_kv_load_file(&o->kv, optarg, kerr, sizeof kerr) < 0) {
                fprintf(stderr, "livekvq: %s\n", kerr);
                return -1;
            }
            break;
        case OPT_JSON: o->json = 1; break;
        case OPT_CSV: o->csv = optarg; break;
        case OPT_JSON_OUT: o->json_out = optarg; break;
        case OPT_START: o->start = optarg; break;
        case OPT_NO_COMPARE: o->no_compare = 1; break;
        case OPT_EXACT: o->exact = 1; break;
        case OPT_DEVICE:
            if (bk_parse_device(optarg, &o->device) < 0) {
                fprintf(stderr, "livekvq: --device expects cpu or cuda, got '%s'\n", optarg);
                return -1;
            }
            break;
        case OPT_WINDOWS:
            if (parse_int("--windows", optarg, 1, 100000, &v) < 0) return -1;
            o->n_windows = v; break;
        case 'q': o->quiet = 1; break;
        case 'h': return 1;
        default:
            if (c >= OPT_KV && c < OPT_KV + 32) {
                if (cfg_kv_set(&o->kv, cfg_kv_keys[c - OPT_KV], optarg, kerr, sizeof kerr) < 0) {
                    fprintf(stderr, "livekvq: %s\n", kerr);
                    return -1;
                }
                break;
            }
            fprintf(stderr, "livekvq: unknown option '%s'\n", argv[optind - 1]);
            return -1;
        case ':':
            fprintf(stderr, "livekvq: option '%s' needs a value\n", argv[optind - 1]);
            return -1;
        case '?':
            fprintf(stderr, "livekvq: unknown option '%s'\n", argv[optind - 1]);
            return -1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "livekvq: unexpected argument '%s'\n", argv[optind]);
        return -1;
    }
    if (!o->model) {
        fprintf(stderr, "livekvq: -m MODEL is required\n");
        return -1;
    }
    if (o->prompt && o->file) {
        fprintf(stderr, "livekvq: give -p or -f, not both\n");
        return -1;
    }
    if (cfg_kv_validate(&o->kv, kerr, sizeof kerr) < 0) {
        fprintf(stderr, "livekvq: %s\n", kerr);
        return -1;
    }
    char err[256];
    if (smp_validate(&o->sp, err, sizeof err) < 0) {
        fprintf(stderr, "livekvq: %s\n", err);
        return -1;
    }
    if (!o->seed_set)
        o->sp.seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    return 0;
}

static int cmd_generate(int argc, char **argv)
{
    cli_opts o;
    int pr = parse_opts(argc, argv, &o);
    if (pr != 0) {
        if (pr > 0) /* --help; a bad option has said why in one line */
            usage_generate(stdout);
        return pr > 0 ? 0 : 2;
    }
    mdl_model *m = NULL;
    if (load_model(&o, &m) < 0)
        return 1;
    int rc = 1;
    if (o.prompt) {
        rc = generate_one(&o, m, o.prompt, strlen(o.prompt)) < 0 ? 1 : 0;
    } else if (o.file) {
        size_t len;
        char *text = read_file(o.file, &len);
        if (text)
            rc = generate_one(&o, m, text, len) < 0 ? 1 : 0;
        free(text);
    } else if (!isatty(STDIN_FILENO)) {
        size_t len;
        char *text = read_all(stdin, &len);
        if (!text)
            fprintf(stderr, "livekvq: cannot read stdin: %s\n", strerror(errno));
        else
            rc = generate_one(&o, m, text, len) < 0 ? 1 : 0;
        free(text);
    } else {
        /* interactive: one prompt per line */
        char *line = NULL;
        size_t cap = 0;
        rc = 0;
        for (;;) {
            fprintf(stderr, "> ");
            ssize_t n = getline(&line, &cap, stdin);
            if (n <= 0)
                break;
            if (line[n - 1] == '\n')
                line[--n] = '\0';
            if (n == 0)
                break;
            if (generate_one(&o, m, line, (size_t)n) < 0)
                rc = 1;
        }
        free(line);
    }
    mdl_free(m);
    return rc;
}

static int cmd_tokenize(int argc, char **argv)
{
    cli_opts o;
    int pr = parse_opts(argc, argv, &o);
    if (pr != 0) {
        if (pr > 0) /* --help; a bad option has said why in one line */
            usage_tokenize(stdout);
        return pr > 0 ? 0 : 2;
    }
    o.quiet = 1;
    mdl_model *m = NULL;
    if (load_model(&o, &m) < 0)
        return 1;
    char *owned = NULL;
    const char *text = o.prompt;
    size_t len = text ? strlen(text) : 0;
    if (!text) {
        owned = o.file ? read_file(o.file, &len) : read_all(stdin, &len);
        text = owned;
    }
    int rc = 1;
    if (text) {
        int n = 0;
        int32_t *ids = encode(m, text, len, o.no_bos ? 0 : tok_default_add_bos(m->tok),
                              o.special, &n);
        if (ids) {
            for (int i = 0; i < n; i++) {
                if (o.pieces) {
                    char buf[256];
                    int pl = tok_piece(m->tok, ids[i], 1, buf, sizeof buf);
                    printf("%d:'%.*s'\n", ids[i], pl < 0 ? 0 : (pl < 256 ? pl : 256), buf);
                } else {
                    printf(i ? " %d" : "%d", ids[i]);
                }
            }
            if (!o.pieces)
                printf("\n");
            rc = 0;
        }
        free(ids);
    }
    free(owned);
    mdl_free(m);
    return rc;
}

static void ppl_progress(void *ctx, int w, int nw, int c, int nc, double ppl, double kld,
                         double el)
{
    const cli_opts *o = ctx;
    if (o->quiet)
        return;
    double done = (double)(w * nc + c + 1) / (double)(nw * nc);
    fprintf(stderr, "perplexity: window %d/%d chunk %d/%d  ppl %.4f  kld %.5f  %.0f s, eta %.0f s\n",
            w + 1, nw, c + 1, nc, ppl, kld, el, el / done - el);
}

/* Result as one JSON object (no newline) into buf. */
static void ppl_json(const cli_opts *o, const mdl_model *m, const eval_result *r,
                     char *buf, size_t cap)
{
    char cfg[1024];
    cfg_kv_json(&o->kv, cfg, sizeof cfg);
    snprintf(buf, cap,
             "{\"model\": \"%s\", \"ctx\": %ld, \"windows\": %ld, \"n_tokens\": %lld, "
             "\"ppl\": %.6f, \"ppl_fp16\": %.6f, \"ppl_rel\": %.6f, \"kld\": %.6g, "
             "\"kld_max\": %.6g, \"top1_agree\": %.6f, \"bits_per_element\": %.4f, "
             "\"kv_bytes\": %lld, \"kv_bytes_fp16\": %lld, \"kv_bytes_int4\": %lld, "
             "\"kv_bytes_scales\": %lld, \"kv_bytes_outliers\": %lld, "
             "\"kv_bytes_fp16_staging\": %lld, \"outlier_ratio\": %.6g, "
             "\"clamp_ratio\": %.6g, \"global_layers\": %d, \"window_layers\": %d, "
             "\"bits_per_element_global\": %.4f, \"bits_per_element_window\": %.4f, "
             "\"kv_bytes_global\": %lld, \"kv_bytes_window\": %lld, "
             "\"kv_tokens_window\": %lld, \"t_test_s\": %.3f, \"t_fp16_s\": %.3f, "
             "\"exact\": %d, %s}",
             m->name, o->n_ctx, o->n_windows, (long long)r->n_scored, r->ppl, r->ppl_ref,
             r->ppl / r->ppl_ref - 1.0, r->kld, r->kld_max, r->top1_agree,
             r->bits_per_element, (long long)r->kv.bytes_total,
             (long long)r->kv.bytes_fp16_equiv, (long long)r->kv.bytes_int4,
             (long long)r->kv.bytes_scales, (long long)r->kv.bytes_outliers,
             (long long)r->kv.bytes_fp16,
             r->kv.n_quantized ? (double)r->kv.n_outliers / (double)r->kv.n_quantized : 0.0,
             r->kv.n_quantized ? (double)r->kv.n_clamped / (double)r->kv.n_quantized : 0.0,
             (int)r->kv.layer_kind[KVC_LAYER_GLOBAL].layers,
             (int)r->kv.layer_kind[KVC_LAYER_WINDOW].layers,
             kvc_stats_kind_bits(&r->kv, KVC_LAYER_GLOBAL),
             kvc_stats_kind_bits(&r->kv, KVC_LAYER_WINDOW),
             (long long)r->kv.layer_kind[KVC_LAYER_GLOBAL].bytes_total,
             (long long)r->kv.layer_kind[KVC_LAYER_WINDOW].bytes_total,
             (long long)r->kv.layer_kind[KVC_LAYER_WINDOW].tokens, r->t_test_s, r->t_ref_s,
             o->exact, cfg);
}

static int append_csv(const char *path, const cli_opts *o, const mdl_model *m,
                      const eval_result *r)
{
    FILE *f = fopen(path, "a+");
    if (!f) {
        fprintf(stderr, "livekvq: cannot open '%s': %s\n", path, strerror(errno));
        return -1;
    }
    fseek(f, 0, SEEK_END);
    if (ftell(f) == 0)
        fprintf(f, "model,ctx,windows,kv_cache,chunk_size,block_tokens,warmup_chunks,"
                   "ema_decay,ema_clip,clip_quantile,v_group,outlier_budget,sink_tokens,"
                   "keep_warmup_fp16,k_quant,n_tokens,ppl,ppl_fp16,ppl_rel,kld,kld_max,"
                   "top1_agree,bits_per_element,kv_bytes,kv_bytes_fp16,outlier_ratio,"
                   "clamp_ratio,t_test_s,t_fp16_s\n");
    const cfg_kv *k = &o->kv;
    fprintf(f, "\"%s\",%ld,%ld,%s,%d,%d,%d,%g,%g,%g,%d,%g,%d,%d,%s,%lld,%.6f,%.6f,%.6f,"
               "%.6g,%.6g,%.6f,%.4f,%lld,%lld,%.6g,%.6g,%.3f,%.3f\n",
            m->name, o->n_ctx, o->n_windows, cfg_kv_mode_name(k),
            k->chunk_size, k->block_tokens, k->warmup_chunks, k->ema_decay, k->ema_clip,
            k->clip_quantile, k->v_group, k->outlier_budget, k->sink_tokens,
            k->keep_warmup_fp16, k->k_mode == KVQ_K_PER_TOKEN ? "token" : "channel",
            (long long)r->n_scored, r->ppl, r->ppl_ref, r->ppl / r->ppl_ref - 1.0, r->kld,
            r->kld_max, r->top1_agree, r->bits_per_element, (long long)r->kv.bytes_total,
            (long long)r->kv.bytes_fp16_equiv,
            r->kv.n_quantized ? (double)r->kv.n_outliers / (double)r->kv.n_quantized : 0.0,
            r->kv.n_quantized ? (double)r->kv.n_clamped / (double)r->kv.n_quantized : 0.0,
            r->t_test_s, r->t_ref_s);
    fclose(f);
    return 0;
}

static int cmd_perplexity(int argc, char **argv)
{
    cli_opts o;
    int pr = parse_opts(argc, argv, &o);
    if (pr != 0) {
        if (pr > 0) /* --help; a bad option has said why in one line */
            usage_perplexity(stdout);
        return pr > 0 ? 0 : 2;
    }
    if (!o.file || o.n_ctx <= 0) {
        fprintf(stderr, "livekvq: perplexity needs -f TEXT and -c CTX\n");
        return 2;
    }
    size_t len;
    char *text = read_file(o.file, &len);
    if (!text)
        return 1;
    const char *marker = o.start ? o.start : "CHAPTER 1.";
    const char *from = text;
    for (const char *q = text; (q = strstr(q, marker)) != NULL; q++)
        if (q == text || q[-1] == '\n') {
            from = q;
            break;
        }
    if (o.start && from == text && strncmp(text, marker, strlen(marker)) != 0) {
        fprintf(stderr, "livekvq: no line of '%s' starts with '%s'\n", o.file, marker);
        free(text);
        return 1;
    }
    mdl_model *m = NULL;
    if (load_model(&o, &m) < 0) {
        free(text);
        return 1;
    }
    char err[512];
    int rc = 1;
    int n = 0;
    int add_bos = o.no_bos ? 0 : tok_default_add_bos(m->tok);
    int32_t *ids = encode(m, from, len - (size_t)(from - text), add_bos, 0, &n);
    if (!ids)
        goto done;
    if (!o.quiet)
        fprintf(stderr, "perplexity: %d tokens from '%.20s...'; %ld window(s) of %ld\n", n,
                from, o.n_windows, o.n_ctx);
    eval_params ep = {
        .n_ctx = (int32_t)o.n_ctx, .n_windows = (int32_t)o.n_windows,
        .n_threads = (int32_t)o.n_threads, .use_ref = o.ref, .compare = !o.no_compare,
        .exact = o.exact,
        .device = (int)o.device,
        .kv = o.kv, .progress = ppl_progress, .progress_ctx = &o,
    };
    eval_result r;
    if (eval_perplexity(m, ids, n, &ep, &r, err, sizeof err) < 0) {
        fprintf(stderr, "livekvq: %s\n", err);
        goto done;
    }
    printf("model            %s\n", m->name);
    printf("kv cache         %s\n", cfg_kv_mode_name(&o.kv));
    printf("evaluation       %s\n", o.exact ? "exact (f32 matmuls)" : "fast (optimized matmuls)");
    printf("context          %ld x %ld window(s), %lld positions scored\n", o.n_ctx,
           o.n_windows, (long long)r.n_scored);
    printf("perplexity       %.4f (fp16 cache %.4f, %+.3f%%)\n", r.ppl, r.ppl_ref,
           100.0 * (r.ppl / r.ppl_ref - 1.0));
    printf("KL divergence    mean %.6f, max %.4f\n", r.kld, r.kld_max);
    printf("top-1 agreement  %.4f\n", r.top1_agree);
    printf("KV bytes         %lld (fp16 would be %lld: %.2fx smaller)\n",
           (long long)r.kv.bytes_total, (long long)r.kv.bytes_fp16_equiv,
           r.kv.bytes_total ? (double)r.kv.bytes_fp16_equiv / (double)r.kv.bytes_total : 0.0);
    printf("  int4 %lld, scales %lld, outliers %lld, fp16 staging %lld, other %lld\n",
           (long long)r.kv.bytes_int4, (long long)r.kv.bytes_scales,
           (long long)r.kv.bytes_outliers, (long long)r.kv.bytes_fp16,
           (long long)r.kv.bytes_other);
    printf("bits per element %.3f\n", r.bits_per_element);
    if (r.kv.layer_kind[KVC_LAYER_WINDOW].layers > 0) {
        const kvc_kind_stats *g = &r.kv.layer_kind[KVC_LAYER_GLOBAL];
        const kvc_kind_stats *w = &r.kv.layer_kind[KVC_LAYER_WINDOW];
        printf("  global layers  %d: %lld bytes, %lld positions, %.3f bits per element\n",
               (int)g->layers, (long long)g->bytes_total, (long long)g->tokens,
               kvc_stats_kind_bits(&r.kv, KVC_LAYER_GLOBAL));
        printf("  window layers  %d: %lld bytes, %lld positions held, %.3f bits per element\n",
               (int)w->layers, (long long)w->bytes_total, (long long)w->tokens,
               kvc_stats_kind_bits(&r.kv, KVC_LAYER_WINDOW));
    }
    printf("outliers         %.4f%% kept, %.4f%% clamped\n",
           r.kv.n_quantized ? 100.0 * (double)r.kv.n_outliers / (double)r.kv.n_quantized : 0.0,
           r.kv.n_quantized ? 100.0 * (double)r.kv.n_clamped / (double)r.kv.n_quantized : 0.0);
    printf("forward time     test %.2f s, fp16 reference %.2f s\n", r.t_test_s, r.t_ref_s);
    char js[4096];
    ppl_json(&o, m, &r, js, sizeof js);
    if (o.csv && append_csv(o.csv, &o, m, &r) < 0)
        goto done;
    if (o.json_out) {
        FILE *f = fopen(o.json_out, "a");
        if (!f) {
            fprintf(stderr, "livekvq: cannot open '%s': %s\n", o.json_out, strerror(errno));
            goto done;
        }
        fprintf(f, "%s\n", js);
        fclose(f);
    }
    if (o.json)
        printf("%s\n", js);
    rc = 0;
done:
    free(ids);
    free(text);
    mdl_free(m);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage_main(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "help") || !strcmp(cmd, "--help") || !strcmp(cmd, "-h")) {
        usage_main(stdout);
        return 0;
    }
    if (!strcmp(cmd, "--version")) {
        printf("livekvq %s\n", LKQ_VERSION);
        return 0;
    }
    if (!strcmp(cmd, "generate"))
        return cmd_generate(argc - 1, argv + 1);
    if (!strcmp(cmd, "tokenize"))
        return cmd_tokenize(argc - 1, argv + 1);
    if (!strcmp(cmd, "perplexity"))
        return cmd_perplexity(argc - 1, argv + 1);
    if (!strcmp(cmd, "ablate"))
        return abl_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "needle"))
        return ndl_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "profile"))
        return prf_main(argc - 1, argv + 1);
    fprintf(stderr, "livekvq: unknown command '%s' (try: livekvq help)\n", cmd);
    return 2;
}
