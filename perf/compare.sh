#!/usr/bin/env bash
# Side by side: the machine's limits, coremq and its peers on one workload.
#
# Usage: perf/compare.sh WORKLOAD [options] [-- coremq-perf run flags...]
#   WORKLOAD          a workload file (e.g. perf/workloads/1-topic-2-queues-1kb-async.yaml)
#   --duration-s S    measured seconds per system (default: the workload's own)
#   --peers LIST      peers to run after coremq, space or comma separated
#                     (default "nats rabbitmq"; "" or "none" for coremq only)
#   --no-build        use the binaries already in BIN (default target/release,
#                     or $CARGO_TARGET_DIR/release)
#                     instead of `cargo build --release -p coremq -p coremq-perf`
#   --limits FILE     take the limits from this limits.sh JSON instead of
#                     measuring them; --no-limits: no limits, no ratios to them
#   --data-root DIR   where the brokers' data directories (and the limits' test
#                     files) go; default a new directory in $TMPDIR or /tmp
#   --out DIR         results directory (default
#                     perf/results/<workload>-<UTC timestamp>)
#   -- FLAGS...       passed to every `coremq-perf run` (e.g. -- --flush sync --rate 0)
# Env: BIN (binaries), COREMQ_SERVE_ARGS (extra `coremq serve` flags),
#      LIMITS_SECONDS and the other limits.sh variables, SETTLE_MAX_S (longest
#      wait for a quiet disk before each system, default 30), COOLDOWN_S (pause
#      after measuring the limits, default 10), DRAIN_S (coremq-perf
#      --drain-s, default 10), SETUP_S (time allowed per run besides the
#      duration and drain, for topic setup and teardown, default 60).
#
# For each system: wait until the disk is quiet, start the broker on free
# ports with fresh data, run coremq-perf with --broker-pid (RSS sampling),
# stop the broker, delete its data. coremq runs from BIN; a peer runs when
# perf/peers/PEER.sh exists and coremq-perf has `--driver PEER`:
#   perf/peers/PEER.sh start DATADIR --port N [--sync]
#                                      prints the server's PID on stdout
#                                      (N: a free port; --sync for nats when
#                                      the run asks for sync flush)
#   perf/peers/PEER.sh stop DATADIR    stops it
# and is skipped with a note otherwise.
#
# Writes into the results directory: limits.json, coremq.json and PEER.json
# (coremq-perf reports), one .log per system, results.md (the table and the
# ratios) and latency.svg / latency.png (coremq-perf plot). Every process it
# starts is stopped on exit, including Ctrl-C; nothing else is touched.
# Every step is bounded: builds aside, about limits (~40 s) + COOLDOWN_S + per
# system (settle <= SETTLE_MAX_S, duration, drain <= DRAIN_S, start/stop
# <= 60 s; a peer's start script gets 300 s, as it may install the peer).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
bin="${BIN:-${CARGO_TARGET_DIR:-$root/target}/release}"
settle_max_s="${SETTLE_MAX_S:-30}"
drain_s="${DRAIN_S:-10}"
cooldown_s="${COOLDOWN_S:-10}"
broker_start_timeout_s=30
broker_stop_timeout_s=20

usage() {
    sed -n '/^# Usage:/,/^# Env:/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
}

workload=""
duration=""
peers="nats rabbitmq"
build=1
limits_mode="measure"
limits_file=""
data_root=""
out=""
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
    --duration-s)
        duration="${2:?--duration-s needs a value}"
        shift 2
        ;;
    --peers)
        peers="${2?--peers needs a value}"
        shift 2
        ;;
    --no-build)
        build=0
        shift
        ;;
    --limits)
        limits_mode="file"
        limits_file="${2:?--limits needs a file}"
        shift 2
        ;;
    --no-limits)
        limits_mode="none"
        shift
        ;;
    --data-root)
        data_root="${2:?--data-root needs a directory}"
        shift 2
        ;;
    --out)
        out="${2:?--out needs a directory}"
        shift 2
        ;;
    --)
        shift
        extra=("$@")
        break
        ;;
    -h | --help) usage ;;
    -*)
        echo "compare.sh: unknown flag $1 (coremq-perf flags go after --)" >&2
        usage
        ;;
    *)
        [[ -z "$workload" ]] || usage
        workload="$1"
        shift
        ;;
    esac
