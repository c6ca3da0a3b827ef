#!/usr/bin/env bash
# The machine's own limits, as JSON on stdout (notes on stderr), for the
# ratios of perf/compare.sh and docs/benchmarks.md:
#
#   disk_write_mb_per_s   sequential O_DIRECT writes, 1 MiB blocks, io_uring,
#                         into a fresh preallocated file (as the commit log
#                         writes its segments); stops at --size-mib or --seconds
#   disk_read_mb_per_s    sequential O_DIRECT reads of what was just written
#                         (never of unwritten extents, which cost no I/O)
#   fdatasync_p50_us, fdatasync_p99_us, fdatasync_p999_us, fdatasync_p9999_us
#                         fio's sync latency percentiles: an O_DIRECT 4 KiB
#                         append, then fdatasync, one at a time
#   fdatasync_64k_*       the same with 64 KiB writes
#   loopback_mb_per_s     iperf3, one TCP stream on 127.0.0.1
#   loopback_p2_mb_per_s  the same with two streams (informational)
#   loopback_bidir_mb_per_s
#                         iperf3 --bidir: a stream each way at once, half
#                         their sum (what each direction gets when shared
#                         fairly). A workload with consumers moves each byte
#                         in (produce) and out again (consume), so this, not
#                         one stream, is its network ceiling. Not the slower
#                         direction: iperf3 (3.12 here) serves both streams
#                         from one thread, and on a busy 2-core VM one
#                         direction starves (2,759 / 945 MB/s, 3,203 / 611)
#   loopback_bidir_fwd_mb_per_s, loopback_bidir_rev_mb_per_s
#                         the two directions of that run (informational)
#   loopback_rtt_p50_us, loopback_rtt_p99_us, loopback_rtt_p9999_us
#                         sockperf TCP ping-pong of 1 KiB messages on 127.0.0.1,
#                         full round trip (--full-rtt): the floor under any
#                         broker's produce-to-ack latency here
#
# MB is 2^20 bytes, the MB of coremq-perf's publish_mb_per_s (BYTES_PER_MB in
# perf/src/stats.rs, OpenMessaging Benchmark's convention), so the two divide
# without a factor.
#
# Usage: perf/limits.sh [--seconds S] [--size-mib N] [--iodepth N] [--settle-s S] [--no-install] [DIR]
#   DIR           a directory on the file system to measure (default ./data if
#                 it exists, else the current directory); test files go into a
#                 temporary directory inside it and are removed on exit
#   --seconds S   length of each measurement (default 5, env LIMITS_SECONDS):
#                 four disk measurements and three iperf3 runs, so at most
#                 7 x S plus the settle wait and setup (about 40 s by default)
#   --size-mib N  size of the bandwidth test file (default 2048, env
#                 LIMITS_SIZE_MIB)
#   --iodepth N   I/Os in flight in the bandwidth tests (default 4, env
#                 LIMITS_IODEPTH)
#   --settle-s S  longest wait for a quiet disk before measuring (default 20,
#                 env LIMITS_SETTLE_S; 0 = one probe, no wait)
#   --no-install  fail instead of installing fio and iperf3 with apt-get
#
# Needs fio, iperf3, sockperf (installed with apt-get when missing, as root)
# and python3.
set -euo pipefail

seconds="${LIMITS_SECONDS:-5}"
size_mib="${LIMITS_SIZE_MIB:-2048}"
iodepth="${LIMITS_IODEPTH:-4}"
settle_s="${LIMITS_SETTLE_S:-20}"
install=1
dir=""

usage() {
    sed -n '/^# Usage:/,/^# Needs/p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

while [[ $# -gt 0 ]]; do
    case "$1" in
    --seconds)
        seconds="${2:?--seconds needs a value}"
        shift 2
        ;;
    --size-mib)
        size_mib="${2:?--size-mib needs a value}"
        shift 2
        ;;
    --iodepth)
        iodepth="${2:?--iodepth needs a value}"
        shift 2
        ;;
    --settle-s)
        settle_s="${2:?--settle-s needs a value}"
        shift 2
        ;;
    --no-install)
        install=0
        shift
        ;;
    -h | --help) usage ;;
    -*)
        echo "limits.sh: unknown flag $1" >&2
        usage
        ;;
    *)
        [[ -z "$dir" ]] || usage
        dir="$1"
        shift
        ;;
    esac
done

[[ "$seconds" =~ ^[0-9]+$ && "$seconds" -ge 1 && "$seconds" -le 600 ]] ||
    {
        echo "limits.sh: --seconds must be a whole number from 1 to 600" >&2
        exit 2
    }
