/*
 * profile.c - `livekvq profile`: where the time of one run goes. Prefills a
 * prompt (CTX - N tokens of a text, or -p TEXT), then decodes N tokens with
 * the sampler, for each cache mode asked (default fp16 and int4, in the
 * same process, same prompt), and prints a table of time per phase:
 * matmul, attention (INT4 history dequantized inside the kernel), KV store
 * (EMA update + live quantization), other (norms, RoPE, SwiGLU, embedding),
 * sampling (timed here), with prefill and decode apart. Dequantization is
 * fused into the attention kernel, so it shows as the INT4 attention time
 * minus the FP16 one (net of the memory traffic the INT4 history saves;
 * negative when the smaller reads win, as in decode over long histories). Then the peak KV bytes (largest held after any step), bits per
 * element, and the process's peak resident memory (VmHWM; note it covers
 * the whole process, both runs included). Phase times come from
 * fwd_profile (engine/graph/forward.h), wall time on the engine thread.
 *
 * Single-threaded apart from the kernel thread pool.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config/kvq_config.h"
#include "engine/graph/forward.h"
#include "engine/model/model.h"
#include "engine/sample/sampler.h"
#include "tokenizer/tok.h"
#include "tools/cli_common.h"
#include "tools/eval_cmds.h"

typedef struct {
    const char *model, *text, *prompt, *start;
    long ctx, n_decode, threads;
    bk_device device;
    float temp;
    unsigned long long seed;
    cfg_kv modes[2];
    int n_modes, json;
    cfg_kv base;
} prf_opts;

/* One mode's measurements. */
typedef struct {
    fwd_profile pre, dec;
    double pre_wall, dec_wall, sample_s;
    int n_prompt, n_gen;
    int64_t kv_peak;
    double bits;
} prf_run;

static void usage(FILE *f)
{
    fprintf(f,
        "usage: livekvq profile -m MODEL (-f TEXT -c CTX | -p PROMPT) [-n N] [options]\n"
        "\n"
        "Prefills the prompt (CTX - N tokens of TEXT from --start, default\n"
        "'CHAPTER 1.', or PROMPT) and decodes N tokens, with each cache mode, and\n"
        "prints the time per phase (matmul, attention incl. INT4 dequantization,\n"
        "KV store = EMA + quantization, other, sampling) for prefill and decode,\n"
        "the peak KV bytes and the process's peak memory (VmHWM).\n"
        "\n"
        "  -m, --model PATH      model file\n"
        "  -f, --file PATH       text for the prompt; -c CTX tokens in all\n"
        "  -p, --prompt TEXT     the prompt itself\n"
        "  -n, --n-predict N     decode steps (default 64)\n"
        "      --kv-cache LIST   modes to profile (default fp16,int4)\n"
        "      --temp T          sampling temperature (default 0: greedy)\n"
        "  -s, --seed S          sampler seed (default 1)\n"
        "      --json            one JSON line per mode at the end of stdout\n"
        "      --set K=V, --config FILE, --knob-name flags: cache knobs\n"
        "  -t, --threads N       threads (default: online CPUs)\n"
        "      --device cpu|cuda where the forward pass runs (default cpu)\n");
}

enum { P_KVC = 256, P_TEMP, P_JSON };

