#!/usr/bin/env python3
"""bench/gemma3_tables.py [JSONL] - the perplexity table of docs/gemma3.md
from `livekvq perplexity --json-out` rows (default docs/data/gemma3/ppl.jsonl;
docs/data/gemma3/window8.jsonl gives the window_kv table). Rows carry their
configuration: "window" is window_kv (the window layers' cache), "T" the
global layers' block_tokens, "ob" the outlier budget. Not run by tests."""
import json, sys
f = sys.argv[1] if len(sys.argv) > 1 else "docs/data/gemma3/ppl.jsonl"
rows = [json.loads(l) for l in open(f) if l.strip()]
def cfg(r):
    return "naive" if r["k_quant"] == "token" and r["outlier_budget"] == 0 else "default"
print("| ctx | cache | window | T / ob | ppl FP16 | ppl INT4 | Δppl | mean KLD | KLD max | top-1 | bits/elt all | bits/elt global | KV bytes INT4 (global + window) | KV bytes FP16 | FP16 / INT4 | targets (≤1 %, ≤0.01, ≤4.6 b global) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
order = {"fp16": 0, "int8": 1, "int4": 2}
for r in sorted(rows, key=lambda r: (r["ctx"], cfg(r) != "default", r["block_tokens"],
                                     order.get(r["window_kv"], 9), r.get("exact", 0))):
    ok = [r["ppl_rel"] <= 0.01, r["kld"] <= 0.01, r["bits_per_element_global"] <= 4.6]
    t = " ".join("met" if o else "**missed**" for o in ok)
    c = cfg(r) + (" exact" if r.get("exact") else "")
    w = r["window_kv"]
    if w != "fp16":  # rows before window_clip_quantile clipped at clip_quantile
        w += f' (clip {r.get("window_clip_quantile", r["clip_quantile"]):g})'
    print(f'| {r["ctx"]} | {c} | {w} | {r["block_tokens"]} / {r["outlier_budget"]:g} | {r["ppl_fp16"]:.4f} | {r["ppl"]:.4f} | {100*r["ppl_rel"]:+.3f}% | '
          f'{r["kld"]:.5f} | {r["kld_max"]:.3f} | {r["top1_agree"]:.4f} | {r["bits_per_element"]:.3f} | '
          f'{r["bits_per_element_global"]:.3f} | {r["kv_bytes"]} ({r["kv_bytes_global"]} + {r["kv_bytes_window"]}) | '
          f'{r["kv_bytes_fp16"]} | {r["kv_bytes_fp16"]/r["kv_bytes"]:.2f}x | {t} |')
