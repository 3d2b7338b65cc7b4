#!/usr/bin/env bash
# Pick the destination's max_concurrency: a fresh hub per value, one e2e run each at c64.
# Usage: bench/tune.sh   Env: VALUES="16 32 64" DURATION=15 CONC=64 PB_RUN_DIR=... HARNESS_DIR=...
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="$HERE/../.venv/bin/python"
: "${HARNESS_DIR:=/work/shared/bench/webhook}" "${PB_RUN_DIR:=${TMPDIR:-/tmp}/patchbay-bench}"
: "${VALUES:=16 32 64}" "${DURATION:=15}" "${CONC:=64}" "${SINK_PORT:=18080}"
export PB_RUN_DIR
OUT=${OUT_DIR:-$PB_RUN_DIR/tune-$(date +%Y%m%d-%H%M%S)}; mkdir -p "$OUT"
nohup python3 "$HARNESS_DIR/sink.py" --port "$SINK_PORT" > "$PB_RUN_DIR/sink.log" 2>&1 &
echo $! > "$PB_RUN_DIR/sink.pid"
trap '"$HERE/patchbay_peer.sh" stop; kill "$(cat "$PB_RUN_DIR/sink.pid")" 2>/dev/null || true' EXIT
sleep 0.5
for mc in $VALUES; do
  PB_MAX_CONCURRENCY=$mc "$HERE/patchbay_peer.sh" setup > /dev/null
  PB_MAX_CONCURRENCY=$mc "$HERE/patchbay_peer.sh" start > /dev/null
  sleep 2
  python3 "$HARNESS_DIR/load.py" --url "http://127.0.0.1:${PB_PORT:-18787}/hook/lead" -c 16 -d 3 > /dev/null
  "$PY" "$HERE/e2e.py" --url "http://127.0.0.1:${PB_PORT:-18787}/hook/lead" --store "$PB_RUN_DIR/project/.patchbay/patchbay.db" \
    --hub-pid "$(cat "$PB_RUN_DIR/patchbay.pid")" --sink-pid "$(cat "$PB_RUN_DIR/sink.pid")" -c "$CONC" -d "$DURATION" \
    --label "max_concurrency $mc" --out "$OUT/tune-mc$mc.json" > /dev/null
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(f\"max_concurrency {sys.argv[2]:>3}: accepted/s {d['accepted_per_s']:.0f}  delivered/s in load {d['delivered_per_s_during_load']:.0f}  sustained {d['sustained_delivered_per_s']:.0f}  backlog {d['backlog_at_end']}  ack p99 {d['ack_ms']['p99']:.0f} ms  other cores {d['cpu']['other_cores']}\")" "$OUT/tune-mc$mc.json" "$mc" | tee -a "$OUT/tune.txt"
  "$HERE/patchbay_peer.sh" stop
done