static int parse_opts(int argc, char **argv, prf_opts *o, char *err, size_t errlen)
{
    static const struct option base[] = {
        {"prompt", required_argument, 0, 'p'},
        {"ctx-size", required_argument, 0, 'c'},
        {"n-predict", required_argument, 0, 'n'},
        {"seed", required_argument, 0, 's'},
        {"kv-cache", required_argument, 0, P_KVC},
        {"temp", required_argument, 0, P_TEMP},
        {"json", no_argument, 0, P_JSON},
    };
    const int nb = (int)(sizeof base / sizeof base[0]);
    static struct option opts[64];
    static char names[32][32];
    cli_eval_opts(base, nb, opts, 64, names);
    memset(o, 0, sizeof *o);
    o->base = cfg_kv_default();
    o->n_decode = 64;
    o->seed = 1;
    const char *kvc = "fp16,int4";
    optind = 1;
    opterr = 0;
    int c;
    long v;
    double d;
    while ((c = getopt_long(argc, argv, ":m:f:p:c:n:t:s:h", opts, NULL)) != -1) {
        switch (c) {
        case 'm': o->model = optarg; break;
        case 'f': o->text = optarg; break;
        case 'p': o->prompt = optarg; break;
        case 'c':
            if (cli_parse_long("-c", optarg, 2, 1 << 20, &v, err, errlen) < 0) return -1;
            o->ctx = v; break;
        case 'n':
            if (cli_parse_long("-n", optarg, 0, 1 << 20, &v, err, errlen) < 0) return -1;
            o->n_decode = v; break;
        case 't':
            if (cli_parse_long("-t", optarg, 1, 256, &v, err, errlen) < 0) return -1;
            o->threads = v; break;
        case 's':
            if (cli_parse_long("--seed", optarg, 0, 0x7fffffffL, &v, err, errlen) < 0)
                return -1;
            o->seed = (unsigned long long)v; break;
        case P_KVC: kvc = optarg; break;
        case P_TEMP:
            if (cli_parse_double("--temp", optarg, &d, err, errlen) < 0) return -1;
            if (d < 0) {
                snprintf(err, errlen, "--temp must be >= 0");
                return -1;
            }
            o->temp = (float)d; break;
        case P_JSON: o->json = 1; break;
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
    if (!o->model || (!o->text == !o->prompt) || (o->text && o->ctx <= 0)) {
        snprintf(err, errlen, "profile needs -m MODEL and either -f TEXT -c CTX or -p PROMPT");
        return -1;
    }
    if (o->text && o->n_decode >= o->ctx) {
        snprintf(err, errlen, "-n %ld leaves no prompt in a context of %ld", o->n_decode,
                 o->ctx);
        return -1;
    }
    int k = cli_kv_modes(kvc, &o->base, o->modes, err, errlen);
    if (k < 0)
        return -1;
    o->n_modes = k;
    return 0;
}

static void peak(fwd_state *fs, prf_run *r)
{
    kvc_stats st;
    if (fwd_kv_stats(fs, &st, NULL, 0) < 0)
        memset(&st, 0, sizeof st);
    if (st.bytes_total > r->kv_peak)
        r->kv_peak = st.bytes_total;
    r->bits = kvc_stats_bits(&st);
}

/* Profiles one mode: prefill then n decode steps with the sampler. */
static int profile_mode(const prf_opts *o, const mdl_model *m, const cfg_kv *kv,
                        const int32_t *ids, int n_prompt, prf_run *r, char *err,
                        size_t errlen)
{
    memset(r, 0, sizeof *r);
    fwd_params fp = fwd_default_params();
    fp.n_ctx = n_prompt + (int)o->n_decode + 1;
    fp.max_batch = kv->chunk_size;
    fp.n_threads = (int32_t)o->threads;
    fp.device = o->device;
    fp.kv = *kv;
    fwd_state *fs = NULL;
    smp_sampler *smp = NULL;
    int32_t *hist = NULL;
    int rc = -1;
    if (fwd_create(m, &fp, &fs, err, errlen) < 0)
        goto done;
    smp_params sp = smp_default_params();
    sp.temperature = o->temp;
    sp.seed = o->seed;
    if (smp_create(&sp, m->hp.n_vocab, &smp, err, errlen) < 0)
        goto done;
    hist = malloc(((size_t)n_prompt + (size_t)o->n_decode + 1) * sizeof *hist);
    if (!hist) {
        snprintf(err, errlen, "out of memory");
        goto done;
    }
    memcpy(hist, ids, (size_t)n_prompt * sizeof *hist);
    const float *lg;
    fwd_profile_reset(fs);
    double t0 = cli_now_s();
    if (fwd_eval(fs, ids, n_prompt, 0, 0, &lg, err, errlen) < 0 ||
        fwd_finish_prefill(fs, err, errlen) < 0)
        goto done;
    r->pre_wall = cli_now_s() - t0;
    fwd_profile_get(fs, &r->pre);
    r->n_prompt = n_prompt;
    peak(fs, r);
    fwd_profile_reset(fs);
    t0 = cli_now_s();
    for (int i = 0; i < o->n_decode; i++) {
        double ts = cli_now_s();
        int32_t next = smp_sample(smp, lg, hist, n_prompt + i, NULL);
        r->sample_s += cli_now_s() - ts;
        hist[n_prompt + i] = next;
        if (fwd_eval(fs, &next, 1, n_prompt + i, 0, &lg, err, errlen) < 0)
            goto done;
        r->n_gen++;
        peak(fs, r);
    }
    r->dec_wall = cli_now_s() - t0;
    fwd_profile_get(fs, &r->dec);
    rc = 0;
done:
    free(hist);
    smp_destroy(smp);
    fwd_destroy(fs);
    return rc;
}

static void print_row(const char *name, const double *v, const double *tot, int n,
                      const prf_run *runs)
{
    printf("| %-34s |", name);
    for (int i = 0; i < n; i++) {
        if (v[2 * i] < 0)
            printf("        - |       |");
        else
            printf(" %8.3f | %4.1f%% |", v[2 * i], 100.0 * v[2 * i] / tot[2 * i]);
        if (v[2 * i + 1] < 0)
            printf("        - |       |");
        else
            printf(" %8.2f | %4.1f%% |",
                   runs[i].n_gen ? 1e3 * v[2 * i + 1] / runs[i].n_gen : 0.0,
                   100.0 * v[2 * i + 1] / tot[2 * i + 1]);
    }
    printf("\n");
}

int prf_main(int argc, char **argv)
{
    prf_opts o;
    char err[512];
    int pr = parse_opts(argc, argv, &o, err, sizeof err);
    if (pr != 0) {
        if (pr > 0) {
            usage(stdout);
            return 0;
        }
        fprintf(stderr, "livekvq profile: %s\n", err);
        return 2;
    }
    int rc = 1;
    char *text = NULL;
    int32_t *ids = NULL;
    mdl_model *m = NULL;
    int n = 0;
    size_t len = 0;
    if (o.text) {
        text = cli_read_file(o.text, &len, err, sizeof err);
        if (!text) {
            fprintf(stderr, "livekvq profile: %s\n", err);
            goto out;
        }
    }
    if (mdl_load(o.model, NULL, &m, err, sizeof err) < 0) {
        fprintf(stderr, "livekvq profile: %s\n", err);
        goto out;
    }
    int add_bos = tok_default_add_bos(m->tok);
    if (o.text) {
        const char *from = cli_text_start(text, o.start);
        if (!from) {
            fprintf(stderr, "livekvq profile: no line of '%s' starts with '%s'\n", o.text,
                    o.start);
            rc = 2;
            goto out;
        }
        ids = cli_encode(m, from, len - (size_t)(from - text), add_bos, 0, &n, err,
                         sizeof err);
        int want = (int)(o.ctx - o.n_decode);
        if (ids && n < want) {
            fprintf(stderr, "livekvq profile: the text has %d tokens, %d needed\n", n, want);
            rc = 2;
            goto out;
        }
        n = want;
    } else {
        ids = cli_encode(m, o.prompt, strlen(o.prompt), add_bos, 0, &n, err, sizeof err);
    }
    if (!ids || n < 1) {
        fprintf(stderr, "livekvq profile: %s\n", ids ? "empty prompt" : err);
        goto out;
    }
    if (m->hp.n_ctx_train > 0 && n + o.n_decode > m->hp.n_ctx_train) {
        fprintf(stderr, "livekvq profile: %d + %ld tokens exceed the model's context %d\n", n,
                o.n_decode, m->hp.n_ctx_train);
        rc = 2;
        goto out;
    }
    prf_run runs[2];
    for (int i = 0; i < o.n_modes; i++)
        if (profile_mode(&o, m, &o.modes[i], ids, n, &runs[i], err, sizeof err) < 0) {
            fprintf(stderr, "livekvq profile: %s: %s\n", cli_kv_mode_name(&o.modes[i]), err);
            goto out;
        }
    /* the table: per mode, prefill seconds and share, decode ms/token and share */
    char thr[32];
    snprintf(thr, sizeof thr, o.threads > 0 ? "%ld" : "all online CPUs", o.threads);
    printf("profile: %s, prompt %d tokens, %ld decode steps, threads: %s\n\n", m->name, n,
           o.n_decode, thr);
    printf("| %-34s |", "phase");
    for (int i = 0; i < o.n_modes; i++)
        printf(" %4s prefill s | share | %4s decode ms/tok | share |",
               cli_kv_mode_name(&o.modes[i]), cli_kv_mode_name(&o.modes[i]));
    printf("\n|---|");
    for (int i = 0; i < o.n_modes; i++)
        printf("---|---|---|---|");
    printf("\n");
    double tot[4], v[4];
    for (int i = 0; i < o.n_modes; i++) {
        tot[2 * i] = runs[i].pre_wall > 0 ? runs[i].pre_wall : 1e-9;
        tot[2 * i + 1] = runs[i].dec_wall + runs[i].sample_s;
        if (tot[2 * i + 1] <= 0)
            tot[2 * i + 1] = 1e-9;
    }
#define ROW(name, expr_pre, expr_dec)                        \
    do {                                                     \
        for (int i = 0; i < o.n_modes; i++) {                \
            const prf_run *r = &runs[i];                     \
            v[2 * i] = (expr_pre);                           \
            v[2 * i + 1] = (expr_dec);                       \
        }                                                    \
        print_row(name, v, tot, o.n_modes, runs);            \
    } while (0)
    ROW("matmul", r->pre.matmul_s, r->dec.matmul_s);
    ROW("attention (incl. INT4 dequant)", r->pre.attn_s, r->dec.attn_s);
    ROW("KV store (EMA + quantization)", r->pre.kv_store_s, r->dec.kv_store_s);
    ROW("other (norms, RoPE, SwiGLU, ...)", r->pre.other_s, r->dec.other_s);
    ROW("sampling", -1.0, r->sample_s);
    ROW("unaccounted (wall - phases)",
        r->pre_wall - (r->pre.matmul_s + r->pre.attn_s + r->pre.kv_store_s + r->pre.other_s),
        r->dec_wall - (r->dec.matmul_s + r->dec.attn_s + r->dec.kv_store_s + r->dec.other_s));
    ROW("total (wall)", r->pre_wall, r->dec_wall + r->sample_s);
#undef ROW
    int fi = -1, qi = -1;
    for (int i = 0; i < o.n_modes; i++) {
        if (o.modes[i].mode == CFG_KV_FP16)
            fi = i;
        else
            qi = i;
    }
    printf("\n");
    for (int i = 0; i < o.n_modes; i++)
        printf("%s: prefill %.1f tok/s, decode %.1f tok/s; peak KV %.2f MiB (%.3f bits "
               "per element)\n",
               cli_kv_mode_name(&o.modes[i]), runs[i].n_prompt / tot[2 * i],
               runs[i].n_gen ? runs[i].n_gen / tot[2 * i + 1] : 0.0,
               (double)runs[i].kv_peak / (1024.0 * 1024.0), runs[i].bits);
    if (fi >= 0 && qi >= 0)
        printf("attention, int4 - fp16 (dequantization cost net of the memory traffic "
               "saved): prefill %+.3f s, decode %+.3f ms/token\n",
               runs[qi].pre.attn_s - runs[fi].pre.attn_s,
               runs[qi].n_gen ? 1e3 * (runs[qi].dec.attn_s - runs[fi].dec.attn_s) / runs[qi].n_gen
                              : 0.0);
    int64_t hwm = cli_vm_hwm_bytes();
    printf("peak resident memory (VmHWM, whole process): %.1f MiB\n",
           hwm > 0 ? (double)hwm / (1024.0 * 1024.0) : -1.0);
    if (o.json)
        for (int i = 0; i < o.n_modes; i++) {
            const prf_run *r = &runs[i];
            printf("{\"kv_cache\": \"%s\", \"prompt_tokens\": %d, \"decode_tokens\": %d, "
                   "\"prefill_s\": %.4f, \"prefill_matmul_s\": %.4f, \"prefill_attn_s\": %.4f, "
                   "\"prefill_kv_store_s\": %.4f, \"prefill_other_s\": %.4f, "
                   "\"decode_s\": %.4f, \"decode_matmul_s\": %.4f, \"decode_attn_s\": %.4f, "
                   "\"decode_kv_store_s\": %.4f, \"decode_other_s\": %.4f, "
                   "\"sampling_s\": %.4f, \"kv_peak_bytes\": %lld, \"bits_per_element\": %.4f, "
                   "\"vm_hwm_bytes\": %lld}\n",
                   cli_kv_mode_name(&o.modes[i]), r->n_prompt, r->n_gen, r->pre_wall,
                   r->pre.matmul_s, r->pre.attn_s, r->pre.kv_store_s, r->pre.other_s,
                   r->dec_wall, r->dec.matmul_s, r->dec.attn_s, r->dec.kv_store_s,
                   r->dec.other_s, r->sample_s, (long long)r->kv_peak, r->bits,
                   (long long)hwm);
        }
    rc = 0;
out:
    free(ids);
    free(text);
    mdl_free(m);
    return rc;
}
