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
MODEL=${LKQ_MODEL:-$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf}
HOST=127.0.0.1
PORT=8080
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
        --host) HOST=${args[$((i + 1))]:-$HOST} ;;
        --port) PORT=${args[$((i + 1))]:-$PORT} ;;
    esac
done
cat >&2 <<MSG
livekvq-server on http://$HOST:$PORT  (model: $(basename "$MODEL"))
try:
  curl -s http://$HOST:$PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"messages": [{"role": "user", "content": "Write a haiku about the sea."}], "max_tokens": 64}'
  curl -sN http://$HOST:$PORT/v1/completions -H 'Content-Type: application/json' \\
    -d '{"prompt": "Call me Ishmael.", "max_tokens": 48, "stream": true}'
  curl -s http://$HOST:$PORT/metrics | grep livekvq_kv_
MSG
exec "$ROOT/build/livekvq-server" -m "$MODEL" --host "$HOST" --port "$PORT" "$@"
