#!/usr/bin/env bash
# The whole test suite: unit tests and integration tests that start real redis-server /
# redis-sentinel processes on free loopback ports and run the real binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
ensure_grpcurl
cargo test --all-targets --locked -- "$@"
