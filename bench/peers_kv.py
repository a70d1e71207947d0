#!/usr/bin/env python3
"""KV cache quality side by side: llama.cpp's KV types and our cache modes.

    ~/.cache/livekvq/venv-llama/bin/python bench/peers_kv.py \
        -m models/SmolLM2-135M-Instruct.Q4_1.gguf -c 4096 \
        -o docs/data/peers/smollm2-4k.csv

Both engines see the same tokens (our tokenizer's ids of the text from its
first line starting with "CHAPTER 1.", BOS as the model says; llama.cpp's own
tokenization of the same text is compared and the number of differing ids
printed), one window of CTX tokens, and score the same positions: every
position with a next token, 0 .. CTX-2, as `livekvq perplexity` does.

llama.cpp (llama-cpp-python, flash attention, n_batch = n_ubatch = 512,
logits of every position): the f16 run goes first and its logits are kept
in a file (--ref-cache, float32 CTX x n_vocab; a rerun or a second
invocation on the same model and tokens reuses it); then each KV type
(--llama-types, default f16 q8_0 q5_0 q4_1 q4_0 iq4_nl; K and V of the same
type) runs alone, chunk by chunk, and its mean KL(P_f16 || P_type),
perplexity rise and top-1 agreement are computed against the stored f16
logits exactly as engine/eval/eval.c does (log-softmax in double, KL
clamped at 0 per position, mean over positions); its row is written as soon
as it finishes, so types can also be split over several invocations
appending to one CSV. Bits per element: the type's block size
(q8_0 34 B / 32 = 8.5, q5_0 5.5, q4_1 5.0, q4_0 and iq4_nl 4.5, f16 16).

Ours: `build/livekvq perplexity -m MODEL -f TEXT -c CTX --json FLAGS` for each
configuration of --ours (LABEL=FLAGS items; default fp16 and int4), in the
fast mode and, with --exact, also in the exact mode (f32 matmuls); bits per
element all-in from its JSON. More configurations (e.g. other bit widths)
are more --ours items: "int3=--kv-cache int3".

Writes CSV rows (engine, config, mode, bits, ppl, ppl_f16, ppl_rel, kld,
top1, command) to -o (appending rows not there yet: a rerun skips finished
configurations) and prints a markdown table. bench/peers_report.py draws the
Pareto plot and docs/peers.md from the CSVs. Outside CI: minutes per configuration on 2 cores.
"""
import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np

# llama.cpp's CPU backend runs on OpenMP: passive waiting, so that its
# threads sleep at barriers instead of spinning on a shared machine (set
# before the library loads)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import llama_cpp  # noqa: E402

LLAMA_TYPES = {
    # name: (ggml type, bits per element of its block)
    "f16": (llama_cpp.GGML_TYPE_F16, 16.0),
    "q8_0": (llama_cpp.GGML_TYPE_Q8_0, 34 * 8 / 32),
    "q5_0": (llama_cpp.GGML_TYPE_Q5_0, 22 * 8 / 32),
    "q5_1": (llama_cpp.GGML_TYPE_Q5_1, 24 * 8 / 32),
    "q4_1": (llama_cpp.GGML_TYPE_Q4_1, 20 * 8 / 32),
    "q4_0": (llama_cpp.GGML_TYPE_Q4_0, 18 * 8 / 32),
    "iq4_nl": (llama_cpp.GGML_TYPE_IQ4_NL, 18 * 8 / 32),
}
FIELDS = ["engine", "model", "ctx", "config", "mode", "bits", "ppl", "ppl_f16",
          "ppl_rel", "kld", "kld_max", "top1", "n_scored", "seconds", "command"]


def text_from_marker(path, marker="CHAPTER 1."):
    """The text from its first line starting with marker (livekvq's rule)."""
    with open(path, "rb") as f:
        raw = f.read()
    m = marker.encode()
    i = 0
    while True:
        j = raw.find(m, i)
        if j < 0:
            return raw
        if j == 0 or raw[j - 1:j] == b"\n":
            return raw[j:]
        i = j + 1


