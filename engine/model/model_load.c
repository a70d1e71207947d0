/*
 * model_load.c - mdl_load()/mdl_free(): builds an mdl_model from a GGUF file
 * or a llama2.c .bin checkpoint, detected by content.
 *
 * GGUF: the family and its hyper-parameters from arch-prefixed metadata
 * (arch.c: llama, qwen2, gemma3), then every tensor the descriptor's
 * features call for (QKV biases, Q/K norms, sandwich norms, rope_freqs),
 * each one's shape and type checked against the hyper-parameters; a tensor
 * the loader did not take is an error (it would be silently ignored).
 * Matmul weights stay in the mapping (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
 * Q4_K, Q5_K, Q6_K);
 * vectors (norms, biases, rope factors) are copied to owned F32 when
 * stored otherwise (or misaligned). Tokenizer from tokenizer.ggml.* with
 * tok_create(), chat template family from tokenizer.chat_template (or,
 * without one, Gemma's turn markers in the vocabulary).
 * llama2.c: F32 views into the mapping, tokenizer found beside the model,
 * every descriptor feature at its Llama default.
 *
 * Unsupported on purpose (clear error): see arch.c (architectures, MoE,
 * per-layer sizes, rope scaling types), value heads of another size than
 * key heads, tensor types other than the above (Q4_K, Q6_K: gguf.c).
 *
 * Threading: mdl_load/mdl_free from one thread; a loaded model is read-only.
 */
#include "engine/model/model.h"

#include "engine/util/err.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/model/arch.h"
#include "engine/model/gguf.h"
#include "engine/model/llama2c.h"

typedef struct {
    gguf_file *gf;
    l2c_file *lf;
    float *norms;      /* owned F32 copies of vectors stored otherwise (or misaligned) */
    size_t norms_used, norms_cap;
    uint8_t *used;     /* [n_tensors]: 1 once the loader has taken the tensor */
} load_priv;

void mdl_free(mdl_model *m)
{
    if (!m)
        return;
    load_priv *p = m->priv;
    if (p) {
        gguf_close(p->gf);
        l2c_close(p->lf);
        free(p->norms);
        free(p->used);
        free(p);
    }
    tok_destroy(m->tok);
    free(m->layers);
    free(m);
}

/* Copies the file stem of path (basename without its last extension). */
static void file_stem(const char *path, char *out, size_t cap)
{
    const char *b = strrchr(path, '/');
    b = b ? b + 1 : path;
    const char *dot = strrchr(b, '.');
    size_t n = dot && dot != b ? (size_t)(dot - b) : strlen(b);
    snprintf(out, cap, "%.*s", (int)(n < cap ? n : cap - 1), b);
}

/* ---------------------------------------------------------------- GGUF -- */

/* Optional boolean key (absent: *out unchanged). */
static int opt_bool(gguf_file *f, const char *key, int *out, char *err, size_t errlen)
{
    int rc = gguf_get_bool(f, key, out, err, errlen);
    return rc == GGUF_EMISSING || rc == 0 ? 0 : -1;
}

/* 1 if the (not NUL-terminated) string s equals lit. */
static int str_is(gguf_str s, const char *lit)
{
    return s.len == strlen(lit) && memcmp(s.s, lit, s.len) == 0;
}

/* Looks a tensor up and marks it used (see check_all_used). */
static const gguf_tensor *find_tensor(gguf_file *f, load_priv *p, const char *name)
{
    const gguf_tensor *t = gguf_find_tensor(f, name);
    if (t)
        p->used[t - gguf_tensor_at(f, 0)] = 1;
    return t;
}

/* A matrix tensor of n_rows rows of n_cols: shape and alignment checked.
 * why (may be NULL) says where the expected shape comes from. */
static int get_matrix(gguf_file *f, load_priv *p, const char *name, int64_t n_cols,
                      int64_t n_rows, const char *why, mdl_weight *w, char *err, size_t errlen)
{
    const gguf_tensor *t = find_tensor(f, p, name);
    if (!t)
        return lkq_err(err, errlen, -1, "missing tensor '%s'", name);
    if (t->ne[0] != n_cols || t->ne[1] != n_rows || t->ne[2] != 1 || t->ne[3] != 1)
        return lkq_err(err, errlen, -1,
                       "tensor '%s' has shape [%lld, %lld, %lld, %lld], expected [%lld, %lld]%s%s%s",
                       
                    name, (long long)t->ne[0], (long long)t->ne[1], (long long)t->ne[2],
                    (long long)t->ne[3], (long long)n_cols, (long long)n_rows,
                    why ? " (" : "", why ? why : "", why ? ")" : "");
    if ((uintptr_t)t->data % (t->type == KT_F32 ? 4 : 2))
        return lkq_err(err, errlen, -1, "tensor '%s' data is misaligned in the file", name);
    w->type = t->type;
    w->data = t->data;
    w->n_cols = n_cols;
    w->n_rows = n_rows;
    return 0;
}

