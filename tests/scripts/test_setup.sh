#!/usr/bin/env bash
# tests/scripts/test_setup.sh - scripts/setup.sh on a fresh machine, as a
# new user meets it: HOME is an empty folder (no ~/.cache), the default
# model is pre-seeded through LKQ_MODEL_SEED (no network needed), the
# optional consumers (openai venv, prometheus) are skipped. Checks:
#   1. setup exits 0, creates ~/.cache/livekvq with the model (checksum
#      checked by setup itself) and links it into the checkout's models/;
#   2. a second run is a no-op that still exits 0;
#   3. a Debian package that cannot be installed (LKQ_EXTRA_PKGS) gives
#      exactly one line on stderr naming it, and a non-zero exit.
# The setup runs from a copy of scripts/ in a temporary checkout root, so
# the real checkout's models/ is not touched. Exit 77 (skip) when the
# seed model is not there.
set -uo pipefail
SRC=${LKQ_SRCDIR:?LKQ_SRCDIR not set}
MODEL=SmolLM2-135M-Instruct.Q4_1.gguf
SEED=${LKQ_MODELS:-$SRC/models}
if [ ! -s "$SEED/$MODEL" ]; then
    echo "skip: no seed model at $SEED/$MODEL (run scripts/setup.sh once)"
    exit 77
fi
SEED=$(cd "$(dirname "$(readlink -f "$SEED/$MODEL")")" && pwd)
tmp=$(mktemp -d /tmp/lkq_setupXXXXXX)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/home" "$tmp/root"
cp -r "$SRC/scripts" "$tmp/root/scripts"
fails=0
check() { # check DESCRIPTION CONDITION...
    local what=$1; shift
    if "$@"; then echo "ok: $what"; else echo "FAIL: $what"; fails=$((fails + 1)); fi
}
run_setup() { # run_setup OUT ERR [VAR=VALUE ...]
    local out=$1 err=$2; shift 2
    env -u LKQ_CACHE HOME="$tmp/home" LKQ_MODEL_SEED="$SEED" LKQ_SETUP_CONSUMERS=0 "$@" \
        bash "$tmp/root/scripts/setup.sh" >"$out" 2>"$err" </dev/null
}

# 1. fresh HOME: no ~/.cache at all
check "HOME has no .cache" test ! -e "$tmp/home/.cache"
run_setup "$tmp/out1" "$tmp/err1"
rc=$?
check "fresh setup exits 0 (got $rc: $(head -c 300 "$tmp/err1"))" test "$rc" -eq 0
check "model cached under the new ~/.cache/livekvq" test -s "$tmp/home/.cache/livekvq/$MODEL"
check "model linked into models/" test -e "$tmp/root/models/$MODEL"
check "nothing on stderr" test ! -s "$tmp/err1"

# 2. again: nothing to do
run_setup "$tmp/out2" "$tmp/err2"
rc=$?
check "second setup exits 0 (got $rc)" test "$rc" -eq 0
check "second setup copies nothing" test ! -s "$tmp/out2"

# 3. a package apt cannot install, again from an empty HOME (apt's log
#    goes into a cache folder that does not exist yet)
bogus=lkq-no-such-package-for-tests
mkdir -p "$tmp/home3"
run_setup "$tmp/out3" "$tmp/err3" LKQ_EXTRA_PKGS=$bogus HOME="$tmp/home3"
rc=$?
check "bad package: non-zero exit (got $rc)" test "$rc" -ne 0
check "bad package: exactly one line on stderr ($(wc -l <"$tmp/err3"))" test "$(wc -l <"$tmp/err3")" -eq 1
check "bad package: the line names it: $(cat "$tmp/err3")" grep -q "$bogus" "$tmp/err3"

echo "$((11 - fails)) passed, $fails failed"
[ "$fails" -eq 0 ]
