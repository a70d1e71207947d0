#!/usr/bin/env bash
# arch_hf.sh TEST_BINARY MAKE_SCRIPT [args...] - the test_arch_hf runner.
# Writes the tiny random-weight GGUFs with tests/golden/make_tiny_models.py
# --gguf-only (needs a python with gguf + numpy: the venv scripts/setup.sh
# makes in ${LKQ_CACHE:-~/.cache/livekvq}/venv-gguf, else python3 if it has
# them) into a temporary folder, runs the Criterion binary on them
# ($LKQ_TINY_DIR), and removes the folder. Exit 77 (meson: skipped) with one
# line when no such python exists; a failing script fails the test.
set -u
bin=$1
script=$2
shift 2
cache=${LKQ_CACHE:-$HOME/.cache/livekvq}
py=""
for cand in "$cache/venv-gguf/bin/python" python3; do
    if "$cand" -c "import gguf, numpy" >/dev/null 2>&1; then
        py=$cand
        break
    fi
done
if [ -z "$py" ]; then
    echo "arch_hf: no python with gguf + numpy ($cache/venv-gguf: run scripts/setup.sh): skipped"
    exit 77
fi
dir=$(mktemp -d "${TMPDIR:-/tmp}/lkq_tiny_XXXXXX") || exit 1
trap 'rm -rf "$dir"' EXIT
if ! "$py" "$script" --gguf-only "$dir" >"$dir/make.log" 2>&1; then
    echo "arch_hf: $script --gguf-only failed: $(tail -n 1 "$dir/make.log")"
    exit 1
fi
LKQ_TINY_DIR=$dir "$bin" "$@"