/* A vector of n floats (norm weights, biases, rope factors): a view when
 * F32 and aligned, else converted into the next n floats of p->norms.
 * why (may be NULL) says where n comes from. */
static int get_vector(gguf_file *f, load_priv *p, const char *name, int64_t n, const char *why,
                      const float **out, char *err, size_t errlen)
{
    const gguf_tensor *t = find_tensor(f, p, name);
    if (!t)
        return lkq_err(err, errlen, -1, "missing tensor '%s'", name);
    if (t->n_elems != n || t->ne[0] != n)
        return lkq_err(err, errlen, -1,
                       "tensor '%s' has %lld elements (first dim %lld), expected a "
                    "vector of %lld%s%s%s", name, (long long)t->n_elems, (long long)t->ne[0],
                    (long long)n, why ? " (" : "", why ? why : "", why ? ")" : "");
    if (t->type == KT_F32 && (uintptr_t)t->data % 4 == 0) {
        *out = t->data;
        return 0;
    }
    if (t->type != KT_F32 && t->type != KT_F16 && t->type != KT_BF16)
        return lkq_err(err, errlen, -1, "tensor '%s' is %s; norm vectors must be F32, F16 or BF16",
                    name, kt_name(t->type));
    if (p->norms_used + (size_t)n > p->norms_cap)
        return lkq_err(err, errlen, -1,
                       "tensor '%s': internal error (vector buffer too small)", name);
    float *dst = p->norms + p->norms_used;
    p->norms_used += (size_t)n;
    const unsigned char *src = t->data;
    for (int64_t i = 0; i < n; i++) {
        if (t->type == KT_F32) {
            memcpy(&dst[i], src + 4 * i, 4);
        } else {
            uint16_t h;
            memcpy(&h, src + 2 * i, 2);
            dst[i] = t->type == KT_F16 ? kt_f16_to_f32(h) : kt_bf16_to_f32(h);
        }
    }
    *out = dst;
    return 0;
}

/* Llama 3.1+ rope_freqs.weight: [n_rot/2] positive frequency divisors.
 * Sets hp->rope_scaling to LLAMA3 when present. */
static int read_rope_freqs(gguf_file *f, const mdl_arch *a, mdl_model *m, load_priv *p,
                           char *err, size_t errlen)
{
    mdl_hparams *hp = &m->hp;
    if (!a->rope_freqs || !gguf_find_tensor(f, "rope_freqs.weight")) {
        if (mdl_arch_wants_rope_freqs(f, a))
            return lkq_err(err, errlen, -1, "%s.rope.scaling.type is 'llama3' but tensor "
                        "'rope_freqs.weight' is missing", a->name);
        return 0; /* a family without rope_freqs: an unused tensor, refused later */
    }
    if (hp->rope_scaling == MDL_ROPE_SCALE_LINEAR)
        return lkq_err(err, errlen, -1,
                       "tensor 'rope_freqs.weight' together with linear rope scaling "
                    "(factor %g): not supported", 1.0 / hp->rope_freq_scale);
    char why[48];
    snprintf(why, sizeof(why), "rope dimension count %d / 2", hp->n_rot);
    if (get_vector(f, p, "rope_freqs.weight", hp->n_rot / 2, why, &m->rope_freqs, err, errlen))
        return -1;
    for (int i = 0; i < hp->n_rot / 2; i++)
        if (!(m->rope_freqs[i] > 0) || !isfinite(m->rope_freqs[i]))
            return lkq_err(err, errlen, -1,
                           "tensor 'rope_freqs.weight' entry %d = %g must be positive "
                        "and finite", i, (double)m->rope_freqs[i]);
    hp->rope_scaling = MDL_ROPE_SCALE_LLAMA3;
    return 0;
}

