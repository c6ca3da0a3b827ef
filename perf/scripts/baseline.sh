#!/usr/bin/env bash
# Runs the baseline benchmark of docs/benchmarks.md: six 20-second runs of
# the 1 topic x 2 queues, 1 KiB workload, each against a fresh release
# broker (default settings, 2 shards on a 2-core machine) with its data in a
# new temporary directory. Writes one JSON report per run and a log to OUT.
#
# Usage: perf/scripts/baseline.sh [OUT]   (default OUT: ./perf-baseline)
# Env:   BIN=dir with release coremq and coremq-perf (default target/release)
#        DURATION_S=seconds per run (default 20)
#
# Before each run the script waits (up to SETTLE_MAX_S) for the disk to be
# quiet again: 100 synchronous 4 KiB writes must take under SETTLE_MS in
# all, so one run's deferred I/O (discards of the deleted data, writeback)
# does not land in the next run. Every broker this script starts is stopped
# (SIGTERM) when its run ends, and on exit, including Ctrl-C.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
root="$(cd "$here/.." && pwd)"
out="$(realpath -m "${1:-perf-baseline}")"
bin="${BIN:-$root/target/release}"
duration="${DURATION_S:-20}"
workloads="$here/workloads"
broker_start_timeout_s=30
broker_stop_timeout_s=20
settle_ms="${SETTLE_MS:-100}"
settle_max_s="${SETTLE_MAX_S:-60}"
mkdir -p "$out"

broker_pid=""
broker_dir=""
stop_broker() {
    if [[ -n "$broker_pid" ]]; then
        kill -TERM "$broker_pid" 2>/dev/null || true
        for _ in $(seq $((broker_stop_timeout_s * 10))); do
            kill -0 "$broker_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$broker_pid" 2>/dev/null || true
        wait "$broker_pid" 2>/dev/null || true
        broker_pid=""
    fi
    if [[ -n "$broker_dir" ]]; then
        rm -rf "$broker_dir"
        broker_dir=""
    fi
}
trap stop_broker EXIT INT TERM

start_broker() {
    broker_dir="$(mktemp -d /tmp/coremq-bench.XXXXXX)"
    "$bin/coremq" serve --data-dir "$broker_dir/data" --listen 127.0.0.1:0 \
        --shard-port-base 0 >"$broker_dir/stdout" 2>"$broker_dir/stderr" &
    broker_pid=$!
    for _ in $(seq $((broker_start_timeout_s * 10))); do
        broker_addr="$(sed -n 's/^listening on \(.*\) (every shard)$/\1/p' "$broker_dir/stdout")"
        [[ -n "$broker_addr" ]] && return 0
        sleep 0.1
    done
    echo "broker did not start; stderr:" >&2
    cat "$broker_dir/stderr" >&2
    return 1
}

# Waits until the disk is quiet; prints the last probe's time in ms.
settle_disk() {
    local probe ms=0 t0
    probe="$(mktemp /tmp/coremq-bench-probe.XXXXXX)"
    for _ in $(seq "$settle_max_s"); do
        t0=$(date +%s%N)
        dd if=/dev/zero of="$probe" bs=4k count=100 oflag=dsync conv=notrunc status=none
        ms=$((($(date +%s%N) - t0) / 1000000))
        ((ms < settle_ms)) && break
        sleep 1
    done
    rm -f "$probe"
    echo "$ms"
}

# name, workload file, extra flags
run_case() {
    local name="$1" workload="$2"
    shift 2
    local settled
    settled="$(settle_disk)"
    start_broker
    echo "== $name: load average $(cut -d' ' -f1-3 /proc/loadavg)," \
        "100 x 4 KiB dsync writes took ${settled} ms" | tee -a "$out/log.txt"
    local cmd=("$bin/coremq-perf" run --workload "$workloads/$workload" --broker "$broker_addr"
        --duration-s "$duration" --broker-pid "$broker_pid" --json "$out/$name.json" "$@")
    echo "\$ ${cmd[*]}" >>"$out/log.txt"
    local rc=0
    "${cmd[@]}" 2>&1 | tee -a "$out/log.txt" || rc=$?
    stop_broker
    [[ $rc -eq 0 ]] || echo "!! $name exited $rc" | tee -a "$out/log.txt"
}

batching=(--producers 2 --batch-bytes 65536 --linger-ms 1)
single=(--producers 1 --batch-bytes 1 --linger-ms 0 --rate 5000)

run_case async-max 1-topic-2-queues-1kb-async.yaml "${batching[@]}" --rate 0
run_case async-50k 1-topic-2-queues-1kb-async.yaml "${batching[@]}" --rate 50000
run_case sync-max 1-topic-2-queues-1kb-sync.yaml "${batching[@]}" --rate 0
run_case sync-50k 1-topic-2-queues-1kb-sync.yaml "${batching[@]}" --rate 50000
run_case single-async 1-topic-2-queues-1kb-async.yaml "${single[@]}"
run_case single-sync 1-topic-2-queues-1kb-sync.yaml "${single[@]}"

echo "reports in $out"
