#!/usr/bin/env bash
# Patchbay alone, several checkouts interleaved on the same machine: the same bench project
# (bench/patchbay_peer.sh), a fresh store and hub per checkout and repetition, then e2e runs
# (bench/e2e.py, wrk through the harness's load.py) at each concurrency and, optionally, ingress
# alone (destination paused). The order of the checkouts rotates every repetition, so background
# load that drifts over the run hits all of them alike. Prints medians [min-max] per checkout.
#
# Usage: bench/versions.sh LABEL=DIR [LABEL=DIR ...]
#   e.g. bench/versions.sh old=/work/wt/hp-old new=/work/main
#   each DIR is a checkout with its own .venv (./scripts/setup); bench/ scripts come from this one.
# Env (defaults): REPS=3 DURATION=15 CONCURRENCIES="16 64" INGRESS=1 (also load.py on the paused
#   flow at c64) PB_MAX_CONCURRENCY=32 PB_PORT=28787 SINK_PORT=28080 PB_DENY_PORT=28081
#   OUT_DIR=${PB_RUN_DIR:-/tmp/patchbay-versions}/results-<timestamp>
# Loopback only; every load run is bounded in time; only processes started here are stopped (by PID).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
[[ $# -ge 1 && $1 != -h && $1 != --help ]] || { sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0; }
: "${HARNESS_DIR:=/work/shared/bench/webhook}"
: "${PB_RUN_DIR:=${TMPDIR:-/tmp}/patchbay-versions}"
REPS=${REPS:-3} DURATION=${DURATION:-15} CONCURRENCIES=${CONCURRENCIES:-"16 64"} INGRESS=${INGRESS:-1}
: "${PB_PORT:=28787}" "${PB_DENY_PORT:=28081}" "${SINK_PORT:=28080}" "${PB_MAX_CONCURRENCY:=32}"
export PB_RUN_DIR HARNESS_DIR PB_PORT PB_DENY_PORT SINK_PORT PB_MAX_CONCURRENCY
OUT_DIR=${OUT_DIR:-$PB_RUN_DIR/results-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT_DIR" "$PB_RUN_DIR"
PY="$REPO/.venv/bin/python"
PEER="$HERE/patchbay_peer.sh"
SINK="http://127.0.0.1:$SINK_PORT"
URL="http://127.0.0.1:$PB_PORT"
STORE="$PB_RUN_DIR/project/.patchbay/patchbay.db"
LABELS=() DIRS=()
for a in "$@"; do LABELS+=("${a%%=*}"); DIRS+=("$(cd "${a#*=}" && pwd)"); done
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT_DIR/run.log"; }
stop_pid() {
  local f="$PB_RUN_DIR/$1.pid" p
  [[ -s $f ]] || return 0
  p=$(cat "$f")
  if kill -0 "$p" 2>/dev/null; then
    kill "$p" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$p" 2>/dev/null && kill -9 "$p" 2>/dev/null || true
  fi
  rm -f "$f"
}
cleanup() { "$PEER" stop || true; stop_pid deny; stop_pid sink; }
trap cleanup EXIT

{ echo "date: $(date -Is)"; echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs) x $(nproc)"
  for i in "${!LABELS[@]}"; do
    echo "${LABELS[$i]}: ${DIRS[$i]} git $(git -C "${DIRS[$i]}" rev-parse --short HEAD)$(git -C "${DIRS[$i]}" diff --quiet || echo ' (dirty)')"
  done
  echo "reps $REPS x ${DURATION}s at c=$CONCURRENCIES, ingress=$INGRESS, max_concurrency $PB_MAX_CONCURRENCY"
} | tee "$OUT_DIR/env.txt"

stop_pid sink
nohup python3 "$HARNESS_DIR/sink.py" --host 127.0.0.1 --port "$SINK_PORT" > "$PB_RUN_DIR/sink.log" 2>&1 &
echo $! > "$PB_RUN_DIR/sink.pid"
stop_pid deny
nohup "$PY" "$HERE/deny_sink.py" --port "$PB_DENY_PORT" > "$PB_RUN_DIR/deny.log" 2>&1 &
echo $! > "$PB_RUN_DIR/deny.pid"
sleep 1
SINK_PID=$(cat "$PB_RUN_DIR/sink.pid")
n=${#LABELS[@]}
for rep in $(seq "$REPS"); do
  for k in $(seq 0 $((n - 1))); do
    i=$(( (k + rep - 1) % n ))   # rotate the order each repetition
    label=${LABELS[$i]}
    export PB_REPO=${DIRS[$i]}
    "$PEER" setup > /dev/null
    "$PEER" start > /dev/null
    hub=$(cat "$PB_RUN_DIR/patchbay.pid")
    # warm-up: a few seconds of load, not counted
    python3 "$HARNESS_DIR/load.py" --url "$URL/hook/lead" -c 16 -d 3 --out /dev/null > /dev/null 2>&1 || true
    sleep 2
    for c in $CONCURRENCIES; do
      log "$label rep=$rep e2e c=$c (load $(cut -d' ' -f1-3 /proc/loadavg))"
      cut -d' ' -f1 /proc/loadavg > "$OUT_DIR/$label-e2e-c$c-r$rep.load"
      "$PY" "$HERE/e2e.py" --url "$URL/hook/lead" --flow lead --store "$STORE" --hub-pid "$hub" \
        --sink "$SINK" --sink-pid "$SINK_PID" -c "$c" -d "$DURATION" --label "$label e2e c$c r$rep" \
        --out "$OUT_DIR/$label-e2e-c$c-r$rep.json" > /dev/null
    done
    if [[ $INGRESS == 1 ]]; then
      log "$label rep=$rep ingress c=64 (load $(cut -d' ' -f1-3 /proc/loadavg))"
      python3 "$HARNESS_DIR/load.py" --url "$URL/hook/lead-backlog" -c 64 -d "$DURATION" \
        --watch-pid "$hub" --sink-pid "$SINK_PID" --label "$label ingress c64 r$rep" \
        --out "$OUT_DIR/$label-ingress-c64-r$rep.json" > /dev/null
    fi
    "$PEER" stop
  done
done
"$PY" "$HERE/versions_summary.py" "$OUT_DIR" "${LABELS[@]}" | tee "$OUT_DIR/summary.md"
