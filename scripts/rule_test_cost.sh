#!/usr/bin/env bash
# What TestRule costs: a backtest over 10^6 journaled decisions, timed, and Score latency at a
# fixed open-loop rate with the server idle, then with TestRule running back to back for the
# whole measurement.
#
#   cargo build --release --workspace && scripts/rule_test_cost.sh
#
# Settings (environment): DECISIONS in the journal (default 1000000), RATE (requests/s,
# default 5000), DURATION (default 30s). Needs grpcurl, sqlite3 and python3.
set -euo pipefail

BIN=${BIN:-target/release/fraudgate}
LOADTEST=${LOADTEST:-target/release/loadtest}
DECISIONS=${DECISIONS:-1000000}
RATE=${RATE:-5000}
DURATION=${DURATION:-30s}
ADDR=127.0.0.1:${PORT:-50072}

work=$(mktemp -d)
server=
cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

"$BIN" serve --listen "$ADDR" --metrics-listen 127.0.0.1:0 --data-dir "$work/data" \
    2>"$work/server.log" &
server=$!
for _ in $(seq 100); do
    grpcurl -plaintext "$ADDR" grpc.health.v1.Health/Check >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
    sleep 0.2
done

count() { sqlite3 "$work/data/journal.db" "SELECT COUNT(*) FROM decisions"; }
echo "filling the journal to $DECISIONS decisions (5% of them labelled)" >&2
seed=1
while [ "$(count)" -lt "$DECISIONS" ]; do
    "$LOADTEST" run --target "http://$ADDR" --duration 20s --warmup 0s --feedback 0.05 \
        --seed "$seed" >/dev/null
    seed=$((seed + 1))
done
echo "journal: $(count) decisions" >&2

# A list and the rules a team would have, so the rebuilt decisions have hits to leave out.
grpcurl -plaintext -d '{"list": "blocked_devices", "entries": [{"value": "dev-1"}, {"value": "dev-2"}]}' \
    "$ADDR" fraudgate.v1.RulesAdmin/PutListEntries >/dev/null
test_rule() {
    grpcurl -plaintext -d '{"expression": "tx.amount > 200.0 && features.acct_count_1h > 1.0 || in_list(\"blocked_devices\", tx.device_id)", "action": "DECISION_REVIEW"}' \
        "$ADDR" fraudgate.v1.RulesAdmin/TestRule >"$work/test_rule.json"
}
start=$(date +%s.%N)
test_rule
cp "$work/test_rule.json" "$work/alone.json"
alone=$(python3 -c "import time; print(round(time.time() - $start, 2))")

echo "measuring idle: $RATE/s for $DURATION" >&2
"$LOADTEST" run --target "http://$ADDR" --rate "$RATE" --duration "$DURATION" \
    --json "$work/idle.json" >/dev/null
echo "measuring during TestRule: $RATE/s for $DURATION" >&2
"$LOADTEST" run --target "http://$ADDR" --rate "$RATE" --duration "$DURATION" \
    --json "$work/busy.json" >/dev/null &
load=$!
rounds=0
while kill -0 "$load" 2>/dev/null; do
    test_rule
    rounds=$((rounds + 1))
done
wait "$load"

python3 - "$work" "$alone" "$rounds" <<'PY'
import json, sys
work, alone, rounds = sys.argv[1:]
t = json.load(open(f"{work}/alone.json"))
c = t["candidate"]
print(f"TestRule over {t['decisions']} decisions, server otherwise idle: {t['seconds']:.2f} s "
      f"in the server ({alone} s with grpcurl), {c.get('hits', 0)} hits")
b = json.load(open(f"{work}/test_rule.json"))
print(f"TestRule during the load: {rounds} rounds, the last over {b['decisions']} decisions "
      f"in {b['seconds']:.2f} s")
print("| Score latency (us) | throughput | p50 | p90 | p99 | p99.9 | max | errors |")
print("|---|---|---|---|---|---|---|---|")
for name in ["idle", "busy"]:
    r = json.load(open(f"{work}/{name}.json"))
    s = r["score"]
    p = s["latency_us"]
    errors = sum(s["errors"].values())
    label = "no backtest" if name == "idle" else "TestRule throughout"
    print(f"| {label} | {r['throughput']:.0f}/s | {p['p50']:.0f} | {p['p90']:.0f} | "
          f"{p['p99']:.0f} | {p['p999']:.0f} | {p['max']:.0f} | {errors} |")
PY
