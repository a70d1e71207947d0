#!/usr/bin/env bash
# scripts/test.sh - sets up what is missing, builds, and runs the whole test
# suite (meson test). This is what CI (.ci/run) runs.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/scripts/setup.sh"
"$ROOT/scripts/build.sh"
cd "$ROOT"
meson test -C build --print-errorlogs --num-processes 2 "$@"
