#!/usr/bin/env python3
"""Golden logits for the real Gemma-3-270M Q4_K_M GGUF (tests/engine/test_gemma3.c).

Command that made tests/golden/gemma3_270m_logits.txt (from the repo root, after
`ninja -C build`, which builds the tokenizer helper tests/tokenizer/tok_ids):

    ~/.cache/livekvq/venv-hf/bin/python tests/golden/make_gemma3_golden.py \
        --gguf ~/.cache/livekvq/gemma-3-270m-q4_k_m.gguf --shared /work/shared \
        --tok-ids build/tests/tokenizer/tok_ids --out tests/golden/gemma3_270m_logits.txt

venv: python3 -m venv ~/.cache/livekvq/venv-hf
      ~/.cache/livekvq/venv-hf/bin/pip install gguf numpy torch transformers accelerate sentencepiece
(accelerate: transformers refuses to load a GGUF without it). About 4 minutes on 2 cores.

How the golden is made
- Token ids: OUR tokenizer (tests/tokenizer/tok_ids: the engine's SentencePiece tokenizer
  built from the GGUF's tokenizer.* metadata, BOS first) on a Moby-Dick passage (byte range
  recorded in the `text` line; test_gemma3 re-tokenizes it and must get the same ids). The
  ids are written into the golden, so the HF model and the engine see the same ids.
- A (the golden values): HF transformers, AutoModelForCausalLM.from_pretrained(dir,
  gguf_file=...), float32, eager attention. transformers dequantizes every tensor with the
  gguf package and, for gemma3, subtracts 1 from every *norm.weight (llama.cpp's converter
  stores Gemma's RMSNorm weights as 1 + w; Gemma3RMSNorm multiplies by 1 + w). Its config
  from the GGUF: 18 layers, dim 640, 4 heads x 256, 1 KV head, hidden 2048, window 512 on
  layers with l % 6 != 5 (RoPE base 1e4) and global layers 5, 11, 17 (base 1e6),
  query_pre_attn_scalar 256, eps 1e-6, GELU-tanh, tied head, no soft-cap.
  Logits of every prompt position, and a greedy continuation of 16 tokens (generate).
- B (cross-check, shares no code with A): a numpy float64 forward pass written here on the
  GGUF tensors as stored (gguf.quants.dequantize; norms used as stored, i.e. 1 + w, the way
  llama.cpp and our engine use them; NEOX RoPE; window mask kv > q - 512 on window layers).
  max |A - B| is recorded in the header: float32 rounding only.
- Checks recorded in the header: A's perplexity on the passage (a 270M model on 19th-century
  prose: tens, not thousands); the same with the norms NOT undone (1 + (1 + w): the wrong
  way round) must be far worse; how far logits move when the window is removed (positions
  >= 512 only), i.e. what the test can see of the window; the greedy text.
- What the engine's optimized CPU kernels should differ by: C = B with every matmul input
  rounded to signed 8 bits in blocks of 32 (float scale, as kernels/cpu does for quantized
  weights), and C256 = the same with blocks of 256 for the K-quant tensors (attn_output,
  ffn_down: Q8_K-style activations); max |C - A| on the recorded logits and lse, argmax flips.

Output format (as tests/golden/smollm2_logits.txt; '#' lines are comments):
    model NAME / vocab V / text FILE BYTE_OFFSET N_BYTES / tokens N id ...
    perplexity N_PREDICTED PPL        (A's, over the next-token predictions of the prompt)
    pos P argmax A margin M lse L top K id:logit ...   (every position; K = 20 at every 8th
                                                       position and the last, else 4)
    greedy N id ... / greedy_margin N m ...
"""
import argparse
import hashlib
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")        # 2 shared cores
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
import numpy as np  # noqa: E402

