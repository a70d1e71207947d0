/*
 * needle.c - `livekvq needle`: long-context retrieval with the FP16 and the
 * INT4 cache. A needle (a 5-digit pass key, several labelled pass keys, or
 * key-value "secret codes") is hidden at a chosen depth of filler text
 * (a text file, e.g. Moby-Dick, from a seed-chosen sentence), followed by
 * a question; the model answers by greedy decoding and the first number in
 * its answer is compared with the needle. Accuracy is reported per
 * (variant, cache, length, depth).
 *
 * Prompts depend only on (seed, variant, length, depth, trial), never on the
 * cache mode, so both caches answer the same prompts and reruns give the
 * same table. Results go to DIR/needle.csv (one row per answer, appended
 * with one write each and fsync; a torn last line is dropped on the next
 * run) and DIR/needle_summary.csv; answers already in needle.csv for the
 * same configuration are not asked again (resumable).
 *
 * Single-threaded apart from the kernel thread pool.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config/kvq_config.h"
#include "engine/sample/chat.h"
#include "engine/graph/forward.h"
#include "engine/model/model.h"
#include "tokenizer/tok.h"
#include "tools/cli_common.h"
#include "tools/eval_cmds.h"

#define NDL_MAX_LIST 32
#define NDL_MAX_NEEDLES 8

typedef enum { NDL_PASSKEY = 0, NDL_MULTI = 1, NDL_KV = 2 } ndl_variant;
static const char *const ndl_variant_names[] = {"passkey", "multi", "kv"};

typedef struct {
    const char *model, *text, *out, *start;
    long lengths[NDL_MAX_LIST], depths[NDL_MAX_LIST];
    int n_lengths, n_depths;
    cfg_kv modes[2];
    int n_modes;
    long trials, n_predict, threads;
    bk_device device;
    unsigned long long seed;
    ndl_variant variant;
    int chat, dump, dry_run, quiet;
    cfg_kv base;
} ndl_opts;

/* One prompt and its expected answer. */
typedef struct {
    char *text;           /* heap */
    size_t len;
    int32_t *ids;         /* heap, tokenized (BOS / template included) */
    int n_ids;
    char answer[16];
} ndl_prompt;

/* One answer (a row of needle.csv). */
typedef struct {
    int variant, mode, length, depth, trial;
    int correct;
} ndl_row;

/* ---- deterministic random numbers (splitmix64) ------------------------ */

static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static uint64_t prompt_seed(const ndl_opts *o, int length, int depth, int trial)
{
    uint64_t s = o->seed;
    uint64_t parts[4] = {(uint64_t)o->variant, (uint64_t)length, (uint64_t)depth,
                         (uint64_t)trial};
    for (int i = 0; i < 4; i++) {
        s ^= parts[i] + 0x632BE59BD9B4E019ULL;
        (void)rng_next(&s);
    }
    return s;
}

/* ---- prompt construction ---------------------------------------------- */

static const char *const ndl_labels[] = {"red", "green", "blue", "yellow"};
static const char *const ndl_words[] = {
    "lantern", "harpoon", "compass", "anchor", "barrel", "sextant", "lighthouse",
    "oyster", "pelican", "glacier", "violin", "tulip", "granite", "falcon", "meadow",
    "pepper",
};

typedef struct {
    double depth;       /* fraction of the haystack */
    char sentence[160];
} ndl_needle;

/* The needles, the question and the answer of one prompt. */
typedef struct {
    ndl_needle nd[NDL_MAX_NEEDLES];
    int n;
    char question[256]; /* after the haystack */
    char answer[16];
} ndl_plan;

