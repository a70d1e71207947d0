#!/usr/bin/env bash
# tests/server/run_py.sh [--openai] SCRIPT.py [ARGS...] - runs one of the
# Python "real consumer" tests of the server. With --openai it uses the venv
# that scripts/setup.sh makes for the official openai client
# (${LKQ_CACHE:-~/.cache/livekvq}/venv-openai, or $LKQ_OPENAI_PYTHON);
# otherwise the system python3. A missing interpreter or venv is a skip
# (exit 77, as meson counts it), never a failure.
set -u
py=python3
if [ "${1:-}" = "--openai" ]; then
    shift
    py=${LKQ_OPENAI_PYTHON:-${LKQ_CACHE:-$HOME/.cache/livekvq}/venv-openai/bin/python}
    if [ ! -x "$py" ]; then
        echo "SKIP: no openai venv at $py (run scripts/setup.sh)"
        exit 77
    fi
fi
command -v "$py" >/dev/null 2>&1 || { echo "SKIP: $py not found"; exit 77; }
exec "$py" "$@"
