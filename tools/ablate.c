/*
 * ablate.c - `livekvq ablate`: sweeps of the KV cache knobs. Each cell of
 * the sweep (one cache configuration at one context length) measures
 *   quality  perplexity, KL divergence and top-1 agreement against the FP16
 *            cache (engine/eval/eval.h, both caches side by side on the text),
 *            bits per element, outlier and clamp ratios;
 *   cost     prefill time of ctx - decode tokens and time per decode step
 *            (teacher-forced on the text) in a separate run without the
 *            reference, the largest KV bytes held after any step, and per
 *            layer: the EMA range after every prefill chunk and the outlier
 *            counts at the end.
 * The sweep is a grid (every combination of the --vary lists) or one knob at
 * a time around the base configuration (--design oat).
 *
 * Results (DIR = --out):
 *   DIR/cells/<hash>.{key,csv,layers.csv,ema.csv,json}  one cell each,
 *        written atomically (tmp + rename), the .json last: a cell whose
 *        .key holds the same description and whose .json is complete is
 *        finished and never rerun;
 *   DIR/ablate.csv, ablate.jsonl, layers.csv, ema.csv  this sweep's finished
 *        cells in sweep order, rebuilt after every cell;
 *   DIR/command.txt  the command line.
 * An interrupted sweep therefore resumes where it stopped, and a finished
 * cell's files are never half-written.
 *
 * Single-threaded apart from the kernel thread pool.
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config/kvq_config.h"
#include "engine/eval/eval.h"
#include "engine/graph/forward.h"
#include "engine/kv/kvcache.h"
#include "engine/model/model.h"
#include "engine/util/strbuf.h"
#include "tokenizer/tok.h"
#include "tools/cli_common.h"
#include "tools/eval_cmds.h"

#define ABL_MAX_AXES 16
#define ABL_MAX_VALUES 32
#define ABL_ERR 512

/* One --vary: a knob (or the pseudo-knob "ctx") and its values. */
typedef struct {
    char key[32];
    int n;
    char *vals[ABL_MAX_VALUES];
    char buf[1024];
} abl_axis;

typedef struct {
    cfg_kv kv;
    int ctx;
    char label[512];
    char key[2048]; /* canonical description: what makes the cell unique */
    char hash[17];
    int done;       /* finished in an earlier run */
} abl_cell;

typedef struct {
    const char *model, *text, *out, *start;
    long ctx, windows, decode, threads, max_cells;
    bk_device device;
    int oat, no_timing, no_quality, no_compare, exact, dry_run, quiet;
    cfg_kv base;
    abl_axis axes[ABL_MAX_AXES];
    int n_axes;
} abl_opts;

/* Measurements of one cell (have_eval / have_timing say which parts ran). */
typedef struct {
    eval_result ev;
    int have_eval;
    double eval_s;
    int have_timing;
    int n_prefill, n_decode;
    double prefill_s, decode_s;
    int64_t kv_peak;
    kvc_stats kv_after_prefill;
} abl_res;

/* Sweep-wide progress. */
typedef struct {
    const abl_opts *o;
    int cell_i, n_cells, n_todo, n_run;
    const char *label;
    double t0, units_total, units_done, cell_units_eval, last_print;
    int tty;
} abl_progress;

/* ---- options ---------------------------------------------------------- */

static void usage(FILE *f)
{
    fprintf(f,
        "usage: livekvq ablate -m MODEL -f TEXT -o DIR [-c CTX] --vary KNOB=V1,V2,... [...]\n"
        "\n"
        "Runs every cell of a sweep over the KV cache knobs and writes one row per\n"
        "cell to DIR/ablate.csv and DIR/ablate.jsonl (plus per-layer outliers in\n"
        "DIR/layers.csv and EMA ranges per chunk in DIR/ema.csv). Finished cells are\n"
        "kept in DIR/cells/ and skipped when the sweep is run again, so an\n"
        "interrupted sweep resumes where it stopped. Progress and ETA on stderr.\n"
        "\n"
        "  -m, --model PATH      model file\n"
        "  -f, --file PATH       text (from the first line starting with --start,\n"
        "                        default 'CHAPTER 1.' when present)\n"
        "  -o, --out DIR         results directory (created)\n"
        "  -c, --ctx-size N      context of every cell (default 1024)\n"
        "      --vary K=LIST     a knob and its comma-separated values; repeat for\n"
        "                        more knobs. K is a cache knob (kv_cache, chunk_size,\n"
        "                        warmup_chunks, ema_decay, ema_clip, clip_quantile,\n"
        "                        v_group, outlier_budget, sink_tokens, k_quant, ...)\n"
        "                        or ctx\n"
        "      --design grid|oat grid: every combination (default); oat: the base\n"
        "                        configuration plus one knob changed at a time\n"
        "      --set K=V         base value of a knob (also --config FILE and every\n"
        "                        --knob-name flag of `livekvq perplexity`)\n"
        "      --windows N       windows of CTX tokens per quality measurement (1)\n"
        "      --decode N        decode steps timed after a prefill of CTX-N tokens (16)\n"
        "      --no-timing       skip the timing run (no prefill/decode times, no\n"
        "                        per-layer files)\n"
        "      --no-quality      skip the quality run (memory and timing only)\n"
        "      --no-compare      quality without the FP16 reference (no KLD/top-1)\n"
        "      --exact           exact quality runs: f32 matmuls over the dequantized\n"
        "                        weights, so a cell and its FP16 reference differ only\n"
        "                        in the KV cache (livekvq perplexity --exact); timing\n"
        "                        runs stay in the fast mode\n"
        "      --max-cells N     refuse sweeps of more cells (default 1000)\n"
        "      --dry-run         list the cells (done / to run) and exit\n"
        "  -t, --threads N       threads (default: online CPUs)\n"
        "      --device cpu|cuda where the forward pass runs (default cpu)\n"
        "  -q, --quiet           no progress on stderr\n");
}

