#!/usr/bin/env bash
# scripts/run.sh [server options] - sets up what is missing, builds, and runs
# the main job: the OpenAI-compatible HTTP server on the default model
# (SmolLM2-135M-Instruct, INT4 LiveKVQuant cache) at 127.0.0.1:8080 unless
# told otherwise (e.g. scripts/run.sh --port 9000 --kv-cache fp16). It
# prints the URL and a ready-to-paste curl line; Ctrl-C stops it cleanly.
# LKQ_MODEL overrides the model file.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/scripts/setup.sh"
"$ROOT/scripts/build.sh"
# --model NAME|PATH picks what to serve: smollm2 (the default, 8K context),
# gemma3-270m (Gemma-3-270M Q4_K_M, served with its 32K context), or a GGUF
# path. LKQ_MODEL overrides the default as before.
MODEL=${LKQ_MODEL:-$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf}
EXTRA=()
HOST=127.0.0.1
PORT=8080
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --model | -m)
            case "${2:-}" in
                smollm2 | smollm2-135m) MODEL=$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf ;;
                gemma3-270m | gemma3)
                    MODEL=$ROOT/models/gemma-3-270m-q4_k_m.gguf
                    EXTRA=(--ctx-size 32768) ;;
                "") echo "run.sh: --model needs a value (smollm2, gemma3-270m or a path)" >&2; exit 2 ;;
                *) MODEL=$2 ;;
            esac
            shift 2 ;;
        *)
            case "$1" in
                --host) HOST=${2:-$HOST} ;;
                --port) PORT=${2:-$PORT} ;;
            esac
            args+=("$1")
            shift ;;
    esac
done
if [ ! -r "$MODEL" ]; then
    echo "run.sh: model file $MODEL not found (scripts/setup.sh fetches smollm2 and gemma3-270m)" >&2
    exit 1
fi
cat >&2 <<MSG
livekvq-server on http://$HOST:$PORT  (model: $(basename "$MODEL"))
try:
  curl -s http://$HOST:$PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"messages": [{"role": "user", "content": "Write a haiku about the sea."}], "max_tokens": 64}'
  curl -sN http://$HOST:$PORT/v1/completions -H 'Content-Type: application/json' \\
    -d '{"prompt": "Call me Ishmael.", "max_tokens": 48, "stream": true}'
  curl -s http://$HOST:$PORT/metrics | grep livekvq_kv_
MSG
exec "$ROOT/build/livekvq-server" -m "$MODEL" --host "$HOST" --port "$PORT" "${EXTRA[@]}" "${args[@]}"
