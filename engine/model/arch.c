/*
 * arch.c - the model families of the GGUF loader and their hyper-parameters
 * (see arch.h). Keys follow llama.cpp's names ({arch}.block_count, ...), and
 * defaults follow llama.cpp where the file is silent (RoPE base 10000,
 * Gemma-3's 5-local-1-global pattern with a local RoPE base of 10000).
 *
 * Refused with a one-line reason (never guessed): unknown architectures,
 * mixture-of-experts, per-layer head counts / FFN sizes that differ between
 * layers, value heads of another size than key heads, RoPE scaling other
 * than none / linear / llama3, linear scaling on a family whose window
 * layers are not scaled (the descriptor has one scale for all layers).
 *
 * Threading: no state; any thread.
 */
#include "engine/model/arch.h"

#include "engine/util/err.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* The families. Field order as in mdl_arch. */
static const mdl_arch arch_table[] = {
    /* Llama 1/2/3.x, Mistral-style, SmolLM2, TinyLlama: adjacent-pair RoPE
     * (the converter permutes Q/K rows for it), SwiGLU; Llama 3.1+ files
     * carry rope_freqs.weight; a few llama-style models have QKV biases. */
    {"llama", MDL_ROPE_NORM, MDL_ACT_SILU, MDL_BIAS_OPTIONAL, 0, 0, 0, 1, 0, 10000.0f, 1e-5f},
    /* Qwen2 / Qwen2.5: rotate-half RoPE, QKV biases, tied or untied head. */
    {"qwen2", MDL_ROPE_NEOX, MDL_ACT_SILU, MDL_BIAS_REQUIRED, 0, 0, 0, 0, 0, 10000.0f, 1e-6f},
    /* Gemma-3: Q/K norms, sandwich norms, GELU-tanh, sqrt(dim) embedding
     * scale, 5 window layers then 1 global, local RoPE base 10000. */
    {"gemma3", MDL_ROPE_NEOX, MDL_ACT_GELU_TANH, MDL_BIAS_NONE, 1, 1, 1, 0, 6, 10000.0f, 1e-6f},
};

const mdl_arch *mdl_arch_find(const char *name, size_t len)
{
    for (size_t i = 0; i < sizeof(arch_table) / sizeof(arch_table[0]); i++)
        if (strlen(arch_table[i].name) == len && memcmp(arch_table[i].name, name, len) == 0)
            return &arch_table[i];
    return NULL;
}

/* "{arch}.suffix" into buf (96 bytes). */
static const char *key(char *buf, const mdl_arch *a, const char *suffix)
{
    snprintf(buf, 96, "%s.%s", a->name, suffix);
    return buf;
}

/* Integer key in [min, max]; *out keeps its default when the key is absent
 * and not required. */
static int get_int(const gguf_file *f, const char *k, int required, int64_t min, int64_t max,
                   int32_t *out, char *err, size_t errlen)
{
    int64_t v;
    int rc = gguf_get_int(f, k, min, max, &v, err, errlen);
    if (rc == GGUF_EMISSING)
        return required ? lkq_err(err, errlen, -1, "missing metadata key '%s'", k) : 0;
    if (rc)
        return -1;
    *out = (int32_t)v;
    return 0;
}

/* A per-layer integer: a scalar, or an array of n_layers integers that
 * must all be equal (the descriptor has one value for every layer). */