static void make_plan(const ndl_opts *o, uint64_t *rs, int depth, ndl_plan *p)
{
    memset(p, 0, sizeof *p);
    const int chat = o->chat;
    char key[16];
    snprintf(key, sizeof key, "%05d", (int)(10000 + rng_next(rs) % 90000));
    if (o->variant == NDL_PASSKEY) {
        p->n = 1;
        p->nd[0].depth = depth / 100.0;
        snprintf(p->nd[0].sentence, sizeof p->nd[0].sentence,
                 "The pass key is %s. Remember it. %s is the pass key.", key, key);
        snprintf(p->question, sizeof p->question, "%s",
                 chat ? "What is the pass key? Answer with the number only."
                      : "What is the pass key? The pass key is");
        snprintf(p->answer, sizeof p->answer, "%s", key);
        return;
    }
    if (o->variant == NDL_MULTI) {
        /* three labelled keys; the asked one at the depth, the others at
         * seed-chosen depths */
        int asked = (int)(rng_next(rs) % 3);
        p->n = 3;
        for (int i = 0; i < 3; i++) {
            char k[16];
            if (i == asked)
                snprintf(k, sizeof k, "%s", key);
            else
                snprintf(k, sizeof k, "%05d", (int)(10000 + rng_next(rs) % 90000));
            p->nd[i].depth = i == asked ? depth / 100.0 : (double)(rng_next(rs) % 101) / 100.0;
            snprintf(p->nd[i].sentence, sizeof p->nd[i].sentence,
                     "The %s pass key is %s. Remember it. %s is the %s pass key.",
                     ndl_labels[i], k, k, ndl_labels[i]);
        }
        if (chat)
            snprintf(p->question, sizeof p->question,
                     "What is the %s pass key? Answer with the number only.",
                     ndl_labels[asked]);
        else
            snprintf(p->question, sizeof p->question,
                     "What is the %s pass key? The %s pass key is", ndl_labels[asked],
                     ndl_labels[asked]);
        snprintf(p->answer, sizeof p->answer, "%s", key);
        return;
    }
    /* key-value: six "secret codes" spread over the haystack, one asked */
    int nw = (int)(sizeof ndl_words / sizeof ndl_words[0]);
    int pick[6];
    for (int i = 0; i < 6; i++) {
        int w, dup;
        do {
            w = (int)(rng_next(rs) % (uint64_t)nw);
            dup = 0;
            for (int j = 0; j < i; j++)
                dup |= pick[j] == w;
        } while (dup);
        pick[i] = w;
    }
    int asked = (int)(rng_next(rs) % 6);
    p->n = 6;
    for (int i = 0; i < 6; i++) {
        char k[16];
        if (i == asked)
            snprintf(k, sizeof k, "%s", key);
        else
            snprintf(k, sizeof k, "%05d", (int)(10000 + rng_next(rs) % 90000));
        p->nd[i].depth = i == asked ? depth / 100.0 : (double)(rng_next(rs) % 101) / 100.0;
        snprintf(p->nd[i].sentence, sizeof p->nd[i].sentence,
                 "The secret code of the %s is %s.", ndl_words[pick[i]], k);
    }
    if (chat)
        snprintf(p->question, sizeof p->question,
                 "What is the secret code of the %s? Answer with the number only.",
                 ndl_words[pick[asked]]);
    else
        snprintf(p->question, sizeof p->question,
                 "What is the secret code of the %s? The secret code of the %s is",
                 ndl_words[pick[asked]], ndl_words[pick[asked]]);
    snprintf(p->answer, sizeof p->answer, "%s", key);
}

static const char ndl_head[] =
    "There is an important piece of information hidden inside a lot of irrelevant "
    "text. Find it and memorize it. I will quiz you about it.\n\n";

/* Where a needle at fraction d goes in hay[0..n): the end of the sentence
 * (". ") at or after d*n, or the next space, or the end. */
static size_t insert_point(const char *hay, size_t n, double d)
{
    if (d <= 0)
        return 0;
    size_t at = (size_t)(d * (double)n);
    if (at >= n)
        return n;
    for (size_t i = at; i + 1 < n && i < at + 400; i++)
        if (hay[i] == '.' && (hay[i + 1] == ' ' || hay[i + 1] == '\n'))
            return i + 1;
    for (size_t i = at; i < n; i++)
        if (hay[i] == ' ' || hay[i] == '\n')
            return i;
    return n;
}

/* Composes head + haystack (with needles) + question into a heap string. */
static char *compose(const ndl_plan *p, const char *hay, size_t n_hay, size_t *len_out)
{
    size_t cap = sizeof ndl_head + n_hay + 256 * (size_t)(p->n + 2);
    char *s = malloc(cap);
    if (!s)
        return NULL;
    size_t pts[NDL_MAX_NEEDLES];
    int order[NDL_MAX_NEEDLES];
    for (int i = 0; i < p->n; i++) {
        pts[i] = insert_point(hay, n_hay, p->nd[i].depth);
        order[i] = i;
    }
    for (int i = 1; i < p->n; i++) /* by position, stable */
        for (int j = i; j > 0 && pts[order[j]] < pts[order[j - 1]]; j--) {
            int t = order[j];
            order[j] = order[j - 1];
            order[j - 1] = t;
        }
    size_t len = 0, from = 0;
    len += (size_t)snprintf(s + len, cap - len, "%s", ndl_head);
    for (int k = 0; k < p->n; k++) {
        size_t at = pts[order[k]];
        memcpy(s + len, hay + from, at - from);
        len += at - from;
        from = at;
        len += (size_t)snprintf(s + len, cap - len, at ? " %s" : "%s ",
                                p->nd[order[k]].sentence);
    }
    memcpy(s + len, hay + from, n_hay - from);
    len += n_hay - from;
    len += (size_t)snprintf(s + len, cap - len, "\n\n%s", p->question);
    *len_out = len;
    return s;
}

/* Tokenizes a prompt (wrapped in the chat template with --chat). */
static int32_t *tokenize_prompt(const ndl_opts *o, const mdl_model *m, const char *text,
                                size_t len, int *n, char *err, size_t errlen)
{
    if (!o->chat)
        return cli_encode(m, text, len, tok_default_add_bos(m->tok), 0, n, err, errlen);
    chat_msg msg = {"user", text};
    int has_bos = 0;
    long need = chat_format(m->chat_template, &msg, 1, 1, NULL, 0, &has_bos, err, errlen);
    if (need < 0)
        return NULL;
    char *buf = malloc((size_t)need + 1);
    if (!buf) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    chat_format(m->chat_template, &msg, 1, 1, buf, (size_t)need + 1, &has_bos, err, errlen);
    int32_t *ids = cli_encode(m, buf, (size_t)need,
                              has_bos ? 0 : tok_default_add_bos(m->tok), 1, n, err, errlen);
    free(buf);
    return ids;
}

