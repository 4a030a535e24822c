#!/usr/bin/env bash
# What retraining costs serving: Score latency at a fixed open-loop rate with the server
# idle, then with ModelAdmin/Retrain running back to back for the whole measurement.
#
#   cargo build --release --workspace && scripts/retrain_cost.sh
#
# Settings (environment): RATE (requests/s, default 5000), DURATION (default 30s), DAYS of
# simulated history in the journal (default 60), ACCOUNTS (default 5000), and any extra
# serve flags in SERVE_ARGS (e.g. "--retrain-rows 400000"). Needs grpcurl and python3.
set -euo pipefail

BIN=${BIN:-target/release/fraudgate}
LOADTEST=${LOADTEST:-target/release/loadtest}
RATE=${RATE:-5000}
DURATION=${DURATION:-30s}
DAYS=${DAYS:-60}
ACCOUNTS=${ACCOUNTS:-5000}
ADDR=127.0.0.1:${PORT:-50071}
SERVE_ARGS=${SERVE_ARGS:-}

work=$(mktemp -d)
server=
cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

echo "simulating $DAYS days of $ACCOUNTS accounts" >&2
"$BIN" simulate --output "$work/sim.csv" --accounts "$ACCOUNTS" --days "$DAYS" >&2
# shellcheck disable=SC2086 # SERVE_ARGS is a list of flags
"$BIN" serve --listen "$ADDR" --metrics-listen 127.0.0.1:0 --data-dir "$work/data" \
    --retrain-maturity 7d $SERVE_ARGS 2>"$work/server.log" &
server=$!
for _ in $(seq 100); do
    grpcurl -plaintext "$ADDR" grpc.health.v1.Health/Check >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
    sleep 0.2
done

echo "filling the journal: replaying the history with labels 7 days late" >&2
"$BIN" replay --input "$work/sim.csv" --server "http://$ADDR" --label-delay 7d \
    --output "$work/replay" 2>/dev/null

retrain() {
    grpcurl -plaintext -d '{"promote_if_better": false}' "$ADDR" \
        fraudgate.v1.ModelAdmin/Retrain >>"$work/retrain.out" 2>&1
}

echo "measuring idle: $RATE/s for $DURATION" >&2
"$LOADTEST" run --target "http://$ADDR" --rate "$RATE" --duration "$DURATION" \
    --json "$work/idle.json" >/dev/null

echo "measuring during retraining: $RATE/s for $DURATION" >&2
start=$(date +%s.%N)
retrain # once on its own, to time it
alone=$(python3 -c "import time; print(round(time.time() - $start, 1))")
"$LOADTEST" run --target "http://$ADDR" --rate "$RATE" --duration "$DURATION" \
    --json "$work/busy.json" >/dev/null &
load=$!
rounds=0
busy_start=$(date +%s.%N)
while kill -0 "$load" 2>/dev/null; do
    retrain
    rounds=$((rounds + 1))
done
wait "$load"
busy=$(python3 -c "import time; print(round((time.time() - $busy_start) / $rounds, 1))")

python3 - "$work" "$alone" "$busy" "$rounds" <<'EOF'
import json, re, sys
work, alone, busy, rounds = sys.argv[1:]
fitted = re.findall(r'"fittedRows": "(\d+)"', open(f"{work}/retrain.out").read())
print(f"retraining: {alone} s with the server idle, {busy} s on average under load "
      f"({rounds} rounds), fitted on {fitted[-1] if fitted else '?'} rows")
print("| Score latency (us) | throughput | p50 | p90 | p99 | p99.9 | max | errors |")
print("|---|---|---|---|---|---|---|---|")
for name in ["idle", "busy"]:
    r = json.load(open(f"{work}/{name}.json"))
    s = r["score"]
    p = s["latency_us"]
    errors = sum(s["errors"].values())
    label = "no retraining" if name == "idle" else "retraining throughout"
    print(f"| {label} | {r['throughput']:.0f}/s | {p['p50']:.0f} | {p['p90']:.0f} | "
          f"{p['p99']:.0f} | {p['p999']:.0f} | {p['max']:.0f} | {errors} |")
EOF