enum {
    O_VARY = 256, O_DESIGN, O_WINDOWS, O_DECODE, O_NO_TIMING, O_NO_QUALITY,
    O_NO_COMPARE, O_MAX_CELLS, O_DRY_RUN, O_EXACT,
};

static const char *const abl_pseudo_keys[] = {"ctx", NULL};

/* "ctx" or a cache knob, '-' folded to '_' into out. 0 if known. */
static int knob_name(const char *k, char *out, size_t cap)
{
    size_t n = strlen(k);
    if (n == 0 || n + 1 > cap)
        return -1;
    for (size_t i = 0; i <= n; i++)
        out[i] = k[i] == '-' ? '_' : k[i];
    for (int i = 0; abl_pseudo_keys[i]; i++)
        if (!strcmp(out, abl_pseudo_keys[i]))
            return 0;
    return cfg_kv_is_key(out) ? 0 : -1;
}

/* Applies one knob value (ctx or cache knob) to a cell's config. */
static int apply_knob(cfg_kv *kv, int *ctx, const char *key, const char *val, char *err,
                      size_t errlen)
{
    if (!strcmp(key, "ctx")) {
        long v;
        if (cli_parse_long("ctx", val, 2, 1 << 20, &v, err, errlen) < 0)
            return -1;
        *ctx = (int)v;
        return 0;
    }
    return cfg_kv_set(kv, key, val, err, errlen);
}

/* Parses one --vary argument into a new axis. */
static int parse_vary(abl_opts *o, const char *arg, char *err, size_t errlen)
{
    const char *eq = strchr(arg, '=');
    if (!eq || eq == arg) {
        snprintf(err, errlen, "--vary '%s': expected KNOB=V1,V2,...", arg);
        return -1;
    }
    if (o->n_axes == ABL_MAX_AXES) {
        snprintf(err, errlen, "--vary: at most %d knobs", ABL_MAX_AXES);
        return -1;
    }
    abl_axis *a = &o->axes[o->n_axes];
    char raw[64];
    size_t kl = (size_t)(eq - arg);
    if (kl >= sizeof raw)
        kl = sizeof raw - 1;
    memcpy(raw, arg, kl);
    raw[kl] = '\0';
    if (knob_name(raw, a->key, sizeof a->key) < 0) {
        snprintf(err, errlen, "--vary '%s': unknown knob '%s' (knobs: ctx, kv_cache, "
                 "chunk_size, block_tokens, warmup_chunks, ema_decay, ema_clip, "
                 "clip_quantile, v_group, outlier_budget, sink_tokens, keep_warmup_fp16, "
                 "k_quant, kv_budget)", arg, raw);
        return -1;
    }
    for (int i = 0; i < o->n_axes; i++)
        if (!strcmp(o->axes[i].key, a->key)) {
            snprintf(err, errlen, "--vary '%s': knob '%s' is already varied", arg, a->key);
            return -1;
        }
    char lerr[256];
    if (!eq[1]) {
        snprintf(err, errlen, "--vary '%s': no values after '='", arg);
        return -1;
    }
    a->n = cli_split_list(eq + 1, a->buf, sizeof a->buf, a->vals, ABL_MAX_VALUES, lerr,
                          sizeof lerr);
    if (a->n < 0) {
        snprintf(err, errlen, "--vary '%s': %s", arg, lerr);
        return -1;
    }
    for (int i = 0; i < a->n; i++) {
        cfg_kv scratch = cfg_kv_default();
        int ctx = 0;
        if (apply_knob(&scratch, &ctx, a->key, a->vals[i], lerr, sizeof lerr) < 0) {
            snprintf(err, errlen, "--vary '%s': %s", arg, lerr);
            return -1;
        }
        for (int j = 0; j < i; j++)
            if (!strcmp(a->vals[i], a->vals[j])) {
                snprintf(err, errlen, "--vary '%s': value '%s' listed twice", arg,
                         a->vals[i]);
                return -1;
            }
    }
    o->n_axes++;
    return 0;
}