/* Builds the prompt of (length, depth, trial): at most length - n_predict
 * tokens, the haystack taken from filler[0..n_filler) at a seed-chosen
 * sentence and trimmed at a word boundary until the prompt fits. */
static int build_prompt(const ndl_opts *o, const mdl_model *m, const char *filler,
                        size_t n_filler, int length, int depth, int trial, ndl_prompt *pr,
                        char *err, size_t errlen)
{
    memset(pr, 0, sizeof *pr);
    uint64_t rs = prompt_seed(o, length, depth, trial);
    ndl_plan plan;
    make_plan(o, &rs, depth, &plan);
    const int target = length - (int)o->n_predict;
    /* characters per token of the filler, measured on a sample */
    size_t sample = n_filler < 20000 ? n_filler : 20000;
    int ns = 0;
    int32_t *sid = cli_encode(m, filler, sample, 0, 0, &ns, err, errlen);
    if (!sid)
        return -1;
    free(sid);
    double cpt = ns > 0 ? (double)sample / ns : 4.0;
    size_t want = (size_t)(cpt * (double)(target > 64 ? target : 64)) + 1024;
    if (want > n_filler) {
        snprintf(err, errlen, "the filler text is too short for %d tokens", length);
        return -1;
    }
    size_t off = (size_t)(rng_next(&rs) % (uint64_t)(n_filler - want + 1));
    for (size_t i = off; i + 1 < n_filler - want / 2 && i < off + 2000; i++)
        if (filler[i] == '.' && filler[i + 1] == ' ') {
            off = i + 2;
            break;
        }
    const char *hay = filler + off;
    size_t avail = n_filler - off, n_hay = (size_t)(cpt * target);
    if (n_hay > avail)
        n_hay = avail;
    size_t best = 0;
    for (int iter = 0; iter < 12; iter++) {
        while (n_hay > 0 && n_hay < avail && hay[n_hay] != ' ' && hay[n_hay] != '\n')
            n_hay--; /* whole words */
        size_t len;
        char *text = compose(&plan, hay, n_hay, &len);
        if (!text) {
            snprintf(err, errlen, "out of memory building a prompt");
            return -1;
        }
        int n = 0;
        int32_t *ids = tokenize_prompt(o, m, text, len, &n, err, errlen);
        if (!ids) {
            free(text);
            return -1;
        }
        if (n <= target && n_hay >= best) {
            free(pr->text);
            free(pr->ids);
            pr->text = text;
            pr->len = len;
            pr->ids = ids;
            pr->n_ids = n;
            best = n_hay;
        } else {
            free(text);
            free(ids);
        }
        int diff = target - n;
        if (diff >= 0 && diff <= target / 100 + 2)
            break;
        double step = cpt * (double)diff;
        if (diff < 0)
            step -= cpt * 2;
        if (step < 0 && (size_t)(-step) >= n_hay)
            n_hay = 0;
        else
            n_hay = (size_t)((double)n_hay + step);
        if (n_hay > avail)
            n_hay = avail;
    }
    if (!pr->text) {
        snprintf(err, errlen, "cannot fit the question in %d tokens", target);
        return -1;
    }
    snprintf(pr->answer, sizeof pr->answer, "%s", plan.answer);
    return 0;
}

static void prompt_free(ndl_prompt *p)
{
    free(p->text);
    free(p->ids);
    memset(p, 0, sizeof *p);
}

/* ---- options ---------------------------------------------------------- */

static void usage(FILE *f)
{
    fprintf(f,
        "usage: livekvq needle -m MODEL -f TEXT -o DIR [options]\n"
        "\n"
        "Hides a needle at several depths of filler text (from TEXT) at several\n"
        "prompt lengths, asks for it, and scores the greedy answer with the FP16\n"
        "and the INT4 cache. Rows go to DIR/needle.csv (answers already there for\n"
        "the same configuration are not asked again), accuracy per (cache, length,\n"
        "depth) over every answer of that configuration in DIR (earlier runs with\n"
        "other lengths, depths or trials included) to DIR/needle_summary.csv and\n"
        "stdout.\n"
        "\n"
        "  -m, --model PATH      model file\n"
        "  -f, --file PATH       filler text (from the first line starting with\n"
        "                        --start, default 'CHAPTER 1.' when present)\n"
        "  -o, --out DIR         results directory (created)\n"
        "      --lengths LIST    prompt lengths in tokens, answer included\n"
        "                        (default 1024,2048,4096,8192)\n"
        "      --depths LIST     needle depths in percent (default 0,25,50,75,100)\n"
        "      --trials N        prompts per (length, depth) (default 3)\n"
        "      --seed S          seed of the prompts (default 1234)\n"
        "      --kv-cache LIST   caches to compare (default fp16,int4)\n"
        "      --variant V       passkey (default), multi (3 labelled keys, one\n"
        "                        asked), kv (6 secret codes, one asked)\n"
        "      --chat            the question as a user message in the model's chat\n"
        "                        template, answered by the assistant (default)\n"
        "      --plain           plain completion: '... The pass key is' (a model\n"
        "                        without a template; SmolLM2 does worse with it)\n"
        "  -n, --n-predict N     answer tokens (default 16)\n"
        "      --set K=V, --config FILE and the --knob-name flags: the INT4 cache\n"
        "      --dump-prompts    write each prompt to DIR/prompts/\n"
        "      --dry-run         build (and dump) the prompts, run nothing\n"
        "  -t, --threads N       threads (default: online CPUs)\n"
        "      --device cpu|cuda where the forward pass runs (default cpu)\n"
        "  -q, --quiet           no progress on stderr\n");
}

