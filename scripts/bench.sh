#!/usr/bin/env bash
# Throughput and latency benchmark on real processes: Redis master + 2 replicas + 3 Sentinels,
# the release auction-server, auctions opened over gRPC, simulated bidders in-process, and
# redis-benchmark (EVAL "return 1" 0, -c 50, -P 1 and -P 16) on the same master.
# Results: a table on stdout, target/bench/summary.json and target/bench/summary.md.
#   bash scripts/bench.sh                      # one step: flat out, 100 bidders, 1 auction, WAIT 1
#   bash scripts/bench.sh --scenario all       # every curve and the targets (about 6 minutes)
#   bash scripts/bench.sh --rate 1000 --bidders 1000 --wait-replicas 0
#   bash scripts/bench.sh --scenario soak      # 3 min of churn at maxmemory 64mb: target/bench/soak.{json,md,svg}
#   bash scripts/bench.sh --help               # every option
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
if ! command -v redis-benchmark >/dev/null 2>&1; then
  echo "error: redis-benchmark not found; it ships with Redis (Debian: redis-tools, a dependency of redis-server)." >&2
  exit 1
fi
echo "building (release)…" >&2
cargo build --release --bins --example bench --quiet
exec target/release/examples/bench "$@"