/* One layer's tensors, per the descriptor's features. */
static int read_layer(gguf_file *f, load_priv *p, const mdl_hparams *hp, int l, mdl_layer *L,
                      char *err, size_t errlen)
{
    int64_t dim = hp->dim, hid = hp->hidden_dim, hd = hp->head_dim;
    int64_t q_dim = (int64_t)hp->n_heads * hd, kv_dim = (int64_t)hp->n_kv_heads * hd;
    char qwhy[64], kvwhy[64], n[96];
    snprintf(qwhy, sizeof(qwhy), "head_count %d x head_dim %d", hp->n_heads, hp->head_dim);
    snprintf(kvwhy, sizeof(kvwhy), "head_count_kv %d x head_dim %d", hp->n_kv_heads, hp->head_dim);
#define T(part, kind) (snprintf(n, sizeof(n), "blk.%d.%s.%s", l, part, kind), n)
    if (get_vector(f, p, T("attn_norm", "weight"), dim, NULL, &L->attn_norm, err, errlen) ||
        get_matrix(f, p, T("attn_q", "weight"), dim, q_dim, qwhy, &L->wq, err, errlen) ||
        get_matrix(f, p, T("attn_k", "weight"), dim, kv_dim, kvwhy, &L->wk, err, errlen) ||
        get_matrix(f, p, T("attn_v", "weight"), dim, kv_dim, kvwhy, &L->wv, err, errlen) ||
        get_matrix(f, p, T("attn_output", "weight"), q_dim, dim, NULL, &L->wo, err, errlen) ||
        get_vector(f, p, T("ffn_norm", "weight"), dim, NULL, &L->ffn_norm, err, errlen) ||
        get_matrix(f, p, T("ffn_gate", "weight"), dim, hid, NULL, &L->ffn_gate, err, errlen) ||
        get_matrix(f, p, T("ffn_down", "weight"), hid, dim, NULL, &L->ffn_down, err, errlen) ||
        get_matrix(f, p, T("ffn_up", "weight"), dim, hid, NULL, &L->ffn_up, err, errlen))
        return -1;
    if (hp->qkv_bias &&
        (get_vector(f, p, T("attn_q", "bias"), q_dim, qwhy, &L->bq, err, errlen) ||
         get_vector(f, p, T("attn_k", "bias"), kv_dim, kvwhy, &L->bk, err, errlen) ||
         get_vector(f, p, T("attn_v", "bias"), kv_dim, kvwhy, &L->bv, err, errlen)))
        return -1;
    if (hp->qk_norm &&
        (get_vector(f, p, T("attn_q_norm", "weight"), hd, "head_dim", &L->q_norm, err, errlen) ||
         get_vector(f, p, T("attn_k_norm", "weight"), hd, "head_dim", &L->k_norm, err, errlen)))
        return -1;
    if (hp->sandwich_norm &&
        (get_vector(f, p, T("post_attention_norm", "weight"), dim, NULL, &L->post_attn_norm, err,
                    errlen) ||
         get_vector(f, p, T("post_ffw_norm", "weight"), dim, NULL, &L->post_ffn_norm, err, errlen)))
        return -1;
#undef T
    return 0;
}

/* Every tensor of the file must have been used: one this loader does not
 * know (an output bias, a rope_freqs of a family without them, ...) would
 * otherwise be silently ignored and give wrong logits. */
static int check_all_used(gguf_file *f, const mdl_arch *a, const load_priv *p, char *err,
                          size_t errlen)
{
    for (int64_t i = 0; i < gguf_n_tensors(f); i++)
        if (!p->used[i])
            return lkq_err(err, errlen, -1,
                           "tensor '%s' is not used by architecture '%s' (not supported)",
                        gguf_tensor_at(f, i)->name, a->name);
    return 0;
}

/* Token embedding, output head, norms, rope factors and all layer weights;
 * completes the descriptor (n_vocab, tied_output, qkv_bias, rope_scaling,
 * each layer's window and RoPE base). */