enum {
    N_LENGTHS = 256, N_DEPTHS, N_TRIALS, N_SEED, N_KVC, N_VARIANT, N_CHAT, N_DUMP, N_DRY,
    N_PLAIN,
};

static int parse_long_list(const char *opt, const char *s, long lo, long hi, long *out,
                           int *n, char *err, size_t errlen)
{
    char buf[1024], *items[NDL_MAX_LIST], lerr[256];
    int k = cli_split_list(s, buf, sizeof buf, items, NDL_MAX_LIST, lerr, sizeof lerr);
    if (k < 0) {
        snprintf(err, errlen, "%s: %s", opt, lerr);
        return -1;
    }
    for (int i = 0; i < k; i++) {
        if (cli_parse_long(opt, items[i], lo, hi, &out[i], err, errlen) < 0)
            return -1;
        for (int j = 0; j < i; j++)
            if (out[j] == out[i]) {
                snprintf(err, errlen, "%s: %ld listed twice", opt, out[i]);
                return -1;
            }
    }
    *n = k;
    return 0;
}

static int parse_opts(int argc, char **argv, ndl_opts *o, char *err, size_t errlen)
{
    static const struct option base[] = {
        {"out", required_argument, 0, 'o'},
        {"n-predict", required_argument, 0, 'n'},
        {"lengths", required_argument, 0, N_LENGTHS},
        {"depths", required_argument, 0, N_DEPTHS},
        {"trials", required_argument, 0, N_TRIALS},
        {"seed", required_argument, 0, N_SEED},
        {"kv-cache", required_argument, 0, N_KVC},
        {"variant", required_argument, 0, N_VARIANT},
        {"chat", no_argument, 0, N_CHAT},
        {"plain", no_argument, 0, N_PLAIN},
        {"dump-prompts", no_argument, 0, N_DUMP},
        {"dry-run", no_argument, 0, N_DRY},
        {"quiet", no_argument, 0, 'q'},
    };
    const int nb = (int)(sizeof base / sizeof base[0]);
    static struct option opts[64];
    static char names[32][32];
    cli_eval_opts(base, nb, opts, 64, names);
    memset(o, 0, sizeof *o);
    o->base = cfg_kv_default();
    static const long def_len[] = {1024, 2048, 4096, 8192}, def_depth[] = {0, 25, 50, 75, 100};
    memcpy(o->lengths, def_len, sizeof def_len);
    o->n_lengths = 4;
    memcpy(o->depths, def_depth, sizeof def_depth);
    o->n_depths = 5;
    o->trials = 3;
    o->seed = 1234;
    o->n_predict = 16;
    o->chat = 1;
    const char *kvc = "fp16,int4";
    optind = 1;
    opterr = 0;
    int c;
    long v;
    while ((c = getopt_long(argc, argv, ":m:f:o:n:t:qh", opts, NULL)) != -1) {
        switch (c) {
        case 'm': o->model = optarg; break;
        case 'f': o->text = optarg; break;
        case 'o': o->out = optarg; break;
        case 'n':
            if (cli_parse_long("-n", optarg, 1, 256, &v, err, errlen) < 0) return -1;
            o->n_predict = v; break;
        case 't':
            if (cli_parse_long("-t", optarg, 1, 256, &v, err, errlen) < 0) return -1;
            o->threads = v; break;
        case N_LENGTHS:
            if (parse_long_list("--lengths", optarg, 64, 1 << 20, o->lengths, &o->n_lengths,
                                err, errlen) < 0)
                return -1;
            break;
        case N_DEPTHS:
            if (parse_long_list("--depths", optarg, 0, 100, o->depths, &o->n_depths, err,
                                errlen) < 0)
                return -1;
            break;
        case N_TRIALS:
            if (cli_parse_long("--trials", optarg, 1, 1000, &v, err, errlen) < 0) return -1;
            o->trials = v; break;
        case N_SEED:
            if (cli_parse_long("--seed", optarg, 0, 0x7fffffffL, &v, err, errlen) < 0)
                return -1;
            o->seed = (unsigned long long)v; break;
        case N_KVC: kvc = optarg; break;
        case N_VARIANT: {
            int found = -1;
            for (int i = 0; i < 3; i++)
                if (!strcmp(optarg, ndl_variant_names[i]))
                    found = i;
            if (found < 0) {
                snprintf(err, errlen, "--variant expects passkey, multi or kv, got '%s'",
                         optarg);
                return -1;
            }
            o->variant = (ndl_variant)found;
            break;
        }
        case N_CHAT: o->chat = 1; break;
        case N_PLAIN: o->chat = 0; break;
        case N_DUMP: o->dump = 1; break;
        case N_DRY: o->dry_run = 1; break;
        case 'q': o->quiet = 1; break;
        case 'h': return 1;
        default:
            if (cli_eval_opt(c, optarg, argv, &o->base, &o->start, &o->device,
                             err, errlen) < 0)
                return -1;
            break;
        }
    }
    if (optind < argc) {
        snprintf(err, errlen, "unexpected argument '%s'", argv[optind]);
        return -1;
    }
    if (!o->model || !o->text || !o->out) {
        snprintf(err, errlen, "needle needs -m MODEL, -f TEXT and -o DIR");
        return -1;
    }
    int k = cli_kv_modes(kvc, &o->base, o->modes, err, errlen);
    if (k < 0)
        return -1;
    o->n_modes = k;
    for (int i = 0; i < o->n_lengths; i++)
        if (o->lengths[i] <= o->n_predict + 64) {
            snprintf(err, errlen, "--lengths: %ld leaves no room for a prompt and %ld answer "
                     "tokens", o->lengths[i], o->n_predict);
            return -1;
        }
    return 0;
}

