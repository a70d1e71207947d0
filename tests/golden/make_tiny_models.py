#!/usr/bin/env python3
"""Tiny random-weight models per architecture, as GGUF files and as HF golden logits.

Each model's weights come from a seeded numpy RandomState (a stream numpy
guarantees to stay the same across versions), so the .gguf files written at
test time hold exactly the weights the committed goldens were made from; the
golden header records a sha256 of the weights and --gguf-only checks it.

  --gguf-only OUTDIR   needs only `gguf` and `numpy`: writes OUTDIR/tiny_<name>.gguf
                       (what tests/engine/arch_hf.sh does at test time)
  --goldens OUTDIR     also needs torch + transformers: writes the GGUFs and
                       OUTDIR/tiny_<name>_logits.txt (commit those, never the GGUFs)

The GGUFs are laid out as llama.cpp's convert_hf_to_gguf.py lays out the same
HF checkpoint: F32 tensors, llama.* / qwen2.* keys, HF [out, in] matrices as
GGUF ne [in, out]; for `llama` the Q and K rows of each head are permuted
(LlamaModel.permute) so that llama.cpp's adjacent-pair RoPE equals HF's
rotate-half; Llama 3.1 rope scaling becomes a rope_freqs.weight tensor of
per-frequency divisors (LlamaModel.generate_extra_tensors); `qwen2` weights
are not permuted (NEOX RoPE) and carry attn_{q,k,v}.bias. The vocabulary is
256 GPT-2 byte-level tokens (no merges), enough for the loader's tokenizer.

Goldens come from HF transformers (float32, eager attention) on the HF
layout; an independent numpy float64 forward pass on the *GGUF* layout
(adjacent-pair RoPE on the permuted rows, rope_freqs as divisors) checks
both the layout and HF; its max |diff| to HF is written in the header, and
so is how much each model's distinguishing feature moves the logits
(the feature ablated in HF), showing that the golden would catch its loss.

Golden format (whitespace separated; '#' lines are comments):
  model NAME
  vocab V
  tokens N id id ...
  logits N V
  N lines of V logits (position 0 first)

Command used for the committed goldens (repo root):
  python3 -m venv ~/.cache/livekvq/venv-hf
  ~/.cache/livekvq/venv-hf/bin/pip install gguf numpy torch transformers
  ~/.cache/livekvq/venv-hf/bin/python tests/golden/make_tiny_models.py --goldens tests/golden
"""
import argparse
import hashlib
import math
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the machine is shared: stay small
import numpy as np  # noqa: E402

N_TOKENS = 40
VOCAB = 256

# name: family and hyper-parameters. GQA ratios 1, 2, 3 and 8; tied and untied.
MODELS = {
    # Qwen2: QKV biases, 6 query heads on 2 KV heads (GQA 3), own output head.
    "qwen2_gqa3": dict(arch="qwen2", seed=101, dim=96, hidden=160, layers=2, heads=6, kv=2,
                       head_dim=16, theta=10000.0, eps=1e-6, tied=False, bias=True),
    # Qwen2, multi-head (GQA 1), output tied to the embedding.
    "qwen2_mha_tied": dict(arch="qwen2", seed=102, dim=64, hidden=128, layers=2, heads=4, kv=4,
                           head_dim=16, theta=10000.0, eps=1e-6, tied=True, bias=True),
    # Llama 3.1 style: rope_freqs (llama3 scaling; the small original context
    # puts the 8 frequencies in all three bands), 8 query heads on 1 KV head.
    "llama31_gqa8": dict(arch="llama", seed=103, dim=128, hidden=192, layers=2, heads=8, kv=1,
                         head_dim=16, theta=10000.0, eps=1e-5, tied=False, bias=False,
                         rope=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                   high_freq_factor=4.0, original_max_position_embeddings=64)),
    # Llama with linear rope scaling, head_dim 32 given by key_length (Q has
    # 128 rows for dim 64), GQA 2, tied output.
    "llama_linear_hd32": dict(arch="llama", seed=104, dim=64, hidden=128, layers=2, heads=4, kv=2,
                              head_dim=32, theta=10000.0, eps=1e-5, tied=True, bias=False,
                              rope=dict(rope_type="linear", factor=2.0)),
    # Gemma-3, every layer global (no sliding_window key): Q/K norms, sandwich
    # norms, GELU-tanh, sqrt(dim) embedding scale, head_dim 32 (Q 128 rows for
    # dim 64), 4 heads on 1 KV head, logit soft-cap 10, tied output.
    "gemma3_global": dict(arch="gemma3", seed=105, dim=64, hidden=128, layers=6, heads=4, kv=1,
                          head_dim=32, theta=1000000.0, eps=1e-6, tied=True, bias=False,
                          gemma=True, window=0, softcap=10.0),
    # Gemma-3 with window layers: window 8 on layers 0-4 (RoPE base 10000),
    # layer 5 global (base 1e6).
    "gemma3_swa": dict(arch="gemma3", seed=106, dim=64, hidden=128, layers=6, heads=4, kv=1,
                       head_dim=32, theta=1000000.0, eps=1e-6, tied=True, bias=False,
                       gemma=True, window=8, theta_local=10000.0, softcap=10.0),
}


