#!/usr/bin/env bash
# The whole test suite: unit tests and integration tests that start real redis-server /
# redis-sentinel processes on free loopback ports and run the real binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
ensure_grpcurl
ensure_netns_tools
rm -f target/chaos/figures.json target/model/report.json
cargo test --workspace --all-targets --locked -- "$@"
if [ -f target/chaos/figures.json ]; then
  echo "chaos figures (tests/chaos.rs, also in target/chaos/figures.json):"
  cat target/chaos/figures.json
fi
if [ -f target/model/report.json ]; then
  echo "protocol model (tests/model, also in target/model/report.json):"
  cat target/model/report.json
fi
