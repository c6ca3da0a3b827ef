#!/usr/bin/env bash
# Starts or stops a RabbitMQ node with the stream plugin for
# `coremq-perf run --driver rabbitmq`.
#
#   perf/peers/rabbitmq.sh start DIR [--port N]   # prints the node's PID (beam.smp)
#   perf/peers/rabbitmq.sh stop DIR
#
# start: installs Debian's rabbitmq-server with apt-get if it is missing,
# then runs a node of its own, whatever the package's service does: node
# name perf-PORT@localhost, every file under DIR (config, Erlang cookie,
# mnesia and stream data, logs), the stream protocol on 127.0.0.1:PORT
# (default 5552, advertised as 127.0.0.1 so clients reconnect to loopback),
# no AMQP 0-9-1 listener, Erlang distribution on 127.0.0.1:PORT+20000. It
# waits until the stream port accepts connections and prints the node's PID
# on stdout (nothing else goes to stdout). If DIR's node is already running
# it just prints its PID. If no epmd is running, it starts one on 127.0.0.1
# and stops it again with the node (unless other nodes use it by then).
# stop: SIGTERM (the Erlang VM then shuts down cleanly), SIGKILL after
# STOP_TIMEOUT_S; nothing to do if it is not running. Both are idempotent
# and bounded in time.
#
# Durability: RabbitMQ streams never fsync (osiris writes its segments with
# file:write and confirms); there is no setting that would make them.
set -euo pipefail

# Debian installs the servers (and epmd's helpers) in sbin, which a
# non-login PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
PORT_DEFAULT=5552
# Erlang distribution port = stream port + this.
DIST_PORT_OFFSET=20000
# Longest wait for the node to accept stream connections, in seconds.
START_TIMEOUT_S=${START_TIMEOUT_S:-90}
# Longest wait for the node to exit after SIGTERM, in seconds.
STOP_TIMEOUT_S=${STOP_TIMEOUT_S:-60}
# Longest wait for epmd to forget a stopped node, in seconds.
EPMD_UNREGISTER_S=5
# Longest an apt-get step may take, in seconds.
INSTALL_TIMEOUT_S=${INSTALL_TIMEOUT_S:-600}
# Where Debian puts the server's own scripts (not the su wrappers in /usr/sbin).
RABBITMQ_BIN=${RABBITMQ_BIN:-/usr/lib/rabbitmq/bin}

usage() {
    echo "usage: $0 start DIR [--port N] | $0 stop DIR" >&2
    exit 2
}

NAME=rabbitmq.sh
# shellcheck source=perf/peers/common.sh
. "$(dirname "$0")/common.sh"

install_if_missing() {
    [[ -x "$RABBITMQ_BIN/rabbitmq-server" ]] && return 0
    apt_install rabbitmq-server
    # Where the package started its own service (systemd or init.d), stop
    # it: this script runs its own node, and that one would hold port 5672.
    if command -v systemctl >/dev/null && systemctl is-active --quiet rabbitmq-server 2>/dev/null; then
        log "stopping the rabbitmq-server service the package started"
        systemctl stop rabbitmq-server >&2 || true
    elif [[ -x /etc/init.d/rabbitmq-server ]] && /etc/init.d/rabbitmq-server status >/dev/null 2>&1; then
        log "stopping the rabbitmq-server service the package started"
        timeout "$STOP_TIMEOUT_S" /etc/init.d/rabbitmq-server stop >&2 || true
    fi
}

# Whether something accepts TCP connections on 127.0.0.1:PORT.
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