[[ "$size_mib" =~ ^[0-9]+$ && "$size_mib" -ge 16 ]] ||
    {
        echo "limits.sh: --size-mib must be a whole number, at least 16" >&2
        exit 2
    }
[[ "$settle_s" =~ ^[0-9]+$ && "$settle_s" -le 600 ]] ||
    {
        echo "limits.sh: --settle-s must be a whole number from 0 to 600" >&2
        exit 2
    }
[[ "$iodepth" =~ ^[0-9]+$ && "$iodepth" -ge 1 && "$iodepth" -le 256 ]] ||
    {
        echo "limits.sh: --iodepth must be a whole number from 1 to 256" >&2
        exit 2
    }
if [[ -z "$dir" ]]; then
    if [[ -d ./data ]]; then dir=./data; else dir=.; fi
fi
[[ -d "$dir" ]] || {
    echo "limits.sh: $dir is not a directory" >&2
    exit 2
}
dir="$(cd "$dir" && pwd)"

note() { echo "limits: $*" >&2; }

# --- tools -------------------------------------------------------------------

ensure_tools() {
    local missing=()
    command -v fio >/dev/null 2>&1 || missing+=(fio)
    command -v iperf3 >/dev/null 2>&1 || missing+=(iperf3)
    command -v sockperf >/dev/null 2>&1 || missing+=(sockperf)
    command -v python3 >/dev/null 2>&1 || {
        echo "limits.sh: python3 is needed to read fio's and iperf3's JSON" >&2
        exit 1
    }
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ $install -eq 0 || $EUID -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        echo "limits.sh: missing ${missing[*]}; install with: apt-get install ${missing[*]}" >&2
        exit 1
    fi
    note "installing ${missing[*]} with apt-get"
    # iperf3 asks whether to start a daemon at boot: answer no, never prompt.
    if command -v debconf-set-selections >/dev/null 2>&1; then
        echo "iperf3 iperf3/start_daemon boolean false" | debconf-set-selections 2>/dev/null || true
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null >&2; then
        apt-get update -q </dev/null >&2
        apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null >&2
    fi
}
ensure_tools

# --- scratch space and cleanup -----------------------------------------------

