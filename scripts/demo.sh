#!/usr/bin/env bash
# A complete local auction on real processes: Redis master + 2 replicas + 3 Sentinels,
# auction-server, 5 auction-client bidders; prints events live and the winner, cleans up.
# Tunables: AUCTION_DURATION (30s), BID_INTERVAL (3s), DEMO_CLIENTS (5), DEMO_KEEP_LOGS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
echo "building (release)…" >&2
cargo build --release --bins --example demo --quiet
exec target/release/examples/demo
