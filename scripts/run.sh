#!/usr/bin/env bash
# scripts/run.sh [generate options] - sets up what is missing, builds, and
# runs the main job on the default model: interactive chat generation with
# SmolLM2-135M-Instruct (one prompt per line on stdin), or, with arguments,
# `livekvq generate` with them (e.g. scripts/run.sh -p "Hello" -n 64).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/scripts/setup.sh"
"$ROOT/scripts/build.sh"
MODEL=${LKQ_MODEL:-$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf}
exec "$ROOT/build/livekvq" generate -m "$MODEL" --chat "$@"