START = "CHAPTER 1. Loomings."
WINDOW_LAYER = lambda l: l % 6 != 5  # noqa: E731  (Gemma-3: 5 window layers, then 1 global)


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ------------------------------------------------------------------ token ids (ours)
def our_ids(tok_ids, gguf_path, text_path, n):
    """Byte range of moby-dick.txt from START, tokenized by our tokenizer with BOS; first n ids."""
    raw = open(text_path, "rb").read()
    off = raw.index(START.encode())
    nbytes = 6 * n                                  # ~4 bytes per token: plenty
    while (raw[off + nbytes] & 0xC0) == 0x80:       # do not cut a UTF-8 character
        nbytes += 1
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as f:
        f.write(raw[off:off + nbytes])
        tmp = f.name
    try:
        out = subprocess.run([tok_ids, gguf_path, tmp, "--bos"], check=True, capture_output=True,
                             text=True).stdout
    finally:
        os.unlink(tmp)
    ids = [int(x) for x in out.split()]
    assert len(ids) > n and ids[0] == 2, "tok_ids: too few ids or no BOS"
    return ids[:n], off, nbytes, raw[off:off + nbytes]


# ------------------------------------------------------------------ numpy model (B)
def load_gguf_numpy(path):
    import gguf
    r = gguf.GGUFReader(path)
    f = lambda k: r.fields[k].contents()  # noqa: E731
    cfg = dict(dim=f("gemma3.embedding_length"), n_layers=f("gemma3.block_count"),
               n_heads=f("gemma3.attention.head_count"), n_kv=f("gemma3.attention.head_count_kv"),
               hd=f("gemma3.attention.key_length"), eps=float(f("gemma3.attention.layer_norm_rms_epsilon")),
               theta=float(f("gemma3.rope.freq_base")), theta_local=10000.0,
               window=f("gemma3.attention.sliding_window"))
    t, types = {}, {}
    for ten in r.tensors:
        a = gguf.quants.dequantize(ten.data, ten.tensor_type)
        t[ten.name] = np.asarray(a, dtype=np.float64).reshape([int(d) for d in ten.shape[::-1]])
        types[ten.name] = ten.tensor_type.name
    return cfg, t, types


def q8_blocks(x, bs):
    """x [..., n] through signed 8-bit blocks of bs with a float scale amax/127 (kernels/cpu)."""
    b = x.reshape(*x.shape[:-1], -1, bs)
    d = (np.abs(b).max(-1, keepdims=True) / 127).astype(np.float32).astype(np.float64)
    q = np.round(np.divide(b, d, out=np.zeros_like(b), where=d > 0))
    return (q * d).reshape(x.shape)