done
[[ -n "$workload" ]] || usage
[[ -f "$workload" ]] || {
    echo "compare.sh: no workload file $workload" >&2
    exit 2
}
workload="$(realpath "$workload")"
if [[ -n "$duration" ]] && ! [[ "$duration" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
    echo "compare.sh: --duration-s must be a number of seconds" >&2
    exit 2
fi
peers="${peers//,/ }"
[[ "$peers" == none ]] && peers=""

note() { echo "compare: $*" >&2; }

name="$(basename "$workload")"
name="${name%.*}"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
out="$(realpath -m "${out:-$here/results/$name-$stamp}")"
mkdir -p "$out"
if [[ -z "$data_root" ]]; then
    data_root="$(mktemp -d "${TMPDIR:-/tmp}/coremq-compare.XXXXXX")"
    own_data_root=1
else
    mkdir -p "$data_root"
    data_root="$(realpath "$data_root")"
    own_data_root=0
fi

# --- what this script started, stopped on exit ----------------------------------

broker_pid=""    # a coremq broker
peer_running=""  # a peer name whose start script succeeded
peer_dir=""
system_dir=""    # the current system's data directory
perf_pid=""      # a coremq-perf run (under timeout)
stop_system() {
    if [[ -n "$perf_pid" ]]; then
        kill -TERM "$perf_pid" 2>/dev/null || true
        wait "$perf_pid" 2>/dev/null || true
        perf_pid=""
    fi
    if [[ -n "$broker_pid" ]]; then
        kill -TERM "$broker_pid" 2>/dev/null || true
        local i
        for ((i = 0; i < broker_stop_timeout_s * 10; i++)); do
            kill -0 "$broker_pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$broker_pid" 2>/dev/null; then
            note "broker $broker_pid did not stop in ${broker_stop_timeout_s}s; killing it"
            kill -KILL "$broker_pid" 2>/dev/null || true
        fi
        wait "$broker_pid" 2>/dev/null || true
        broker_pid=""
    fi
    if [[ -n "$peer_running" ]]; then
        timeout -k 5 "$broker_stop_timeout_s" "$here/peers/$peer_running.sh" stop "$peer_dir" >&2 ||
            note "stopping $peer_running failed"
        peer_running=""
    fi
    if [[ -n "$system_dir" ]]; then
        rm -rf "$system_dir"
        system_dir=""
    fi
}
cleanup() {
    stop_system
    if [[ $own_data_root -eq 1 ]]; then rm -rf "$data_root"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- build ------------------------------------------------------------------------

if [[ $build -eq 1 ]]; then
    note "building (cargo build --release -p coremq -p coremq-perf)"
    (cd "$root" && cargo build --release -p coremq -p coremq-perf) >&2
fi
for b in coremq coremq-perf; do
    [[ -x "$bin/$b" ]] || {
        echo "compare.sh: no $bin/$b (build it, or set BIN)" >&2
        exit 1
    }
done
perf="$bin/coremq-perf"
run_help="$("$perf" run --help)"

{
    echo "workload: $workload"
    echo "started: $stamp"
    echo "commit: $(git -C "$root" describe --always --dirty 2>/dev/null || echo unknown)"
    echo "kernel: $(uname -r), nproc: $(nproc), loadavg: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "coremq-perf run flags: --duration-s ${duration:-"(workload)"} ${extra[*]}"
} >"$out/run-info.txt"

# --- limits -----------------------------------------------------------------------

case "$limits_mode" in
measure)
    note "measuring the machine's limits on $data_root (perf/limits.sh)"
    "$here/limits.sh" "$data_root" >"$out/limits.json"
    ;;
file) cp "$limits_file" "$out/limits.json" ;;
none) note "no limits: results.md will have no ratios to them" ;;
esac
if [[ "$limits_mode" == measure ]]; then
    # limits.sh just deleted GiBs; on a file system mounted with discard the
    # discards can stall writes for a while, beyond what the probe sees.
    note "cooling down ${cooldown_s}s after the limits"
    sleep "$cooldown_s"
fi

# --- one system -------------------------------------------------------------------