/* ---- results file ----------------------------------------------------- */

static const char ndl_csv_header[] =
    "variant,kv_cache,length,depth,trial,seed,cfg,n_prompt,expected,got,correct,prefill_s\n";

/* Configuration tag of a row: what besides the cell makes an answer
 * comparable (model, chat, answer length, the cache knobs). */
static void cfg_tag(const ndl_opts *o, const cfg_kv *kv, char *out, size_t cap)
{
    char cfg[1024], all[1400];
    cfg_kv_json(kv, cfg, sizeof cfg);
    const char *mb = strrchr(o->model, '/');
    snprintf(all, sizeof all, "%s chat=%d n=%ld start=%s %s", mb ? mb + 1 : o->model, o->chat,
             o->n_predict, o->start ? o->start : "-", cfg);
    snprintf(out, cap, "%016llx", (unsigned long long)cli_hash64(all));
}

/* Appends one row to the growing array *rows (*n used, *cap allocated).
 * Returns 0 or -1 (out of memory). */
static int push_row(ndl_row **rows, int *n, int *cap, ndl_row r)
{
    if (*n == *cap) {
        int nc = *cap ? *cap * 2 : 64;
        ndl_row *t = realloc(*rows, (size_t)nc * sizeof *t);
        if (!t)
            return -1;
        *rows = t;
        *cap = nc;
    }
    (*rows)[(*n)++] = r;
    return 0;
}

/* Loads every needle.csv row of this configuration (variant, seed, cache
 * tags; any length, depth, trial) into the growing array *rows (*n, *cap);
 * truncates a torn last line. Returns 0 or -1. */
static int load_rows(const ndl_opts *o, const char *path, ndl_row **rows, int *n, int *cap,
                     char *err, size_t errlen)
{
    size_t len;
    char lerr[256];
    char *s = cli_read_file(path, &len, lerr, sizeof lerr);
    if (!s)
        return 0; /* no file yet */
    int rc = 0;
    size_t good = len;
    while (good > 0 && s[good - 1] != '\n')
        good--;
    if (good < len && truncate(path, (off_t)good) < 0) {
        snprintf(err, errlen, "cannot truncate the torn last line of '%.300s': %s", path,
                 strerror(errno));
        free(s);
        return -1;
    }
    s[good] = '\0';
    char tags[2][32];
    for (int i = 0; i < o->n_modes; i++)
        cfg_tag(o, &o->modes[i], tags[i], sizeof tags[i]);
    char *save = NULL;
    for (char *line = strtok_r(s, "\n", &save); line && rc == 0;
         line = strtok_r(NULL, "\n", &save)) {
        char var[16], mode[8], tag[32];
        int length, depth, trial, correct = 0;
        unsigned long long seed;
        if (sscanf(line, "%15[^,],%7[^,],%d,%d,%d,%llu,%31[^,],", var, mode, &length, &depth,
                   &trial, &seed, tag) != 7)
            continue; /* header */
        const char *last = strrchr(line, ',');
        /* correct is the second-to-last field */
        const char *p = last;
        while (p > line && p[-1] != ',')
            p--;
        if (p > line)
            correct = atoi(p);
        if (seed != o->seed || strcmp(var, ndl_variant_names[o->variant]))
            continue;
        for (int i = 0; i < o->n_modes; i++)
            if (!strcmp(tag, tags[i]) && !strcmp(mode, cli_kv_mode_name(&o->modes[i])) &&
                push_row(rows, n, cap, (ndl_row){o->variant, i, length, depth, trial,
                                                 correct}) < 0) {
                snprintf(err, errlen, "out of memory reading '%.300s'", path);
                rc = -1;
            }
    }
    free(s);
    return rc;
}