static int layer_int(const gguf_file *f, const char *k, int required, int32_t n_layers,
                     int64_t min, int64_t max, int32_t *out, char *err, size_t errlen)
{
    int64_t i = gguf_find_key(f, k);
    if (i < 0 || gguf_kv_type(f, i) != GGUF_ARRAY)
        return get_int(f, k, required, min, max, out, err, errlen);
    gguf_arr a;
    if (gguf_get_arr(f, k, &a, err, errlen))
        return -1;
    if (a.n != (uint64_t)n_layers)
        return lkq_err(err, errlen, -1,
                       "metadata '%s' has %llu per-layer values, block_count is %d",
                    k, (unsigned long long)a.n, n_layers);
    int64_t first = 0;
    for (uint64_t j = 0; j < a.n; j++) {
        int64_t v;
        if (gguf_arr_int(&a, j, &v))
            return lkq_err(err, errlen, -1, "metadata '%s' must hold integers (found %s)", k,
                        gguf_vtype_name(a.type));
        if (v < min || v > max)
            return lkq_err(err, errlen, -1,
                           "metadata '%s' = %lld at layer %llu is outside [%lld, %lld]",
                        k, (long long)v, (unsigned long long)j, (long long)min, (long long)max);
        if (j == 0)
            first = v;
        else if (v != first)
            return lkq_err(err, errlen, -1,
                           "metadata '%s' differs between layers (%lld at layer 0, %lld "
                        "at layer %llu): not supported", k, (long long)first, (long long)v,
                        (unsigned long long)j);
    }
    *out = (int32_t)first;
    return 0;
}

/* Optional positive finite float. */
static int opt_pos_float(const gguf_file *f, const char *k, float *out, char *err, size_t errlen)
{
    double v;
    int rc = gguf_get_float(f, k, &v, err, errlen);
    if (rc == GGUF_EMISSING)
        return 0;
    if (rc)
        return -1;
    if (!(v > 0) || !isfinite(v) || v > 3.4e38)
        return lkq_err(err, errlen, -1, "metadata '%s' = %g must be positive and finite", k, v);
    *out = (float)v;
    return 0;
}

static int str_is(gguf_str s, const char *lit)
{
    return s.len == strlen(lit) && memcmp(s.s, lit, s.len) == 0;
}

/* {arch}.attention.sliding_window_pattern, when a file has it (a period,
 * or one bool per layer, true = window layer), must be the family's own
 * pattern: the descriptor does not take another one. */
static int check_swa_pattern(const gguf_file *f, const mdl_arch *a, int32_t n_layers, char *err,
                             size_t errlen)
{
    char k[96];
    key(k, a, "attention.sliding_window_pattern");
    int64_t i = gguf_find_key(f, k);
    if (i < 0)
        return 0;
    if (gguf_kv_type(f, i) != GGUF_ARRAY) {
        int32_t period = 0;
        if (get_int(f, k, 1, 0, 1 << 20, &period, err, errlen))
            return -1;
        if (period != a->swa_period)
            return lkq_err(err, errlen, -1,
                           "metadata '%s' = %d: only %s's pattern (%d) is supported", k,
                        period, a->name, a->swa_period);
        return 0;
    }
    gguf_arr arr;
    if (gguf_get_arr(f, k, &arr, err, errlen))
        return -1;
    if (arr.n != (uint64_t)n_layers)
        return lkq_err(err, errlen, -1,
                       "metadata '%s' has %llu per-layer values, block_count is %d", k,
                    (unsigned long long)arr.n, n_layers);
    for (int32_t l = 0; l < n_layers; l++) {
        int64_t v;
        if (gguf_arr_int(&arr, (uint64_t)l, &v))
            return lkq_err(err, errlen, -1, "metadata '%s' must hold booleans (found %s)", k,
                        gguf_vtype_name(arr.type));
        if ((v != 0) != (l % a->swa_period < a->swa_period - 1))
            return lkq_err(err, errlen, -1, "metadata '%s' differs from %s's pattern at layer %d: "
                        "not supported", k, a->name, l);
    }
    return 0;
}

int mdl_arch_wants_rope_freqs(const gguf_file *f, const mdl_arch *arch)
{
    char k[96];
    gguf_str st;
    return gguf_get_str(f, key(k, arch, "rope.scaling.type"), &st, NULL, 0) == 0 &&
           str_is(st, "llama3");
}

/* RoPE scaling: none, linear (positions divided by the factor; an absent
 * type with a factor means linear, as does the older scale_linear key) or
 * llama3 (the factors are in rope_freqs.weight; the caller checks it). */
