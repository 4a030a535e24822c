#!/usr/bin/env bash
# The fraud handbook benchmark, end to end and live (../shared/datasets/handbook/README.md):
# train on every payment before 2018-08-01 with 7-day labels, serve that model, replay
# 2018-07-01 .. 08-14 over ScoreStream with each fraud reported 7 days late, and print AUC,
# average precision and card precision@100 on the test week 2018-08-08 .. 08-14 with the
# book's exclusion of cards already known compromised.
#
#   scripts/handbook.sh [DATA] [WORK]
#
# DATA: the book's transactions.csv.gz or its directory (default ../shared/datasets/handbook);
# WORK: scratch directory (default /tmp/fraudgate-handbook). Extra `train` flags may be given
# in TRAIN_FLAGS. About 5 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/datasets/handbook}
work=${2:-/tmp/fraudgate-handbook}
port=${PORT:-50591}
mkdir -p "$work"

cargo build --release --quiet --bin fraudgate
fg=target/release/fraudgate

$fg handbook prepare --data "$data" --work "$work"
# shellcheck disable=SC2086
$fg train --input "$work/train.csv" --output "$work/model" --label-delay 7d --quiet ${TRAIN_FLAGS:-}

$fg serve --model "$work/model" --ephemeral --listen "127.0.0.1:$port" --metrics-listen off \
    >"$work/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    grep -q "serving" "$work/serve.log" 2>/dev/null && break
    kill -0 $server 2>/dev/null || { cat "$work/serve.log"; exit 1; }
    sleep 0.2
done

$fg handbook replay --work "$work" --server "http://127.0.0.1:$port"