/* Returns 0, 1 for --help, -1 for a usage error (one line in err). */
static int parse_opts(int argc, char **argv, abl_opts *o, char *err, size_t errlen)
{
    static const struct option base[] = {
        {"out", required_argument, 0, 'o'},
        {"ctx-size", required_argument, 0, 'c'},
        {"vary", required_argument, 0, O_VARY},
        {"design", required_argument, 0, O_DESIGN},
        {"windows", required_argument, 0, O_WINDOWS},
        {"decode", required_argument, 0, O_DECODE},
        {"no-timing", no_argument, 0, O_NO_TIMING},
        {"no-quality", no_argument, 0, O_NO_QUALITY},
        {"no-compare", no_argument, 0, O_NO_COMPARE},
        {"exact", no_argument, 0, O_EXACT},
        {"max-cells", required_argument, 0, O_MAX_CELLS},
        {"dry-run", no_argument, 0, O_DRY_RUN},
        {"quiet", no_argument, 0, 'q'},
    };
    const int nb = (int)(sizeof base / sizeof base[0]);
    static struct option opts[64];
    static char names[32][32];
    cli_eval_opts(base, nb, opts, 64, names);

    memset(o, 0, sizeof *o);
    o->ctx = 1024;
    o->windows = 1;
    o->decode = 16;
    o->max_cells = 1000;
    o->base = cfg_kv_default();
    optind = 1;
    opterr = 0;
    int c;
    long v;
    while ((c = getopt_long(argc, argv, ":m:f:o:c:t:qh", opts, NULL)) != -1) {
        switch (c) {
        case 'm': o->model = optarg; break;
        case 'f': o->text = optarg; break;
        case 'o': o->out = optarg; break;
        case 'c':
            if (cli_parse_long("-c", optarg, 2, 1 << 20, &v, err, errlen) < 0) return -1;
            o->ctx = v; break;
        case 't':
            if (cli_parse_long("-t", optarg, 1, 256, &v, err, errlen) < 0) return -1;
            o->threads = v; break;
        case O_VARY:
            if (parse_vary(o, optarg, err, errlen) < 0) return -1;
            break;
        case O_DESIGN:
            if (!strcmp(optarg, "grid")) o->oat = 0;
            else if (!strcmp(optarg, "oat")) o->oat = 1;
            else {
                snprintf(err, errlen, "--design expects grid or oat, got '%s'", optarg);
                return -1;
            }
            break;
        case CLI_OPT_SET: { /* also takes ctx=N */
            char k[64];
            const char *eq = strchr(optarg, '=');
            size_t kl = eq ? (size_t)(eq - optarg) : 0;
            if (eq && kl < sizeof k) {
                memcpy(k, optarg, kl);
                k[kl] = '\0';
                if (knob_name(k, k, sizeof k) == 0 && !strcmp(k, "ctx")) {
                    if (cli_parse_long("ctx", eq + 1, 2, 1 << 20, &v, err, errlen) < 0)
                        return -1;
                    o->ctx = v;
                    break;
                }
            }
            if (cli_eval_opt(c, optarg, argv, &o->base, &o->start, &o->device,
                             err, errlen) < 0)
                return -1;
            break;
        }
        case O_WINDOWS:
            if (cli_parse_long("--windows", optarg, 1, 100000, &v, err, errlen) < 0) return -1;
            o->windows = v; break;
        case O_DECODE:
            if (cli_parse_long("--decode", optarg, 0, 1 << 16, &v, err, errlen) < 0) return -1;
            o->decode = v; break;
        case O_NO_TIMING: o->no_timing = 1; break;
        case O_NO_QUALITY: o->no_quality = 1; break;
        case O_NO_COMPARE: o->no_compare = 1; break;
        case O_EXACT: o->exact = 1; break;
        case O_MAX_CELLS:
            if (cli_parse_long("--max-cells", optarg, 1, 1000000, &v, err, errlen) < 0)
                return -1;
            o->max_cells = v; break;
        case O_DRY_RUN: o->dry_run = 1; break;
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
        snprintf(err, errlen, "ablate needs -m MODEL, -f TEXT and -o DIR");
        return -1;
    }
    if (o->no_timing && o->no_quality) {
        snprintf(err, errlen, "--no-timing and --no-quality leave nothing to measure");
        return -1;
    }
    return 0;
}

/* ---- cells ------------------------------------------------------------ */

static const char *base_name(const char *p)
{
    const char *s = strrchr(p, '/');
    return s ? s + 1 : p;
}

/* Fills the canonical key, hash and validates the cell's config. */
static int finish_cell(const abl_opts *o, abl_cell *c, char *err, size_t errlen)
{
    char lerr[256];
    if (cfg_kv_validate(&c->kv, lerr, sizeof lerr) < 0) {
        snprintf(err, errlen, "cell '%.120s': %s", c->label, lerr);
        return -1;
    }
    if (o->decode >= c->ctx && !o->no_timing) {
        snprintf(err, errlen, "cell '%.120s': --decode %ld leaves no prompt in a context of %d",
                 c->label, o->decode, c->ctx);
        return -1;
    }
    char cfg[1024];
    cfg_kv_json(&c->kv, cfg, sizeof cfg);
    snprintf(c->key, sizeof c->key,
             "model=%s text=%s start=%s ctx=%d windows=%ld decode=%ld quality=%d "
             "compare=%d timing=%d%s {%s}",
             base_name(o->model), base_name(o->text), o->start ? o->start : "-", c->ctx,
             o->windows, o->no_timing ? 0L : o->decode, !o->no_quality, !o->no_compare,
             !o->no_timing, o->exact ? " exact=1" : "", cfg);
    snprintf(c->hash, sizeof c->hash, "%016llx", (unsigned long long)cli_hash64(c->key));
    return 0;
}

/* Expands the axes into cells (grid or one-at-a-time). Caller frees *out. */
static int make_cells(const abl_opts *o, abl_cell **out, int *n_out, char *err,
                      size_t errlen)
{
    long n = 1;
    if (o->oat) {
        for (int i = 0; i < o->n_axes; i++)
            n += o->axes[i].n;
    } else {
        for (int i = 0; i < o->n_axes; i++) {
            n *= o->axes[i].n;
            if (n > o->max_cells)
                break;
        }
    }
    if (n > o->max_cells) {
        snprintf(err, errlen, "the sweep has more than %ld cells (--max-cells %ld); "
                 "vary fewer knobs or raise --max-cells", o->max_cells, o->max_cells);
        return -1;
    }
    abl_cell *cells = calloc((size_t)n, sizeof *cells);
    if (!cells) {
        snprintf(err, errlen, "out of memory for %ld cells", n);
        return -1;
    }
    int k = 0;
    char lerr[256];
    if (o->oat) {
        cells[k].kv = o->base;
        cells[k].ctx = (int)o->ctx;
        snprintf(cells[k].label, sizeof cells[k].label, "default");
        if (finish_cell(o, &cells[k], err, errlen) < 0)
            goto fail;
        k++;
        for (int a = 0; a < o->n_axes; a++)
            for (int j = 0; j < o->axes[a].n; j++) {
                abl_cell *c = &cells[k];
                c->kv = o->base;
                c->ctx = (int)o->ctx;
                if (apply_knob(&c->kv, &c->ctx, o->axes[a].key, o->axes[a].vals[j], lerr,
                               sizeof lerr) < 0) {
                    snprintf(err, errlen, "%s", lerr);
                    goto fail;
                }
                snprintf(c->label, sizeof c->label, "%s=%s", o->axes[a].key,
                         o->axes[a].vals[j]);
                if (finish_cell(o, c, err, errlen) < 0)
                    goto fail;
                int dup = 0; /* the base value of a knob is the base cell */
                for (int i = 0; i < k; i++)
                    dup |= !strcmp(cells[i].key, c->key);
                if (!dup)
                    k++;
            }
    } else {
        int idx[ABL_MAX_AXES] = {0};
        for (;;) {
            abl_cell *c = &cells[k];
            c->kv = o->base;
            c->ctx = (int)o->ctx;
            size_t ll = 0;
            c->label[0] = '\0';
            for (int a = 0; a < o->n_axes; a++) {
                const char *val = o->axes[a].vals[idx[a]];
                if (apply_knob(&c->kv, &c->ctx, o->axes[a].key, val, lerr, sizeof lerr) < 0) {
                    snprintf(err, errlen, "%s", lerr);
                    goto fail;
                }
                ll += (size_t)snprintf(c->label + ll, sizeof c->label - ll, "%s%s=%s",
                                       a ? " " : "", o->axes[a].key, val);
                if (ll >= sizeof c->label)
                    ll = sizeof c->label - 1;
            }
            if (o->n_axes == 0)
                snprintf(c->label, sizeof c->label, "default");
            if (finish_cell(o, c, err, errlen) < 0)
                goto fail;
            k++;
            int a = o->n_axes - 1; /* odometer, last knob fastest */
            while (a >= 0 && ++idx[a] == o->axes[a].n)
                idx[a--] = 0;
            if (a < 0)
                break;
        }
    }
    *out = cells;
    *n_out = k;
    return 0;
fail:
    free(cells);
    return -1;
}

/* 1 if the cell's .key file holds this cell's key and its .json (written
 * last) is complete: hash collisions and files of other versions are not
 * taken for it. */
static int cell_done(const abl_opts *o, const abl_cell *c)
{
    char path[4096], err[256];
    size_t len;
    snprintf(path, sizeof path, "%s/cells/%s.key", o->out, c->hash);
    char *k = cli_read_file(path, &len, err, sizeof err);
    if (!k)
        return 0;
    int ok = len == strlen(c->key) + 1 && !strncmp(k, c->key, len - 1) && k[len - 1] == '\n';
    free(k);
    if (!ok)
        return 0;
    snprintf(path, sizeof path, "%s/cells/%s.json", o->out, c->hash);
    char *s = cli_read_file(path, &len, err, sizeof err);
    if (!s)
        return 0;
    ok = len > 2 && s[0] == '{' && s[len - 1] == '\n' && s[len - 2] == '}';
    free(s);
    return ok;
}

/* ---- measurement ------------------------------------------------------ */

static void print_progress(abl_progress *P, const char *what, int force)
{
    if (P->o->quiet)
        return;
    double now = cli_now_s();
    if (!force && !P->tty && now - P->last_print < 15.0)
        return;
    P->last_print = now;
    double el = now - P->t0;
    double frac = P->units_total > 0 ? P->units_done / P->units_total : 0;
    if (frac > 1)
        frac = 1;
    char e1[32], e2[32];
    cli_fmt_duration(el, e1, sizeof e1);
    if (frac > 0.001)
        cli_fmt_duration(el / frac - el, e2, sizeof e2);
    else
        snprintf(e2, sizeof e2, "?");
    fprintf(stderr, "%sablate: cell %d/%d [%s] %s | %3.0f%% | %s elapsed, eta %s%s",
            P->tty ? "\r\033[K" : "", P->cell_i + 1, P->n_cells, P->label, what,
            100.0 * frac, e1, e2, P->tty ? "" : "\n");
    fflush(stderr);
}

static void eval_cb(void *ctx, int w, int nw, int c, int nc, double ppl, double kld,
                    double el)
{
    abl_progress *P = ctx;
    (void)el;
    (void)ppl;
    (void)kld;
    double f = (double)(w * nc + c + 1) / (double)(nw * nc);
    double saved = P->units_done;
    P->units_done += f * P->cell_units_eval;
    char what[96];
    snprintf(what, sizeof what, "quality w%d/%d chunk %d/%d", w + 1, nw, c + 1, nc);
    print_progress(P, what, 0);
    P->units_done = saved;
}

/* Work units of a cell (tokens, the quality run weighted for its two
 * caches and all-position logits). */
static double cell_units(const abl_opts *o, const abl_cell *c, double *eval_units)
{
    double q = 0;
    if (!o->no_quality)
        q = (double)c->ctx * (double)o->windows *
            (!o->no_compare && c->kv.mode != CFG_KV_FP16 ? 2.6 : 1.3);
    *eval_units = q;
    return q + (o->no_timing ? 0 : (double)c->ctx);
}

static void peak_update(fwd_state *fs, abl_res *r)
{
    kvc_stats st;
    if (fwd_kv_stats(fs, &st, NULL, 0) == 0 && st.bytes_total > r->kv_peak)
        r->kv_peak = st.bytes_total;
}

/* The timing run: prefill tokens[0, ctx - decode) chunk by chunk (EMA
 * trace after each chunk), then decode steps teacher-forced on the text;
 * per-layer outlier counts at the end. Appends rows to ema and layers. */
static int timing_run(const abl_opts *o, const mdl_model *m, const abl_cell *c,
                      const int32_t *tok, abl_res *r, lkq_sb *ema, lkq_sb *layers,
                      abl_progress *P, char *err, size_t errlen)
{
    fwd_params fp = fwd_default_params();
    fp.n_ctx = c->ctx;
    fp.max_batch = c->kv.chunk_size;
    fp.n_threads = (int32_t)o->threads;
    fp.device = o->device;
    fp.kv = c->kv;
    fwd_state *fs = NULL;
    if (fwd_create(m, &fp, &fs, err, errlen) < 0)
        return -1;
    int rc = -1;
    const int C = c->kv.chunk_size, L = m->hp.n_layers;
    const int n_prompt = c->ctx - (int)o->decode;
    const int nc = (n_prompt + C - 1) / C;
    const float *lg;
    double units0 = P->units_done;
    double t0 = cli_now_s();
    for (int ch = 0; ch < nc; ch++) {
        int pos = ch * C, len = n_prompt - pos < C ? n_prompt - pos : C;
        if (fwd_eval(fs, tok + pos, len, pos, 0, &lg, err, errlen) < 0)
            goto done;
        peak_update(fs, r);
        fwd_seq *sq = fwd_own_seq(fs);
        for (int l = 0; l < L; l++)
            for (int t = 0; t < 2; t++) {
                float lo, hi;
                if (fwd_seq_ema(sq, l, t, &lo, &hi) == 0)
                    lkq_sb_printf(ema, "%s,\"%s\",%d,%d,%s,%.6g,%.6g,%.6g\n", c->hash, c->label,
                              ch, l, t ? "v" : "k", lo, hi, hi - lo);
            }
        P->units_done = units0 + (double)(pos + len);
        char what[96];
        snprintf(what, sizeof what, "timing prefill chunk %d/%d", ch + 1, nc);
        print_progress(P, what, 0);
    }
    if (fwd_finish_prefill(fs, err, errlen) < 0)
        goto done;
    r->prefill_s = cli_now_s() - t0;
    r->n_prefill = n_prompt;
    peak_update(fs, r);
    if (fwd_kv_stats(fs, &r->kv_after_prefill, err, errlen) < 0)
        goto done;
    t0 = cli_now_s();
    for (int i = 0; i < (int)o->decode; i++) {
        int pos = n_prompt + i;
        if (fwd_eval(fs, tok + pos, 1, pos, 0, &lg, err, errlen) < 0)
            goto done;
        peak_update(fs, r);
    }
    r->decode_s = cli_now_s() - t0;
    r->n_decode = (int)o->decode;
    fwd_seq *sq = fwd_own_seq(fs);
    for (int l = 0; l < L; l++) {
        kvc_layer_counts lc;
        if (fwd_seq_layer_counts(sq, l, &lc, NULL, 0) < 0)
            continue;
        double q = lc.n_quantized > 0 ? (double)lc.n_quantized : 1;
        lkq_sb_printf(layers, "%s,\"%s\",%d,%lld,%lld,%lld,%lld,%.6g,%.6g\n", c->hash, c->label,
                  l, (long long)lc.n_quantized, (long long)lc.n_k_outliers,
                  (long long)lc.n_v_outliers, (long long)lc.n_clamped,
                  (double)(lc.n_k_outliers + lc.n_v_outliers) / q, (double)lc.n_clamped / q);
    }
    r->have_timing = 1;
    rc = 0;
done:
    fwd_destroy(fs);
    return rc;
}

static const char abl_csv_header[] =
    "cell,label,ctx,windows,kv_cache,chunk_size,block_tokens,warmup_chunks,ema_decay,"
    "ema_clip,clip_quantile,v_group,outlier_budget,sink_tokens,keep_warmup_fp16,k_quant,"
    "kv_budget,n_scored,ppl,ppl_fp16,ppl_rel,kld,kld_max,top1_agree,bits_per_element,"
    "kv_bytes,kv_bytes_fp16,kv_peak_bytes,outlier_ratio,clamp_ratio,prefill_tokens,"
    "prefill_s,prefill_tok_s,decode_tokens,decode_ms_per_tok,quality_s\n";
static const char abl_layers_header[] =
    "cell,label,layer,n_quantized,k_outliers,v_outliers,clamped,outlier_ratio,clamp_ratio\n";
static const char abl_ema_header[] = "cell,label,chunk,layer,tensor,lo,hi,width\n";

/* The cell's CSV row and JSON object (one line each, with newline). */
static void format_cell(const abl_opts *o, const abl_cell *c, const abl_res *r,
                        lkq_sb *csv, lkq_sb *js)
{
    const cfg_kv *k = &c->kv;
    char budget[32];
    if (k->kv_budget_tokens > 0)
        snprintf(budget, sizeof budget, "%lldt", (long long)k->kv_budget_tokens);
    else
        snprintf(budget, sizeof budget, "%lld", (long long)k->kv_budget_bytes);
    const kvc_stats *st = r->have_eval ? &r->ev.kv : &r->kv_after_prefill;
    double bits = kvc_stats_bits(st);
    double nq = st->n_quantized ? (double)st->n_quantized : 1;
    double orat = (double)st->n_outliers / nq, crat = (double)st->n_clamped / nq;
    lkq_sb_printf(csv, "%s,\"%s\",%d,%ld,%s,%d,%d,%d,%g,%g,%g,%d,%g,%d,%d,%s,%s,", c->hash,
              c->label, c->ctx, o->windows, cli_kv_mode_name(k), k->chunk_size,
              k->block_tokens, k->warmup_chunks, k->ema_decay, k->ema_clip,
              k->clip_quantile, k->v_group, k->outlier_budget, k->sink_tokens,
              k->keep_warmup_fp16, k->k_mode == KVQ_K_PER_TOKEN ? "token" : "channel",
              budget);
    char cfg[1024];
    cfg_kv_json(k, cfg, sizeof cfg);
    lkq_sb_printf(js, "{\"cell\": \"%s\", \"label\": \"%s\", \"ctx\": %d, \"windows\": %ld, %s",
              c->hash, c->label, c->ctx, o->windows, cfg);
    if (r->have_eval) {
        const eval_result *e = &r->ev;
        lkq_sb_printf(csv, "%lld,%.6f,%.6f,%.6f,%.6g,%.6g,%.6f,", (long long)e->n_scored, e->ppl,
                  e->ppl_ref, e->ppl / e->ppl_ref - 1.0, e->kld, e->kld_max, e->top1_agree);
        lkq_sb_printf(js, ", \"n_scored\": %lld, \"ppl\": %.6f, \"ppl_fp16\": %.6f, "
                  "\"ppl_rel\": %.6f, \"kld\": %.6g, \"kld_max\": %.6g, \"top1_agree\": %.6f, "
                  "\"exact\": %d",
                  (long long)e->n_scored, e->ppl, e->ppl_ref, e->ppl / e->ppl_ref - 1.0,
                  e->kld, e->kld_max, e->top1_agree, o->exact);
    } else {
        lkq_sb_printf(csv, ",,,,,,,");
    }
    lkq_sb_printf(csv, "%.4f,%lld,%lld,", bits, (long long)st->bytes_total,
              (long long)st->bytes_fp16_equiv);
    lkq_sb_printf(js, ", \"bits_per_element\": %.4f, \"kv_bytes\": %lld, \"kv_bytes_fp16\": %lld",
              bits, (long long)st->bytes_total, (long long)st->bytes_fp16_equiv);
    if (r->have_timing)
        lkq_sb_printf(csv, "%lld,", (long long)r->kv_peak);
    else
        lkq_sb_printf(csv, ",");
    lkq_sb_printf(csv, "%.6g,%.6g,", orat, crat);
    lkq_sb_printf(js, ", \"outlier_ratio\": %.6g, \"clamp_ratio\": %.6g", orat, crat);
    if (r->have_timing) {
        double dms = r->n_decode ? 1e3 * r->decode_s / r->n_decode : 0;
        lkq_sb_printf(csv, "%d,%.4f,%.2f,%d,%.3f,", r->n_prefill, r->prefill_s,
                  r->n_prefill / (r->prefill_s > 0 ? r->prefill_s : 1e-9), r->n_decode, dms);
        lkq_sb_printf(js, ", \"kv_peak_bytes\": %lld, \"prefill_tokens\": %d, \"prefill_s\": %.4f, "
                  "\"decode_tokens\": %d, \"decode_ms_per_tok\": %.3f",
                  (long long)r->kv_peak, r->n_prefill, r->prefill_s, r->n_decode, dms);
    } else {
        lkq_sb_printf(csv, ",,,,,");
    }
    if (r->have_eval) {
        lkq_sb_printf(csv, "%.3f\n", r->eval_s);
        lkq_sb_printf(js, ", \"quality_s\": %.3f", r->eval_s);
    } else {
        lkq_sb_printf(csv, "\n");
    }
    lkq_sb_printf(js, ", \"key\": \"");
    for (const char *p = c->key; *p; p++)
        lkq_sb_printf(js, *p == '"' || *p == '\\' ? "\\%c" : "%c", *p);
    lkq_sb_printf(js, "\"}\n");
}

/* Writes one file of a cell atomically. */
static int write_cell_file(const abl_opts *o, const abl_cell *c, const char *ext,
                           const lkq_sb *b, char *err, size_t errlen)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/cells/%s.%s", o->out, c->hash, ext);
    return cli_write_atomic(path, b->s ? b->s : "", b->len, err, errlen);
}

