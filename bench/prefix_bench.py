#!/usr/bin/env python3
"""bench/prefix_bench.py [--kv-cache int4|fp16] [--port P] - prefix reuse
through livekvq-server (issue 13 targets; docs/server.md, "Prefix reuse";
not run by tests).

Starts build/livekvq-server with the default model (SmolLM2-135M-Instruct
Q4_1), -t 2, on 127.0.0.1:PORT, and measures the time to the first streamed
token (TTFT; with n > 1: until every choice has one) of:
  1. a 3K-token shared prefix: a cold request (3072 tokens of Moby-Dick +
     a question) and a warm one (the same 3072 tokens + another question);
     the warm one is also sent with "cache_prompt": false, and both answers
     (greedy text and top-5 logprobs of every token) must be identical;
  2. a 6-turn chat over a 2K-token system prompt (each turn sends the whole
     conversation so far, the answers of the earlier turns included);
  3. n = 8 on a 2K-token prompt against n = 1 on another 2K prompt (and
     n = 8 with "cache_prompt": false: each choice prefills the prompt).
Every prompt is cut from a different place of the book, so nothing is
shared between the three parts. Prints one table per part and the
prefix-cache counters of /metrics at the end.
"""
import argparse
import json
import subprocess
import sys
import time
import urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("--kv-cache", default="int4")
ap.add_argument("--port", type=int, default=18097)
ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
ap.add_argument("--parts", default="1,2,3", help="which parts to run (1,2,3)")
args = ap.parse_args()
parts = set(args.parts.split(","))
base = "http://127.0.0.1:%d" % args.port

book = open("../shared/data/moby-dick.txt", encoding="utf-8").read()
book = book[book.index("CHAPTER 1."):]

srv = subprocess.Popen(["build/livekvq-server", "-m", args.model, "--host", "127.0.0.1",
                        "--port", str(args.port), "-t", "2", "--kv-cache", args.kv_cache],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def post(path, body, timeout=600):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


for _ in range(600):
    try:
        urllib.request.urlopen(base + "/health", timeout=1).read()
        break
    except Exception:
        time.sleep(0.1)
else:
    sys.exit("the server did not come up: " + srv.stderr.read()[-2000:])


def tokens(text):
    with post("/tokenize", {"content": text}) as r:
        return json.loads(r.read())["tokens"]


book_ids = tokens(book[:200000])
at = [0]


def slab(n):
    """The next n tokens of the book (never reused)."""
    s = book_ids[at[0]:at[0] + n]
    at[0] += n + 97
    return s


def stream(path, body):
    """Streams a request; returns (TTFT until every choice has a token, text
    per choice, logprob records per choice)."""
    n = body.get("n", 1)
    body = dict(body, stream=True)
    t0 = time.time()
    first = {}
    text = [""] * n
    lps = [[] for _ in range(n)]
    with post(path, body) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            for c in d.get("choices", []):
                i = c["index"]
                piece = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                if piece and i not in first:  # a chat stream opens with a role delta
                    first[i] = time.time() - t0
                text[i] += piece or ""
                if c.get("logprobs"):
                    lps[i].append(c["logprobs"])
    return max(first.values()), text, lps


def metrics():
    out = {}
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if "prefix_cache" in line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
    return out


def table(title, head, rows):
    print("\n" + title)
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


# Every part takes its prompts from its own place in the book (slabs are
# cut in this order whatever parts run), so nothing is shared between them.
prefix = slab(3072)
system_ids = slab(2048)
n_prompts = [slab(2048) for _ in range(3)]
q1 = tokens("\n\nQuestion: who is the narrator? Answer:")
q2 = tokens("\n\nQuestion: where does the story begin? Answer:")


def part1():
    common = {"max_tokens": 8, "temperature": 0, "logprobs": 5}
    cold, _, _ = stream("/v1/completions", dict(common, prompt=prefix + q1))
    warm, wtext, wlp = stream("/v1/completions", dict(common, prompt=prefix + q2))
    ref, rtext, rlp = stream("/v1/completions", dict(common, prompt=prefix + q2,
                                                      cache_prompt=False))
    same = wtext == rtext and wlp == rlp
    table("1. 3K-token shared prefix (%d prompt tokens, %s KV cache)"
          % (len(prefix) + len(q1), args.kv_cache), ["request", "TTFT s", "vs cold"],
          [["cold (cache empty)", "%.3f" % cold, "1.00"],
           ["warm (3072 tokens cached)", "%.3f" % warm, "%.3f" % (warm / cold)],
           ["same prompt, cache_prompt false", "%.3f" % ref, "%.3f" % (ref / cold)]])
    print("warm answer identical to the cache_prompt-false one (text and top-5 logprobs "
          "of each token): %s" % ("yes" if same else "NO"))


def counter(m, name):
    return sum(v for key, v in m.items() if key.startswith(name))


def part2():
    with post("/detokenize", {"tokens": system_ids}) as r:
        system = json.loads(r.read())["content"]
    msgs = [{"role": "system", "content": system}]
    questions = ["Who is speaking here?", "What does he want to do?", "Where is he going?",
                 "What is the weather like?", "Who does he meet?", "How does it end?"]
    rows, t1 = [], None
    for k, q in enumerate(questions):
        msgs.append({"role": "user", "content": q})
        before = metrics()
        t, text, _ = stream("/v1/chat/completions", {"messages": msgs, "max_tokens": 24,
                                                     "temperature": 0})
        after = metrics()
        msgs.append({"role": "assistant", "content": text[0]})
        t1 = t1 or t
        qs = counter(after, "vllm:prefix_cache_queries") - counter(before,
                                                                   "vllm:prefix_cache_queries")
        hits = counter(after, "vllm:prefix_cache_hits") - counter(before,
                                                                  "vllm:prefix_cache_hits")
        rows.append([k + 1, int(qs), int(hits), "%.3f" % t, "%.2f" % (t / t1)])
    table("2. 6-turn chat over a 2K-token system prompt",
          ["turn", "prompt tokens", "reused", "TTFT s", "vs turn 1"], rows)


def part3():
    body = {"max_tokens": 4, "temperature": 0.8, "seed": 1}
    one, _, _ = stream("/v1/completions", dict(body, prompt=n_prompts[0], n=1))
    eight, _, _ = stream("/v1/completions", dict(body, prompt=n_prompts[1], n=8))
    eight_off, _, _ = stream("/v1/completions", dict(body, prompt=n_prompts[2], n=8,
                                                     cache_prompt=False))
    table("3. n = 8 on a 2K-token prompt (TTFT: until every choice has its first token)",
          ["request", "TTFT s", "vs n = 1"],
          [["n = 1", "%.3f" % one, "1.00"],
           ["n = 8 (choices fork the prompt's blocks)", "%.3f" % eight,
            "%.2f" % (eight / one)],
           ["n = 8, cache_prompt false (8 prefills)", "%.3f" % eight_off,
            "%.2f" % (eight_off / one)]])


try:
    for p, fn in (("1", part1), ("2", part2), ("3", part3)):
        if p in parts:
            fn()
    m = metrics()
    print("\n/metrics at the end:")
    for k in sorted(m):
        print("  %s %g" % (k, m[k]))
finally:
    srv.terminate()
    srv.wait()
