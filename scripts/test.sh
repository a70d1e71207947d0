#!/usr/bin/env bash
# scripts/test.sh - sets up what is missing, builds, and runs the whole test
# suite (meson test) twice: on the release build (build/) and on a build with
# AddressSanitizer + UndefinedBehaviorSanitizer (build-asan/). This is what
# CI (.ci/run) runs. Extra arguments go to both `meson test` runs.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
"$ROOT/scripts/setup.sh"
"$ROOT/scripts/build.sh"
echo "== tests: release build" >&2
meson test -C build --print-errorlogs --num-processes 2 "$@"
if [ "${LKQ_SKIP_ASAN:-0}" != 1 ]; then
    if [ ! -f build-asan/build.ninja ]; then
        meson setup build-asan -Db_sanitize=address,undefined \
            -Dbuildtype=debugoptimized >/dev/null
    fi
    ninja -C build-asan >/dev/null
    echo "== tests: address + undefined sanitizers" >&2
    meson test -C build-asan --print-errorlogs --num-processes 2 "$@"
fi
