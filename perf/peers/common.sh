# shellcheck shell=bash
# Shell functions the peer scripts share; sourced by nats.sh and rabbitmq.sh
# (which set NAME and INSTALL_TIMEOUT_S first).

log() { echo "$NAME: $*" >&2; }

# Whether PID runs (a zombie does not: its parent may never reap it).
alive() {
    local state
    state=$(sed -n 's/^[0-9]* ([^)]*) \(.\).*/\1/p' "/proc/$1/stat" 2>/dev/null || true)
    [[ -n "$state" && "$state" != Z ]]
}

# The PID in FILE if that process is alive and runs COMM (not a recycled pid).
pid_from() {
    local pid
    pid=$(cat "$1" 2>/dev/null || true)
    if [[ -n "$pid" ]] && alive "$pid" && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]]; then
        echo "$pid"
    fi
}

# apt-get install PACKAGE, updating the package lists once if that fails.
apt_install() {
    log "installing $1 with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! timeout "$INSTALL_TIMEOUT_S" apt-get install -y -q "$1" >&2; then
        timeout "$INSTALL_TIMEOUT_S" apt-get update -q >&2
        timeout "$INSTALL_TIMEOUT_S" apt-get install -y -q "$1" >&2
    fi
}

# SIGTERM to PID (if set), SIGKILL after STOP_TIMEOUT_S; returns once it is gone.
terminate() {
    local pid=$1
    [[ -n "$pid" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_TIMEOUT_S))
    while alive "$pid"; do
        if ((SECONDS >= deadline)); then
            log "process $pid still running after ${STOP_TIMEOUT_S}s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
}

# The command line of a peer script: start DIR [flags...] | stop DIR.
dispatch() {
    (($# >= 2)) || usage
    local cmd=$1 dir=$2
    shift 2
    case $cmd in
    start) start "$dir" "$@" ;;
    stop) (($# == 0)) || usage; stop "$dir" ;;
    *) usage ;;
    esac
}