static int read_tensors(gguf_file *f, const mdl_arch *a, mdl_model *m, load_priv *p, char *err,
                        size_t errlen)
{
    mdl_hparams *hp = &m->hp;
    if (!(p->used = calloc((size_t)gguf_n_tensors(f) + 1, 1)))
        return lkq_err(err, errlen, -1, "out of memory");
    const gguf_tensor *te = gguf_find_tensor(f, "token_embd.weight");
    if (!te)
        return lkq_err(err, errlen, -1, "missing tensor 'token_embd.weight'");
    int64_t nv = te->ne[1];
    char k[96];
    snprintf(k, sizeof(k), "%s.vocab_size", a->name);
    int rc = gguf_get_int(f, k, 1, 1 << 22, &nv, err, errlen);
    if (rc && rc != GGUF_EMISSING)
        return -1;
    if (nv < 1 || nv > (1 << 22))
        return lkq_err(err, errlen, -1,
                       "token_embd.weight has %lld rows (vocab too large)", (long long)nv);
    hp->n_vocab = (int32_t)nv;
    int64_t dim = hp->dim;
    int64_t q_dim = (int64_t)hp->n_heads * hp->head_dim;
    int64_t kv_dim = (int64_t)hp->n_kv_heads * hp->head_dim;
    if (get_matrix(f, p, "token_embd.weight", dim, nv, NULL, &m->tok_embd, err, errlen))
        return -1;
    hp->tied_output = !gguf_find_tensor(f, "output.weight");
    if (hp->tied_output)
        m->output = m->tok_embd;
    else if (get_matrix(f, p, "output.weight", dim, nv, NULL, &m->output, err, errlen))
        return -1;
    hp->qkv_bias = a->qkv_bias == MDL_BIAS_REQUIRED ||
                   (a->qkv_bias == MDL_BIAS_OPTIONAL && gguf_find_tensor(f, "blk.0.attn_q.bias"));

    /* room for every vector that may need converting to F32 */
    size_t per_layer = 2 * (size_t)dim + (hp->qkv_bias ? (size_t)(q_dim + 2 * kv_dim) : 0) +
                       (hp->qk_norm ? 2 * (size_t)hp->head_dim : 0) +
                       (hp->sandwich_norm ? 2 * (size_t)dim : 0);
    p->norms_cap = (size_t)hp->n_layers * per_layer + (size_t)dim + (size_t)hp->n_rot / 2;
    p->norms = malloc(p->norms_cap * sizeof(float));
    m->layers = calloc((size_t)hp->n_layers, sizeof(mdl_layer));
    if (!p->norms || !m->layers)
        return lkq_err(err, errlen, -1, "out of memory");
    if (get_vector(f, p, "output_norm.weight", dim, NULL, &m->out_norm, err, errlen) ||
        read_rope_freqs(f, a, m, p, err, errlen))
        return -1;
    for (int l = 0; l < hp->n_layers; l++) {
        mdl_layer *L = &m->layers[l];
        if (read_layer(f, p, hp, l, L, err, errlen))
            return -1;
        mdl_arch_layer_kind(a, hp, l, &L->window, &L->rope_theta);
    }
    return check_all_used(f, a, p, err, errlen);
}

/* Optional special-token id: -1 when absent (or dflt for SPM defaults);
 * an id outside [0, n_tok) is an error, except for padding (ignored). */
static int tok_id(gguf_file *f, const char *key, int32_t n_tok, int32_t dflt, int lenient,
                  int32_t *out, char *err, size_t errlen)
{
    int64_t v;
    int rc = gguf_get_int(f, key, INT64_MIN, INT64_MAX, &v, err, errlen);
    *out = dflt < n_tok ? dflt : -1;
    if (rc == GGUF_EMISSING)
        return 0;
    if (rc)
        return -1;
    if (v < 0 || v >= n_tok) {
        if (lenient) {
            *out = -1;
            return 0;
        }
        return lkq_err(err, errlen, -1, "%s = %lld is outside the vocabulary (%d tokens)", key,
                    (long long)v, n_tok);
    }
    *out = (int32_t)v;
    return 0;
}