static int read_rope_scaling(const gguf_file *f, const mdl_arch *a, mdl_hparams *hp, char *err,
                             size_t errlen)
{
    char k[96];
    float factor = 1.0f;
    if (opt_pos_float(f, key(k, a, "rope.scaling.factor"), &factor, err, errlen) ||
        opt_pos_float(f, key(k, a, "rope.scale_linear"), &factor, err, errlen))
        return -1;
    gguf_str st;
    int rc = gguf_get_str(f, key(k, a, "rope.scaling.type"), &st, err, errlen);
    if (rc && rc != GGUF_EMISSING)
        return -1;
    if (rc == 0) {
        if (str_is(st, "none") || str_is(st, "llama3"))
            factor = 1.0f; /* llama3's factor is folded into rope_freqs */
        else if (!str_is(st, "linear"))
            return lkq_err(err, errlen, -1,
                           "unsupported rope scaling type '%.*s' in '%s' (supported: "
                        "none, linear, llama3)", (int)(st.len > 32 ? 32 : st.len), st.s, k);
    }
    if (factor != 1.0f && hp->sliding_window > 0)
        return lkq_err(err, errlen, -1, "linear rope scaling (factor %g) on a %s file with window "
                    "layers: %s scales only its global layers, not supported", factor, a->name,
                    a->name);
    hp->rope_freq_scale = 1.0f / factor;
    hp->rope_scaling = factor != 1.0f ? MDL_ROPE_SCALE_LINEAR : MDL_ROPE_SCALE_NONE;
    return 0;
}