/* Appends one line with a single write and fsync. */
static int append_line(const char *path, const char *line, char *err, size_t errlen)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0) {
        snprintf(err, errlen, "cannot open '%.300s': %s", path, strerror(errno));
        return -1;
    }
    off_t end = lseek(fd, 0, SEEK_END);
    size_t n = strlen(line);
    int rc = 0;
    if (end == 0 && write(fd, ndl_csv_header, sizeof ndl_csv_header - 1) < 0)
        rc = -1;
    if (rc == 0 && write(fd, line, n) != (ssize_t)n)
        rc = -1;
    if (rc == 0 && fsync(fd) < 0)
        rc = -1;
    if (rc < 0)
        snprintf(err, errlen, "cannot write '%.300s': %s", path, strerror(errno));
    close(fd);
    return rc;
}

static int find_row(const ndl_row *rows, int n, int mode, int length, int depth, int trial)
{
    for (int i = 0; i < n; i++)
        if (rows[i].mode == mode && rows[i].length == length && rows[i].depth == depth &&
            rows[i].trial == trial)
            return i;
    return -1;
}

/* ---- running ---------------------------------------------------------- */

/* Prefills the prompt and decodes greedily; the answer text into out. */
static int answer(fwd_state *fs, const mdl_model *m, const ndl_prompt *pr, long n_predict,
                  char *out, size_t cap, double *prefill_s, char *err, size_t errlen)
{
    const float *lg;
    double t0 = cli_now_s();
    if (fwd_eval(fs, pr->ids, pr->n_ids, 0, 0, &lg, err, errlen) < 0)
        return -1;
    *prefill_s = cli_now_s() - t0;
    tok_decoder dec;
    tok_decoder_init(&dec, m->tok, 0);
    dec.first = 0;
    size_t len = 0;
    out[0] = '\0';
    const int V = m->hp.n_vocab;
    for (int i = 0; i < n_predict; i++) {
        int32_t best = 0;
        for (int v = 1; v < V; v++)
            if (lg[v] > lg[best])
                best = v;
        if (tok_is_eog(m->tok, best))
            break;
        char piece[256];
        size_t w = tok_decoder_push(&dec, best, piece, sizeof piece);
        if (len + w + 1 < cap) {
            memcpy(out + len, piece, w);
            len += w;
            out[len] = '\0';
        }
        if (i + 1 == n_predict)
            break;
        if (fwd_eval(fs, &best, 1, pr->n_ids + i, 0, &lg, err, errlen) < 0)
            return -1;
    }
    return 0;
}

/* 1 if the first run of digits in text equals want. */
static int score(const char *text, const char *want)
{
    const char *p = text;
    while (*p && (*p < '0' || *p > '9'))
        p++;
    size_t n = 0;
    while (p[n] >= '0' && p[n] <= '9')
        n++;
    return n == strlen(want) && !strncmp(p, want, n);
}

/* Adds v to the ascending set vals (*nv of at most cap). */
static void add_sorted(long *vals, int *nv, int cap, long v)
{
    int i = 0;
    while (i < *nv && vals[i] < v)
        i++;
    if ((i < *nv && vals[i] == v) || *nv >= cap)
        return;
    memmove(vals + i + 1, vals + i, (size_t)(*nv - i) * sizeof *vals);
    vals[i] = v;
    (*nv)++;
}

/* Writes the summary (accuracy per mode, length, depth) of every answer in
 * needle.csv for this configuration - the lengths and depths of earlier
 * runs into the same directory included, all their trials - to DIR and
 * stdout. */
static int summarize(const ndl_opts *o, const ndl_row *rows, int n, char *err,
                     size_t errlen)
{
    long lens[64], deps[64];
    int n_lens = 0, n_deps = 0;
    for (int i = 0; i < n; i++) {
        add_sorted(lens, &n_lens, 64, rows[i].length);
        add_sorted(deps, &n_deps, 64, rows[i].depth);
    }
    char path[4096];
    char *buf = malloc(1 << 16);
    if (!buf) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    size_t len = (size_t)snprintf(buf, 1 << 16,
                                  "variant,kv_cache,length,depth,n,correct,accuracy\n");
    const char *vn = ndl_variant_names[o->variant];
    printf("needle (%s%s): accuracy per prompt length (rows) and needle depth %% "
           "(columns), every answer in the results for seed %llu\n", vn, o->chat ? ", chat" : "",
           o->seed);
    for (int mi = 0; mi < o->n_modes; mi++) {
        printf("\n%s cache\n| length |", cli_kv_mode_name(&o->modes[mi]));
        for (int d = 0; d < n_deps; d++)
            printf(" %ld%% |", deps[d]);
        printf(" all |\n|---|");
        for (int d = 0; d <= n_deps; d++)
            printf("---|");
        printf("\n");
        int tot_n = 0, tot_c = 0;
        for (int li = 0; li < n_lens; li++) {
            printf("| %ld |", lens[li]);
            int ln = 0, lc = 0;
            for (int d = 0; d < n_deps; d++) {
                int cn = 0, cc = 0;
                for (int i = 0; i < n; i++)
                    if (rows[i].mode == mi && rows[i].length == lens[li] &&
                        rows[i].depth == deps[d]) {
                        cn++;
                        cc += rows[i].correct;
                    }
                ln += cn;
                lc += cc;
                if (cn)
                    printf(" %.2f |", (double)cc / cn);
                else
                    printf(" - |");
                if (cn && len < (1 << 16) - 128)
                    len += (size_t)snprintf(buf + len, (1 << 16) - len, "%s,%s,%ld,%ld,%d,%d,%.4f\n",
                                            vn, cli_kv_mode_name(&o->modes[mi]),
                                            lens[li], deps[d], cn, cc,
                                            (double)cc / cn);
            }
            printf(ln ? " %.2f |\n" : " - |\n", ln ? (double)lc / ln : 0.0);
            tot_n += ln;
            tot_c += lc;
        }
        printf("overall %s: %d/%d = %.3f\n", cli_kv_mode_name(&o->modes[mi]), tot_c, tot_n,
               tot_n ? (double)tot_c / tot_n : 0.0);
    }
    snprintf(path, sizeof path, "%s/needle_summary%s%s.csv", o->out,
             o->variant == NDL_PASSKEY ? "" : "_", o->variant == NDL_PASSKEY ? "" : vn);
    int rc = cli_write_atomic(path, buf, len, err, errlen);
    free(buf);
    return rc;
}