def is_window_layer(cfg, i):
    """Gemma-3 / llama.cpp pattern: 5 window layers, then 1 global."""
    return cfg.get("window", 0) > 0 and i % 6 < 5


def make_weights(cfg):
    """HF-layout float32 weights: matrices [out, in] of N(0, 1/in) so that
    activations stay O(1) and logits spread over a few units; norm weights
    near 1, biases N(0, 0.25)."""
    rs = np.random.RandomState(cfg["seed"])
    d, h, hd = cfg["dim"], cfg["hidden"], cfg["head_dim"]
    qd, kvd = cfg["heads"] * hd, cfg["kv"] * hd

    def mat(rows, cols):
        return (rs.standard_normal((rows, cols)) / math.sqrt(cols)).astype(np.float32)

    def vec(n, base, spread):
        return (base + spread * rs.standard_normal(n)).astype(np.float32)

    # embedding rows of RMS 2/sqrt(d): a tied head gives logits of std ~2
    w = {"embed": (2.0 / math.sqrt(d) * rs.standard_normal((VOCAB, d))).astype(np.float32),
         "layers": []}
    for _ in range(cfg["layers"]):
        L = {"attn_norm": vec(d, 1.0, 0.1), "wq": mat(qd, d), "wk": mat(kvd, d), "wv": mat(kvd, d),
             "wo": mat(d, qd), "ffn_norm": vec(d, 1.0, 0.1), "gate": mat(h, d), "up": mat(h, d),
             "down": mat(d, h)}
        if cfg["bias"]:
            L.update(bq=vec(qd, 0.0, 0.5), bk=vec(kvd, 0.0, 0.5), bv=vec(kvd, 0.0, 0.5))
        if cfg.get("gemma"):
            # HF Gemma3RMSNorm multiplies by (1 + w): these are the w, near 0
            for k in ("attn_norm", "ffn_norm"):
                L[k] = L[k] - 1.0
            L.update(q_norm=vec(hd, 0.0, 0.1), k_norm=vec(hd, 0.0, 0.1),
                     post_attn_norm=vec(d, 0.0, 0.1), post_ffn_norm=vec(d, 0.0, 0.1))
        w["layers"].append(L)
    w["norm"] = vec(d, 0.0 if cfg.get("gemma") else 1.0, 0.1)
    if not cfg["tied"]:
        w["output"] = mat(VOCAB, d)
    return w


def weights_sha256(w):
    hsh = hashlib.sha256()
    for L in [w] + w["layers"]:
        for k in sorted(L):
            if k != "layers":
                hsh.update(k.encode())
                hsh.update(np.ascontiguousarray(L[k]).tobytes())
    return hsh.hexdigest()


def token_ids(cfg):
    return [int(t) for t in np.random.RandomState(cfg["seed"] + 1000).randint(0, VOCAB, N_TOKENS)]


