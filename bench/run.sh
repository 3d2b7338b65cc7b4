#!/usr/bin/env bash
# The backbone benchmarks in one command: Patchbay's ingress, end-to-end delivery, backlog RSS and
# kill -9 probe, then (unless --no-peers) n8n and Node-RED through the shared harness in the same
# run, and a summary table with the ratios and the floors.
#
# Usage: bench/run.sh [--no-peers] [--quick] [--profile]
#   --quick    REPS=1 DURATION=10 FAULT_REPS=1 BACKLOG_TARGETS=10000,25000 (a smoke run, ~5 min)
#   --profile  also sample the hub with py-spy during one extra c64 run (pip install py-spy)
# Env (defaults): REPS=3 DURATION=20 CONCURRENCIES="16 64" WARMUP=5 PB_MAX_CONCURRENCY=32
#   AUTH_DURATION=10  FAULT_REPS=3 FAULT_DURATION=40 FAULT_KILL_AT=10
#   BACKLOG_TARGETS=10000,25000,50000,100000  BACKLOG_DRAIN=1
#   PEERS="node-red n8n" PEER_FAULT_REPS=1 OPEN_RATE=200 (open-loop ack latency, requests/s)
#   PEER_MODE=interleave (default: each repetition runs Patchbay, then each peer, at each concurrency,
#     with the harness's peer.sh/load.py, so drifting background load hits all alike) | run_all (the
#     harness's own run_all.sh after the Patchbay benches; PEER_REPS/PEER_DURATION apply)
#   OUT_DIR=${PB_RUN_DIR:-/tmp/patchbay-bench}/results-<timestamp>  HARNESS_DIR=/work/shared/bench/webhook
# Loopback only; every load run is bounded in time; only processes started here are stopped (by PID).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
PEERS_ON=1 PROFILE=0
for arg in "$@"; do
  case $arg in
    --no-peers) PEERS_ON=0 ;;
    --quick) REPS=${REPS:-1} DURATION=${DURATION:-10} FAULT_REPS=${FAULT_REPS:-1}
             BACKLOG_TARGETS=${BACKLOG_TARGETS:-10000,25000} ;;
    --profile) PROFILE=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "unknown option $arg (try --help)" >&2; exit 2 ;;
  esac
