#!/usr/bin/env bash
# deploy/nginx/main_conf.sh DIR [USER] - writes DIR/nginx.conf, a minimal
# main configuration that includes DIR/livekvq.conf (a copy of
# deploy/nginx/livekvq.conf) with pid, logs (DIR/logs) and temp files
# (DIR/tmp) under DIR, so nginx runs unprivileged and leaves nothing behind.
# USER (e.g. "nobody nogroup") is the workers' user when started as root.
# Used by deploy/check_deploy.sh and deploy/test_nginx.sh.
set -euo pipefail
dir=$1
mkdir -p "$dir/logs" "$dir/tmp"
{
    [ -n "${2:-}" ] && echo "user $2;"
    cat <<EOC
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 512; }
http {
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    include $dir/livekvq.conf;
}
EOC
} >"$dir/nginx.conf"
