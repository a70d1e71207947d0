#!/usr/bin/env python3
"""Same measurements as bench_e2e.c, through llama.cpp (llama-cpp-python).

    ~/.cache/livekvq/venv-llama/bin/python bench/llamacpp_bench.py \
        -m models/SmolLM2-135M-Instruct.Q4_1.gguf -t 2 -r 5 [-P 512,2048] [-G 16,2048]

Setup (outside CI; it builds llama.cpp from source, ~10 min on 2 cores):
    python3 -m venv ~/.cache/livekvq/venv-llama
    ~/.cache/livekvq/venv-llama/bin/pip install llama-cpp-python

pp N: N prompt tokens from an empty cache, n_batch = n_ubatch = 512.
tg N@C: N tokens one at a time after a C-token prompt (prompt not timed).
The token ids are the same pseudo-random sequence bench_e2e uses.
Prints markdown rows in the same format as bench_e2e.
"""
import argparse
import statistics
import time

import llama_cpp


def ids_like_bench_e2e(n, n_vocab):
    x = 42
    out = []
    for _ in range(n):
        x = (x * 1664525 + 1013904223) & 0xFFFFFFFF
        out.append(100 + (x >> 8) % (n_vocab - 200))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", required=True)
    ap.add_argument("-t", type=int, default=2)
    ap.add_argument("-r", type=int, default=5)
    ap.add_argument("-P", default="512,2048", help="prompt lengths (pp), as bench_e2e -P")
    ap.add_argument("-G", default="16,2048", help="contexts of the tg64 runs, as bench_e2e -G")
    a = ap.parse_args()
    pp = [int(x) for x in a.P.split(",") if x]
    tg = [int(x) for x in a.G.split(",") if x]
    n_gen = 64
    n_ctx = max(pp + [c + n_gen for c in tg]) + 16
    llm = llama_cpp.Llama(model_path=a.m, n_ctx=n_ctx, n_threads=a.t,
                          n_threads_batch=a.t, n_batch=512, n_ubatch=512,
                          verbose=False)
    ids = ids_like_bench_e2e(n_ctx, llm.n_vocab())
    name = "llama.cpp %s" % getattr(llama_cpp, "__version__", "?")
    for n in pp:
        llm.reset()
        llm.eval(ids[:64])
        rates = []
        for _ in range(a.r):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids[:n])
            rates.append(n / (time.perf_counter() - t0))
        print("| %s | llama.cpp | %d | pp%d | %.1f |" % (name, a.t, n, statistics.median(rates)), flush=True)
    for c in tg:
        rates = []
        for _ in range(a.r):
            llm.reset()
            llm.eval(ids[:c])
            t0 = time.perf_counter()
            for i in range(n_gen):
                llm.eval([ids[c + i]])
            rates.append(n_gen / (time.perf_counter() - t0))
        print("| %s | llama.cpp | %d | tg%d@%d | %.1f |" % (name, a.t, n_gen, c, statistics.median(rates)), flush=True)


if __name__ == "__main__":
    main()