static int dump_prompt(const ndl_opts *o, int length, int depth, int trial,
                       const ndl_prompt *pr, char *err, size_t errlen)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/prompts", o->out);
    if (cli_mkdir(path, err, errlen) < 0)
        return -1;
    snprintf(path, sizeof path, "%s/prompts/%s_%d_%03d_%d.txt", o->out,
             ndl_variant_names[o->variant], length, depth, trial);
    char *buf = malloc(pr->len + 64);
    if (!buf) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    int h = snprintf(buf, 64, "# answer %s, %d tokens\n", pr->answer, pr->n_ids);
    memcpy(buf + h, pr->text, pr->len);
    int rc = cli_write_atomic(path, buf, (size_t)h + pr->len, err, errlen);
    free(buf);
    return rc;
}

int ndl_main(int argc, char **argv)
{
    ndl_opts *o = calloc(1, sizeof *o);
    char err[512];
    if (!o) {
        fprintf(stderr, "livekvq needle: out of memory\n");
        return 1;
    }
    char *text = NULL;
    mdl_model *m = NULL;
    ndl_row *rows = NULL;
    fwd_state *fs[2] = {NULL, NULL};
    int rc = 2;
    int pr = parse_opts(argc, argv, o, err, sizeof err);
    if (pr != 0) {
        if (pr > 0) {
            usage(stdout);
            rc = 0;
        } else {
            fprintf(stderr, "livekvq needle: %s\n", err);
        }
        goto out;
    }
    rc = 1;
    if (cli_mkdir(o->out, err, sizeof err) < 0) {
        fprintf(stderr, "livekvq needle: %s\n", err);
        goto out;
    }
    size_t len;
    text = cli_read_file(o->text, &len, err, sizeof err);
    if (!text) {
        fprintf(stderr, "livekvq needle: %s\n", err);
        goto out;
    }
    const char *filler = cli_text_start(text, o->start);
    if (!filler) {
        fprintf(stderr, "livekvq needle: no line of '%s' starts with '%s'\n", o->text, o->start);
        rc = 2;
        goto out;
    }
    size_t n_filler = len - (size_t)(filler - text);
    if (mdl_load(o->model, NULL, &m, err, sizeof err) < 0) {
        fprintf(stderr, "livekvq needle: %s\n", err);
        goto out;
    }
    for (int i = 0; i < o->n_lengths; i++)
        if (m->hp.n_ctx_train > 0 && o->lengths[i] > m->hp.n_ctx_train) {
            fprintf(stderr, "livekvq needle: length %ld exceeds the model's context %d\n",
                    o->lengths[i], m->hp.n_ctx_train);
            rc = 2;
            goto out;
        }
    const int total = o->n_modes * o->n_lengths * o->n_depths * (int)o->trials;
    int n_rows = 0, cap_rows = 0;
    char csv[4096];
    snprintf(csv, sizeof csv, "%s/needle%s%s.csv", o->out,
             o->variant == NDL_PASSKEY ? "" : "_",
             o->variant == NDL_PASSKEY ? "" : ndl_variant_names[o->variant]);
    if (load_rows(o, csv, &rows, &n_rows, &cap_rows, err, sizeof err) < 0) {
        fprintf(stderr, "livekvq needle: %s\n", err);
        goto out;
    }
    char tags[2][32];
    for (int i = 0; i < o->n_modes; i++)
        cfg_tag(o, &o->modes[i], tags[i], sizeof tags[i]);
    /* work in tokens, for the ETA */
    double work_total = 0, work_done = 0;
    int have = 0;
    for (int li = 0; li < o->n_lengths; li++)
        for (int d = 0; d < o->n_depths; d++)
            for (int t = 0; t < o->trials; t++)
                for (int mi = 0; mi < o->n_modes; mi++) {
                    if (find_row(rows, n_rows, mi, (int)o->lengths[li], (int)o->depths[d], t) < 0)
                        work_total += (double)o->lengths[li];
                    else
                        have++;
                }
    if (!o->quiet)
        fprintf(stderr, "needle: %d answers, %d in %s already, %.0f prompt tokens to run\n",
                total, have, csv, work_total);
    double t0 = cli_now_s(), last = 0;
    for (int li = 0; li < o->n_lengths; li++) {
        const int L = (int)o->lengths[li];
        for (int mi = 0; mi < 2; mi++) {
            fwd_destroy(fs[mi]);
            fs[mi] = NULL;
        }
        for (int d = 0; d < o->n_depths; d++) {
            for (int t = 0; t < o->trials; t++) {
                int need = o->dump || o->dry_run;
                for (int mi = 0; mi < o->n_modes; mi++)
                    need |= find_row(rows, n_rows, mi, L, (int)o->depths[d], t) < 0;
                if (!need)
                    continue;
                ndl_prompt p;
                if (build_prompt(o, m, filler, n_filler, L, (int)o->depths[d], t, &p, err,
                                 sizeof err) < 0) {
                    fprintf(stderr, "livekvq needle: length %d depth %ld: %s\n", L,
                            o->depths[d], err);
                    goto out;
                }
                if (o->dump && dump_prompt(o, L, (int)o->depths[d], t, &p, err, sizeof err) < 0) {
                    prompt_free(&p);
                    fprintf(stderr, "livekvq needle: %s\n", err);
                    goto out;
                }
                for (int mi = 0; mi < o->n_modes && !o->dry_run; mi++) {
                    if (find_row(rows, n_rows, mi, L, (int)o->depths[d], t) >= 0)
                        continue;
                    if (!fs[mi]) {
                        fwd_params fp = fwd_default_params();
                        fp.n_ctx = L;
                        fp.n_threads = (int32_t)o->threads;
                        fp.device = o->device;
                        fp.max_batch = o->modes[mi].chunk_size;
                        fp.kv = o->modes[mi];
                        if (fwd_create(m, &fp, &fs[mi], err, sizeof err) < 0) {
                            prompt_free(&p);
                            fprintf(stderr, "livekvq needle: %s\n", err);
                            goto out;
                        }
                    }
                    char got[512];
                    double ps = 0;
                    if (answer(fs[mi], m, &p, o->n_predict, got, sizeof got, &ps, err,
                               sizeof err) < 0) {
                        prompt_free(&p);
                        fprintf(stderr, "livekvq needle: %s\n", err);
                        goto out;
                    }
                    int ok = score(got, p.answer);
                    for (char *q = got; *q; q++)
                        if (*q == ',' || *q == '"' || *q == '\n' || *q == '\r')
                            *q = ' ';
                    char line[1024];
                    snprintf(line, sizeof line, "%s,%s,%d,%ld,%d,%llu,%s,%d,%s,\"%.60s\",%d,%.3f\n",
                             ndl_variant_names[o->variant], cli_kv_mode_name(&o->modes[mi]),
                             L, o->depths[d], t, o->seed, tags[mi], p.n_ids, p.answer, got,
                             ok, ps);
                    if (append_line(csv, line, err, sizeof err) < 0) {
                        prompt_free(&p);
                        fprintf(stderr, "livekvq needle: %s\n", err);
                        goto out;
                    }
                    if (push_row(&rows, &n_rows, &cap_rows,
                                 (ndl_row){o->variant, mi, L, (int)o->depths[d], t, ok}) < 0) {
                        prompt_free(&p);
                        fprintf(stderr, "livekvq needle: out of memory\n");
                        goto out;
                    }
                    work_done += L;
                    double el = cli_now_s() - t0;
                    if (!o->quiet && (el - last > 10 || work_done >= work_total)) {
                        last = el;
                        char e1[32], e2[32];
                        cli_fmt_duration(el, e1, sizeof e1);
                        cli_fmt_duration(el / work_done * (work_total - work_done), e2,
                                         sizeof e2);
                        fprintf(stderr, "needle: %s len %d depth %ld%% trial %d: %s "
                                "(answer %s, got '%.30s') | %3.0f%% | %s elapsed, eta %s\n",
                                cli_kv_mode_name(&o->modes[mi]), L, o->depths[d], t,
                                ok ? "right" : "wrong", p.answer, got,
                                100.0 * work_done / (work_total > 0 ? work_total : 1), e1, e2);
                    }
                }
                if (o->dry_run && !o->quiet)
                    printf("length %d depth %ld trial %d: %d tokens, answer %s\n", L,
                           o->depths[d], t, p.n_ids, p.answer);
                prompt_free(&p);
            }
        }
    }
    if (!o->dry_run && summarize(o, rows, n_rows, err, sizeof err) < 0) {
        fprintf(stderr, "livekvq needle: %s\n", err);
        goto out;
    }
    rc = 0;
out:
    fwd_destroy(fs[0]);
    fwd_destroy(fs[1]);
    free(rows);
    free(text);
    mdl_free(m);
    free(o);
    return rc;
}