/* Builds the tokenizer from tokenizer.ggml.* metadata. */
static int read_tokenizer(gguf_file *f, mdl_model *m, char *err, size_t errlen)
{
    tok_desc d = {0};
    tok_str *tokens = NULL, *merges = NULL;
    float *scores = NULL;
    int32_t *types = NULL;
    char pre[64] = "";
    int rc = -1;
    gguf_str s;
    gguf_arr a;

    int r = gguf_get_str(f, "tokenizer.ggml.model", &s, err, errlen);
    if (r == GGUF_EMISSING)
        return lkq_err(err, errlen, -1,
                       "missing metadata key 'tokenizer.ggml.model' (no tokenizer in file)");
    if (r)
        return -1;
    if (str_is(s, "llama"))
        d.kind = TOK_SPM;
    else if (str_is(s, "gpt2"))
        d.kind = TOK_GPT2;
    else
        return lkq_err(err, errlen, -1,
                       "unsupported tokenizer model '%.*s' (only 'llama' and 'gpt2')",
                    (int)(s.len > 32 ? 32 : s.len), s.s);

    r = gguf_get_arr(f, "tokenizer.ggml.tokens", &a, err, errlen);
    if (r == GGUF_EMISSING)
        return lkq_err(err, errlen, -1, "missing metadata key 'tokenizer.ggml.tokens'");
    if (r)
        return -1;
    if (a.type != GGUF_STRING || a.n < 1 || a.n > (uint64_t)m->hp.n_vocab)
        return lkq_err(err, errlen, -1,
                       "tokenizer.ggml.tokens must be 1..%d strings (found %llu %s)",
                    m->hp.n_vocab, (unsigned long long)a.n, gguf_vtype_name(a.type));
    d.n_vocab = (int32_t)a.n;
    tokens = calloc((size_t)d.n_vocab, sizeof(*tokens));
    if (!tokens)
        goto oom;
    for (int32_t i = 0; i < d.n_vocab; i++) {
        gguf_arr_str(&a, (uint64_t)i, &s);
        if (s.len > UINT32_MAX) {
            lkq_err(err, errlen, -1, "token %d is too long", i);
            goto out;
        }
        tokens[i].s = s.s;
        tokens[i].len = (uint32_t)s.len;
    }
    d.tokens = tokens;

    r = gguf_get_arr(f, "tokenizer.ggml.scores", &a, err, errlen);
    if (r && r != GGUF_EMISSING)
        goto out;
    if (r == 0) {
        if (a.n != (uint64_t)d.n_vocab || a.type == GGUF_STRING) {
            lkq_err(err, errlen, -1, "tokenizer.ggml.scores: %llu %s values for %d tokens",
                 (unsigned long long)a.n, gguf_vtype_name(a.type), d.n_vocab);
            goto out;
        }
        if (!(scores = malloc((size_t)d.n_vocab * sizeof(float))))
            goto oom;
        for (int32_t i = 0; i < d.n_vocab; i++) {
            double v = 0;
            gguf_arr_float(&a, (uint64_t)i, &v);
            scores[i] = (float)v;
        }
        d.scores = scores;
    }
    r = gguf_get_arr(f, "tokenizer.ggml.token_type", &a, err, errlen);
    if (r && r != GGUF_EMISSING)
        goto out;
    if (r == 0) {
        if (!(types = malloc((size_t)d.n_vocab * sizeof(int32_t))))
            goto oom;
        for (int32_t i = 0; i < d.n_vocab; i++) {
            int64_t v = 0;
            if (a.n != (uint64_t)d.n_vocab || gguf_arr_int(&a, (uint64_t)i, &v) || v < 0 || v > 255) {
                lkq_err(err, errlen, -1,
                        "tokenizer.ggml.token_type: bad entry %d (%llu %s values for %d tokens)",
                     i, (unsigned long long)a.n, gguf_vtype_name(a.type), d.n_vocab);
                goto out;
            }
            types[i] = (int32_t)v;
        }
        d.types = types;
    }
    r = gguf_get_arr(f, "tokenizer.ggml.merges", &a, err, errlen);
    if (r && r != GGUF_EMISSING)
        goto out;
    if (r == 0) {
        if (a.type != GGUF_STRING || a.n > INT32_MAX) {
            lkq_err(err, errlen, -1, "tokenizer.ggml.merges must be an array of strings");
            goto out;
        }
        d.n_merges = (int32_t)a.n;
        if (!(merges = calloc(a.n ? a.n : 1, sizeof(*merges))))
            goto oom;
        for (int32_t i = 0; i < d.n_merges; i++) {
            gguf_arr_str(&a, (uint64_t)i, &s);
            merges[i].s = s.s;
            merges[i].len = s.len > UINT32_MAX ? 0 : (uint32_t)s.len;
        }
        d.merges = merges;
    }

    int spm = d.kind == TOK_SPM;
    if (tok_id(f, "tokenizer.ggml.bos_token_id", d.n_vocab, spm ? 1 : -1, 0, &d.bos_id, err, errlen) ||
        tok_id(f, "tokenizer.ggml.eos_token_id", d.n_vocab, spm ? 2 : -1, 0, &d.eos_id, err, errlen) ||
        tok_id(f, "tokenizer.ggml.unknown_token_id", d.n_vocab, spm ? 0 : -1, 1, &d.unk_id, err, errlen) ||
        tok_id(f, "tokenizer.ggml.padding_token_id", d.n_vocab, -1, 1, &d.pad_id, err, errlen))
        goto out;
    d.add_bos = spm;
    d.add_eos = 0;
    d.add_space_prefix = spm;
    if (opt_bool(f, "tokenizer.ggml.add_bos_token", &d.add_bos, err, errlen) ||
        opt_bool(f, "tokenizer.ggml.add_eos_token", &d.add_eos, err, errlen) ||
        opt_bool(f, "tokenizer.ggml.add_space_prefix", &d.add_space_prefix, err, errlen))
        goto out;
    if (gguf_get_str(f, "tokenizer.ggml.pre", &s, NULL, 0) == 0) {
        snprintf(pre, sizeof(pre), "%.*s", (int)(s.len < sizeof(pre) ? s.len : sizeof(pre) - 1), s.s);
        d.pre = pre;
    }
    rc = tok_create(&d, &m->tok, err, errlen);
    goto out;
oom:
    lkq_err(err, errlen, -1, "out of memory");
out:
    free(tokens);
    free(merges);
    free(scores);
    free(types);
    return rc;
}