done
: "${HARNESS_DIR:=/work/shared/bench/webhook}"
: "${PB_RUN_DIR:=${TMPDIR:-/tmp}/patchbay-bench}"
REPS=${REPS:-3} DURATION=${DURATION:-20} CONCURRENCIES=${CONCURRENCIES:-"16 64"} WARMUP=${WARMUP:-5}
AUTH_DURATION=${AUTH_DURATION:-10}
FAULT_REPS=${FAULT_REPS:-3} FAULT_DURATION=${FAULT_DURATION:-40} FAULT_KILL_AT=${FAULT_KILL_AT:-10}
BACKLOG_TARGETS=${BACKLOG_TARGETS:-10000,25000,50000,100000} BACKLOG_DRAIN=${BACKLOG_DRAIN:-1}
PEERS=${PEERS:-"node-red n8n"} PEER_REPS=${PEER_REPS:-$REPS} PEER_DURATION=${PEER_DURATION:-$DURATION}
PEER_FAULT_REPS=${PEER_FAULT_REPS:-1} PEER_MODE=${PEER_MODE:-interleave} OPEN_RATE=${OPEN_RATE:-200}
export PB_RUN_DIR HARNESS_DIR PB_MAX_CONCURRENCY=${PB_MAX_CONCURRENCY:-32}
: "${PB_PORT:=18787}" "${PB_DENY_PORT:=18081}" "${SINK_PORT:=18080}"
export PB_PORT PB_DENY_PORT SINK_PORT
OUT_DIR=${OUT_DIR:-$PB_RUN_DIR/results-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT_DIR" "$PB_RUN_DIR"
PY="$REPO/.venv/bin/python"
PEER="$HERE/patchbay_peer.sh"
SINK="http://127.0.0.1:$SINK_PORT"
URL="http://127.0.0.1:$PB_PORT"
STORE="$PB_RUN_DIR/project/.patchbay/patchbay.db"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT_DIR/run.log"; }
pid_of() { cat "$PB_RUN_DIR/$1.pid"; }
stop_pid() {  # stop_pid NAME: SIGTERM the PID in $PB_RUN_DIR/NAME.pid, SIGKILL after 10 s
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
ACTIVE_PEERS=()
cleanup() {
  "$PEER" stop || true
  for p in "${ACTIVE_PEERS[@]}"; do "$HARNESS_DIR/peer.sh" "$p" stop || true; done
  stop_pid deny; stop_pid sink
}
trap cleanup EXIT

{ echo "date: $(date -Is)"; echo "host: $(uname -srm)"; echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs) x $(nproc)"
  echo "mem: $(free -g | awk '/Mem:/{print $2" GiB"}')"; echo "python: $("$PY" --version 2>&1)"
  echo "patchbay: $("$REPO/.venv/bin/patchbay" --version 2>&1 | tail -1) (git $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo ?)$(git -C "$REPO" diff --quiet 2>/dev/null || echo ', dirty tree'))"
  echo "aiohttp: $("$PY" -c 'import aiohttp; print(aiohttp.__version__)'), uvloop: $("$PY" -c 'import uvloop; print(uvloop.__version__)' 2>/dev/null || echo no)"
  echo "sqlite: $("$PY" -c 'import sqlite3; print(sqlite3.sqlite_version)')"
  echo "wrk: $(if command -v wrk > /dev/null; then wrk -v 2>&1 | head -1; else echo 'not installed: load.py falls back to its py engine'; fi)"
  echo "node: $(node --version 2>/dev/null || echo n/a)"
  echo "max_concurrency: $PB_MAX_CONCURRENCY; reps $REPS x ${DURATION}s at c=$CONCURRENCIES"
} > "$OUT_DIR/env.txt"
cat "$OUT_DIR/env.txt"

# ---------------------------------------------------------------- sinks + hub
stop_pid sink
nohup python3 "$HARNESS_DIR/sink.py" --host 127.0.0.1 --port "$SINK_PORT" > "$PB_RUN_DIR/sink.log" 2>&1 &
echo $! > "$PB_RUN_DIR/sink.pid"
stop_pid deny
nohup "$PY" "$HERE/deny_sink.py" --port "$PB_DENY_PORT" > "$PB_RUN_DIR/deny.log" 2>&1 &
echo $! > "$PB_RUN_DIR/deny.pid"
for _ in $(seq 100); do curl -sf -o /dev/null -m 1 "$SINK/stats" && curl -sf -o /dev/null -m 1 "http://127.0.0.1:$PB_DENY_PORT/_stats" && break; sleep 0.1; done
SINK_PID=$(pid_of sink)

fresh_hub() {
  "$PEER" setup | tee -a "$OUT_DIR/run.log"
  "$PEER" start | tee -a "$OUT_DIR/run.log"
  sleep 3
}
fresh_hub
HUB=$(pid_of patchbay)
idle=$("$PY" -c "import sys; sys.path.insert(0,'$HARNESS_DIR'); import load; p=$HUB; print(round(sum(load._rss_kb(x) for x in [p]+load._children(p))/1024,1))")  # before any peer starts
echo "{\"tag\":\"patchbay\",\"idle_tree_rss_mb\":$idle}" > "$OUT_DIR/patchbay-idle.json"
log "patchbay idle RSS ${idle} MB"
python3 "$HARNESS_DIR/load.py" --url "$URL/hook/lead" -c 16 -d "$WARMUP" --label warmup > /dev/null

short() { python3 -c "
import json,sys; d=json.load(open(sys.argv[1]))
print(' '.join(f'{k}={d[k]}' for k in sys.argv[2:] if k in d))" "$@"; }

tree_rss() { "$PY" -c "import sys; sys.path.insert(0,'$HARNESS_DIR'); import load; p=$1; print(round(sum(load._rss_kb(x) for x in [p]+load._children(p))/1024,1))"; }

# ---------------------------------------------------------------- peers up (interleaved mode)
PEERS_DIR=${PEERS_DIR:-$HOME/.cache/peers}
if [[ $PEERS_ON == 1 && $PEER_MODE == interleave ]]; then
  mkdir -p "$OUT_DIR/peers"
  for p in $PEERS; do
    case $p in node-red) probe=$PEERS_DIR/node-red/node_modules ;; n8n) probe=$PEERS_DIR/n8n/node_modules/n8n ;; *) probe=/nonexistent ;; esac
    if [[ ! -d $probe ]]; then log "peer $p skipped: not installed ($HARNESS_DIR/install.sh)"; continue; fi
    log "peer $p: setup + start (harness peer.sh)"
    "$HARNESS_DIR/peer.sh" "$p" setup sync >> "$OUT_DIR/peers.log" 2>&1
    "$HARNESS_DIR/peer.sh" "$p" start | tee -a "$OUT_DIR/run.log"
    ACTIVE_PEERS+=("$p")
    sleep 3
    ppid_=$(cat "$("$HARNESS_DIR/peer.sh" "$p" pidfile)")
    echo "{\"tag\":\"$p\",\"idle_tree_rss_mb\":$(tree_rss "$ppid_")}" > "$OUT_DIR/peers/$p-idle.json"
    log "peer $p idle RSS $(tree_rss "$ppid_") MB"
    python3 "$HARNESS_DIR/load.py" --url "$("$HARNESS_DIR/peer.sh" "$p" url)" -c 16 -d "$WARMUP" --label "$p warmup" > /dev/null
  done
