/*
 * arch.h - the model families the GGUF loader knows, and the reading of
 * their hyper-parameters from arch-prefixed metadata ({arch}.block_count,
 * {arch}.attention.head_count, ...) into an mdl_hparams.
 *
 * A family is a row of a table (arch.c): which RoPE pairing, activation,
 * optional tensors (QKV biases, Q/K norms, sandwich norms) and attention
 * kinds (sliding-window layer pattern and their RoPE base) its files mean.
 * Supporting a new family is a new row here plus, where needed, new
 * descriptor fields and ops in the graph.
 *
 * Internal to engine/model (model_load.c). Threading: the table is
 * constant; the functions keep no state.
 */
#ifndef LKQ_MODEL_ARCH_H
#define LKQ_MODEL_ARCH_H

#include <stddef.h>

#include "engine/model/gguf.h"
#include "engine/model/model.h"

typedef enum {
    MDL_BIAS_NONE = 0,     /* Q/K/V projections have no bias tensors */
    MDL_BIAS_OPTIONAL = 1, /* biases used when blk.0.attn_q.bias is present */
    MDL_BIAS_REQUIRED = 2, /* every layer carries attn_{q,k,v}.bias */
} mdl_bias_kind;

typedef struct {
    const char *name;          /* general.architecture */
    mdl_rope_type rope_type;
    mdl_act act;
    mdl_bias_kind qkv_bias;
    int qk_norm;               /* blk.N.attn_q_norm / attn_k_norm [head_dim] */
    int sandwich_norm;         /* blk.N.post_attention_norm / post_ffw_norm [dim] */
    int embd_scale_sqrt_dim;   /* embeddings times sqrt(dim) (Gemma) */
    int rope_freqs;            /* may carry rope_freqs.weight (Llama 3.1+) */
    int swa_period;            /* with {arch}.attention.sliding_window > 0: layer l
                                  is a window layer when l % swa_period < swa_period-1
                                  (llama.cpp's pattern; 0: every layer global) */
    float rope_theta_local;    /* RoPE base of window layers */
    float norm_eps;            /* default RMSNorm epsilon */
} mdl_arch;

/* The family named name[0..len) (not NUL-terminated), or NULL. */
const mdl_arch *mdl_arch_find(const char *name, size_t len);

/* Reads general.architecture and the family's hyper-parameters into *hp
 * (every field set; n_vocab is left 0 for the tensor reader, and
 * rope_scaling is NONE or LINEAR: the caller upgrades it to LLAMA3 when it
 * loads rope_freqs.weight). *arch gets the family. Returns 0, or -1 with a
 * one-line reason naming the key in err. */
int mdl_arch_read_hparams(const gguf_file *f, const mdl_arch **arch, mdl_hparams *hp,
                          char *err, size_t errlen);

/* Whether the file's rope.scaling.type is "llama3" (then rope_freqs.weight
 * must be present). */
int mdl_arch_wants_rope_freqs(const gguf_file *f, const mdl_arch *arch);

/* Attention kind of layer l: its window (0: global) and RoPE base. */
void mdl_arch_layer_kind(const mdl_arch *arch, const mdl_hparams *hp, int l, int32_t *window,
                         float *rope_theta);

#endif
