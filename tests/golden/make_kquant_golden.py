#!/usr/bin/env python3
"""Goldens for the weight types Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, made
with the official `gguf` PyPI package (gguf.quants.dequantize), read by
tests/kernels/test_kquant.c.

Two files:
  tests/golden/kquant_gemma.txt  real tensors of Gemma-3-270M Q4_K_M (by file
      offset; the model itself is never copied): several Q5_0, Q4_K, Q6_K and
      Q8_0 tensors (token_embd: its first EMBD_ROWS rows).
  tests/golden/kquant_synth.txt  small tensors written here, bytes inline:
      Q5_1 made by gguf's own quantizer (gguf.quants.quantize) from seeded
      Gaussian data, and blocks of random bytes (seeded; finite fp16 factors
      of both signs, zeros and subnormals) for Q5_0, Q5_1, Q4_K, Q5_K, Q6_K -
      Q5_1 and Q5_K are absent from the Gemma file and gguf has no quantizer
      for the K-quants.

Per tensor the goldens hold checksums of the raw bytes and of the whole
dequantized tensor plus a few runs of 8 dequantized values (f32 bit patterns).
The checksum of n values u_i (uint32 bit patterns, or bytes for the raw data)
in row-major order is ck = sum_i u_i * (2i + 1) mod 2^64: any change of a
single value changes it (the weights are odd, hence invertible mod 2^64).

Format (one record per line, '#' comments):
  G <file size>                                         the Gemma file
  T <name> <type> <ne0> <rows> <offset> <nbytes> <raw ck> <deq ck> <deq sum>
  S <name> <type> <ne0> <rows> <nbytes> <raw ck> <deq ck> <deq sum>
  H <hex bytes>                                         data of the last S
  V <row> <col> <8 x f32 bits in hex>                   of the last T / S
<type> is the GGUF type id, ck in hex, <deq sum> the double sum (%.17g).

Usage: make_kquant_golden.py [gemma.gguf]   (default: $LKQ_GEMMA, else
~/.cache/livekvq/gemma-3-270m-q4_k_m.gguf). Needs gguf and numpy
(a venv with `pip install gguf numpy`).
"""
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

HERE = os.path.dirname(os.path.abspath(__file__))
EMBD_ROWS = 4096
GEMMA_TENSORS = [
    # Q5_0
    "blk.0.attn_k.weight", "blk.0.attn_q.weight", "blk.2.attn_v.weight",
    "blk.9.ffn_gate.weight", "blk.17.ffn_up.weight",
    # Q4_K
    "blk.0.attn_output.weight", "blk.2.ffn_down.weight", "blk.9.ffn_down.weight",
    "blk.17.attn_output.weight",
    # Q6_K
    "blk.0.ffn_down.weight", "blk.10.ffn_down.weight", "blk.17.ffn_down.weight",
    # Q8_0
    "blk.0.attn_v.weight", "blk.17.attn_v.weight", "token_embd.weight",
]