work="$(mktemp -d "$dir/.coremq-limits.XXXXXX")"
out="$(mktemp -d /tmp/coremq-limits-out.XXXXXX)"
iperf_pid=""
rtt_server=""
cleanup() {
    local pid
    for pid in "$iperf_pid" "$rtt_server"; do
        [[ -n "$pid" ]] || continue
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work" "$out"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fs_type="$(findmnt -n -o FSTYPE -T "$dir" 2>/dev/null || stat -f -c %T "$dir")"
fs_source="$(findmnt -n -o SOURCE -T "$dir" 2>/dev/null || echo unknown)"
note "measuring $dir ($fs_type on $fs_source), ${seconds}s per measurement"

# Wait (at most --settle-s) until the disk is quiet: 100 synchronous 4 KiB
# writes in under 100 ms in all, as perf/scripts/baseline.sh does, so earlier
# writeback or the discards of deleted files do not land in the figures.
settle_ms=-1
settle() {
    local probe="$work/probe" t0 i
    for ((i = 0; i <= settle_s; i++)); do
        t0=$(date +%s%N)
        dd if=/dev/zero of="$probe" bs=4k count=100 oflag=dsync conv=notrunc status=none
        settle_ms=$((($(date +%s%N) - t0) / 1000000))
        ((settle_ms < 100)) && break
        ((i < settle_s)) && sleep 1
    done
    rm -f "$probe"
    if ((settle_ms < 100)); then
        note "disk quiet: 100 x 4 KiB dsync writes in $settle_ms ms"
    else
        note "disk still busy after ${settle_s}s (100 x 4 KiB dsync writes took $settle_ms ms); measuring anyway"
    fi
}
settle

# --- fio -----------------------------------------------------------------------

# io_uring like the broker; fall back to libaio, then psync, where the kernel
# or fio lacks it. Every run below uses the engine that worked first.
engine=""
run_fio() { # output-file, fio args...
    local json="$1"
    shift
    local engines=(io_uring libaio psync)
    [[ -n "$engine" ]] && engines=("$engine")
    local e
    for e in "${engines[@]}"; do
        if fio --output-format=json --output="$json" --ioengine="$e" "$@" \
            >"$out/fio.log" 2>&1; then
            engine="$e"
            return 0
        fi
        note "fio with ioengine=$e failed: $(tail -n 3 "$out/fio.log" | tr '\n' ' ')"
    done
    echo "limits.sh: fio failed; does $fs_type on $dir support O_DIRECT?" >&2
    exit 1
}

common=(--direct=1 --group_reporting=1 --randrepeat=0 --invalidate=1)

# fdatasync after every write, one at a time (the broker's sync flush path:
# an O_DIRECT write into a preallocated segment, then fdatasync). Appending
# without looping, so each write lands in a block not yet written.
note "4 KiB O_DIRECT writes + fdatasync, ${seconds}s"
run_fio "$out/sync4k.json" --name=sync4k --filename="$work/sync4k" --rw=write \
    --bs=4k --iodepth=1 --size=1G --runtime="$seconds" --fdatasync=1 \
    --percentile_list=50:90:99:99.9:99.99 "${common[@]}"
rm -f "$work/sync4k"
note "64 KiB O_DIRECT writes + fdatasync, ${seconds}s"
run_fio "$out/sync64k.json" --name=sync64k --filename="$work/sync64k" --rw=write \
    --bs=64k --iodepth=1 --size=2G --runtime="$seconds" --fdatasync=1 \
    --percentile_list=50:90:99:99.9:99.99 "${common[@]}"
rm -f "$work/sync64k"

note "sequential write, 1 MiB blocks, iodepth $iodepth, up to $size_mib MiB or ${seconds}s"
run_fio "$out/write.json" --name=seqwrite --filename="$work/seq" --rw=write \
    --bs=1M --iodepth="$iodepth" --size="${size_mib}M" --runtime="$seconds" "${common[@]}"

# Read back only what was written (whole MiBs): reading a preallocated but
# unwritten extent returns zeros without touching the disk.
written_mib="$(python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))
print(j["jobs"][0]["write"]["io_bytes"] // 1048576)
' "$out/write.json")"
if [[ "$written_mib" -lt 16 ]]; then
    echo "limits.sh: only $written_mib MiB written in ${seconds}s; too little to read back" >&2
    exit 1
fi
note "sequential read of the $written_mib MiB written, 1 MiB blocks, iodepth $iodepth, ${seconds}s"
run_fio "$out/read.json" --name=seqread --filename="$work/seq" --rw=read \
    --bs=1M --iodepth="$iodepth" --size="${written_mib}M" --runtime="$seconds" \
    --time_based=1 "${common[@]}"
rm -f "$work/seq"

# --- iperf3 ----------------------------------------------------------------------

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Whether iperf3 wrote a result (iperf3 3.12 exits 0 even when it could not
# connect, with an "error" in its JSON).
iperf_ok() {
    python3 -c '
import json, sys
try:
    j = json.load(open(sys.argv[1]))
except ValueError:
    sys.exit(1)
sys.exit(0 if "error" not in j and j.get("end", {}).get("sum_received") else 1)
' "$1"
}

iperf() { # output-file, client args...
    local json="$1" port i
    shift
    port="$(free_port)"
    iperf3 --server --bind 127.0.0.1 --port "$port" --one-off >"$out/iperf-server.log" 2>&1 &
    iperf_pid=$!
    # Connect only once the server listens: a refused attempt is harmless, but
    # a connection that is not a test would use up the one-off server.
    for ((i = 0; i < 100; i++)); do
        if ! command -v ss >/dev/null 2>&1; then
            sleep 0.5
            break
        fi
        ss -Hltn "sport = :$port" 2>/dev/null | grep -q . && break
        kill -0 "$iperf_pid" 2>/dev/null || break
        sleep 0.05
    done
    if ! timeout -k 2 $((seconds + 20)) iperf3 --client 127.0.0.1 --port "$port" --json \
        --time "$seconds" "$@" >"$json" 2>"$out/iperf-client.log" || ! iperf_ok "$json"; then
        echo "limits.sh: iperf3 failed: $(cat "$out/iperf-client.log" "$out/iperf-server.log") $(grep -o '"error".*' "$json" || true)" >&2
        exit 1
    fi
    # The one-off server ends after its test; give it a moment, no more.
    for ((i = 0; i < 50; i++)); do
        kill -0 "$iperf_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill "$iperf_pid" 2>/dev/null || true
    wait "$iperf_pid" 2>/dev/null || true
    iperf_pid=""
}

note "loopback TCP, 1 stream, ${seconds}s"
iperf "$out/iperf1.json"
note "loopback TCP, 2 streams, ${seconds}s"
iperf "$out/iperf2.json" --parallel 2
note "loopback TCP, a stream each way at once, ${seconds}s"
iperf "$out/iperf-bidir.json" --bidir

note "loopback TCP round trip, 1 KiB ping-pong, ${seconds}s"
rtt_port="$(free_port)"
sockperf server --tcp -i 127.0.0.1 -p "$rtt_port" >"$out/sockperf-server.log" 2>&1 &
rtt_server=$!
sleep 0.5
timeout -k 2 $((seconds + 20)) sockperf ping-pong --tcp --full-rtt -i 127.0.0.1 -p "$rtt_port" -m 1024 \
    -t "$seconds" >"$out/sockperf.txt" 2>&1 || true
kill "$rtt_server" 2>/dev/null || true
wait "$rtt_server" 2>/dev/null || true
rtt_server=""

# --- the report ------------------------------------------------------------------

python3 - "$out" "$dir" "$fs_type" "$fs_source" "$engine" "$iodepth" "$seconds" "$settle_ms" <<'EOF'
import json, os, sys

out, dir_, fs_type, fs_source, engine, iodepth, seconds, settle_ms = sys.argv[1:9]
MB = 1 << 20  # coremq-perf's MB (perf/src/stats.rs BYTES_PER_MB)


def fio(name):
    with open(os.path.join(out, name + ".json")) as f:
        text = f.read()
    # fio may print notes before the JSON object.
    return json.loads(text[text.index("{"):])["jobs"][0]


def bw(job, ddir):
    # "bw_bytes" is bytes/s over the job's I/O time.
    return round(job[ddir]["bw_bytes"] / MB, 1)


def sync_pcts(job):
    # Latency of each fdatasync, in ns; fio names percentiles "99.900000".
    # fio's percentiles are bucket bounds, so a high one can exceed the max.
    lat = job["sync"]["lat_ns"]
    pct = lat.get("percentile") or {}
    def us(p):
        for k, v in pct.items():
            if abs(float(k) - p) < 1e-6:
                return round(min(v, lat["max"]) / 1000.0, 1)
        return None
    return {
        "p50": us(50), "p90": us(90), "p99": us(99), "p999": us(99.9), "p9999": us(99.99),
        "max": round(job["sync"]["lat_ns"]["max"] / 1000.0, 1),
        "count": job["sync"]["lat_ns"].get("N", 0),
    }


def rtt(p):
    # sockperf prints percentiles as "---> percentile 99.000 =   62.102" (µs).
    import re
    with open(os.path.join(out, "sockperf.txt")) as f:
        text = f.read()
    m = re.search(r"percentile %.3f =\s*([0-9.]+)" % p, text)
    return round(float(m.group(1)), 1) if m else None


def iperf(name, key="sum_received"):
    with open(os.path.join(out, name + ".json")) as f:
        j = json.load(f)
    if "error" in j:
        raise SystemExit("iperf3: " + j["error"])
    return round(j["end"][key]["bits_per_second"] / 8 / MB, 1)


w, r = fio("write"), fio("read")
s4, s64 = sync_pcts(fio("sync4k")), sync_pcts(fio("sync64k"))
report = {
    "disk_write_mb_per_s": bw(w, "write"),
    "disk_read_mb_per_s": bw(r, "read"),
    "fdatasync_p50_us": s4["p50"],
    "fdatasync_p99_us": s4["p99"],
    "fdatasync_p999_us": s4["p999"],
    "fdatasync_p9999_us": s4["p9999"],
    "fdatasync_max_us": s4["max"],
    "fdatasync_count": s4["count"],
    "fdatasync_64k_p50_us": s64["p50"],
    "fdatasync_64k_p99_us": s64["p99"],
    "fdatasync_64k_p999_us": s64["p999"],
    "fdatasync_64k_max_us": s64["max"],
    "fdatasync_64k_count": s64["count"],
    "loopback_mb_per_s": iperf("iperf1"),
    "loopback_p2_mb_per_s": iperf("iperf2"),
    "loopback_bidir_mb_per_s": round(
        (iperf("iperf-bidir") + iperf("iperf-bidir", "sum_received_bidir_reverse")) / 2, 1
    ),
    "loopback_bidir_fwd_mb_per_s": iperf("iperf-bidir"),
    "loopback_bidir_rev_mb_per_s": iperf("iperf-bidir", "sum_received_bidir_reverse"),
    "loopback_rtt_p50_us": rtt(50),
    "loopback_rtt_p99_us": rtt(99),
    "loopback_rtt_p9999_us": rtt(99.99),
    "mb_bytes": MB,
    "dir": dir_,
    "filesystem": fs_type,
    "device": fs_source,
    "fio_ioengine": engine,
    "fio_iodepth": int(iodepth),
    "disk_written_mib": w["write"]["io_bytes"] // MB,
    "seconds_per_test": int(seconds),
    # Time of 100 x 4 KiB dsync writes just before the disk tests (< 100: quiet).
    "disk_settle_probe_ms": int(settle_ms),
    "nproc": os.cpu_count(),
    "loadavg_1m": float(open("/proc/loadavg").read().split()[0]),
}
print(json.dumps(report, indent=2))
EOF
