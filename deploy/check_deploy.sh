#!/usr/bin/env bash
# deploy/check_deploy.sh - static checks of everything under deploy/, with the
# tools' own validators where they are installed (each check is skipped, and
# said so, when its tool is missing):
#   promtool check config / check rules / test rules   (Debian: prometheus)
#   the Grafana dashboard is valid JSON whose panels all have queries
#   the Kubernetes manifests are valid YAML with apiVersion/kind/metadata
#   nginx -t on deploy/nginx/livekvq.conf inside a throwaway main config
#   systemd-analyze verify on the unit (binary path replaced)
#   the scripts pass ShellCheck
# Takes a couple of seconds; run by the test suite (meson test deploy_config).
# Exit status: 0 all run checks passed, 1 a check failed, 77 nothing could run.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
D=$ROOT/deploy
T=$(mktemp -d /tmp/lkq_deploy_check.XXXXXX)
trap 'rm -rf "$T"' EXIT
ran=0
failed=0

ok() { echo "check_deploy: ok   $*"; ran=$((ran + 1)); }
bad() { echo "check_deploy: FAIL $*" >&2; ran=$((ran + 1)); failed=$((failed + 1)); }
skip() { echo "check_deploy: skip $* (tool missing)"; }

# --- Prometheus --------------------------------------------------------------
if command -v promtool >/dev/null; then
    if out=$(cd "$D/prometheus" && promtool check config prometheus.yml 2>&1); then
        ok "promtool check config prometheus.yml"
    else
        bad "promtool check config: $out"
    fi
    if out=$(cd "$D/prometheus" && promtool check rules alerts.yml 2>&1); then
        ok "promtool check rules alerts.yml"
    else
        bad "promtool check rules: $out"
    fi
    if out=$(cd "$D/prometheus" && promtool test rules alerts_test.yml 2>&1); then
        ok "promtool test rules alerts_test.yml"
    else
        bad "promtool test rules: $out"
    fi
else
    skip "promtool"
fi

# --- Grafana dashboard and Kubernetes YAML (python3 + PyYAML) -----------------
if command -v python3 >/dev/null; then
    if out=$(python3 - "$D/grafana/livekvq-dashboard.json" 2>&1 <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
assert d.get("uid") and d.get("title"), "dashboard needs uid and title"
ids = set()
for p in d["panels"]:
    assert p["id"] not in ids, "duplicate panel id %s" % p["id"]
    ids.add(p["id"])
    if p["type"] != "row":
        t = p.get("targets") or []
        assert t and all(x.get("expr") for x in t), "panel '%s' has no query" % p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, "panel '%s' wider than the grid" % p["title"]
print(len(d["panels"]), "panels")
EOF
    ); then
        ok "grafana/livekvq-dashboard.json ($out)"
    else
        bad "grafana dashboard: $out"
    fi
    if python3 -c 'import yaml' 2>/dev/null; then
        if out=$(python3 - "$D"/k8s/*.yaml 2>&1 <<'EOF'
import sys, yaml
n = 0
for f in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(f)):
        if doc is None:
            continue
        assert "apiVersion" in doc and "kind" in doc, "%s: a document without apiVersion/kind" % f
        if doc["kind"] != "Kustomization":
            assert doc.get("metadata", {}).get("name"), "%s: %s without metadata.name" % (f, doc["kind"])
        n += 1
print(n, "objects")
EOF
        ); then
            ok "k8s/*.yaml ($out)"
        else
            bad "k8s YAML: $out"
        fi
    else
        skip "PyYAML (k8s manifests)"
    fi
else
    skip "python3 (dashboard, k8s manifests)"
fi

# --- nginx ---------------------------------------------------------------------
NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
if [ -x "$NGINX" ]; then
    mkdir -p "$T/nginx"
    sed "s|/var/log/nginx/livekvq.access.log|$T/nginx/logs/access.log|" \
        "$D/nginx/livekvq.conf" >"$T/nginx/livekvq.conf"
    "$D/nginx/main_conf.sh" "$T/nginx"
    if out=$("$NGINX" -t -q -p "$T/nginx" -c "$T/nginx/nginx.conf" 2>&1); then
        ok "nginx -t nginx/livekvq.conf"
    else
        bad "nginx -t: $out"
    fi
else
    skip "nginx"
fi

# --- systemd -----------------------------------------------------------------------
if command -v systemd-analyze >/dev/null; then
    mkdir -p "$T/systemd"
    cp "$D/systemd/livekvq.env" "$T/systemd/livekvq.env"
    sed -e "s|/usr/local/bin/livekvq-server|/bin/true|" \
        -e "s|/etc/livekvq/livekvq.env|$T/systemd/livekvq.env|" \
        "$D/systemd/livekvq.service" >"$T/systemd/livekvq.service"
    if out=$(systemd-analyze verify "$T/systemd/livekvq.service" 2>&1) && [ -z "$out" ]; then
        ok "systemd-analyze verify systemd/livekvq.service"
    else
        bad "systemd-analyze verify: $out"
    fi
else
    skip "systemd-analyze"
fi

# --- scripts -------------------------------------------------------------------------
if command -v shellcheck >/dev/null; then
    scripts=()
    for f in "$D/test_nginx.sh" "$D/check_deploy.sh" "$D/nginx/main_conf.sh" "$ROOT/loadtests/compare_kv.sh"; do
        [ -f "$f" ] && scripts+=("$f")
    done
    if out=$(shellcheck "${scripts[@]}" 2>&1); then
        ok "shellcheck"
    else
        bad "shellcheck: $out"
    fi
else
    skip "shellcheck"
fi

if [ "$ran" = 0 ]; then
    echo "check_deploy: no validator installed; nothing checked"
    exit 77
fi
echo "check_deploy: $((ran - failed))/$ran checks passed"
[ "$failed" = 0 ]