def ck64(u):
    """sum_i u_i * (2i + 1) mod 2^64 over a flat array of unsigned ints."""
    u = np.ascontiguousarray(u).reshape(-1).astype(np.uint64)
    w = np.arange(u.size, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    with np.errstate(over="ignore"):
        return int(np.sum(u * w, dtype=np.uint64))


def value_lines(deq, rng):
    """V lines: 8 values at the start, middle, end, and a random spot."""
    rows, ne0 = deq.shape
    spots = [(0, 0), (rows // 2, ne0 // 2), (rows - 1, ne0 - 8),
             (int(rng.integers(rows)), int(rng.integers(ne0 // 8)) * 8)]
    out = []
    for r, c in spots:
        bits = deq[r, c:c + 8].view(np.uint32)
        out.append("V %d %d %s" % (r, c, " ".join("%08x" % b for b in bits)))
    return out


def summary(deq):
    return "%016x %.17g" % (ck64(deq.view(np.uint32)), float(np.sum(deq, dtype=np.float64)))


def gemma_lines(path, rng):
    rd = gguf.GGUFReader(path)
    by_name = {t.name: t for t in rd.tensors}
    lines = ["G %d" % os.path.getsize(path)]
    for name in GEMMA_TENSORS:
        t = by_name[name]
        ne0 = int(t.shape[0])
        raw = np.asarray(t.data)  # uint8 [rows, row bytes]
        if name == "token_embd.weight":
            raw = raw[:EMBD_ROWS]
        rows = raw.shape[0]
        deq = dequantize(raw, t.tensor_type)
        assert deq.dtype == np.float32 and deq.shape == (rows, ne0)
        lines.append("T %s %d %d %d %d %d %016x %s" % (
            name, int(t.tensor_type), ne0, rows, t.data_offset, raw.nbytes,
            ck64(raw), summary(deq)))
        lines += value_lines(deq, rng)
    return lines


def random_f16(rng, n, scale):
    """Finite fp16 factors: mostly |N(0, scale)|-sized of both signs, some
    zeros and subnormals."""
    v = (rng.standard_normal(n) * scale).astype(np.float16).view(np.uint16)
    kind = rng.integers(0, 10, n)
    v = np.where(kind == 0, 0, v)
    v = np.where(kind == 1, rng.integers(1, 0x400, n) | (rng.integers(0, 2, n) << 15), v)
    return v.astype(np.uint16)


def random_blocks(rng, qtype, n_blocks):
    """n_blocks blocks of random bytes with finite fp16 factors."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    if qtype in (QT.Q5_0,):
        b[:, 0:2] = random_f16(rng, n_blocks, 0.02).view(np.uint8).reshape(-1, 2)
    elif qtype in (QT.Q5_1, QT.Q4_K, QT.Q5_K):  # d, then m / dmin
        b[:, 0:2] = random_f16(rng, n_blocks, 0.02).view(np.uint8).reshape(-1, 2)
        b[:, 2:4] = random_f16(rng, n_blocks, 0.05).view(np.uint8).reshape(-1, 2)
    elif qtype == QT.Q6_K:  # d last
        b[:, size - 2:] = random_f16(rng, n_blocks, 0.002).view(np.uint8).reshape(-1, 2)
    else:
        raise ValueError(qtype)
    return b


def synth_lines(rng):
    cases = []
    # gguf's own Q5_1 quantizer on Gaussian rows (with an outlier per row)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    x[:, 7] *= 20.0
    cases.append(("q5_1.quantized", QT.Q5_1, 256, quantize(x, QT.Q5_1)))
    for name, qt, ne0, rows in [("q5_0.random", QT.Q5_0, 64, 3),
                                ("q5_1.random", QT.Q5_1, 96, 2),
                                ("q4_k.random", QT.Q4_K, 512, 2),
                                ("q5_k.random", QT.Q5_K, 512, 3),
                                ("q6_k.random", QT.Q6_K, 512, 2)]:
        block, size = gguf.GGML_QUANT_SIZES[qt]
        nb = ne0 // block
        cases.append((name, qt, ne0, random_blocks(rng, qt, nb * rows).reshape(rows, nb * size)))
    lines = []
    for name, qt, ne0, raw in cases:
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        deq = dequantize(raw, qt)
        assert deq.shape == (raw.shape[0], ne0)
        lines.append("S %s %d %d %d %d %016x %s" % (name, int(qt), ne0, raw.shape[0], raw.nbytes,
                                                    ck64(raw), summary(deq)))
        flat = raw.reshape(-1).tobytes()
        for i in range(0, len(flat), 64):
            lines.append("H " + flat[i:i + 64].hex())
        lines += value_lines(deq, rng)
    return lines


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LKQ_GEMMA") or \
        os.path.expanduser("~/.cache/livekvq/gemma-3-270m-q4_k_m.gguf")
    head = ["# made by tests/golden/make_kquant_golden.py with gguf %s, numpy %s; "
            "format in the script's docstring" % (gguf.__version__ if hasattr(gguf, "__version__")
                                                  else _gguf_version(), np.__version__)]
    rng = np.random.default_rng(20260115)
    with open(os.path.join(HERE, "kquant_gemma.txt"), "w") as f:
        f.write("\n".join(head + ["# source: gemma-3-270m-q4_k_m.gguf (sha256 a5fd3b62...6818)"]
                          + gemma_lines(path, rng)) + "\n")
    with open(os.path.join(HERE, "kquant_synth.txt"), "w") as f:
        f.write("\n".join(head + synth_lines(rng)) + "\n")


def _gguf_version():
    try:
        from importlib.metadata import version
        return version("gguf")
    except Exception:  # pragma: no cover
        return "?"


if __name__ == "__main__":
    main()
