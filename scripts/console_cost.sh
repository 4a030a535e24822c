#!/usr/bin/env bash
# What the analyst console costs: its pages' response times with DECISIONS journaled, and
# Score latency at a fixed open-loop rate with nobody on the console, then with an analyst's
# pages (overview, queue, a case) refreshing every second.
#
#   cargo build --release --workspace && scripts/console_cost.sh
#
# Settings (environment): DECISIONS (default 1000000), RATE (default 5000), DURATION
# (default 30s). Needs curl, sqlite3 and python3.
set -euo pipefail

BIN=${BIN:-target/release/fraudgate}
LOADTEST=${LOADTEST:-target/release/loadtest}
DECISIONS=${DECISIONS:-1000000}
RATE=${RATE:-5000}
DURATION=${DURATION:-30s}
ADDR=127.0.0.1:${PORT:-50073}
HTTP=127.0.0.1:${HTTP_PORT:-9473}

work=$(mktemp -d)
server=
cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

hash=$(echo "console-cost-password" | "$BIN" hash-password)
printf '[[user]]\nname = "ana"\nrole = "analyst"\npassword = "%s"\n' "$hash" >"$work/users.toml"
"$BIN" serve --listen "$ADDR" --http-listen "$HTTP" --data-dir "$work/data" \
    --console-users "$work/users.toml" 2>"$work/server.log" &
server=$!
# Serving once start-up has made the journal (the HTTP listener answers before that).
for _ in $(seq 300); do
    grep -q 'serving addr=' "$work/server.log" 2>/dev/null && break
    kill -0 "$server" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
    sleep 0.2
done

count() { sqlite3 "$work/data/journal.db" "SELECT COUNT(*) FROM decisions"; }
echo "filling the journal to $DECISIONS decisions" >&2
seed=1
while [ "$(count)" -lt "$DECISIONS" ]; do
    "$LOADTEST" run --target "http://$ADDR" --duration 20s --warmup 0s --seed "$seed" >/dev/null
    seed=$((seed + 1))
done
reviews=$(sqlite3 "$work/data/journal.db" "SELECT COUNT(*) FROM decisions WHERE decision = 'REVIEW'")
echo "journal: $(count) decisions, $reviews reviews" >&2

cookie=$(curl -s -i -d "name=ana&password=console-cost-password" "http://$HTTP/login" \
    | grep -o 'fraudgate_session=[0-9a-f]*')
case_id=$(sqlite3 "$work/data/journal.db" \
    "SELECT transaction_id FROM decisions WHERE decision = 'REVIEW' ORDER BY seq DESC LIMIT 1")
time_page() { # prints the median and the slowest of 20 fetches, in ms
    for _ in $(seq 20); do
        curl -s -o /dev/null -w '%{time_total}\n' -b "$cookie" "http://$HTTP$1"
    done | sort -n | awk '{t[NR] = $1 * 1000} END {printf "%.1f %.1f\n", t[int((NR + 1) / 2)], t[NR]}'
}
echo "| page | median ms | slowest of 20 ms |"
echo "|---|---|---|"
for page in "/" "/queue" "/queue?min_score=0.2" "/cases/$case_id" "/search?q=$case_id"; do
    read -r median slowest < <(time_page "$page")
    echo "| \`$page\` | $median | $slowest |"
done

echo "measuring with nobody on the console: $RATE/s for $DURATION" >&2
"$LOADTEST" run --target "http://$ADDR" --rate "$RATE" --duration "$DURATION" \
    --json "$work/idle.json" >/dev/null
echo "measuring with an analyst's pages refreshing every second" >&2
"$LOADTEST" run --target "http://$ADDR" --rate "$RATE" --duration "$DURATION" \
    --json "$work/busy.json" >/dev/null &
load=$!
while kill -0 "$load" 2>/dev/null; do
    for page in "/" "/queue" "/cases/$case_id"; do
        curl -s -o /dev/null -b "$cookie" "http://$HTTP$page"
    done
    sleep 1
done
wait "$load"
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
print("| Score latency (us) | throughput | p50 | p90 | p99 | p99.9 | max | errors |")
print("|---|---|---|---|---|---|---|---|")
for name, label in [("idle", "nobody on the console"), ("busy", "overview, queue and a case refreshed every second")]:
    r = json.load(open(f"{work}/{name}.json"))
    s = r["score"]
    p = s["latency_us"]
    print(f"| {label} | {r['throughput']:.0f}/s | {p['p50']:.0f} | {p['p90']:.0f} | "
          f"{p['p99']:.0f} | {p['p999']:.0f} | {p['max']:.0f} | {sum(s['errors'].values())} |")
PY