fi

# ---------------------------------------------------------------- end to end (wrk, harness load.py), peers interleaved
for rep in $(seq "$REPS"); do
  for c in $CONCURRENCIES; do
    log "e2e c=$c rep=$rep (${DURATION}s + drain)"
    "$PY" "$HERE/e2e.py" --url "$URL/hook/lead" --flow lead --store "$STORE" --hub-pid "$(pid_of patchbay)" \
      --sink "$SINK" --sink-pid "$SINK_PID" -c "$c" -d "$DURATION" --label "patchbay e2e c$c r$rep" \
      --out "$OUT_DIR/patchbay-e2e-c$c-r$rep.json" > /dev/null
    short "$OUT_DIR/patchbay-e2e-c$c-r$rep.json" ack_rps accepted_per_s delivered_per_s_during_load backlog_at_end \
      sustained_delivered_per_s hub_cpu_ms_per_event ack_ms e2e_ms | tee -a "$OUT_DIR/run.log"
    for p in "${ACTIVE_PEERS[@]}"; do
      log "$p c=$c rep=$rep (${DURATION}s)"
      python3 "$HARNESS_DIR/load.py" --url "$("$HARNESS_DIR/peer.sh" "$p" url)" -c "$c" -d "$DURATION" \
        --watch-pid "$(cat "$("$HARNESS_DIR/peer.sh" "$p" pidfile)")" --sink "$SINK" --sink-pid "$SINK_PID" \
        --label "$p c$c r$rep" --out "$OUT_DIR/peers/$p-load-c$c-r$rep.json" > /dev/null
      short "$OUT_DIR/peers/$p-load-c$c-r$rep.json" rps_ok latency_ms sink_minus_ok | tee -a "$OUT_DIR/run.log"
    done
  done
done

# ---------------------------------------------------------------- open loop: ack latency at a fixed offered rate, c64
log "open loop: ${OPEN_RATE}/s over 64 connections, ${DURATION}s (bench/drive.py)"
"$PY" "$HERE/e2e.py" --engine drive --rate "$OPEN_RATE" --url "$URL/hook/lead" --flow lead --store "$STORE" \
  --hub-pid "$(pid_of patchbay)" --sink "$SINK" --sink-pid "$SINK_PID" -c 64 -d "$DURATION" \
  --label "patchbay open loop" --out "$OUT_DIR/patchbay-open-c64.json" > /dev/null