def our_tokens(livekvq, model, text):
    with tempfile.NamedTemporaryFile(suffix=".txt") as tf:
        tf.write(text)
        tf.flush()
        out = subprocess.run([livekvq, "tokenize", "-m", model, "-f", tf.name],
                             check=True, capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def log_softmax(x):
    """Rows of float32 logits -> float64 log-probabilities (eval.c's way)."""
    x = x.astype(np.float64)
    mx = x.max(axis=1, keepdims=True)
    return x - (mx + np.log(np.exp(x - mx).sum(axis=1, keepdims=True)))


class Run:
    """One llama.cpp context fed chunk by chunk, logits of every row."""

    def __init__(self, model, n_ctx, kv_type, threads):
        self.llm = llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_batch=512,
                                   n_ubatch=512, n_threads=threads,
                                   n_threads_batch=threads, flash_attn=True,
                                   type_k=kv_type, type_v=kv_type, logits_all=False,
                                   verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.n_past = 0

    def chunk(self, ids):
        b = self.llm._batch
        b.set_batch(batch=ids, n_past=self.n_past, logits_all=True)
        self.llm._ctx.decode(b)
        self.n_past += len(ids)
        lg = np.ctypeslib.as_array(self.llm._ctx.get_logits(),
                                   shape=(len(ids) * self.n_vocab,))
        return lg.reshape(len(ids), self.n_vocab).copy()

    def close(self):
        self.llm.close()


def ref_logits(model, ids, threads, path, log):
    """The f16 run's logits of every position (float32, CTX x n_vocab) in a
    file at path, computed once and reused: a rerun, or another invocation
    on the same model and tokens, reads it instead of running f16 again.
    path + '.json' records the model, the tokens' hash and the shape."""
    import hashlib
    n = len(ids)
    key = dict(model=os.path.abspath(model), n=n,
               ids=hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest())
    meta = path + ".json"
    if os.path.exists(path) and os.path.exists(meta):
        with open(meta) as f:
            m = json.load(f)
        if all(m.get(k) == v for k, v in key.items()):
            log("llama.cpp f16: reference logits from %s" % path)
            return np.memmap(path, dtype=np.float32, mode="r", shape=(n, m["n_vocab"]))
    ref = Run(model, n, LLAMA_TYPES["f16"][0], threads)
    out = np.memmap(path + ".part", dtype=np.float32, mode="w+", shape=(n, ref.n_vocab))
    t0 = time.time()
    for pos in range(0, n, 512):
        part = ids[pos:pos + 512]
        out[pos:pos + len(part)] = ref.chunk(part)
        log("llama.cpp f16: %d/%d tokens, %.0f s" % (pos + len(part), n, time.time() - t0))
    out.flush()
    del out
    ref.close()
    os.replace(path + ".part", path)
    with open(meta, "w") as f:
        json.dump(dict(key, n_vocab=ref.n_vocab, seconds=time.time() - t0), f)
    return np.memmap(path, dtype=np.float32, mode="r", shape=(n, ref.n_vocab))


def llama_eval(model, ids, kv_name, ref, threads, log):
    """KLD / ppl / top-1 of llama.cpp KV type kv_name against the f16 run's
    logits ref (ref_logits), fed chunk by chunk as the f16 run was."""
    n = len(ids)
    run = Run(model, n, LLAMA_TYPES[kv_name][0], threads)
    a = dict(nll=0.0, nll_ref=0.0, kld=0.0, kld_max=0.0, agree=0, scored=0)
    t0 = time.time()
    for pos in range(0, n, 512):
        part = ids[pos:pos + 512]
        m = min(len(part), n - 1 - pos)  # rows with a next token
        logits = run.chunk(part)
        # rows in slices of 64: a large vocabulary (Gemma-3: 262144) makes
        # a chunk's float64 log-probabilities 1 GB each
        for r0 in range(0, max(m, 0), 64):
            r1 = min(r0 + 64, m)
            lp = log_softmax(logits[r0:r1])
            lr = log_softmax(np.asarray(ref[pos + r0:pos + r1]))
            nxt = np.asarray(ids[pos + 1 + r0:pos + 1 + r1], dtype=np.int64)
            rows = np.arange(r1 - r0)
            pr = np.exp(lr)
            a["nll"] -= lp[rows, nxt].sum()
            a["nll_ref"] -= lr[rows, nxt].sum()
            k = np.maximum((pr * (lr - lp)).sum(axis=1), 0.0)
            a["kld"] += k.sum()
            a["kld_max"] = max(a["kld_max"], float(k.max()))
            a["agree"] += int((lp.argmax(axis=1) == lr.argmax(axis=1)).sum())
            a["scored"] += r1 - r0
        log("llama.cpp %s: %d/%d tokens, %.0f s" % (kv_name, pos + len(part), n,
                                                     time.time() - t0))
    run.close()
    ppl, ppl_ref = np.exp(a["nll"] / a["scored"]), np.exp(a["nll_ref"] / a["scored"])
    return dict(ppl=ppl, ppl_f16=ppl_ref, ppl_rel=ppl / ppl_ref - 1,
                kld=a["kld"] / a["scored"], kld_max=a["kld_max"],
                top1=a["agree"] / a["scored"], n_scored=a["scored"],
                bits=LLAMA_TYPES[kv_name][1], seconds=time.time() - t0)


def ref_row(ids, ref):
    """The f16 reference's own row (KLD 0 by construction), from its logits."""
    n = len(ids)
    nll = 0.0
    for pos in range(0, n - 1, 64):
        m = min(64, n - 1 - pos)
        lr = log_softmax(np.asarray(ref[pos:pos + m]))
        nll -= lr[np.arange(m), np.asarray(ids[pos + 1:pos + 1 + m])].sum()
    ppl = float(np.exp(nll / (n - 1)))
    return dict(ppl=ppl, ppl_f16=ppl, ppl_rel=0.0, kld=0.0, kld_max=0.0, top1=1.0,
                n_scored=n - 1, bits=LLAMA_TYPES["f16"][1], seconds=0.0)


def ours_eval(livekvq, model, text_path, ctx, flags, exact, threads):
    cmd = [livekvq, "perplexity", "-m", model, "-f", text_path, "-c", str(ctx), "--json",
           "-q"] + (["-t", str(threads)] if threads else []) + shlex.split(flags)
    if exact:
        cmd.append("--exact")
    t0 = time.time()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    j = json.loads(out.strip().splitlines()[-1])
    bits = j["bits_per_element"] or 16.0
    return dict(ppl=j["ppl"], ppl_f16=j["ppl_fp16"], ppl_rel=j["ppl_rel"], kld=j["kld"],
                kld_max=j["kld_max"], top1=j["top1_agree"], n_scored=j["n_tokens"],
                bits=bits, seconds=time.time() - t0), " ".join(shlex.quote(c) for c in cmd)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-f", "--file", default="../shared/data/moby-dick.txt")
    ap.add_argument("-c", "--ctx", type=int, default=4096)
    ap.add_argument("-o", "--out", required=True, help="CSV of results (appended)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--livekvq", default="build/livekvq")
    ap.add_argument("--ref-cache", default=None, metavar="PATH",
                    help="file of the f16 run's logits (float32, CTX x n_vocab; "
                    "default $TMPDIR/peers_ref_MODEL_CTX.f32), reused when it "
                    "matches the model and tokens")
    ap.add_argument("--f16-rerun", action="store_true",
                    help="with f16 in --llama-types, run f16 a second time against "
                    "the stored one (its row: KLD 0 unless llama.cpp is "
                    "nondeterministic); without it the f16 row is the reference's "
                    "own perplexity, KLD 0 by construction")
    ap.add_argument("--llama-types", default="f16,q8_0,q5_0,q4_1,q4_0,iq4_nl",
                    help="comma-separated llama.cpp KV types ('' for none)")
    ap.add_argument("--ours", action="append", default=None, metavar="LABEL=FLAGS",
                    help="one of our configurations (repeat); default "
                    "fp16='--kv-cache fp16' and int4='--kv-cache int4'")
    ap.add_argument("--exact", action="store_true",
                    help="also run ours in the exact mode (livekvq perplexity --exact)")
    ap.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                    help="run ours in the fast mode (default on)")
    a = ap.parse_args()
    ours = a.ours or ["fp16=--kv-cache fp16", "int4=--kv-cache int4"]
    for item in ours:
        if "=" not in item:
            ap.error("--ours expects LABEL=FLAGS, got '%s'" % item)
    types = [t for t in a.llama_types.split(",") if t]
    for t in types:
        if t not in LLAMA_TYPES:
            ap.error("unknown llama.cpp KV type '%s' (known: %s)" % (t, ", ".join(LLAMA_TYPES)))
    if not os.access(a.livekvq, os.X_OK):
        ap.error("%s is not built (ninja -C build)" % a.livekvq)

    def log(s):
        print(s, file=sys.stderr, flush=True)

    model_name = os.path.basename(a.model)
    text = text_from_marker(a.file)
    ids = our_tokens(a.livekvq, a.model, text)
    if len(ids) < a.ctx:
        sys.exit("peers_kv: the text has %d tokens, fewer than -c %d" % (len(ids), a.ctx))
    ids = ids[:a.ctx]
    probe = llama_cpp.Llama(model_path=a.model, n_ctx=64, vocab_only=True, verbose=False)
    theirs = probe.tokenize(text[:a.ctx * 16], add_bos=ids[0] == probe.token_bos(),
                            special=False)[:a.ctx]
    probe.close()
    diff = sum(1 for x, y in zip(ids, theirs) if x != y) + abs(len(theirs) - len(ids))
    first = next((i for i, (x, y) in enumerate(zip(ids, theirs)) if x != y), None)
    log("tokens: %d of ours; llama.cpp's tokenizer differs at %d of them%s" %
        (len(ids), diff, "" if first is None else " (first at %d)" % first))

    # the command, beside the CSV (bench/peers_report.py shows it)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".cmd", "a") as f:
        f.write("~/.cache/livekvq/venv-llama/bin/python bench/peers_kv.py %s\n" %
                " ".join(shlex.quote(x) for x in sys.argv[1:]))
    done = set()
    if os.path.exists(a.out):
        with open(a.out) as f:
            for r in csv.DictReader(f):
                done.add((r["engine"], r["model"], r["ctx"], r["config"], r["mode"]))
    else:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w", newline="") as f:
            csv.writer(f).writerow(FIELDS)
    rows = []

    def emit(engine, config, mode, res, command):
        row = dict(engine=engine, model=model_name, ctx=a.ctx, config=config, mode=mode,
                   command=command, **res)
        with open(a.out, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore").writerow(row)
        rows.append(row)

    ver = getattr(llama_cpp, "__version__", "?")
    todo = []
    for t in types:
        if ("llama.cpp", model_name, str(a.ctx), t, "fast") in done:
            log("skip llama.cpp %s (in %s)" % (t, a.out))
        else:
            todo.append(t)
    if todo:
        ref_path = a.ref_cache or os.path.join(
            tempfile.gettempdir(), "peers_ref_%s_%d.f32" % (model_name, a.ctx))
        ref = ref_logits(a.model, ids, a.threads, ref_path, log)
    for t in todo:
        if t == "f16":
            # the reference against itself: KLD 0 by construction; its ppl
            # is the sanity check (the ppl_f16 column of every other row)
            r = (llama_eval(a.model, ids, "f16", ref, a.threads, log) if a.f16_rerun
                 else ref_row(ids, ref))
        else:
            r = llama_eval(a.model, ids, t, ref, a.threads, log)
        emit("llama.cpp", t, "fast", r,
             "llama-cpp-python %s, flash_attn, type_k=type_v=%s, n_ubatch 512" % (ver, t))
    modes = (["fast"] if a.fast else []) + (["exact"] if a.exact else [])
    for mode in modes:
        for item in ours:
            label, flags = item.split("=", 1)
            key = ("livekvq", model_name, str(a.ctx), label, mode)
            if key in done:
                log("skip livekvq %s %s (in %s)" % (label, mode, a.out))
                continue
            log("livekvq %s (%s mode) ..." % (label, mode))
            res, cmd = ours_eval(a.livekvq, a.model, a.file, a.ctx, flags, mode == "exact",
                                 a.threads)
            emit("livekvq", label, mode, res, cmd)

    print("| engine | config | mode | bits/elt | ppl | ppl f16 | Δppl | KLD | top-1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| %s | %s | %s | %.3f | %.4f | %.4f | %+.3f%% | %.5f | %.4f |" %
              (r["engine"], r["config"], r["mode"], r["bits"], r["ppl"], r["ppl_f16"],
               100 * r["ppl_rel"], r["kld"], r["top1"]))


if __name__ == "__main__":
    main()
