#!/usr/bin/env python3
"""fair_bench.py - issue 13's fairness target: with one request of 4 prompts
x n=16 running, how long does a 4-token request take?

Starts livekvq-server (default model, default flags: 16 slots, at most 12
per request, queue 64) on a free loopback port, sends the big request
(non-streaming, ignore_eos, --big-tokens each), waits until it holds its
slots (/metrics: livekvq_requests_running), then sends --rounds small
requests one after another (max_tokens 4) and prints each one's latency,
the big request's total time and the server's fair-share preemptions.

Standard library only. Not part of the test suite (minutes on 2 cores):

  python3 tests/server/fair_bench.py [--build build] [--model PATH]
      [--big-tokens 256] [--rounds 5] [--server-arg=--max-seqs-per-request=16 ...]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def post(url, body, timeout=3600):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


def metric(base, name):
    with urllib.request.urlopen(base + "/metrics", timeout=60) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models",
                                                    "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--big-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", default="2")
    ap.add_argument("--server-arg", action="append", default=[])
    a = ap.parse_args()
    args = [os.path.join(a.build, "livekvq-server"), "-m", a.model, "--port", "0",
            "-t", a.threads] + a.server_arg
    log = tempfile.NamedTemporaryFile(prefix="lkq-fair-", suffix=".log", delete=False)
    srv = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log)
    line = srv.stdout.readline().decode()
    m = re.search(r"listening on (http://\S+)", line)
    if not m:
        srv.wait(60)
        with open(log.name, errors="replace") as f:
            print("the server did not start:", line, f.read()[-2000:])
        return 1
    print("server log:", log.name)
    try:
        return bench(a, args, m.group(1))
    finally:
        srv.terminate()
        srv.wait(60)


def bench(a, args, base):
    print("server:", " ".join(args[1:]))
    big = {"prompt": ["Write a story about a dragon.", "Explain how a bicycle works.",
                      "List ten uses of a brick.", "Describe the sea at night."],
           "n": 16, "max_tokens": a.big_tokens, "ignore_eos": True, "temperature": 0.8}
    res = {}

    def run_big():
        t0 = time.monotonic()
        r = post(base + "/v1/completions", big)
        res["big_s"] = time.monotonic() - t0
        res["big_tokens"] = r["usage"]["completion_tokens"]

    t0 = time.monotonic()
    th = threading.Thread(target=run_big)
    th.start()
    while (metric(base, "livekvq_requests_running") or 0) < 12:
        time.sleep(0.1)
    print("big request (4 prompts x n=16, %d tokens each) holds %d sequences after %.2f s"
          % (a.big_tokens, metric(base, "livekvq_requests_running"), time.monotonic() - t0))
    lat = []
    for i in range(a.rounds):
        t1 = time.monotonic()
        r = post(base + "/v1/completions", {"prompt": "The capital of France is",
                                            "max_tokens": 4, "ignore_eos": True,
                                            "temperature": 0})
        lat.append(time.monotonic() - t1)
        print("  4-token request %d: %.2f s (%d tokens, big request still running: %s)"
              % (i + 1, lat[-1], r["usage"]["completion_tokens"], th.is_alive()))
    th.join()
    lat.sort()
    print("4-token request: median %.2f s, max %.2f s over %d rounds" %
          (lat[len(lat) // 2], lat[-1], len(lat)))
    fair = metric(base, "livekvq_preemptions_fair_total")
    print("big request: %.1f s for %d tokens; fair-share preemptions: %s" %
          (res["big_s"], res["big_tokens"], "n/a" if fair is None else "%g" % fair))
    return 0


if __name__ == "__main__":
    sys.exit(main())