/* Rebuilds DIR/<name> from the header plus cells/<hash>.<ext> of every
 * finished cell of this sweep, in sweep order. */
static int rebuild(const abl_opts *o, const abl_cell *cells, int n, const char *name,
                   const char *header, const char *ext, char *err, size_t errlen)
{
    lkq_sb b = {0};
    if (header)
        lkq_sb_printf(&b, "%s", header);
    for (int i = 0; i < n; i++) {
        if (!cells[i].done)
            continue;
        char path[4096], lerr[256];
        snprintf(path, sizeof path, "%s/cells/%s.%s", o->out, cells[i].hash, ext);
        size_t len;
        char *s = cli_read_file(path, &len, lerr, sizeof lerr);
        if (!s)
            continue; /* a cell measured with --no-timing has no per-layer files */
        lkq_sb_printf(&b, "%s", s);
        free(s);
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", o->out, name);
    int rc = b.oom ? -1 : cli_write_atomic(path, b.s ? b.s : "", b.len, err, errlen);
    if (b.oom)
        snprintf(err, errlen, "out of memory rebuilding %.300s", path);
    lkq_sb_free(&b);
    return rc;
}

static int rebuild_all(const abl_opts *o, const abl_cell *cells, int n, char *err,
                       size_t errlen)
{
    if (rebuild(o, cells, n, "ablate.csv", abl_csv_header, "csv", err, errlen) < 0 ||
        rebuild(o, cells, n, "ablate.jsonl", NULL, "json", err, errlen) < 0 ||
        rebuild(o, cells, n, "layers.csv", abl_layers_header, "layers.csv", err, errlen) < 0 ||
        rebuild(o, cells, n, "ema.csv", abl_ema_header, "ema.csv", err, errlen) < 0)
        return -1;
    return 0;
}

/* Runs one cell and writes its files (the .json last). */
static int run_cell(const abl_opts *o, const mdl_model *m, const abl_cell *c,
                    const int32_t *tok, int64_t n_tok, abl_progress *P, char *err,
                    size_t errlen)
{
    abl_res r;
    memset(&r, 0, sizeof r);
    lkq_sb csv = {0}, js = {0}, ema = {0}, layers = {0}, key = {0};
    int rc = -1;
    double eval_units;
    double units = cell_units(o, c, &eval_units);
    double units0 = P->units_done;
    P->cell_units_eval = eval_units;
    if (!o->no_quality) {
        eval_params ep = {
            .n_ctx = c->ctx, .n_windows = (int32_t)o->windows,
            .n_threads = (int32_t)o->threads, .device = (int)o->device, .compare = !o->no_compare, .kv = c->kv,
            .exact = o->exact,
            .progress = eval_cb, .progress_ctx = P,
        };
        double t0 = cli_now_s();
        if (eval_perplexity(m, tok, n_tok, &ep, &r.ev, err, errlen) < 0)
            goto done;
        r.eval_s = cli_now_s() - t0;
        r.have_eval = 1;
        P->units_done = units0 + eval_units;
    }
    if (!o->no_timing &&
        timing_run(o, m, c, tok, &r, &ema, &layers, P, err, errlen) < 0)
        goto done;
    P->units_done = units0 + units;
    format_cell(o, c, &r, &csv, &js);
    lkq_sb_printf(&key, "%s\n", c->key);
    if (csv.oom || js.oom || ema.oom || layers.oom || key.oom) {
        snprintf(err, errlen, "out of memory formatting the results");
        goto done;
    }
    if ((r.have_timing && (write_cell_file(o, c, "layers.csv", &layers, err, errlen) < 0 ||
                           write_cell_file(o, c, "ema.csv", &ema, err, errlen) < 0)) ||
        write_cell_file(o, c, "key", &key, err, errlen) < 0 ||
        write_cell_file(o, c, "csv", &csv, err, errlen) < 0 ||
        write_cell_file(o, c, "json", &js, err, errlen) < 0)
        goto done;
    if (!o->quiet) {
        if (P->tty)
            fprintf(stderr, "\r\033[K");
        fprintf(stderr, "ablate: done %s:", c->label);
        if (r.have_eval)
            fprintf(stderr, " ppl %.4f (%+.3f%%) kld %.5f top1 %.4f", r.ev.ppl,
                    100.0 * (r.ev.ppl / r.ev.ppl_ref - 1.0), r.ev.kld, r.ev.top1_agree);
        const kvc_stats *st = r.have_eval ? &r.ev.kv : &r.kv_after_prefill;
        fprintf(stderr, " bits %.3f", kvc_stats_bits(st));
        if (r.have_timing)
            fprintf(stderr, " prefill %.1f tok/s decode %.1f ms/tok",
                    r.n_prefill / (r.prefill_s > 0 ? r.prefill_s : 1e-9),
                    r.n_decode ? 1e3 * r.decode_s / r.n_decode : 0.0);
        fprintf(stderr, "\n");
    }
    rc = 0;
done:
    lkq_sb_free(&csv);
    lkq_sb_free(&js);
    lkq_sb_free(&ema);
    lkq_sb_free(&layers);
    lkq_sb_free(&key);
    return rc;
}

static int check_cells_dims(const abl_opts *o, const mdl_model *m, const kvc_dims *d,
                            const abl_cell *cells, int n, int64_t n_tok, char *err,
                            size_t errlen);

/* Checks every cell still to run against the model and the text; the
 * first impossible one is the reason. */
static int check_cells(const abl_opts *o, const mdl_model *m, const abl_cell *cells,
                       int n, int64_t n_tok, char *err, size_t errlen)
{
    const int hd = m->hp.head_dim > 0 ? m->hp.head_dim : m->hp.dim / m->hp.n_heads;
    int32_t *win = malloc((size_t)(m->hp.n_layers > 0 ? m->hp.n_layers : 1) * sizeof *win);
    if (!win) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    for (int l = 0; l < m->hp.n_layers; l++)
        win[l] = m->layers[l].window;
    const kvc_dims d = {m->hp.n_layers, m->hp.n_kv_heads * hd, hd, win};
    int rc = check_cells_dims(o, m, &d, cells, n, n_tok, err, errlen);
    free(win);
    return rc;
}

static int check_cells_dims(const abl_opts *o, const mdl_model *m, const kvc_dims *d,
                            const abl_cell *cells, int n, int64_t n_tok, char *err,
                            size_t errlen)
{
    const int hd = d->head_dim;
    char lerr[256];
    for (int i = 0; i < n; i++) {
        const abl_cell *c = &cells[i];
        if (c->done)
            continue;
        if (cfg_kv_validate_model(&c->kv, hd, m->hp.n_kv_heads, lerr, sizeof lerr) < 0) {
            snprintf(err, errlen, "cell '%.120s': %s", c->label, lerr);
            return -1;
        }
        if (m->hp.n_ctx_train > 0 && c->ctx > m->hp.n_ctx_train) {
            snprintf(err, errlen, "cell '%.120s': context %d exceeds the model's %d", c->label,
                     c->ctx, m->hp.n_ctx_train);
            return -1;
        }
        int64_t need = (int64_t)c->ctx * (o->no_quality ? 1 : o->windows);
        if (need > n_tok) {
            snprintf(err, errlen, "cell '%.120s': the text has %lld tokens, %lld needed",
                     c->label, (long long)n_tok, (long long)need);
            return -1;
        }
        if (c->kv.kv_budget_bytes > 0 || c->kv.kv_budget_tokens > 0) {
            /* what the pool gets from the budget vs what one sequence of
             * ctx tokens needs */
            cfg_kv free_kv = c->kv;
            free_kv.kv_budget_bytes = free_kv.kv_budget_tokens = 0;
            kvc_pool_sizes sz, sz_need; /* the global layers': what the budget buys */
            if (kvc_pool_plan(&c->kv, d, c->ctx, 1, &sz, lerr, sizeof lerr) < 0 ||
                kvc_pool_plan(&free_kv, d, c->ctx, 1, &sz_need, lerr, sizeof lerr) < 0) {
                snprintf(err, errlen, "cell '%.120s': impossible budget: %s", c->label, lerr);
                return -1;
            }
            int64_t nq = sz.n_qblocks[KVC_LAYER_GLOBAL], nf = sz.n_fpages[KVC_LAYER_GLOBAL];
            int64_t nf_need = sz_need.n_fpages[KVC_LAYER_GLOBAL];
            int64_t tq = (int64_t)c->ctx / c->kv.block_tokens;
            if ((c->kv.mode == CFG_KV_FP16 && nf < nf_need - 1) ||
                (c->kv.mode != CFG_KV_FP16 && nq < tq)) {
                snprintf(err, errlen, "cell '%.120s': impossible budget: kv_budget holds %lld "
                         "%s, a context of %d tokens needs %lld",
                         c->label,
                         (long long)(c->kv.mode == CFG_KV_FP16 ? nf : nq),
                         c->kv.mode == CFG_KV_FP16 ? "FP16 pages" : "INT4 blocks", c->ctx,
                         (long long)(c->kv.mode == CFG_KV_FP16 ? nf_need - 1 : tq));
                return -1;
            }
        }
    }
    return 0;
}

/* Writes DIR/command.txt (the command line, shell-quoted). */
static void write_command(const abl_opts *o, int argc, char **argv)
{
    lkq_sb b = {0};
    lkq_sb_printf(&b, "livekvq");
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        int plain = *a != '\0';
        for (const char *p = a; *p; p++)
            if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                        "-_=.,/:+", *p))
                plain = 0;
        if (plain) {
            lkq_sb_printf(&b, " %s", a);
        } else {
            lkq_sb_printf(&b, " '");
            for (const char *p = a; *p; p++)
                lkq_sb_printf(&b, *p == '\'' ? "'\\''" : "%c", *p);
            lkq_sb_printf(&b, "'");
        }
    }
    lkq_sb_printf(&b, "\n");
    char path[4096], err[256];
    snprintf(path, sizeof path, "%s/command.txt", o->out);
    if (!b.oom)
        (void)cli_write_atomic(path, b.s, b.len, err, sizeof err);
    lkq_sb_free(&b);
}