short "$OUT_DIR/patchbay-open-c64.json" ack_rps ack_ms e2e_ms backlog_at_end | tee -a "$OUT_DIR/run.log"
for p in "${ACTIVE_PEERS[@]}"; do
  [[ $p == node-red ]] || continue  # n8n cannot take this rate (tens of requests/s)
  "$PY" "$HERE/drive.py" --rate "$OPEN_RATE" --url "$("$HARNESS_DIR/peer.sh" "$p" url)" -c 64 -d "$DURATION" \
    --watch-pid "$(cat "$("$HARNESS_DIR/peer.sh" "$p" pidfile)")" --label "$p open loop" \
    --out "$OUT_DIR/peers/$p-open-c64.json" > /dev/null
  short "$OUT_DIR/peers/$p-open-c64.json" rps_ok latency_ms | tee -a "$OUT_DIR/run.log"
done

# ---------------------------------------------------------------- peers' kill -9 probes, then peers down
for p in "${ACTIVE_PEERS[@]}"; do
  for rep in $(seq "$PEER_FAULT_REPS"); do
    log "$p fault rep=$rep"
    python3 "$HARNESS_DIR/fault.py" --url "$("$HARNESS_DIR/peer.sh" "$p" url)" --sink "$SINK" \
      --pidfile "$("$HARNESS_DIR/peer.sh" "$p" pidfile)" --restart-cmd "'$HARNESS_DIR/peer.sh' $p start" \
      -c 16 -d "$FAULT_DURATION" --kill-at "$FAULT_KILL_AT" --label "$p fault r$rep" \
      --out "$OUT_DIR/peers/$p-sync-fault-r$rep.json" > /dev/null
    short "$OUT_DIR/peers/$p-sync-fault-r$rep.json" ok_2xx_3xx accepted_not_delivered sink_duplicates outage_s | tee -a "$OUT_DIR/run.log"
  done
  "$HARNESS_DIR/peer.sh" "$p" stop
done
ACTIVE_PEERS=()

# ---------------------------------------------------------------- auth cost: same driver, unsigned vs signed
for c in $CONCURRENCIES; do
  for v in unsigned signed; do
    if [[ $v == signed ]]; then path=/hook/lead-signed flow=lead_signed sign=(--sign-secret-file "$PB_RUN_DIR/whsec")
    else path=/hook/lead flow=lead sign=(); fi
    log "auth $v c=$c (${AUTH_DURATION}s, bench/drive.py)"
    "$PY" "$HERE/e2e.py" --engine drive "${sign[@]}" --url "$URL$path" --flow "$flow" --store "$STORE" \
      --hub-pid "$(pid_of patchbay)" --sink "$SINK" --sink-pid "$SINK_PID" -c "$c" -d "$AUTH_DURATION" \
      --label "patchbay $v c$c" --out "$OUT_DIR/patchbay-auth-$v-c$c.json" > /dev/null
    short "$OUT_DIR/patchbay-auth-$v-c$c.json" ack_rps ack_ms e2e_ms sustained_delivered_per_s | tee -a "$OUT_DIR/run.log"
  done
done

# ---------------------------------------------------------------- ingress alone: destination paused (401)
for rep in $(seq "$REPS"); do
  for c in $CONCURRENCIES; do
    log "ingress (destination paused) c=$c rep=$rep"
    python3 "$HARNESS_DIR/load.py" --url "$URL/hook/lead-backlog" -c "$c" -d "$DURATION" \
      --watch-pid "$(pid_of patchbay)" --sink-pid "$SINK_PID" --label "patchbay ingress c$c r$rep" \
      --out "$OUT_DIR/patchbay-ingress-c$c-r$rep.json" > /dev/null
    short "$OUT_DIR/patchbay-ingress-c$c-r$rep.json" rps_ok latency_ms | tee -a "$OUT_DIR/run.log"
  done
done

