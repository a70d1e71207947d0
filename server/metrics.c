/*
 * metrics.c - Prometheus text format 0.0.4 (see metrics.h). Names use the
 * livekvq_ prefix and base units; counters end in _total; histograms are
 * cumulative with +Inf; plus the vLLM-compatible gauges that Kubernetes
 * inference gateways route on. The KV memory is also given by layer kind
 * (livekvq_kv_layer_*{layer_kind="global|window"}): separate families, so
 * that summing livekvq_kv_bytes still counts every byte once.
 */
#include "server/metrics.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/graph/forward.h"
#include "engine/util/strbuf.h"

static void head(lkq_sb *b, const char *name, const char *type, const char *help)
{
    lkq_sb_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void gauge(lkq_sb *b, const char *name, const char *help, double v)
{
    head(b, name, "gauge", help);
    lkq_sb_printf(b, "%s %.17g\n", name, v);
}

static void counter(lkq_sb *b, const char *name, const char *help, double v)
{
    head(b, name, "counter", help);
    lkq_sb_printf(b, "%s %.17g\n", name, v);
}

static void hist(lkq_sb *b, const char *name, const char *help, const sched_hist *h)
{
    head(b, name, "histogram", help);
    uint64_t cum = 0;
    for (int i = 0; i < h->n_le; i++) {
        cum += h->count[i];
        lkq_sb_printf(b, "%s_bucket{le=\"%g\"} %llu\n", name, h->le[i], (unsigned long long)cum);
    }
    cum += h->count[h->n_le];
    lkq_sb_printf(b, "%s_bucket{le=\"+Inf\"} %llu\n", name, (unsigned long long)cum);
    lkq_sb_printf(b, "%s_sum %.17g\n%s_count %llu\n", name, h->sum, name, (unsigned long long)h->total);
}

/* Escapes a label value (backslash, quote, newline). */
static void label(char *out, size_t cap, const char *v)
{
    size_t j = 0;
    for (size_t i = 0; v[i] && j + 3 < cap; i++) {
        char c = v[i];
        if (c == '\\' || c == '"') {
            out[j++] = '\\';
            out[j++] = c;
        } else if (c == '\n') {
            out[j++] = '\\';
            out[j++] = 'n';
        } else {
            out[j++] = c;
        }
    }
    out[j] = '\0';
}

/* One family of series by KV mode: v[m] for each mode the pool holds
 * (labels mode="m" plus `extra`, e.g. ",kind=\"int4\""). */
static void mode_family(lkq_sb *b, const sched_metrics *sm, const char *name, const char *type,
                        const char *help, const char *extra, const double *v)
{
    if (help)
        head(b, name, type, help);
    for (int m = 0; m < CFG_KV_MODES; m++)
        if ((sm->kv_modes >> m) & 1u)
            lkq_sb_printf(b, "%s{mode=\"%s\"%s} %.17g\n", name, cfg_kv_mode_str(m), extra, v[m]);
}

/* What the sequences of each KV mode ("kv_cache" per request) hold now and
 * held at their end, and their TTFT: one server can A/B the modes. */
static void render_modes(lkq_sb *b, const sched_metrics *sm)
{
    enum { N = 10 };
    double v[N][CFG_KV_MODES];
    for (int m = 0; m < CFG_KV_MODES; m++) {
        v[0][m] = sm->kv_mode[m].seqs;
        v[1][m] = (double)sm->kv_mode[m].bytes;
        v[2][m] = (double)sm->kv_mode[m].tokens;
        v[3][m] = (double)sm->kv_mode[m].qblocks;
        v[4][m] = (double)sm->kv_mode[m].fpages;
        v[5][m] = (double)sm->kv_mode[m].finished;
        v[6][m] = (double)sm->kv_mode[m].finished_bytes;
        v[7][m] = (double)sm->kv_mode[m].finished_tokens;
        v[8][m] = (double)sm->kv_mode[m].ttft_count;
        v[9][m] = sm->kv_mode[m].ttft_sum;
    }
    static const char *const fam[N][4] = {
        {"livekvq_kv_mode_sequences", "gauge", "Running sequences, by KV mode.", ""},
        {"livekvq_kv_mode_bytes", "gauge",
         "KV cache bytes held by the running sequences, by KV mode.", ""},
        {"livekvq_kv_mode_tokens", "gauge",
         "Token positions held by the running sequences, by KV mode.", ""},
        {"livekvq_kv_mode_blocks_used", "gauge",
         "Pool units held by the running sequences, by KV mode and unit kind.",
         ",kind=\"int4\""},
        {"livekvq_kv_mode_blocks_used", "gauge", NULL, ",kind=\"fp16\""},
        {"livekvq_kv_mode_finished_sequences_total", "counter",
         "Sequences that ended, by KV mode.", ""},
        {"livekvq_kv_mode_finished_bytes_total", "counter",
         "KV cache bytes each ended sequence held at its end, summed, by KV mode.", ""},
        {"livekvq_kv_mode_finished_tokens_total", "counter",
         "Token positions each ended sequence held at its end, summed, by KV mode.", ""},
        {"livekvq_kv_mode_first_tokens_total", "counter",
         "Requests that got their first token, by KV mode.", ""},
        {"livekvq_kv_mode_ttft_seconds_total", "counter",
         "Times to first token summed, by KV mode (divide by first_tokens_total).", ""},
    };
    for (int i = 0; i < N; i++)
        mode_family(b, sm, fam[i][0], fam[i][1], fam[i][2], fam[i][3], v[i]);
    double cap[CFG_KV_MODES];
    for (int m = 0; m < CFG_KV_MODES; m++)
        cap[m] = (double)sm->kv_mode_capacity[m];
    mode_family(b, sm, "livekvq_kv_mode_capacity_sequences", "gauge",
                "Full-context sequences the whole pool holds when all are of this KV mode "
                "(a pool of several modes is shared: memory moves between them).", "", cap);
    if (sm->kv_shared) {
        head(b, "livekvq_kv_shared_free_bytes", "gauge",
             "Free bytes of the shared pool of several KV modes (free slabs plus the free "
             "units of slabs in use, at their slab share), what admission counts.");
        lkq_sb_printf(b, "livekvq_kv_shared_free_bytes %lld\n", (long long)sm->kv_free_bytes);
    }
}

char *metrics_render(const sched_metrics *sm, const metrics_http *hm, const char *model_id,
                     const char *kv_mode, double uptime_s)
{
    lkq_sb b = {0};
    const kvc_stats *kv = &sm->kv;
    char model[256];
    label(model, sizeof model, model_id);

    head(&b, "livekvq_build_info", "gauge", "Build and serving configuration (value 1).");
    lkq_sb_printf(&b, "livekvq_build_info{version=\"0.1.0\",model=\"%s\",kv_cache=\"%s\"} 1\n", model,
        kv_mode);
    gauge(&b, "livekvq_uptime_seconds", "Seconds since the server started.", uptime_s);

    /* KV cache memory */
    head(&b, "livekvq_kv_bytes", "gauge", "KV cache bytes held, by kind.");
    lkq_sb_printf(&b, "livekvq_kv_bytes{kind=\"int4\"} %lld\n", (long long)kv->bytes_int4);
    lkq_sb_printf(&b, "livekvq_kv_bytes{kind=\"scales\"} %lld\n", (long long)kv->bytes_scales);
    lkq_sb_printf(&b, "livekvq_kv_bytes{kind=\"outliers\"} %lld\n", (long long)kv->bytes_outliers);
    lkq_sb_printf(&b, "livekvq_kv_bytes{kind=\"fp16\"} %lld\n", (long long)kv->bytes_fp16);
    lkq_sb_printf(&b, "livekvq_kv_bytes{kind=\"other\"} %lld\n", (long long)kv->bytes_other);
    gauge(&b, "livekvq_kv_bytes_held", "KV cache bytes held, all kinds.",
          (double)kv->bytes_total);
    gauge(&b, "livekvq_kv_fp16_equivalent_bytes",
          "Bytes an FP16 cache would hold for the same tokens.",
          (double)kv->bytes_fp16_equiv);
    double saved = (double)(kv->bytes_fp16_equiv - kv->bytes_total);
    gauge(&b, "livekvq_kv_saved_bytes", "FP16-equivalent bytes minus bytes held.", saved);
    gauge(&b, "livekvq_kv_saved_ratio", "Fraction of the FP16-equivalent bytes saved.",
          kv->bytes_fp16_equiv > 0 ? saved / (double)kv->bytes_fp16_equiv : 0.0);
    gauge(&b, "livekvq_kv_bits_per_element", "Bits per KV element, all overheads included.",
          kvc_stats_bits(kv));
    gauge(&b, "livekvq_kv_tokens", "Token positions held in the KV cache.", (double)kv->tokens);
    gauge(&b, "livekvq_kv_outlier_ratio",
          "Quantized elements kept exactly as FP16 outliers (fraction).",
          kv->n_quantized ? (double)kv->n_outliers / (double)kv->n_quantized : 0.0);
    gauge(&b, "livekvq_kv_clamp_ratio",
          "Quantized elements out of range but over the outlier budget (fraction).",
          kv->n_quantized ? (double)kv->n_clamped / (double)kv->n_quantized : 0.0);
    head(&b, "livekvq_kv_blocks_used", "gauge", "Pool units in use (INT4 blocks, FP16 pages).");
    lkq_sb_printf(&b, "livekvq_kv_blocks_used{kind=\"int4\"} %lld\n", (long long)kv->qblocks_used);
    lkq_sb_printf(&b, "livekvq_kv_blocks_used{kind=\"fp16\"} %lld\n", (long long)kv->fpages_used);
    head(&b, "livekvq_kv_blocks_total", "gauge", "Pool units (INT4 blocks, FP16 pages).");
    lkq_sb_printf(&b, "livekvq_kv_blocks_total{kind=\"int4\"} %lld\n", (long long)kv->qblocks_total);
    lkq_sb_printf(&b, "livekvq_kv_blocks_total{kind=\"fp16\"} %lld\n", (long long)kv->fpages_total);
    render_modes(&b, sm);
    /* by layer kind: global layers (the whole context, LiveKVQuant-P) and
     * sliding-window layers (their last W positions only) */
    static const char *const lk[KVC_LAYER_KINDS] = {"global", "window"};
    head(&b, "livekvq_kv_layer_bytes", "gauge",
         "KV cache bytes held, by layer kind (global, sliding-window) and storage kind.");
    for (int k = 0; k < KVC_LAYER_KINDS; k++) {
        const kvc_kind_stats *ks = &kv->layer_kind[k];
        const struct {
            const char *kind;
            int64_t v;
        } parts[5] = {{"int4", ks->bytes_int4}, {"scales", ks->bytes_scales},
                      {"outliers", ks->bytes_outliers}, {"fp16", ks->bytes_fp16},
                      {"other", ks->bytes_other}};
        for (int i = 0; i < 5; i++)
            lkq_sb_printf(&b, "livekvq_kv_layer_bytes{layer_kind=\"%s\",kind=\"%s\"} %lld\n",
                          lk[k], parts[i].kind, (long long)parts[i].v);
    }
    head(&b, "livekvq_kv_layer_bytes_held", "gauge",
         "KV cache bytes held by the layers of one kind, all storage kinds.");
    for (int k = 0; k < KVC_LAYER_KINDS; k++)
        lkq_sb_printf(&b, "livekvq_kv_layer_bytes_held{layer_kind=\"%s\"} %lld\n", lk[k],
                      (long long)kv->layer_kind[k].bytes_total);
    head(&b, "livekvq_kv_layer_bits_per_element", "gauge",
         "Bits per KV element held by the layers of one kind, all overheads included.");
    for (int k = 0; k < KVC_LAYER_KINDS; k++)
        lkq_sb_printf(&b, "livekvq_kv_layer_bits_per_element{layer_kind=\"%s\"} %.17g\n", lk[k],
                      kvc_stats_kind_bits(kv, k));
    head(&b, "livekvq_kv_layer_tokens", "gauge",
         "Token positions held by the layers of one kind (window layers: about their last W).");
    for (int k = 0; k < KVC_LAYER_KINDS; k++)
        lkq_sb_printf(&b, "livekvq_kv_layer_tokens{layer_kind=\"%s\"} %lld\n", lk[k],
                      (long long)kv->layer_kind[k].tokens);
    head(&b, "livekvq_kv_layer_mode_info", "gauge",
         "How the layers of each kind are cached in the default mode (value 1): fp16, or "
         "the code widths (window layers: window_kv).");
    lkq_sb_printf(&b, "livekvq_kv_layer_mode_info{layer_kind=\"global\",kv_cache=\"%s\"} 1\n",
                  kv_mode);
    lkq_sb_printf(&b, "livekvq_kv_layer_mode_info{layer_kind=\"window\",kv_cache=\"%s\"} 1\n",
                  sm->kv_window_name ? sm->kv_window_name : kv_mode);
    head(&b, "livekvq_kv_layer_count", "gauge", "Model layers of each kind.");
    for (int k = 0; k < KVC_LAYER_KINDS; k++)
        lkq_sb_printf(&b, "livekvq_kv_layer_count{layer_kind=\"%s\"} %d\n", lk[k],
                      (int)kv->layer_kind[k].layers);
    head(&b, "livekvq_kv_layer_blocks_used", "gauge",
         "Pool units in use by layer kind (INT4 blocks, FP16 pages).");
    for (int k = 0; k < KVC_LAYER_KINDS; k++) {
        lkq_sb_printf(&b, "livekvq_kv_layer_blocks_used{layer_kind=\"%s\",kind=\"int4\"} %lld\n",
                      lk[k], (long long)kv->layer_kind[k].qblocks_used);
        lkq_sb_printf(&b, "livekvq_kv_layer_blocks_used{layer_kind=\"%s\",kind=\"fp16\"} %lld\n",
                      lk[k], (long long)kv->layer_kind[k].fpages_used);
    }
    head(&b, "livekvq_kv_layer_blocks_total", "gauge",
         "Pool units by layer kind (INT4 blocks, FP16 pages).");
    for (int k = 0; k < KVC_LAYER_KINDS; k++) {
        lkq_sb_printf(&b, "livekvq_kv_layer_blocks_total{layer_kind=\"%s\",kind=\"int4\"} %lld\n",
                      lk[k], (long long)kv->layer_kind[k].qblocks_total);
        lkq_sb_printf(&b, "livekvq_kv_layer_blocks_total{layer_kind=\"%s\",kind=\"fp16\"} %lld\n",
                      lk[k], (long long)kv->layer_kind[k].fpages_total);
    }
    gauge(&b, "livekvq_kv_pool_bytes", "Bytes of the KV pool (its capacity).",
          (double)sm->kv_budget_bytes);
    gauge(&b, "livekvq_kv_usage_ratio", "Fraction of the KV pool's bytes in use.",
          sm->kv_usage);
    gauge(&b, "livekvq_kv_sequences_warming",
          "Sequences still in EMA warm-up (chunks staged in FP16).", sm->seqs_warming);

    /* EMA ranges per layer and tensor (mean over channels and running
     * sequences; absent while no sequence has statistics) */
    static const char *const names[3] = {"livekvq_kv_ema_lo", "livekvq_kv_ema_hi",
                                         "livekvq_kv_ema_width"};
    static const char *const helps[3] = {
        "EMA lower range (Eq. 3-3), mean over channels and running sequences.",
        "EMA upper range (Eq. 3-3), mean over channels and running sequences.",
        "EMA range width hi - lo, mean over channels and running sequences."};
    for (int k = 0; k < 3; k++) {
        head(&b, names[k], "gauge", helps[k]);
        for (int l = 0; l < sm->n_layers; l++) {
            for (int x = 0; x < 2; x++) {
                if (!sm->ema_valid[l][x])
                    continue;
                double v = k == 0 ? sm->ema_lo[l][x]
                           : k == 1 ? sm->ema_hi[l][x]
                                    : (double)sm->ema_hi[l][x] - sm->ema_lo[l][x];
                lkq_sb_printf(&b, "%s{layer=\"%d\",tensor=\"%s\"} %.9g\n", names[k], l, x ? "v" : "k", v);
            }
        }
    }

    /* requests */
    gauge(&b, "livekvq_requests_running", "Sequences running (admitted to the KV pool).",
          sm->running);
    gauge(&b, "livekvq_requests_waiting", "Sequences waiting for admission.", sm->waiting);
    gauge(&b, "livekvq_max_sequences", "Sequence slots.", sm->max_seqs);
    head(&b, "livekvq_requests_total", "counter", "HTTP requests answered, by endpoint and code.");
    for (int i = 0; i < hm->n; i++)
        lkq_sb_printf(&b, "livekvq_requests_total{endpoint=\"%s\",code=\"%d\"} %llu\n",
            hm->c[i].endpoint, hm->c[i].code, (unsigned long long)hm->c[i].n);
    head(&b, "livekvq_requests_rejected_total", "counter",
         "Requests refused before running, by reason.");
    lkq_sb_printf(&b, "livekvq_requests_rejected_total{reason=\"queue_full\"} %llu\n",
        (unsigned long long)hm->rejected_queue_full);
    lkq_sb_printf(&b, "livekvq_requests_rejected_total{reason=\"shutting_down\"} %llu\n",
        (unsigned long long)hm->rejected_shutdown);
    lkq_sb_printf(&b, "livekvq_requests_rejected_total{reason=\"invalid\"} %llu\n",
        (unsigned long long)hm->rejected_invalid);
    head(&b, "livekvq_requests_finished_total", "counter", "Sequences ended, by reason.");
    lkq_sb_printf(&b, "livekvq_requests_finished_total{reason=\"stop\"} %llu\n",
        (unsigned long long)sm->finished_stop);
    lkq_sb_printf(&b, "livekvq_requests_finished_total{reason=\"length\"} %llu\n",
        (unsigned long long)sm->finished_length);
    lkq_sb_printf(&b, "livekvq_requests_finished_total{reason=\"cancelled\"} %llu\n",
        (unsigned long long)sm->cancelled);
    lkq_sb_printf(&b, "livekvq_requests_finished_total{reason=\"error\"} %llu\n",
        (unsigned long long)sm->failed);
    counter(&b, "livekvq_preemptions_total",
            "Sequences preempted (KV blocks freed, recomputed later).", (double)sm->preemptions);
    counter(&b, "livekvq_preemptions_fair_total",
            "Of those, preempted to give a request with nothing running a slot.",
            (double)sm->preemptions_fair);
    counter(&b, "livekvq_client_disconnects_total",
            "Requests whose client went away before the answer (their sequences cancelled).",
            (double)hm->client_gone);
    counter(&b, "livekvq_http_read_timeouts_total",
            "Connections closed because a request's headers and body did not arrive within "
            "--read-timeout.", (double)hm->read_timeouts);
    counter(&b, "livekvq_prompt_tokens_total", "Prompt tokens prefilled.",
            (double)sm->prompt_tokens);
    counter(&b, "livekvq_generation_tokens_total", "Tokens generated.",
            (double)sm->generated_tokens);
    counter(&b, "livekvq_engine_steps_total", "Forward steps run.", (double)sm->steps);
    hist(&b, "livekvq_time_to_first_token_seconds", "Time from arrival to the first token.",
         &sm->ttft);
    hist(&b, "livekvq_inter_token_latency_seconds", "Time between tokens of a sequence.",
         &sm->itl);
    hist(&b, "livekvq_e2e_request_latency_seconds", "Time from arrival to the last token.",
         &sm->e2e);
    hist(&b, "livekvq_queue_time_seconds", "Time from arrival to admission.", &sm->queue_time);
    hist(&b, "livekvq_prefill_chunk_seconds", "Duration of steps that run a prefill chunk.",
         &sm->prefill_chunk);

    /* vLLM-compatible gauges (inference gateways route on these) */
    head(&b, "vllm:kv_cache_usage_perc", "gauge", "KV cache usage, 0 to 1 (vLLM-compatible).");
    lkq_sb_printf(&b, "vllm:kv_cache_usage_perc{model_name=\"%s\"} %.17g\n", model, sm->kv_usage);
    head(&b, "vllm:num_requests_running", "gauge", "Requests running (vLLM-compatible).");
    lkq_sb_printf(&b, "vllm:num_requests_running{model_name=\"%s\"} %d\n", model, sm->running);
    head(&b, "vllm:num_requests_waiting", "gauge", "Requests waiting (vLLM-compatible).");
    lkq_sb_printf(&b, "vllm:num_requests_waiting{model_name=\"%s\"} %d\n", model, sm->waiting);
    /* prefix reuse (vLLM's counter names; tokens) */
    head(&b, "vllm:prefix_cache_queries_total", "counter",
         "Prompt tokens looked up in the prefix cache (vLLM-compatible).");
    lkq_sb_printf(&b, "vllm:prefix_cache_queries_total{model_name=\"%s\"} %lld\n", model,
                  (long long)sm->prefix.queries);
    head(&b, "vllm:prefix_cache_hits_total", "counter",
         "Of those, tokens found cached and not recomputed (vLLM-compatible).");
    lkq_sb_printf(&b, "vllm:prefix_cache_hits_total{model_name=\"%s\"} %lld\n", model,
                  (long long)sm->prefix.hits);
    gauge(&b, "livekvq_prefix_cache_enabled", "1 when prompt prefix reuse is on.",
          (double)sm->prefix_on);
    gauge(&b, "livekvq_prefix_cache_prefixes", "Prompt prefixes cached now.",
          (double)sm->prefix.nodes);
    gauge(&b, "livekvq_prefix_cache_blocks", "INT4 blocks only the prefix cache holds "
          "(evictable; admission counts them as free).", (double)sm->prefix.qblocks);
    gauge(&b, "livekvq_prefix_cache_pages", "FP16 pages only the prefix cache holds.",
          (double)sm->prefix.fpages);
    gauge(&b, "livekvq_prefix_cache_bytes", "Bytes of the units only the prefix cache holds.",
          (double)sm->prefix.bytes);
    counter(&b, "livekvq_prefix_cache_evictions_total",
            "Cached prefixes evicted (least recently used, when the pool needed room).",
            (double)sm->prefix.evictions);
    counter(&b, "livekvq_prefix_cache_forks_total",
            "Choices (n > 1) that shared their prompt's prefill with the first choice.",
            (double)sm->forks);
    if (b.oom) {
        free(b.s);
        return NULL;
    }
    return b.s;
}