int abl_main(int argc, char **argv)
{
    abl_opts *o = calloc(1, sizeof *o);
    char err[ABL_ERR];
    if (!o) {
        fprintf(stderr, "livekvq ablate: out of memory\n");
        return 1;
    }
    abl_cell *cells = NULL;
    char *text = NULL;
    int32_t *tok = NULL;
    mdl_model *m = NULL;
    int rc = 2, n = 0;
    int pr = parse_opts(argc, argv, o, err, sizeof err);
    if (pr != 0) {
        if (pr > 0) {
            usage(stdout);
            rc = 0;
        } else {
            fprintf(stderr, "livekvq ablate: %s\n", err);
        }
        goto out;
    }
    if (make_cells(o, &cells, &n, err, sizeof err) < 0) {
        fprintf(stderr, "livekvq ablate: %s\n", err);
        goto out;
    }
    int n_todo = 0;
    for (int i = 0; i < n; i++) {
        cells[i].done = cell_done(o, &cells[i]);
        n_todo += !cells[i].done;
    }
    if (o->dry_run) {
        for (int i = 0; i < n; i++)
            printf("%s  %-5s  ctx %-5d  %s\n", cells[i].hash, cells[i].done ? "done" : "todo",
                   cells[i].ctx, cells[i].label);
        printf("%d cells, %d to run\n", n, n_todo);
        rc = 0;
        goto out;
    }
    rc = 1;
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/cells", o->out);
    if (n_todo > 0) {
        size_t len;
        text = cli_read_file(o->text, &len, err, sizeof err);
        if (!text) {
            fprintf(stderr, "livekvq ablate: %s\n", err);
            goto out;
        }
        const char *from = cli_text_start(text, o->start);
        if (!from) {
            fprintf(stderr, "livekvq ablate: no line of '%s' starts with '%s'\n", o->text,
                    o->start);
            rc = 2;
            goto out;
        }
        if (mdl_load(o->model, NULL, &m, err, sizeof err) < 0) {
            fprintf(stderr, "livekvq ablate: %s\n", err);
            goto out;
        }
        int nt = 0;
        tok = cli_encode(m, from, len - (size_t)(from - text), tok_default_add_bos(m->tok),
                         0, &nt, err, sizeof err);
        if (!tok) {
            fprintf(stderr, "livekvq ablate: %s\n", err);
            goto out;
        }
        if (check_cells(o, m, cells, n, nt, err, sizeof err) < 0) {
            fprintf(stderr, "livekvq ablate: %s\n", err);
            rc = 2;
            goto out;
        }
        if (cli_mkdir(dir, err, sizeof err) < 0) {
            fprintf(stderr, "livekvq ablate: %s\n", err);
            goto out;
        }
        write_command(o, argc, argv);
        if (!o->quiet)
            fprintf(stderr, "ablate: %d cells, %d finished earlier, %d to run\n", n,
                    n - n_todo, n_todo);
        abl_progress P = {.o = o, .n_cells = n, .n_todo = n_todo, .t0 = cli_now_s(),
                          .tty = isatty(STDERR_FILENO)};
        for (int i = 0; i < n; i++) {
            double eu;
            if (!cells[i].done)
                P.units_total += cell_units(o, &cells[i], &eu);
        }
        for (int i = 0; i < n; i++) {
            if (cells[i].done)
                continue;
            P.cell_i = i;
            P.label = cells[i].label;
            print_progress(&P, "starting", 1);
            if (run_cell(o, m, &cells[i], tok, nt, &P, err, sizeof err) < 0) {
                if (P.tty && !o->quiet)
                    fprintf(stderr, "\n");
                fprintf(stderr, "livekvq ablate: cell '%s': %s\n", cells[i].label, err);
                (void)rebuild_all(o, cells, n, err, sizeof err);
                goto out;
            }
            cells[i].done = 1;
            P.n_run++;
            if (rebuild_all(o, cells, n, err, sizeof err) < 0) {
                fprintf(stderr, "livekvq ablate: %s\n", err);
                goto out;
            }
        }
        if (!o->quiet) {
            char e1[32];
            cli_fmt_duration(cli_now_s() - P.t0, e1, sizeof e1);
            fprintf(stderr, "ablate: %d cells run in %s\n", P.n_run, e1);
        }
    } else {
        if (!o->quiet)
            fprintf(stderr, "ablate: %d cells, %d finished earlier, 0 to run\n", n, n);
        if (rebuild_all(o, cells, n, err, sizeof err) < 0) {
            fprintf(stderr, "livekvq ablate: %s\n", err);
            goto out;
        }
    }
    printf("results: %s/ablate.csv (%d cells)\n", o->out, n);
    rc = 0;
out:
    free(cells);
    free(tok);
    free(text);
    mdl_free(m);
    free(o);
    return rc;
}
