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
logits of every position): each KV type (--llama-types, default f16 q8_0
q5_0 q4_1 q4_0 iq4_nl; K and V of the same type) runs in lockstep with an
f16 run (--group types beside one f16 run), chunk by chunk, and its mean KL(P_f16 || P_type),
perplexity rise and top-1 agreement are computed against that f16 run
exactly as engine/eval/eval.c does (log-softmax in double, KL clamped at 0
per position, mean over positions). Bits per element: the type's block size
(q8_0 34 B / 32 = 8.5, q5_0 5.5, q4_1 5.0, q4_0 and iq4_nl 4.5, f16 16).

Ours: `build/livekvq perplexity -m MODEL -f TEXT -c CTX --json FLAGS` for each
configuration of --ours (LABEL=FLAGS items; default fp16 and int4), in the
fast mode and, with --exact, also in the exact mode (f32 matmuls); bits per
element all-in from its JSON. More configurations (e.g. other bit widths)
are more --ours items: "int3=--kv-cache int3".

Writes CSV rows (engine, config, mode, bits, ppl, ppl_f16, ppl_rel, kld,
top1, command) to -o (appending rows not there yet: a rerun skips finished
configurations) and prints a markdown table. bench/peers_plot.sh draws the
Pareto plot from the CSVs. Outside CI: minutes per configuration on 2 cores.
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


def llama_eval(model, ids, kv_names, threads, log):
    """KLD / ppl / top-1 of each KV type of kv_names against one f16 run,
    all contexts fed in lockstep chunk by chunk (only one chunk of
    log-probabilities is ever held per context). Returns {name: result}."""
    n = len(ids)
    ref = Run(model, n, LLAMA_TYPES["f16"][0], threads)
    tests = {t: Run(model, n, LLAMA_TYPES[t][0], threads) for t in kv_names}
    acc = {t: dict(nll=0.0, nll_ref=0.0, kld=0.0, kld_max=0.0, agree=0, scored=0)
           for t in kv_names}
    t0 = time.time()
    for pos in range(0, n, 512):
        part = ids[pos:pos + 512]
        m = min(len(part), n - 1 - pos)  # rows with a next token
        lr = log_softmax(ref.chunk(part))[:max(m, 0)]
        nxt = np.asarray(ids[pos + 1:pos + 1 + m], dtype=np.int64)
        rows = np.arange(len(nxt))
        am_ref = lr.argmax(axis=1)
        pr = np.exp(lr)
        for t, run in tests.items():
            lp = log_softmax(run.chunk(part))[:max(m, 0)]
            if m <= 0:
                continue
            a = acc[t]
            a["nll"] -= lp[rows, nxt].sum()
            a["nll_ref"] -= lr[rows, nxt].sum()
            k = np.maximum((pr * (lr - lp)).sum(axis=1), 0.0)
            a["kld"] += k.sum()
            a["kld_max"] = max(a["kld_max"], float(k.max()))
            a["agree"] += int((lp.argmax(axis=1) == am_ref).sum())
            a["scored"] += m
        log("llama.cpp f16 + %s: %d/%d tokens, %.0f s" % ("/".join(kv_names),
                                                          pos + len(part), n, time.time() - t0))
    ref.close()
    out = {}
    for t, run in tests.items():
        run.close()
        a = acc[t]
        ppl, ppl_ref = np.exp(a["nll"] / a["scored"]), np.exp(a["nll_ref"] / a["scored"])
        out[t] = dict(ppl=ppl, ppl_f16=ppl_ref, ppl_rel=ppl / ppl_ref - 1,
                      kld=a["kld"] / a["scored"], kld_max=a["kld_max"],
                      top1=a["agree"] / a["scored"], n_scored=a["scored"],
                      bits=LLAMA_TYPES[t][1], seconds=time.time() - t0)
    return out


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
    ap.add_argument("--group", type=int, default=8,
                    help="llama.cpp contexts run beside one f16 run (memory: each "
                    "holds 512 x n_vocab logits); more types rerun the f16 run")
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
    for g in range(0, len(todo), a.group):
        res = llama_eval(a.model, ids, todo[g:g + a.group], a.threads, log)
        for t, r in res.items():
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
