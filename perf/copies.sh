#!/usr/bin/env bash
# Counts how many times the broker copies each produced and each consumed
# byte in user space (issue 4, target 9).
#
# It attaches uprobes (perf probe, from Debian's linux-perf) to glibc's
# memcpy/memmove implementations in the broker process only, produces MB
# megabytes of 1 KiB messages with the CLI, then reads them all back, and
# divides the bytes those calls copied by the bytes moved. Copies the
# compiler inlines (fixed sizes below a few dozen bytes: frame headers,
# integers) are not seen; payload copies always go through memcpy.
#
# Usage: perf/copies.sh [--mb MB] [--compression CODEC]   (prints JSON)
set -euo pipefail

MB=64
CODEC=none
while [ $# -gt 0 ]; do
  case "$1" in
    --mb) MB="$2"; shift 2 ;;
    --compression) CODEC="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="$ROOT/target/release/coremq"
WORK="$(mktemp -d /tmp/coremq-copies.XXXXXX)"
BROKER_PID=""
PERF_PID=""

cleanup() {
  [ -n "$PERF_PID" ] && kill -INT "$PERF_PID" 2>/dev/null || true
  [ -n "$BROKER_PID" ] && kill "$BROKER_PID" 2>/dev/null || true
  perf probe -q -d 'probe_libc:cmq_*' >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

if ! command -v perf >/dev/null; then
  echo "installing linux-perf" >&2
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >&2
fi
(cd "$ROOT" && cargo build --release -q -p coremq)

# The broker's libc and the copy routines glibc may pick at run time (ifunc).
LIBC="$(ldd "$BIN" | awk '/libc.so.6/ {print $3}')"
perf probe -q -d 'probe_libc:cmq_*' >/dev/null 2>&1 || true
n=0
# memcpy's variants are aliases of memmove's (same address): probe memmove's
# only, or each call counts twice.
for sym in $(perf probe -x "$LIBC" -F --filter '*' 2>/dev/null | grep -E '^__memmove_[a-z0-9_]+$' | grep -v -E '_chk|ifunc'); do
  perf probe -q -x "$LIBC" --add "cmq_$n=$sym len=%dx:u64" >/dev/null 2>&1 && n=$((n + 1))
done
if [ "$n" = 0 ]; then
  echo "no memmove symbols found in $LIBC (is its debug info installed? libc6-dbg)" >&2
  exit 1
fi

"$BIN" serve --data-dir "$WORK/data" --listen 127.0.0.1:0 --shard-port-base 0 >"$WORK/broker.out" 2>"$WORK/broker.err" &
BROKER_PID=$!
for _ in $(seq 100); do
  ADDR="$(awk '/^listening on/ {print $3; exit}' "$WORK/broker.out")"
  [ -n "$ADDR" ] && break
  sleep 0.1
done
[ -n "${ADDR:-}" ] || { echo "broker did not start" >&2; cat "$WORK/broker.err" >&2; exit 1; }
"$BIN" topic create --broker "$ADDR" --queues 1 copies >/dev/null

COUNT=$((MB * 1024))
python3 -c "import sys; line=b'x'*1023+b'\n'; sys.stdout.buffer.write(line*$COUNT)" >"$WORK/input"
BYTES=$((COUNT * 1023))
# A copy this long or longer is counted as a payload copy (messages are 1 KiB).
PAYLOAD_COPY_MIN=1024

# Records every copy call of the broker while COMMAND runs; prints the bytes
# copied in all calls, and in calls of at least PAYLOAD_COPY_MIN bytes (the
# rest is the executor's own bookkeeping: timers, queues — per second, not
# per byte).
copied_while() {
  perf record -q -e 'probe_libc:cmq_*' -p "$BROKER_PID" -o "$WORK/perf.data" >/dev/null 2>&1 &
  PERF_PID=$!
  sleep 1
  "$@" >&2
  sleep 0.5
  kill -INT "$PERF_PID"
  wait "$PERF_PID" 2>/dev/null || true
  PERF_PID=""
  perf script -i "$WORK/perf.data" -F trace 2>/dev/null |
    python3 -c 'import re, sys
lens = [int(m, 0) for m in re.findall(r"len=(\S+)", sys.stdin.read())]
print(sum(lens), sum(n for n in lens if n >= int(sys.argv[1])))' "$PAYLOAD_COPY_MIN"
}

PRODUCED=$(copied_while "$BIN" produce --broker "$ADDR" --compression "$CODEC" copies <"$WORK/input")
CONSUMED=$(copied_while sh -c "'$BIN' consume --broker '$ADDR' --group copies --count $COUNT copies >/dev/null")

python3 - "$BYTES" "$CODEC" $PRODUCED $CONSUMED <<'EOF'
import json, sys
payload, codec = int(sys.argv[1]), sys.argv[2]
p_all, p_big, c_all, c_big = (int(x) for x in sys.argv[3:7])
per = lambda n: round(n / payload, 3)
print(json.dumps({
    "compression": codec,
    "payload_bytes": payload,
    "produce_copies_per_byte": per(p_big),
    "consume_copies_per_byte": per(c_big),
    "produce_copied_bytes_all_sizes": p_all,
    "consume_copied_bytes_all_sizes": c_all,
    "produce_copies_per_byte_all_sizes": per(p_all),
    "consume_copies_per_byte_all_sizes": per(c_all),
}, indent=2))
EOF