# Waits until 100 synchronous 4 KiB writes take under 100 ms (at most
# SETTLE_MAX_S), so one run's writeback and discards do not land in the next.
settle_disk() {
    local probe="$data_root/.settle-probe" t0 ms=0 i
    for ((i = 0; i <= settle_max_s; i++)); do
        t0=$(date +%s%N)
        dd if=/dev/zero of="$probe" bs=4k count=100 oflag=dsync conv=notrunc status=none
        ms=$((($(date +%s%N) - t0) / 1000000))
        ((ms < 100)) && break
        sleep 1
    done
    rm -f "$probe"
    note "disk probe before the run: 100 x 4 KiB dsync writes in $ms ms"
}

start_coremq() {
    system_dir="$data_root/coremq"
    mkdir -p "$system_dir"
    local serve_args=()
    read -r -a serve_args <<<"${COREMQ_SERVE_ARGS:-}"
    # Created here: the background broker's redirect may come after the first read.
    : >"$system_dir/stdout"
    "$bin/coremq" serve --data-dir "$system_dir/data" --listen 127.0.0.1:0 \
        --shard-port-base 0 "${serve_args[@]}" >"$system_dir/stdout" 2>"$out/coremq-broker.log" &
    broker_pid=$!
    local i
    for ((i = 0; i < broker_start_timeout_s * 10; i++)); do
        addr="$(sed -n 's/^listening on \([^ ]*\).*$/\1/p' "$system_dir/stdout" | head -n 1)"
        [[ -n "$addr" ]] && return 0
        kill -0 "$broker_pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "compare.sh: coremq did not start; its log:" >&2
    tail -n 20 "$out/coremq-broker.log" >&2
    return 1
}

# A free loopback port in 20000-44999 whose +20000 is free too (RabbitMQ's
# Erlang distribution listens there), so peers never meet a broker that
# someone else runs on their default port.
free_peer_port() {
    python3 -c '
import random, socket
for _ in range(200):
    port = random.randrange(20000, 45000)
    try:
        for p in (port, port + 20000):
            with socket.socket() as s:
                s.bind(("127.0.0.1", p))
    except OSError:
        continue
    print(port)
    break
else:
    raise SystemExit("no free port pair")
'
}

# Whether the run asks for sync flush (workload file or extra flags).
wants_sync() {
    local prev="" a
    for a in "${extra[@]}"; do
        [[ "$a" == --flush=sync || ("$prev" == --flush && "$a" == sync) ]] && return 0
        [[ "$a" == --flush=* || "$prev" == --flush ]] && return 1
        prev="$a"
    done
    grep -Eq '^[[:space:]]*flush:[[:space:]]*"?sync' "$workload"
}

start_peer() { # peer
    local peer="$1" line port start_args=()
    system_dir="$data_root/$peer"
    peer_dir="$system_dir"
    mkdir -p "$system_dir"
    port="$(free_peer_port)"
    start_args=(--port "$port")
    [[ "$peer" == nats ]] && wants_sync && start_args+=(--sync)
    line="$(timeout -k 5 300 "$here/peers/$peer.sh" start "$system_dir" "${start_args[@]}" \
        2>"$out/$peer-broker.log" | tail -n 1)" || {
        echo "compare.sh: perf/peers/$peer.sh start failed; its log:" >&2
        tail -n 20 "$out/$peer-broker.log" >&2
        return 1
    }
    peer_running="$peer"
    broker_pid_peer="${line%% *}"
    addr="127.0.0.1:$port"
    [[ "$line" == *" "* ]] && addr="${line#* }"
    [[ "$broker_pid_peer" =~ ^[0-9]+$ ]] || {
        echo "compare.sh: perf/peers/$peer.sh start printed '$line', not a PID" >&2
        return 1
    }
}

# Runs coremq-perf for one system; its exit status is recorded, not fatal.
run_perf() { # system, pid, addr, driver args...
    local system="$1" pid="$2" addr="$3"
    shift 3
    local cmd=("$perf" run --workload "$workload" --broker-pid "$pid"
        --json "$out/$system.json" --drain-s "$drain_s" "$@")
    [[ -n "$addr" ]] && cmd+=(--broker "$addr")
    [[ -n "$duration" ]] && cmd+=(--duration-s "$duration")
    cmd+=("${extra[@]}")
    # Bounded: the run, its drain, and SETUP_S (default a minute) for setup
    # and teardown: creating and deleting 10,000 topics takes longer.
    local limit
    limit="$(python3 -c 'import sys; print(int(float(sys.argv[1]) + float(sys.argv[2]) + float(sys.argv[3])))' \
        "${duration:-3600}" "$drain_s" "${SETUP_S:-60}")"
    echo "\$ ${cmd[*]}" >"$out/$system.log"
    note "running $system (--duration-s ${duration:-from the workload})"
    local rc=0
    # In the background, so that a signal to this script acts at once (bash
    # runs traps only between foreground commands); the trap stops it.
    timeout -k 10 "$limit" "${cmd[@]}" > >(tee -a "$out/$system.log" >&2) 2>&1 &
    perf_pid=$!
    wait "$perf_pid" || rc=$?
    perf_pid=""
    echo "$system $rc" >>"$out/exit-status.txt"
    [[ $rc -eq 0 ]] || note "$system: coremq-perf exited $rc (see $out/$system.log)"
}

