#!/usr/bin/env bash
# Starts or stops a nats-server with JetStream (file storage) for
# `coremq-perf run --driver nats`.
#
#   perf/peers/nats.sh start DIR [--port N] [--sync]   # prints the server's PID
#   perf/peers/nats.sh stop DIR
#
# start: installs Debian's nats-server with apt-get if it is missing, writes
# DIR/nats.conf (client port on 127.0.0.1 only, JetStream store in
# DIR/jetstream), starts the server in the background (log in DIR/nats.log),
# waits until it logs that it is ready and prints its PID on stdout (nothing
# else goes to stdout). If DIR's server is already running it just prints
# its PID. --sync asks for an fsync of every write (`sync_interval: always`);
# nats-server before 2.10 (Debian bookworm has 2.9.10) has no such option:
# then a warning says so and the server runs with its default background
# sync. stop: SIGTERM, then SIGKILL after STOP_TIMEOUT_S; nothing to do if
# it is not running. Both are idempotent and bounded in time.
set -euo pipefail

# Debian installs the servers (and epmd's helpers) in sbin, which a
# non-login PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
PORT_DEFAULT=4222
# Longest wait for the server to be ready, in seconds.
START_TIMEOUT_S=${START_TIMEOUT_S:-30}
# Longest wait for the server to exit after SIGTERM, in seconds.
STOP_TIMEOUT_S=${STOP_TIMEOUT_S:-30}
# Longest an apt-get step may take, in seconds.
INSTALL_TIMEOUT_S=${INSTALL_TIMEOUT_S:-600}

usage() {
    echo "usage: $0 start DIR [--port N] [--sync] | $0 stop DIR" >&2
    exit 2
}

NAME=nats.sh
# shellcheck source=perf/peers/common.sh
. "$(dirname "$0")/common.sh"

running_pid() {
    pid_from "$1/nats.pid" nats-server
}

install_if_missing() {
    command -v nats-server >/dev/null && return 0
    apt_install nats-server
    # Where the package started its own service (systemd machines), stop it:
    # it would hold the default port.
    if command -v systemctl >/dev/null && systemctl is-active --quiet nats-server 2>/dev/null; then
        log "stopping the nats-server service the package started"
        systemctl stop nats-server >&2 || true
    fi
}

# Whether this nats-server knows `sync_interval` (2.10 and later).
supports_sync_interval() {
    local v major minor
    v=$(nats-server --version | sed -n 's/.*v\([0-9]*\.[0-9]*\).*/\1/p')
    major=${v%%.*}
    minor=${v#*.}
    [[ -n "$major" && -n "$minor" ]] && ((major > 2 || (major == 2 && minor >= 10)))
}

start() {
    local dir=$1 port=$PORT_DEFAULT sync=0
    shift
    while (($#)); do
        case $1 in
        --port) port=${2:?--port needs a value}; shift 2 ;;
        --sync) sync=1; shift ;;
        *) usage ;;
        esac
    done
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    local pid
    pid=$(running_pid "$dir")
    if [[ -n "$pid" ]]; then
        log "already running in $dir"
        echo "$pid"
        return 0
    fi
    install_if_missing
    local sync_line=""
    if ((sync)); then
        if supports_sync_interval; then
            sync_line="  sync_interval: always"
        else
            log "warning: $(nats-server --version) has no sync_interval: every write is NOT fsync'd (background sync only)"
        fi
    fi
    cat >"$dir/nats.conf" <<EOF
# Written by perf/peers/nats.sh.
listen: 127.0.0.1:$port
max_payload: 8MB
jetstream {
  store_dir: "$dir/jetstream"
$sync_line
}
EOF
    : >"$dir/nats.log"
    setsid nats-server -c "$dir/nats.conf" -l "$dir/nats.log" </dev/null >>"$dir/nats.out" 2>&1 &
    pid=$!
    echo "$pid" >"$dir/nats.pid"
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until grep -q "Server is ready" "$dir/nats.log" 2>/dev/null; do
        if ! alive "$pid"; then
            log "nats-server exited during startup:"
            tail -n 20 "$dir/nats.out" "$dir/nats.log" >&2 || true
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            log "nats-server not ready after ${START_TIMEOUT_S}s; stopping it"
            tail -n 20 "$dir/nats.log" >&2 || true
            stop "$dir"
            exit 1
        fi
        sleep 0.1
    done
    log "nats-server $(nats-server --version | sed 's/^nats-server: //') ready on 127.0.0.1:$port, pid $pid, data in $dir/jetstream"
    echo "$pid"
}

stop() {
    local dir=$1 pid
    pid=$(running_pid "$dir")
    if [[ -z "$pid" ]]; then
        rm -f "$dir/nats.pid"
        return 0
    fi
    terminate "$pid"
    rm -f "$dir/nats.pid"
}

dispatch "$@"