def np_forward(cfg, T_, ids, aq=None, window=True):
    """Causal forward over ids on the GGUF tensors as stored (norms = 1 + w). Returns [T, V].
    aq(x, tensor_name) is applied to the input of every weight matmul (None: identity)."""
    aq = aq or (lambda x, name: x)
    T, H, KV, hd, d = len(ids), cfg["n_heads"], cfg["n_kv"], cfg["hd"], cfg["dim"]
    eps = cfg["eps"]
    rms = lambda x, w: x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w  # noqa: E731
    pos = np.arange(T, dtype=np.float64)
    qi, ki = np.arange(T)[:, None], np.arange(T)[None, :]

    def rope(x, theta):                                   # NEOX: pairs (i, i + hd/2)
        ang = pos[:, None] * theta ** (-np.arange(0, hd, 2) / hd)[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a, b = x[..., :hd // 2], x[..., hd // 2:]
        return np.concatenate([a * c - b * s, a * s + b * c], axis=-1)

    def mm(x, name):
        return aq(x, name) @ T_[name].T

    x = T_["token_embd.weight"][np.asarray(ids)] * math.sqrt(d)
    for l in range(cfg["n_layers"]):
        p = f"blk.{l}."
        win = window and WINDOW_LAYER(l)
        h = rms(x, T_[p + "attn_norm.weight"])
        q = rms(mm(h, p + "attn_q.weight").reshape(T, H, hd), T_[p + "attn_q_norm.weight"])
        k = rms(mm(h, p + "attn_k.weight").reshape(T, KV, hd), T_[p + "attn_k_norm.weight"])
        v = mm(h, p + "attn_v.weight").reshape(T, KV, hd)
        th = cfg["theta_local"] if WINDOW_LAYER(l) else cfg["theta"]
        q, k = rope(q, th), rope(k, th)
        k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
        masked = ki > qi
        if win:
            masked |= ki <= qi - cfg["window"]
        sc = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
        sc[:, masked] = -np.inf
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        sc /= sc.sum(-1, keepdims=True)
        a = np.einsum("hts,shd->thd", sc, v).reshape(T, H * hd)
        x = x + rms(mm(a, p + "attn_output.weight"), T_[p + "post_attention_norm.weight"])
        h = rms(x, T_[p + "ffn_norm.weight"])
        g = mm(h, p + "ffn_gate.weight")
        g = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
        f = mm(g * mm(h, p + "ffn_up.weight"), p + "ffn_down.weight")
        x = x + rms(f, T_[p + "post_ffw_norm.weight"])
    return mm(rms(x, T_["output_norm.weight"]), "token_embd.weight")


# ------------------------------------------------------------------ helpers
def lse(v):
    mx = v.max()
    return float(mx + np.log(np.exp(v - mx).sum()))


def top2_margin(v):
    a = np.partition(v, -2)[-2:]
    return float(a[1] - a[0])


def pos_line(p, v, k):
    top = np.argpartition(-v, k)[:k]
    top = top[np.argsort(-v[top], kind="stable")]
    items = " ".join(f"{int(i)}:{v[i]:.5f}" for i in top)
    return (f"pos {p} argmax {int(top[0])} margin {v[top[0]] - v[top[1]]:.5f} lse {lse(v):.5f} "
            f"top {k} {items}")


def compare(a, b, positions, k=20):
    """max |a-b| over a's top-k at positions, over the whole vocab, of the lse; argmax flips."""
    dtop = dall = dlse = 0.0
    flips = []
    for p in positions:
        top = np.argpartition(-a[p], k)[:k]
        dtop = max(dtop, float(np.abs(a[p][top] - b[p][top]).max()))
        dall = max(dall, float(np.abs(a[p] - b[p]).max()))
        dlse = max(dlse, abs(lse(a[p]) - lse(b[p])))
        if np.argmax(a[p]) != np.argmax(b[p]):
            flips.append((p, top2_margin(a[p])))
    return dtop, dall, dlse, flips


def ppl(logits, ids):
    nll = [lse(logits[i]) - logits[i][ids[i + 1]] for i in range(len(ids) - 1)]
    return float(math.exp(np.mean(nll)))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for blk in iter(lambda: f.read(1 << 20), b""):
            h.update(blk)
    return h.hexdigest()


def versions():
    import torch
    import transformers
    from importlib.metadata import version
    return (f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, gguf {version('gguf')}")


# ------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default="~/.cache/livekvq/gemma-3-270m-q4_k_m.gguf")
    ap.add_argument("--shared", default="/work/shared")
    ap.add_argument("--tok-ids", default="build/tests/tokenizer/tok_ids")
    ap.add_argument("--out", default="tests/golden/gemma3_270m_logits.txt")
    ap.add_argument("--n-prompt", type=int, default=640)
    ap.add_argument("--n-greedy", type=int, default=16)
    ap.add_argument("--no-sim", action="store_true", help="skip the q8 simulations (C, C256)")
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    gpath = os.path.abspath(os.path.expanduser(args.gguf))
    text_path = os.path.join(args.shared, "data/moby-dick.txt")

    ids, off, nbytes, text = our_ids(args.tok_ids, gpath, text_path, args.n_prompt)
    N = len(ids)
    log(f"{N} ids from our tokenizer, bytes [{off}, {off + nbytes}) of moby-dick.txt")

    # ---- A: transformers
    d, name = os.path.split(gpath)
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32,
                                             attn_implementation="eager").eval()
    c = m.config
    rp = c.rope_parameters
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.intermediate_size, c.sliding_window, c.query_pre_attn_scalar) == \
        (18, 640, 4, 1, 256, 2048, 512, 256), c
    assert rp["full_attention"]["rope_theta"] == 1e6 and rp["sliding_attention"]["rope_theta"] == 1e4, rp
    assert [t == "sliding_attention" for t in c.layer_types] == [WINDOW_LAYER(l) for l in range(18)]
    assert c.final_logit_softcapping is None and c.tie_word_embeddings

    def hf_logits(seq):
        with torch.no_grad():
            return m(torch.tensor([seq])).logits[0].double().numpy()

    A = hf_logits(ids)
    ppl_a = ppl(A, ids)
    log(f"A: HF perplexity on the passage {ppl_a:.2f}")
    with torch.no_grad():
        out = m.generate(torch.tensor([ids]), max_new_tokens=args.n_greedy, do_sample=False,
                         output_scores=True, return_dict_in_generate=True, top_k=None, top_p=None)
    greedy = out.sequences[0, N:].tolist()
    gmargin = [top2_margin(s[0].double().numpy()) for s in out.scores]
    # the greedy steps again without the KV cache (one forward of prompt + continuation)
    A_full = hf_logits(ids + greedy[:-1])
    assert [int(np.argmax(A_full[N - 1 + i])) for i in range(len(greedy))] == greedy
    del A_full

    # norms the wrong way round: keep the GGUF's 1 + w and let Gemma3RMSNorm add 1 again
    saved = {k: p.detach().clone() for k, p in m.named_parameters() if k.endswith("norm.weight")}
    with torch.no_grad():
        for k, p in m.named_parameters():
            if k in saved:
                p.add_(1.0)
    ppl_wrong = ppl(hf_logits(ids), ids)
    with torch.no_grad():
        for k, p in m.named_parameters():
            if k in saved:
                p.copy_(saved[k])
    log(f"A with norms left as 1 + w (not undone): perplexity {ppl_wrong:.4g}")
    # the window removed: what a test of positions >= 512 can see of it
    far = list(range(c.sliding_window, N))
    if far:
        c.sliding_window = 1 << 20
        for layer in m.model.layers:
            if layer.self_attn.sliding_window:
                layer.self_attn.sliding_window = 1 << 20
        W = hf_logits(ids)
        c.sliding_window = 512
        for layer in m.model.layers:
            if layer.self_attn.sliding_window:
                layer.self_attn.sliding_window = 512
        assert np.array_equal(hf_logits(ids), A), "restoring the window did not restore A"
        wtop, wall, wlse, wflips = compare(A, W, far)
        ppl_w = ppl(W, ids)
        win_note = (f"without the window (all layers global), positions {far[0]}..{far[-1]} move by "
                    f"max |diff| top20 {wtop:.3g}, full vocab {wall:.3g}, lse {wlse:.3g}; argmax "
                    f"flips at {len(wflips)}/{len(far)}; perplexity {ppl_w:.3f} (with window "
                    f"{ppl_a:.3f})")
        del W
    else:
        win_note = f"prompt ({N}) shorter than the window: the window is not exercised"
    log(win_note)
    del m

    # ---- B: numpy float64 on the GGUF tensors as stored
    cfg, T_, types = load_gguf_numpy(gpath)
    assert cfg["window"] == 512 and cfg["n_layers"] == 18
    t0 = time.time()
    B = np_forward(cfg, T_, ids)
    btop, ball, blse, bflips = compare(A, B, range(N))
    b_note = (f"B (numpy float64, GGUF tensors as stored, norms 1 + w) vs A at all {N} positions: "
              f"max |diff| top20 {btop:.2e}, full vocab {ball:.2e}, lse {blse:.2e}, argmax flips "
              f"{len(bflips)} ({time.time() - t0:.0f} s)")
    log(b_note)
    assert ball < 1e-2 and not bflips, "A and B disagree"
    del B

    # ---- C: what 8-bit activations (our quantized matmuls) do
    sim_notes = []
    rec = sorted(set(range(0, N, 8)) | {N - 1})
    if not args.no_sim:
        kq = {n for n, ty in types.items() if ty in ("Q4_K", "Q5_K", "Q6_K")}
        for label, bs_k in (("C (blocks of 32 everywhere)", 32), ("C256 (blocks of 256 for K-quants)", 256)):
            aq = lambda x, nm, bs_k=bs_k: q8_blocks(x, bs_k if nm in kq else 32)  # noqa: E731
            C = np_forward(cfg, T_, ids, aq=aq)
            ctop, call, clse, cflips = compare(A, C, range(N))
            rtop, _, rlse, _ = compare(A, C, rec)
            fm = max([mg for _, mg in cflips], default=0.0)
            note = (f"q8 simulation {label} vs A: all {N} positions max |diff| top20 {ctop:.3g}, "
                    f"full vocab {call:.3g}, lse {clse:.3g} (recorded top20 positions: top20 "
                    f"{rtop:.3g}, lse {rlse:.3g}); argmax flips at {len(cflips)}/{N}, largest golden "
                    f"margin among them {fm:.3f}; perplexity {ppl(C, ids):.3f}")
            log(note)
            sim_notes.append(note)
            del C

    # ---- write
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
        gtext = tok.decode(greedy)
        ptail = tok.decode(ids[-24:])
        covered = tok.decode(ids[1:]).encode()       # the bytes the 640 ids spell
        assert text.startswith(covered), "HF's decode of our ids is not the passage"
        bpb = (N - 1) * math.log(ppl_a) / math.log(2) / len(covered)
        bpb_note = f" = {bpb:.3f} bits per byte over the {len(covered)} bytes the ids spell"
    except Exception as e:  # the text is only a comment
        gtext = ptail = f"(no HF tokenizer: {e})"
        bpb_note = ""
    hdr = ["Gemma-3-270M Q4_K_M GGUF: golden logits from HF transformers (tests/engine/test_gemma3.c)",
           "made by tests/golden/make_gemma3_golden.py (its docstring: method and command)",
           f"model file: {name} sha256 {sha256(gpath)}",
           f"versions: {versions()}",
           "golden = transformers Gemma3ForCausalLM float32 eager, GGUF loader (dequantized by gguf, "
           "norm weights - 1)",
           f"ids: our tokenizer (tests/tokenizer/tok_ids), BOS + moby-dick.txt bytes [{off}, "
           f"{off + nbytes}) from '{START}', first {N} ids",
           f"HF perplexity on the {N - 1} next tokens: {ppl_a:.3f}{bpb_note} (sane for a 270M "
           f"model on 1851 prose); with the norms not undone (1 + (1 + w)): {ppl_wrong:.4g}, so "
           "the loader's - 1 is the right way round",
           win_note, b_note] + sim_notes + [
           f"prompt tail: {ptail!r}", f"greedy text: {gtext!r}"]
    body = ["model gemma-3-270m-q4_k_m", f"vocab {A.shape[1]}",
            f"text moby-dick.txt {off} {nbytes}", f"tokens {N} " + " ".join(map(str, ids)),
            f"perplexity {N - 1} {ppl_a:.5f}"]
    body += [pos_line(p, A[p], 20 if p in rec else 4) for p in range(N)]
    body += [f"greedy {len(greedy)} " + " ".join(map(str, greedy)),
             f"greedy_margin {len(gmargin)} " + " ".join(f"{x:.5f}" for x in gmargin)]
    with open(args.out, "w") as f:
        f.write("".join(f"# {h}\n" for h in hdr))
        f.write("\n".join(body) + "\n")
    log(f"wrote {args.out} ({os.path.getsize(args.out)} B)")
    for h in hdr:
        print("#", h)


if __name__ == "__main__":
    sys.exit(main())