systems=()

settle_disk
start_coremq
note "coremq listening on $addr (pid $broker_pid)"
run_perf coremq "$broker_pid" "$addr"
stop_system
[[ -f "$out/coremq.json" ]] && systems+=(coremq)

for peer in $peers; do
    if [[ ! -x "$here/peers/$peer.sh" ]]; then
        note "skipping $peer: no executable perf/peers/$peer.sh yet"
        continue
    fi
    if ! grep -q -- "--driver" <<<"$run_help" || ! grep -q "$peer" <<<"$run_help"; then
        note "skipping $peer: this coremq-perf has no --driver $peer yet"
        continue
    fi
    settle_disk
    if ! start_peer "$peer"; then
        note "skipping $peer: it did not start"
        stop_system
        continue
    fi
    note "$peer started (pid $broker_pid_peer${addr:+, $addr})"
    run_perf "$peer" "$broker_pid_peer" "$addr" --driver "$peer"
    stop_system
    [[ -f "$out/$peer.json" ]] && systems+=("$peer")
done

[[ ${#systems[@]} -gt 0 ]] || {
    echo "compare.sh: no system produced a report; see the logs in $out" >&2
    exit 1
}

# --- plot and table ---------------------------------------------------------------

plot_args=()
for s in "${systems[@]}"; do plot_args+=(--label "$s"); done
for s in "${systems[@]}"; do plot_args+=("$out/$s.json"); done
for format in svg png; do
    "$perf" plot --out "$out/latency.$format" "${plot_args[@]}" >&2 ||
        note "coremq-perf plot --out latency.$format failed"
done

python3 - "$out" "${systems[@]}" >"$out/results.md" <<'EOF'
import json, os, sys

out, systems = sys.argv[1], sys.argv[2:]
reports = {s: json.load(open(os.path.join(out, s + ".json"))) for s in systems}
limits = None
if os.path.exists(os.path.join(out, "limits.json")):
    limits = json.load(open(os.path.join(out, "limits.json")))
status = {}
if os.path.exists(os.path.join(out, "exit-status.txt")):
    for line in open(os.path.join(out, "exit-status.txt")):
        s, rc = line.split()
        status[s] = int(rc)
info = open(os.path.join(out, "run-info.txt")).read().strip()


def ms(us):
    """Microseconds as milliseconds with about three significant digits."""
    if us is None:
        return "–"
    v = us / 1000.0
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def ratio(a, b, fmt="{:.2f}"):
    if a is None or b is None or b == 0:
        return "–"
    return fmt.format(a / b)


first = reports[systems[0]]
w = first.get("workload", {})
lines = [f"# {w.get('name', 'workload')}", ""]
lines += ["```", info, "```", ""]
lines.append(
    f"{w.get('topics', '?')} topic(s) × {w.get('partitionsPerTopic', '?')} queue(s), "
    f"{w.get('messageSize', '?')} B messages, {w.get('producersPerTopic', '?')} producer(s), "
    f"rate {w.get('producerRate', '?')} msg/s ({'open' if first.get('open_loop') else 'CLOSED'} loop), "
    f"flush {w.get('flush', '?')}, batch {w.get('batchBytes', '?')} B, linger {w.get('lingerMs', '?')} ms, "
    f"{first.get('measured_seconds', 0):.1f} s measured."
)
lines.append("")

limit_mb = None
if limits:
    # With consumers every byte crosses loopback in and out again: the
    # network ceiling is then a stream each way at once (limits.sh --bidir).
    consumed = (w.get("subscriptionsPerTopic") or 0) > 0
    net_key = "loopback_bidir_mb_per_s" if consumed and "loopback_bidir_mb_per_s" in limits else "loopback_mb_per_s"
    net_name = "loopback each way at once" if net_key == "loopback_bidir_mb_per_s" else "loopback"
    limit_mb = min(limits["disk_write_mb_per_s"], limits[net_key])
    lines += [
        "## Machine limits (perf/limits.sh, MB = 2^20 B)",
        "",
        "| disk write MB/s | disk read MB/s | fdatasync 4 KiB p50 / p99 / p99.9 µs | fdatasync 64 KiB p99 µs | loopback MB/s (1 / 2 streams / each way at once) |",
        "|---:|---:|---:|---:|---:|",
        f"| {limits['disk_write_mb_per_s']:,.0f} | {limits['disk_read_mb_per_s']:,.0f} "
        f"| {limits['fdatasync_p50_us']:,.0f} / {limits['fdatasync_p99_us']:,.0f} / {limits['fdatasync_p999_us']:,.0f} "
        f"| {limits.get('fdatasync_64k_p99_us', 0):,.0f} "
        f"| {limits['loopback_mb_per_s']:,.0f} / {limits.get('loopback_p2_mb_per_s', 0):,.0f} "
        f"/ {limits.get('loopback_bidir_mb_per_s', 0):,.0f} |",
        "",
        f"Throughput limit used for the ratios: min(disk write, {net_name}) = {limit_mb:,.0f} MB/s.",
        "",
    ]

base = reports.get("coremq")
lines += [
    "## Results",
    "",
    "Latencies in ms. MB/s is payload MiB/s (acked, over the measured window). "
    "\"of limit\" = MB/s ÷ the throughput limit above; \"coremq ×\" = coremq's msgs/s ÷ "
    "this system's; \"p99 ÷ coremq\" = this system's publish p99 ÷ coremq's.",
    "",
    "| system | result | msgs/s | MB/s | pub p50 | pub p99 | pub p99.9 | pub p99.99 | pub max "
    "| e2e p50 | e2e p99 | e2e max | broker RSS max MiB | CPU cores broker / perf | of limit | coremq × | p99 ÷ coremq |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]
for s in systems:
    r = reports[s]
    p, e = r["publish_latency_us"], r["e2e_latency_us"]
    rc = status.get(s)
    result = "PASS" if r.get("passed") and rc in (0, None) else "FAIL"
    if result == "FAIL" and r.get("failures"):
        result += ": " + "; ".join(r["failures"])[:120]
    rss = r.get("broker_rss_mb_max")
    cpu = " / ".join(
        f"{r[k]:.2f}" if r.get(k) is not None else "–"
        for k in ("broker_cpu_cores_avg", "perf_cpu_cores_avg")
    )
    lines.append(
        "| " + " | ".join([
            s,
            result,
            f"{r['publish_msgs_per_s']:,.0f}",
            f"{r['publish_mb_per_s']:,.1f}",
            ms(p["p50"]), ms(p["p99"]), ms(p["p999"]), ms(p["p9999"]), ms(p["max"]),
            ms(e["p50"]), ms(e["p99"]), ms(e["max"]),
            f"{rss:,.0f}" if rss is not None else "–",
            cpu,
            ratio(r["publish_mb_per_s"], limit_mb, "{:.1%}"),
            ratio(base["publish_msgs_per_s"], r["publish_msgs_per_s"]) if base else "–",
            ratio(p["p99"], base["publish_latency_us"]["p99"]) if base else "–",
        ]) + " |"
    )
lines.append("")
if first.get("open_loop") and limit_mb:
    lines.append(
        "Open loop at a fixed rate: \"of limit\" is the offered load over the limit, "
        "not the broker's capacity (for that, run closed loop: `-- --rate 0`)."
    )
    lines.append("")
if limits and w.get("flush") == "sync":
    lines.append(
        "Sync flush: publish p99 ÷ fio's fdatasync p99 (4 KiB): "
        + ", ".join(f"{s} {ratio(reports[s]['publish_latency_us']['p99'], limits['fdatasync_p99_us'])}" for s in systems)
    )
    lines.append("")
lines += ["![latency percentiles](latency.svg)", ""]
lines.append(
    "Files: " + ("limits.json, " if limits else "") + ", ".join(f"{s}.json" for s in systems)
    + ", the logs (*.log), latency.svg, latency.png."
)
print("\n".join(lines))
EOF
note "results in $out"
cat "$out/results.md"