def llama3_rope_factors(cfg):
    """convert_hf_to_gguf.py LlamaModel: per-frequency divisors for rope_type llama3."""
    r, hd = cfg["rope"], cfg["head_dim"]
    freqs = 1.0 / (cfg["theta"] ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    factor, lo, hi = r["factor"], r["low_freq_factor"], r["high_freq_factor"]
    old = r["original_max_position_embeddings"]
    lo_wl, hi_wl = old / lo, old / hi
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(factor)
        else:
            smooth = (old / wl - lo) / (hi - lo)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def permute(w, n_head):
    """convert_hf_to_gguf.py LlamaModel.permute: per head, rows (first half,
    second half) -> interleaved pairs, for adjacent-pair RoPE."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_tensors(cfg, w):
    """(name, array) in the converter's names and layout (arrays [out, in]).
    gemma3: the converter stores Gemma's RMSNorm weights as 1 + w."""
    llama = cfg["arch"] == "llama"
    gemma = cfg.get("gemma", False)
    nw = (lambda v: v + np.float32(1.0)) if gemma else (lambda v: v)
    t = [("token_embd.weight", w["embed"])]
    if cfg.get("rope", {}).get("rope_type") == "llama3":
        t.append(("rope_freqs.weight", llama3_rope_factors(cfg)))
    for i, L in enumerate(w["layers"]):
        p = f"blk.{i}."
        wq, wk = L["wq"], L["wk"]
        if llama:
            wq, wk = permute(wq, cfg["heads"]), permute(wk, cfg["kv"])
        t += [(p + "attn_norm.weight", nw(L["attn_norm"])), (p + "attn_q.weight", wq),
              (p + "attn_k.weight", wk), (p + "attn_v.weight", L["wv"]),
              (p + "attn_output.weight", L["wo"])]
        if cfg["bias"]:
            bq, bk = L["bq"], L["bk"]
            if llama:
                bq, bk = permute(bq, cfg["heads"]), permute(bk, cfg["kv"])
            t += [(p + "attn_q.bias", bq), (p + "attn_k.bias", bk), (p + "attn_v.bias", L["bv"])]
        if gemma:
            t += [(p + "attn_q_norm.weight", nw(L["q_norm"])),
                  (p + "attn_k_norm.weight", nw(L["k_norm"])),
                  (p + "post_attention_norm.weight", nw(L["post_attn_norm"])),
                  (p + "post_ffw_norm.weight", nw(L["post_ffn_norm"]))]
        t += [(p + "ffn_norm.weight", nw(L["ffn_norm"])), (p + "ffn_gate.weight", L["gate"]),
              (p + "ffn_up.weight", L["up"]), (p + "ffn_down.weight", L["down"])]
    t.append(("output_norm.weight", nw(w["norm"])))
    if not cfg["tied"]:
        t.append(("output.weight", w["output"]))
    return t


def byte_tokens():
    """GPT-2's byte-to-unicode map: the 256 byte-level tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    m = dict(zip(bs, cs))
    return [chr(m[b]) for b in range(256)]


def write_gguf(name, cfg, w, path):
    import gguf
    a = cfg["arch"]
    wr = gguf.GGUFWriter(path, a)
    wr.add_type(gguf.GGUFType.MODEL)
    wr.add_name(f"tiny {name}")
    wr.add_block_count(cfg["layers"])
    wr.add_context_length(256)
    wr.add_embedding_length(cfg["dim"])
    wr.add_feed_forward_length(cfg["hidden"])
    wr.add_head_count(cfg["heads"])
    wr.add_head_count_kv(cfg["kv"])
    wr.add_rope_freq_base(cfg["theta"])
    wr.add_layer_norm_rms_eps(cfg["eps"])
    if cfg["head_dim"] != cfg["dim"] // cfg["heads"]:
        wr.add_key_length(cfg["head_dim"])
        wr.add_value_length(cfg["head_dim"])
    wr.add_file_type(gguf.LlamaFileType.ALL_F32)
    if a == "llama":
        wr.add_vocab_size(VOCAB)
        wr.add_rope_dimension_count(cfg["head_dim"])
    if cfg.get("window"):
        wr.add_sliding_window(cfg["window"])
    if cfg.get("softcap"):
        wr.add_final_logit_softcapping(cfg["softcap"])
    rope = cfg.get("rope", {})
    if rope.get("rope_type") == "linear":
        wr.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        wr.add_rope_scaling_factor(rope["factor"])
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("llama-bpe" if a == "llama" else "default")
    wr.add_token_list(byte_tokens())
    wr.add_token_types([gguf.TokenType.NORMAL] * VOCAB)
    wr.add_add_bos_token(False)
    for tn, arr in gguf_tensors(cfg, w):
        wr.add_tensor(tn, np.ascontiguousarray(arr, dtype=np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


# ------------------------------------------------- numpy fp64, GGUF layout
def np_forward(cfg, tensors, ids):
    """Forward pass in float64 over the GGUF tensors, llama.cpp's reading of
    them (llama: permuted Q/K rows with adjacent-pair RoPE; qwen2, gemma3:
    rotate-half; gemma3: norms stored as 1 + w, Q/K and sandwich norms,
    GELU-tanh, sqrt(dim) embedding scale, window layers with their own RoPE
    base, logit soft-cap)."""
    T = {k: v.astype(np.float64) for k, v in tensors}
    nh, nkv, hd, eps = cfg["heads"], cfg["kv"], cfg["head_dim"], cfg["eps"]
    neox, gemma = cfg["arch"] != "llama", cfg.get("gemma", False)
    rope = cfg.get("rope", {})
    scale = 1.0 / rope["factor"] if rope.get("rope_type") == "linear" else 1.0
    n = len(ids)
    pos = np.arange(n)

    def rope_cs(theta):
        freq = theta ** (-np.arange(0, hd, 2) / hd)
        if "rope_freqs.weight" in T:
            freq = freq / T["rope_freqs.weight"]
        ang = (pos * scale)[:, None] * freq[None, :]                  # [n, hd/2]
        return np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rms(x, g):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g

    def rot(x, c, s):                                                # x [n, H, hd]
        a, b = (x[..., :hd // 2], x[..., hd // 2:]) if neox else (x[..., 0::2], x[..., 1::2])
        ra, rb = a * c - b * s, a * s + b * c
        out = np.empty_like(x)
        if neox:
            out[..., :hd // 2], out[..., hd // 2:] = ra, rb
        else:
            out[..., 0::2], out[..., 1::2] = ra, rb
        return out

    x = T["token_embd.weight"][np.asarray(ids)] * (math.sqrt(cfg["dim"]) if gemma else 1.0)
    causal = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(cfg["layers"]):
        p = f"blk.{i}."
        local = is_window_layer(cfg, i)
        c, s = rope_cs(cfg["theta_local"] if local else cfg["theta"])
        mask = causal.copy()
        if local:  # query t sees keys t - window + 1 .. t
            mask[pos[:, None] - pos[None, :] >= cfg["window"]] = -np.inf
        h = rms(x, T[p + "attn_norm.weight"])
        q, k, v = h @ T[p + "attn_q.weight"].T, h @ T[p + "attn_k.weight"].T, h @ T[p + "attn_v.weight"].T
        if cfg["bias"]:
            q, k, v = q + T[p + "attn_q.bias"], k + T[p + "attn_k.bias"], v + T[p + "attn_v.bias"]
        q, k, v = q.reshape(n, nh, hd), k.reshape(n, nkv, hd), v.reshape(n, nkv, hd)
        if gemma:
            q, k = rms(q, T[p + "attn_q_norm.weight"]), rms(k, T[p + "attn_k_norm.weight"])
        q, k = rot(q, c, s), rot(k, c, s)
        k, v = np.repeat(k, nh // nkv, 1), np.repeat(v, nh // nkv, 1)
        sc = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        sc /= sc.sum(-1, keepdims=True)
        a = np.einsum("hts,shd->thd", sc, v).reshape(n, nh * hd) @ T[p + "attn_output.weight"].T
        x = x + (rms(a, T[p + "post_attention_norm.weight"]) if gemma else a)
        h = rms(x, T[p + "ffn_norm.weight"])
        g = h @ T[p + "ffn_gate.weight"].T
        if gemma:
            act = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
        else:
            act = g / (1 + np.exp(-g))
        f = (act * (h @ T[p + "ffn_up.weight"].T)) @ T[p + "ffn_down.weight"].T
        x = x + (rms(f, T[p + "post_ffw_norm.weight"]) if gemma else f)
    out = T.get("output.weight", T["token_embd.weight"])
    logits = rms(x, T["output_norm.weight"]) @ out.T
    if cfg.get("softcap"):
        logits = cfg["softcap"] * np.tanh(logits / cfg["softcap"])
    return logits


# ------------------------------------------------------------- HF goldens
def hf_logits(cfg, w, ids, ablate=None):
    """HF transformers float32 logits [n, V]. ablate: drop the model's
    distinguishing feature ('rope' scaling, 'bias', gemma3's 'window' or
    'softcap') to measure how much the golden depends on it."""
    import torch
    import transformers
    torch.set_num_threads(1)
    rope = dict(cfg.get("rope", {}))
    common = dict(vocab_size=VOCAB, hidden_size=cfg["dim"], intermediate_size=cfg["hidden"],
                  num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                  num_key_value_heads=cfg["kv"], head_dim=cfg["head_dim"],
                  max_position_embeddings=256, rms_norm_eps=cfg["eps"],
                  tie_word_embeddings=cfg["tied"], attn_implementation="eager")
    rp = {"rope_type": "default", "rope_theta": cfg["theta"]}
    if rope and ablate != "rope":
        rp.update(rope)
    if cfg["arch"] == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_parameters=rp, **common))
    elif cfg["arch"] == "qwen2":
        conf = transformers.Qwen2Config(rope_parameters=rp, use_sliding_window=False, **common)
        model = transformers.Qwen2ForCausalLM(conf)
    else:
        window = cfg["window"] > 0 and ablate != "window"
        types = ["sliding_attention" if window and is_window_layer(cfg, i) else "full_attention"
                 for i in range(cfg["layers"])]
        rps = {"full_attention": dict(rp), "sliding_attention": {
            "rope_type": "default", "rope_theta": cfg.get("theta_local", cfg["theta"])}}
        conf = transformers.Gemma3TextConfig(
            rope_parameters=rps, layer_types=types, sliding_window=cfg["window"] or 4096,
            query_pre_attn_scalar=cfg["head_dim"], hidden_activation="gelu_pytorch_tanh",
            final_logit_softcapping=None if ablate == "softcap" else cfg.get("softcap"),
            pad_token_id=0, bos_token_id=None, eos_token_id=None, **common)
        model = transformers.Gemma3ForCausalLM(conf)
    sd = {"model.embed_tokens.weight": w["embed"], "model.norm.weight": w["norm"],
          "lm_head.weight": w["embed"] if cfg["tied"] else w["output"]}
    for i, L in enumerate(w["layers"]):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": L["attn_norm"],
                   p + "self_attn.q_proj.weight": L["wq"], p + "self_attn.k_proj.weight": L["wk"],
                   p + "self_attn.v_proj.weight": L["wv"], p + "self_attn.o_proj.weight": L["wo"],
                   p + "mlp.gate_proj.weight": L["gate"], p + "mlp.up_proj.weight": L["up"],
                   p + "mlp.down_proj.weight": L["down"]})
        if cfg.get("gemma"):
            sd.update({p + "self_attn.q_norm.weight": L["q_norm"],
                       p + "self_attn.k_norm.weight": L["k_norm"],
                       p + "post_attention_layernorm.weight": L["post_attn_norm"],
                       p + "pre_feedforward_layernorm.weight": L["ffn_norm"],
                       p + "post_feedforward_layernorm.weight": L["post_ffn_norm"]})
        else:
            sd[p + "post_attention_layernorm.weight"] = L["ffn_norm"]
        if cfg["bias"]:
            z = ablate == "bias"
            for nm, key in (("q", "bq"), ("k", "bk"), ("v", "bv")):
                sd[p + f"self_attn.{nm}_proj.bias"] = L[key] * (0 if z else 1)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("inv_freq")]
    if missing or unexpected:
        sys.exit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits[0]
    return out.double().numpy()


def golden_path(outdir, name):
    return os.path.join(outdir, f"tiny_{name}_logits.txt")


def write_golden(path, name, cfg, ids, logits, notes):
    with open(path, "w") as f:
        f.write(f"# tiny {name}: {cfg['arch']}, random weights (seed {cfg['seed']}), F32; made by\n")
        f.write("# tests/golden/make_tiny_models.py --goldens (HF transformers, float32, eager)\n")
        for line in notes:
            f.write(f"# {line}\n")
        f.write(f"model tiny_{name}\nvocab {VOCAB}\n")
        f.write(f"tokens {len(ids)} " + " ".join(map(str, ids)) + "\n")
        f.write(f"logits {logits.shape[0]} {logits.shape[1]}\n")
        for row in logits:
            f.write(" ".join(f"{v:.7g}" for v in row) + "\n")


def recorded_sha(path):
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("# weights_sha256 "):
                    return line.split()[2]
    except OSError:
        pass
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--gguf-only", metavar="OUTDIR", help="write only the GGUF files (gguf + numpy)")
    g.add_argument("--goldens", metavar="OUTDIR", help="write GGUFs and HF golden logits")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    args = ap.parse_args()
    outdir = args.gguf_only or args.goldens
    os.makedirs(outdir, exist_ok=True)
    here = os.path.dirname(os.path.abspath(__file__))
    for name in args.models.split(","):
        cfg = MODELS[name]
        w = make_weights(cfg)
        sha = weights_sha256(w)
        gguf_path = os.path.join(outdir, f"tiny_{name}.gguf")
        write_gguf(name, cfg, w, gguf_path)
        if args.gguf_only:
            want = recorded_sha(golden_path(here, name))
            if want and want != sha:
                sys.exit(f"tiny_{name}: weights sha256 {sha[:12]} differs from the golden's "
                         f"{want[:12]} (numpy stream changed?)")
            print(f"wrote {gguf_path}")
            continue
        ids = token_ids(cfg)
        ref = hf_logits(cfg, w, ids)
        npl = np_forward(cfg, gguf_tensors(cfg, w), ids)
        d_np = float(np.abs(npl - ref).max())
        notes = [f"weights_sha256 {sha}",
                 f"dim {cfg['dim']} hidden {cfg['hidden']} layers {cfg['layers']} heads "
                 f"{cfg['heads']} kv_heads {cfg['kv']} head_dim {cfg['head_dim']} theta "
                 f"{cfg['theta']:g} tied {int(cfg['tied'])} qkv_bias {int(cfg['bias'])} rope "
                 f"{cfg.get('rope', {'rope_type': 'default'})}",
                 f"numpy float64 forward on the GGUF layout vs HF: max |diff| {d_np:.3g}",
                 f"logits range [{ref.min():.3f}, {ref.max():.3f}], std {ref.std():.3f}"]
        feats = [f for f, on in (("rope", cfg.get("rope")), ("bias", cfg["bias"]),
                                 ("window", cfg.get("window")), ("softcap", cfg.get("softcap")))
                 if on]
        for feat in feats:
            d = float(np.abs(hf_logits(cfg, w, ids, ablate=feat) - ref).max())
            notes.append(f"without its {feat}, HF logits move by max |diff| {d:.3g}")
        if d_np > 1e-3:
            sys.exit(f"tiny_{name}: numpy and HF disagree by {d_np:g}: layout bug")
        write_golden(golden_path(outdir, name), name, cfg, ids, ref, notes)
        print(f"tiny_{name}: numpy vs HF {d_np:.3g}; " + "; ".join(notes[4:]))


if __name__ == "__main__":
    main()