start() {
    local dir=$1 port=$PORT_DEFAULT
    shift
    while (($#)); do
        case $1 in
        --port) port=${2:?--port needs a value}; shift 2 ;;
        *) usage ;;
        esac
    done
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    local pid
    pid=$(pid_from "$dir/rabbitmq.pid" beam.smp)
    if [[ -n "$pid" ]]; then
        log "already running in $dir"
        echo "$pid"
        return 0
    fi
    install_if_missing
    if port_open "$port"; then
        log "something already listens on 127.0.0.1:$port"
        exit 1
    fi
    mkdir -p "$dir/home" "$dir/mnesia" "$dir/log"
    : >"$dir/rabbitmq-env.conf"
    echo "[rabbitmq_stream]." >"$dir/enabled_plugins"
    cat >"$dir/rabbitmq.conf" <<EOF
# Written by perf/peers/rabbitmq.sh.
listeners.tcp = none
stream.listeners.tcp.1 = 127.0.0.1:$port
stream.advertised_host = 127.0.0.1
stream.advertised_port = $port
log.file.level = info
EOF
    # epmd: use a running one; else start one on loopback and own it.
    if ! epmd -names >/dev/null 2>&1; then
        setsid epmd -address 127.0.0.1 </dev/null >>"$dir/epmd.out" 2>&1 &
        echo $! >"$dir/epmd.pid"
        local epmd_deadline=$((SECONDS + 10))
        until epmd -names >/dev/null 2>&1; do
            ((SECONDS < epmd_deadline)) || { log "epmd did not start"; exit 1; }
            sleep 0.1
        done
    fi
    (
        export HOME="$dir/home" # the Erlang cookie
        export RABBITMQ_NODENAME="perf-$port@localhost"
        export RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf"
        export RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf"
        export RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config"
        export RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
        export RABBITMQ_MNESIA_BASE="$dir/mnesia"
        export RABBITMQ_LOG_BASE="$dir/log"
        export RABBITMQ_PID_FILE="$dir/rabbitmq-erl.pid"
        export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
        export RABBITMQ_DIST_PORT=$((port + DIST_PORT_OFFSET))
        export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
        # With input allowed the script execs erl, so $! is the node itself
        # (beam.smp); -noinput keeps it from reading a terminal.
        export RABBITMQ_ALLOW_INPUT=1
        export RABBITMQ_SERVER_START_ARGS="-noinput"
        exec setsid "$RABBITMQ_BIN/rabbitmq-server" </dev/null >>"$dir/rabbitmq.out" 2>&1
    ) &
    pid=$!
    echo "$pid" >"$dir/rabbitmq.pid"
    local deadline=$((SECONDS + START_TIMEOUT_S))
    until port_open "$port"; do
        if ! alive "$pid"; then
            log "the node exited during startup:"
            tail -n 30 "$dir/rabbitmq.out" >&2 || true
            stop "$dir"
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            log "the node does not accept stream connections after ${START_TIMEOUT_S}s; stopping it"
            tail -n 30 "$dir/rabbitmq.out" >&2 || true
            stop "$dir"
            exit 1
        fi
        sleep 0.2
    done
    local version=rabbitmq d
    for d in "$RABBITMQ_BIN"/../lib/rabbitmq_server-*; do
        [[ -d "$d" ]] && version=${d##*/}
    done
    log "$version node perf-$port@localhost ready, streams on 127.0.0.1:$port, pid $pid, data in $dir/mnesia"
    echo "$pid"
}

stop() {
    local dir=$1 pid
    # The node: by its pid file, or (a start that failed early) still starting.
    pid=$(pid_from "$dir/rabbitmq.pid" beam.smp)
    [[ -n "$pid" ]] || pid=$(pid_from "$dir/rabbitmq.pid" rabbitmq-server)
    terminate "$pid"
    rm -f "$dir/rabbitmq.pid"
    # Our epmd, once no node is registered with it any more.
    local epmd
    epmd=$(pid_from "$dir/epmd.pid" epmd)
    if [[ -n "$epmd" ]]; then
        # The node's name may take a moment to go after the node has.
        local names_deadline=$((SECONDS + EPMD_UNREGISTER_S))
        while epmd -names 2>/dev/null | grep -q "^name " && ((SECONDS < names_deadline)); do
            sleep 0.2
        done
        if epmd -names 2>/dev/null | grep -q "^name "; then
            log "leaving epmd $epmd running: other nodes use it"
        else
            kill -TERM "$epmd" 2>/dev/null || true
        fi
    fi
    rm -f "$dir/epmd.pid"
}

dispatch "$@"
