#!/usr/bin/env python3
"""bench/gemma3_server.py MODE [CHARS [WINDOW]] - one long prompt through livekvq-server
(docs/gemma3.md, section 3; not run by tests).

Starts build/livekvq-server on 127.0.0.1:18093 with Gemma-3-270M, -c 32768,
--kv-cache MODE (int4|fp16), --window-kv WINDOW (default: the server's), --max-seqs 2; sends CHARS characters of Moby-Dick
(from "CHAPTER 1.") to /v1/completions, stream, max_tokens 8, temperature 0;
records the time to the first streamed token (TTFT) and end-to-end time,
polls /metrics every 0.25 s while the request runs and prints the largest
KV bytes held (all layers, global, window) and the pool's blocks, then the
usage. Prints one JSON line."""
import json, re, subprocess, sys, threading, time, urllib.request

mode = sys.argv[1]
chars = int(sys.argv[2]) if len(sys.argv) > 2 else 121000
window = sys.argv[3] if len(sys.argv) > 3 else None
port = 18093
base = f"http://127.0.0.1:{port}"
text = open("../shared/data/moby-dick.txt", encoding="utf-8").read()
text = text[text.index("CHAPTER 1."):][:chars]
srv = subprocess.Popen(["build/livekvq-server", "-m", "models/gemma-3-270m-q4_k_m.gguf",
                        "--host", "127.0.0.1", "--port", str(port), "-c", "32768",
                        "--max-seqs", "2", "--kv-cache", mode, "-t", "2"] +
                       (["--window-kv", window] if window else []),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
startup = srv.stdout.readline().strip()
for _ in range(100):
    try:
        urllib.request.urlopen(base + "/health", timeout=1).read(); break
    except Exception:
        time.sleep(0.1)

def metrics():
    out = {}
    for line in urllib.request.urlopen(base + "/metrics", timeout=5).read().decode().splitlines():
        if line.startswith("livekvq_kv"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out

idle = metrics()
peak = {}
done = threading.Event()
def poll():
    while not done.is_set():
        try:
            m = metrics()
            if m.get("livekvq_kv_bytes_held", 0) >= peak.get("livekvq_kv_bytes_held", -1):
                peak.clear(); peak.update(m)
        except Exception:
            pass
        time.sleep(0.25)
th = threading.Thread(target=poll); th.start()
body = json.dumps({"prompt": text, "max_tokens": 8, "temperature": 0, "stream": True,
                   "stream_options": {"include_usage": True}}).encode()
req = urllib.request.Request(base + "/v1/completions", data=body,
                             headers={"Content-Type": "application/json"})
t0 = time.time(); ttft = None; usage = None; out = ""
with urllib.request.urlopen(req, timeout=1200) as r:
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        d = json.loads(line[6:])
        if d.get("choices"):
            if ttft is None and d["choices"][0].get("text"):
                ttft = time.time() - t0
            out += d["choices"][0].get("text", "")
        if d.get("usage"):
            usage = d["usage"]
total = time.time() - t0
time.sleep(0.6)
done.set(); th.join()
srv.terminate(); srv.wait()
g = lambda k: peak.get(k, 0)
print(json.dumps({"mode": mode, "chars": chars, "startup": startup, "usage": usage,
    "ttft_s": ttft, "total_s": total, "text": out,
    "kv_bytes_held": g("livekvq_kv_bytes_held"),
    "kv_bytes_held_global": g('livekvq_kv_layer_bytes_held{layer_kind="global"}'),
    "kv_bytes_held_window": g('livekvq_kv_layer_bytes_held{layer_kind="window"}'),
    "kv_tokens": g("livekvq_kv_tokens"),
    "bits_global": g('livekvq_kv_layer_bits_per_element{layer_kind="global"}'),
    "bits_all": g("livekvq_kv_bits_per_element"),
    "fp16_equiv": g("livekvq_kv_fp16_equivalent_bytes"),
    "peak_metrics": {k: v for k, v in peak.items() if "blocks" in k or "bytes" in k}}))
