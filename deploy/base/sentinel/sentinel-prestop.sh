#!/bin/sh
# preStop of a Sentinel: never leave in the middle of a failover. While this Sentinel has a
# failover of MASTER_NAME in progress (it may be the leader that promotes the replica and
# reconfigures the others), wait for it to end, up to FAILOVER_WAIT_SECONDS; then stop.
# A rolling update or a drain that stops the leader halfway leaves the replicas pointing at
# different masters until another Sentinel retries (after 2 x failover-timeout).
set -eu

SCRIPT=sentinel-prestop
MASTER_NAME=${MASTER_NAME:-mymaster}
SENTINEL_PORT=${SENTINEL_PORT:-26379}
FAILOVER_WAIT_SECONDS=${FAILOVER_WAIT_SECONDS:-20}
case "${ADMIN_PASSWORD:-}" in
  '' | *[!A-Za-z0-9]*)
    echo "$SCRIPT: ADMIN_PASSWORD must be set to letters and digits only (deploy/README.md \"Secrets\")" >&2
    exit 1 ;;
esac
for var in FAILOVER_WAIT_SECONDS SENTINEL_PORT; do
  eval "value=\${$var:-}"
  case "$value" in
    '' | *[!0-9]*)
      echo "$SCRIPT: $var must be a whole number, not '$value'" >&2
      exit 1 ;;
  esac
done

# flags: this Sentinel's flags for MASTER_NAME (e.g. "master,failover_in_progress").
flags() {
  REDISCLI_AUTH="$ADMIN_PASSWORD" timeout 3 redis-cli --no-auth-warning --raw --user admin \
    -h 127.0.0.1 -p "$SENTINEL_PORT" SENTINEL MASTER "$MASTER_NAME" 2>/dev/null |
    awk 'previous == "flags" { print; exit } { previous = $0 }'
}

waited=0
while flags | grep -q failover_in_progress; do
  if [ "$waited" -ge "$FAILOVER_WAIT_SECONDS" ]; then
    echo "$SCRIPT: a failover of $MASTER_NAME is still in progress after ${FAILOVER_WAIT_SECONDS}s; stopping anyway (another Sentinel retries it)" >&2
    exit 1
  fi
  sleep 1
  waited=$((waited + 1))
done
echo "$SCRIPT: no failover of $MASTER_NAME in progress here (waited ${waited}s); stopping"