# ---------------------------------------------------------------- profile (optional)
if [[ $PROFILE == 1 ]]; then
  if [[ -x $REPO/.venv/bin/py-spy ]]; then
    log "profile: py-spy on the hub during a c64 e2e run"
    "$REPO/.venv/bin/py-spy" record --pid "$(pid_of patchbay)" --duration "$((DURATION + 5))" --rate 200 \
      --format raw --threads --output "$OUT_DIR/profile-c64.txt" --nonblocking > "$OUT_DIR/profile.log" 2>&1 &
    spy=$!
    "$PY" "$HERE/e2e.py" --url "$URL/hook/lead" --store "$STORE" --hub-pid "$(pid_of patchbay)" --sink "$SINK" \
      -c 64 -d "$DURATION" --label "profiled c64" --out "$OUT_DIR/profiled-e2e-c64.json" > /dev/null
    wait "$spy" || true
    "$PY" "$HERE/hotspots.py" "$OUT_DIR/profile-c64.txt" | tee "$OUT_DIR/hotspots.txt"
  else
    log "profile skipped: $REPO/.venv/bin/pip install py-spy"
  fi
fi

# ---------------------------------------------------------------- kill -9 probe (harness fault.py)
for rep in $(seq "$FAULT_REPS"); do
  log "fault rep=$rep: kill -9 at ${FAULT_KILL_AT}s of ${FAULT_DURATION}s, c16"
  python3 "$HARNESS_DIR/fault.py" --url "$URL/hook/lead" --sink "$SINK" --pidfile "$("$PEER" pidfile)" \
    --restart-cmd "'$PEER' start" -c 16 -d "$FAULT_DURATION" --kill-at "$FAULT_KILL_AT" \
    --label "patchbay fault r$rep" --out "$OUT_DIR/patchbay-fault-r$rep.json" | tail -1 > /dev/null
  curl -s "$SINK/stats" > "$OUT_DIR/patchbay-fault-r$rep.sink.json"
  short "$OUT_DIR/patchbay-fault-r$rep.json" ok_2xx_3xx accepted_not_delivered sink_duplicates outage_s | tee -a "$OUT_DIR/run.log"
  log " sink: $(cat "$OUT_DIR/patchbay-fault-r$rep.sink.json")"
done

# ---------------------------------------------------------------- backlog RSS (fresh store)
log "backlog: fresh hub, destination answers 401, targets $BACKLOG_TARGETS"
fresh_hub
drain=(); [[ $BACKLOG_DRAIN == 1 ]] && drain=(--drain)
"$PY" "$HERE/backlog_rss.py" --url "$URL/hook/lead-backlog" --hub-pid "$(pid_of patchbay)" --store "$STORE" \
  --project "$("$PEER" project)" --deny "http://127.0.0.1:$PB_DENY_PORT" --targets "$BACKLOG_TARGETS" \
  "${drain[@]}" --out "$OUT_DIR/patchbay-backlog.json" 2>&1 | tee -a "$OUT_DIR/run.log" > /dev/null
"$PEER" stop
stop_pid deny
stop_pid sink  # run_all.sh starts its own sink on the same port

# ---------------------------------------------------------------- peers through run_all.sh (PEER_MODE=run_all)
if [[ $PEERS_ON == 1 && $PEER_MODE == run_all ]]; then
  if [[ -d $PEERS_DIR/node-red/node_modules ]]; then
    log "peers: $PEERS via $HARNESS_DIR/run_all.sh (reps $PEER_REPS x ${PEER_DURATION}s)"
    # shellcheck disable=SC2086
    REPS=$PEER_REPS DURATION=$PEER_DURATION CONCURRENCIES="$CONCURRENCIES" WARMUP=$WARMUP \
      FAULT_REPS=$PEER_FAULT_REPS ACK_FAULT=0 N8N_NOSAVE=0 NR_KEEPALIVE=0 SINK_BASELINE=0 \
      OUT_DIR="$OUT_DIR/peers" timeout 3600 "$HARNESS_DIR/run_all.sh" $PEERS > "$OUT_DIR/peers.log" 2>&1 \
      || log "peers: run_all.sh failed (rc $?); see $OUT_DIR/peers.log"
  else
    log "peers skipped: not installed; run $HARNESS_DIR/install.sh once (~6 min, 2.3 GB outside the repo)"
  fi
fi

"$PY" "$HERE/summarize.py" "$OUT_DIR" | tee "$OUT_DIR/summary.md"
log "results: $OUT_DIR (summary.md)"