/* A ChatML template that inserts a default system message when the first
 * message is not one ("... != 'system' %}{{ '<|im_start|>system\nTEXT<|im_end|>"):
 * copies TEXT to out (else ""). */
static void default_system(const char *t, size_t n, char *out, size_t cap)
{
    static const char hdr[] = "<|im_start|>system\n";
    out[0] = 0;
    if (!memmem(t, n, "!= 'system'", 11) && !memmem(t, n, "!= \"system\"", 11))
        return;
    const char *a = memmem(t, n, hdr, sizeof hdr - 1);
    if (!a)
        return;
    a += sizeof hdr - 1;
    const char *b = memmem(a, n - (size_t)(a - t), "<|im_end|>", 10);
    if (!b || b - a <= 0 || (size_t)(b - a) >= cap || memchr(a, '{', (size_t)(b - a)) ||
        memchr(a, '\'', (size_t)(b - a)))
        return;
    memcpy(out, a, (size_t)(b - a));
    out[b - a] = 0;
}

/* Maps the chat_template text to a template family name. A GGUF without
 * tokenizer.chat_template whose vocabulary has Gemma's turn markers
 * (<start_of_turn>, and <end_of_turn> as an end-of-generation token) gets
 * "gemma": such files exist (the Gemma-3-270M Q4_K_M of scripts/setup.sh),
 * and ChatML markup would be plain text to them. */
static void detect_chat_template(gguf_file *f, const tok_tokenizer *tok, char *out, size_t cap,
                                 char *sys, size_t syscap)
{
    static const struct { const char *marker, *name; } fams[] = {
        {"<|im_start|>", "chatml"}, {"<|start_header_id|>", "llama3"},
        {"[INST]", "llama2"}, {"<|user|>", "zephyr"}, {"<start_of_turn>", "gemma"}};
    gguf_str s;
    out[0] = 0;
    if (gguf_get_str(f, "tokenizer.chat_template", &s, NULL, 0)) {
        if (tok && tok_find(tok, "<start_of_turn>") >= 0 &&
            tok_is_eog(tok, tok_find(tok, "<end_of_turn>")))
            snprintf(out, cap, "gemma");
        return;
    }
    for (size_t i = 0; i < sizeof(fams) / sizeof(fams[0]); i++)
        if (memmem(s.s, (size_t)s.len, fams[i].marker, strlen(fams[i].marker))) {
            snprintf(out, cap, "%s", fams[i].name);
            if (i == 0)
                default_system(s.s, (size_t)s.len, sys, syscap);
            return;
        }
}

/* GGUF path of mdl_load: fills m; on failure p holds what to free. */
static int load_gguf(const char *path, mdl_model *m, load_priv *p, char *err, size_t errlen)
{
    if (gguf_open(path, &p->gf, err, errlen))
        return -1;
    gguf_file *f = p->gf;
    char why[384];
    const mdl_arch *a = NULL;
    if (mdl_arch_read_hparams(f, &a, &m->hp, why, sizeof(why)) ||
        read_tensors(f, a, m, p, why, sizeof(why)) || read_tokenizer(f, m, why, sizeof(why)))
        return lkq_err(err, errlen, -1, "'%s': %s", path, why);
    m->format = "gguf";
    snprintf(m->arch, sizeof(m->arch), "%s", a->name);
    gguf_str s;
    if (gguf_get_str(f, "general.name", &s, NULL, 0) == 0 && s.len > 0 && s.s[0] != 0) {
        size_t n = strnlen(s.s, (size_t)(s.len < sizeof(m->name) ? s.len : sizeof(m->name) - 1));
        memcpy(m->name, s.s, n);
        m->name[n] = 0;
    } else {
        file_stem(path, m->name, sizeof(m->name));
    }
    detect_chat_template(f, m->tok, m->chat_template, sizeof(m->chat_template),
                         m->default_system, sizeof(m->default_system));
    return 0;
}