int mdl_arch_read_hparams(const gguf_file *f, const mdl_arch **arch, mdl_hparams *hp,
                          char *err, size_t errlen)
{
    gguf_str name;
    int rc = gguf_get_str(f, "general.architecture", &name, err, errlen);
    if (rc == GGUF_EMISSING)
        return lkq_err(err, errlen, -1, "missing metadata key 'general.architecture'");
    if (rc)
        return -1;
    const mdl_arch *a = mdl_arch_find(name.s, (size_t)name.len);
    if (!a)
        return lkq_err(err, errlen, -1,
                       "unsupported architecture '%.*s' (supported: llama, qwen2, gemma3)",
                    (int)(name.len > 64 ? 64 : name.len), name.s);
    *arch = a;
    memset(hp, 0, sizeof(*hp));
    char k[96];

    if (get_int(f, key(k, a, "block_count"), 1, 1, 1024, &hp->n_layers, err, errlen) ||
        get_int(f, key(k, a, "embedding_length"), 1, 1, 65536, &hp->dim, err, errlen) ||
        get_int(f, key(k, a, "context_length"), 1, 1, 1 << 24, &hp->n_ctx_train, err, errlen) ||
        layer_int(f, key(k, a, "feed_forward_length"), 1, hp->n_layers, 1, 1 << 20,
                  &hp->hidden_dim, err, errlen) ||
        layer_int(f, key(k, a, "attention.head_count"), 1, hp->n_layers, 1, 1024, &hp->n_heads,
                  err, errlen))
        return -1;
    hp->n_kv_heads = hp->n_heads;
    if (layer_int(f, key(k, a, "attention.head_count_kv"), 0, hp->n_layers, 1, hp->n_heads,
                  &hp->n_kv_heads, err, errlen))
        return -1;
    if (hp->n_heads % hp->n_kv_heads)
        return lkq_err(err, errlen, -1, "%s.attention.head_count %d is not a multiple of "
                    "head_count_kv %d", a->name, hp->n_heads, hp->n_kv_heads);

    /* head_dim: key_length when given (Gemma-3: 256 with dim 640 and 4
     * heads; Q then has n_heads * head_dim rows), else dim / n_heads. */
    int32_t kl = 0, vl = 0;
    if (get_int(f, key(k, a, "attention.key_length"), 0, 1, 65536, &kl, err, errlen) ||
        get_int(f, key(k, a, "attention.value_length"), 0, 1, 65536, &vl, err, errlen))
        return -1;
    if (!kl) {
        if (hp->dim % hp->n_heads)
            return lkq_err(err, errlen, -1, "%s.embedding_length %d is not a multiple of "
                        "attention.head_count %d (and no attention.key_length)", a->name,
                        hp->dim, hp->n_heads);
        kl = hp->dim / hp->n_heads;
    }
    if (vl && vl != kl)
        return lkq_err(err, errlen, -1, "%s.attention.value_length %d differs from key_length %d: "
                    "not supported", a->name, vl, kl);
    hp->head_dim = kl;
    int32_t experts = 0;
    if (get_int(f, key(k, a, "expert_count"), 0, 0, 1 << 20, &experts, err, errlen))
        return -1;
    if (experts > 0)
        return lkq_err(err, errlen, -1, "mixture-of-experts models (%s.expert_count = %d) are not "
                    "supported", a->name, experts);

    hp->n_rot = hp->head_dim;
    if (get_int(f, key(k, a, "rope.dimension_count"), 0, 2, hp->head_dim, &hp->n_rot, err,
                errlen))
        return -1;
    if (hp->n_rot % 2)
        return lkq_err(err, errlen, -1, "%s.rope.dimension_count %d is odd", a->name, hp->n_rot);
    hp->rope_theta = 10000.0f;
    hp->norm_eps = a->norm_eps;
    if (opt_pos_float(f, key(k, a, "rope.freq_base"), &hp->rope_theta, err, errlen) ||
        opt_pos_float(f, key(k, a, "attention.layer_norm_rms_epsilon"), &hp->norm_eps, err,
                      errlen))
        return -1;

    /* attention kinds: window layers only for families with a pattern */
    hp->rope_theta_local = hp->rope_theta;
    if (a->swa_period > 0) {
        if (get_int(f, key(k, a, "attention.sliding_window"), 0, 0, 1 << 24,
                    &hp->sliding_window, err, errlen))
            return -1;
        if (hp->sliding_window > 0) {
            hp->rope_theta_local = a->rope_theta_local;
            if (opt_pos_float(f, key(k, a, "rope.freq_base_swa"), &hp->rope_theta_local, err,
                              errlen) ||
                check_swa_pattern(f, a, hp->n_layers, err, errlen))
                return -1;
        }
    }
    if (read_rope_scaling(f, a, hp, err, errlen))
        return -1;

    hp->qkv_bias = 0; /* set by the tensor reader (optional for llama) */
    hp->qk_norm = a->qk_norm;
    hp->sandwich_norm = a->sandwich_norm;
    hp->act = a->act;
    hp->rope_type = a->rope_type;
    hp->embd_scale = a->embd_scale_sqrt_dim ? sqrtf((float)hp->dim) : 1.0f;
    /* Query scale 1/sqrt(head_dim); Gemma-3 27B (62 layers) uses
     * query_pre_attn_scalar = dim / n_heads instead, as llama.cpp does
     * (GGUF has no key for it). */
    hp->attn_scale = 1.0f / sqrtf((float)hp->head_dim);
    if (!strcmp(a->name, "gemma3") && hp->n_layers == 62)
        hp->attn_scale = 1.0f / sqrtf((float)(hp->dim / hp->n_heads));
    hp->final_softcap = 0.0f;
    if (opt_pos_float(f, key(k, a, "final_logit_softcapping"), &hp->final_softcap, err, errlen))
        return -1;
    hp->tied_output = 0; /* set by the tensor reader */
    return 0;
}

void mdl_arch_layer_kind(const mdl_arch *arch, const mdl_hparams *hp, int l, int32_t *window,
                         float *rope_theta)
{
    int local = hp->sliding_window > 0 && arch->swa_period > 0 &&
                l % arch->swa_period < arch->swa_period - 1;
    *window = local ? hp->sliding_window : 0;
    *rope_theta = local ? hp->rope_theta_local : hp->rope_theta;
}