/* ------------------------------------------------------------ llama2.c -- */

static int is_file(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Finds and loads the tokenizer for a llama2.c model (see mdl_load). */
static int load_l2c_tokenizer(const char *path, const char *tokenizer_path, int32_t n_vocab,
                              tok_tokenizer **out, char *err, size_t errlen)
{
    char cand[4][4096];
    const char *tp = tokenizer_path;
    if (!tp) {
        const char *slash = strrchr(path, '/');
        int dl = slash ? (int)(slash - path + 1) : 0;
        snprintf(cand[0], sizeof(cand[0]), "%.*stokenizer.bin", dl, path);
        snprintf(cand[1], sizeof(cand[1]), "%.*stok%d.bin", dl, path, n_vocab);
        snprintf(cand[2], sizeof(cand[2]), "%.*stokenizer.model", dl, path);
        snprintf(cand[3], sizeof(cand[3]), "%.*stok%d.model", dl, path, n_vocab);
        for (int i = 0; i < 4 && !tp; i++)
            if (is_file(cand[i]))
                tp = cand[i];
        if (!tp)
            return lkq_err(err, errlen, -1,
                           "no tokenizer found beside '%s' (tried tokenizer.bin, tok%d.bin, "
                        "tokenizer.model, tok%d.model); give a tokenizer path", path, n_vocab, n_vocab);
    }
    size_t n = strlen(tp);
    char why[384];
    int rc = n >= 6 && !strcmp(tp + n - 6, ".model")
                 ? tok_load_spm_model(tp, out, why, sizeof(why))
                 : tok_load_llama2c(tp, n_vocab, out, why, sizeof(why));
    if (rc)
        return lkq_err(err, errlen, -1, "tokenizer '%s': %s", tp, why);
    if (tok_n_vocab(*out) > n_vocab)
        return lkq_err(err, errlen, -1, "tokenizer '%s' has %d tokens, the model only %d", tp,
                    tok_n_vocab(*out), n_vocab);
    return 0;
}

static mdl_weight f32_weight(const float *data, int64_t n_cols, int64_t n_rows)
{
    mdl_weight w = {KT_F32, data, n_cols, n_rows};
    return w;
}

/* llama2.c path of mdl_load: F32 views into the mapping, then the
 * tokenizer (see load_l2c_tokenizer). */
static int load_l2c(const char *path, const char *tokenizer_path, mdl_model *m, load_priv *p,
                    char *err, size_t errlen)
{
    if (l2c_open(path, &p->lf, err, errlen))
        return -1;
    const l2c_file *f = p->lf;
    const l2c_config *c = &f->cfg;
    mdl_hparams *hp = &m->hp;
    hp->n_vocab = c->vocab_size;
    hp->dim = c->dim;
    hp->hidden_dim = c->hidden_dim;
    hp->n_layers = c->n_layers;
    hp->n_heads = c->n_heads;
    hp->n_kv_heads = c->n_kv_heads;
    hp->head_dim = c->dim / c->n_heads;
    hp->n_rot = hp->head_dim;
    hp->n_ctx_train = c->seq_len;
    hp->rope_theta = 10000.0f;
    hp->rope_freq_scale = 1.0f;
    hp->norm_eps = 1e-5f;
    /* llama2.c checkpoints are plain Llama: every feature at its default */
    hp->qkv_bias = 0;
    hp->qk_norm = 0;
    hp->sandwich_norm = 0;
    hp->act = MDL_ACT_SILU;
    hp->rope_type = MDL_ROPE_NORM;
    hp->rope_scaling = MDL_ROPE_SCALE_NONE;
    hp->embd_scale = 1.0f;
    hp->attn_scale = 1.0f / sqrtf((float)hp->head_dim);
    hp->final_softcap = 0.0f;
    hp->tied_output = c->shared_classifier;
    hp->sliding_window = 0;
    hp->rope_theta_local = hp->rope_theta;

    size_t dim = (size_t)c->dim, hid = (size_t)c->hidden_dim;
    size_t kv_dim = (size_t)hp->head_dim * (size_t)c->n_kv_heads;
    m->tok_embd = f32_weight(f->token_embedding, c->dim, c->vocab_size);
    m->output = f32_weight(f->wcls, c->dim, c->vocab_size);
    m->out_norm = f->rms_final;
    if (!(m->layers = calloc((size_t)c->n_layers, sizeof(mdl_layer))))
        return lkq_err(err, errlen, -1, "out of memory");
    for (size_t l = 0; l < (size_t)c->n_layers; l++) {
        mdl_layer *L = &m->layers[l];
        L->attn_norm = f->rms_att + l * dim;
        L->ffn_norm = f->rms_ffn + l * dim;
        L->wq = f32_weight(f->wq + l * dim * dim, c->dim, c->dim);
        L->wk = f32_weight(f->wk + l * kv_dim * dim, c->dim, (int64_t)kv_dim);
        L->wv = f32_weight(f->wv + l * kv_dim * dim, c->dim, (int64_t)kv_dim);
        L->wo = f32_weight(f->wo + l * dim * dim, c->dim, c->dim);
        L->ffn_gate = f32_weight(f->w1 + l * hid * dim, c->dim, c->hidden_dim);
        L->ffn_down = f32_weight(f->w2 + l * dim * hid, c->hidden_dim, c->dim);
        L->ffn_up = f32_weight(f->w3 + l * hid * dim, c->dim, c->hidden_dim);
        L->window = 0;
        L->rope_theta = hp->rope_theta;
    }
    if (load_l2c_tokenizer(path, tokenizer_path, c->vocab_size, &m->tok, err, errlen))
        return -1;
    m->format = "llama2c";
    snprintf(m->arch, sizeof(m->arch), "llama");
    file_stem(path, m->name, sizeof(m->name));
    return 0;
}

/* ---------------------------------------------------------------- entry -- */

/* See model.h. Sniffs the first bytes: "GGUF" -> GGUF, else a header that
 * passes l2c_check against the file size -> llama2.c, else a clear error. */
int mdl_load(const char *path, const char *tokenizer_path, mdl_model **out,
             char *err, size_t errlen)
{
    *out = NULL;
    if (!path || !*path)
        return lkq_err(err, errlen, -1, "no model path given");
    /* Sniff the format (and give the common file errors) before mapping. */
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return lkq_err(err, errlen, -1, "cannot open '%s': %s", path, strerror(errno));
    struct stat st;
    unsigned char head[28] = {0};
    ssize_t got = 0;
    int bad = fstat(fd, &st) ? errno : 0;
    if (!bad && S_ISREG(st.st_mode))
        got = pread(fd, head, sizeof(head), 0);
    close(fd);
    if (bad)
        return lkq_err(err, errlen, -1, "cannot stat '%s': %s", path, strerror(bad));
    if (S_ISDIR(st.st_mode))
        return lkq_err(err, errlen, -1, "'%s' is a directory, not a model file", path);
    if (!S_ISREG(st.st_mode))
        return lkq_err(err, errlen, -1, "'%s' is not a regular file", path);
    if (st.st_size == 0)
        return lkq_err(err, errlen, -1, "'%s' is empty", path);
    if (got < 0)
        return lkq_err(err, errlen, -1, "cannot read '%s': %s", path, strerror(errno));

    int is_gguf = got >= 4 && !memcmp(head, "GGUF", 4);
    if (!is_gguf) {
        l2c_config cfg;
        int32_t hdr[7];
        char why[256] = "file shorter than a llama2.c header";
        memcpy(hdr, head, sizeof(hdr));
        if (got < (ssize_t)sizeof(head) ||
            l2c_check(hdr, (uint64_t)st.st_size, &cfg, why, sizeof(why)))
            return lkq_err(err, errlen, -1,
                           "'%s' is neither a GGUF file (no 'GGUF' magic) nor a valid "
                        "llama2.c checkpoint (%s)", path, why);
    }

    mdl_model *m = calloc(1, sizeof(*m));
    load_priv *p = calloc(1, sizeof(*p));
    if (!m || !p) {
        free(m);
        free(p);
        return lkq_err(err, errlen, -1, "out of memory");
    }
    m->priv = p;
    int rc = is_gguf ? load_gguf(path, m, p, err, errlen)
                     : load_l2c(path, tokenizer_path, m, p, err, errlen);
    if (rc) {
        mdl_free(m);
        return -1;
    }
    *out = m;
    return 0;
}
