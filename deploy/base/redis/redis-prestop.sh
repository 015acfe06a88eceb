#!/bin/sh
# preStop of a data node: a master hands over before it stops, so a rolling update, a drain
# or `kubectl delete pod` of the master is a switchover, not an unplanned failover.
#
#   1. CLIENT PAUSE WRITE: no write lands on this node from now on (clients wait);
#   2. wait (up to CATCH_UP_SECONDS) until the online replicas have every write (their
#      offset reaches the master's), so whichever Sentinel promotes has them all;
#   3. SENTINEL FAILOVER on the first Sentinel that takes it;
#   4. wait (up to SWITCH_SECONDS) until a Sentinel names another master that confirms it;
#   5. REPLICAOF that master here (no window in which this node takes writes again), then
#      CLIENT UNPAUSE: paused clients get READONLY at once and follow the new master.
#
# A replica has nothing to hand over. On any failure the writes are unpaused (the node is
# still master), the reason is printed and the hook exits 1: the kubelet records it in the
# pod's events, and the stop becomes an ordinary failover (redis-start.sh then keeps the
# restarted node from serving as master before Sentinel promotes a replica).
set -eu

SCRIPT=redis-prestop
TEMPLATE_DIR=${TEMPLATE_DIR:-/etc/redis-template}
MASTER_NAME=${MASTER_NAME:-mymaster}
REDIS_PORT=${REDIS_PORT:-6379}
CATCH_UP_SECONDS=${CATCH_UP_SECONDS:-5}
SWITCH_SECONDS=${SWITCH_SECONDS:-30}
. "$TEMPLATE_DIR/topology.sh"
[ -n "${ANNOUNCE_HOST:-}" ] || { say "ANNOUNCE_HOST must be set (see the StatefulSet redis)"; exit 1; }
require_addresses SENTINELS
require_number REDIS_PORT
require_passwords ADMIN_PASSWORD LOOKUP_PASSWORD SENTINEL_PASSWORD
require_number CATCH_UP_SECONDS
require_number SWITCH_SECONDS
SELF="$ANNOUNCE_HOST $REDIS_PORT"

here() {
  cli admin "$ADMIN_PASSWORD" 127.0.0.1 "$REDIS_PORT" "$@"
}

# give_up REASON: the node stays master and takes writes again.
give_up() {
  here CLIENT UNPAUSE >/dev/null 2>&1 || true
  say "$1; writes unpaused, this node is still master: its stop becomes an unplanned failover"
  exit 1
}

role=$(here ROLE 2>/dev/null | sed -n 1p) || true
if [ "$role" != master ]; then
  say "role '${role:-unknown}': nothing to hand over"
  exit 0
fi

# The pause outlasts every wait below; it ends with CLIENT UNPAUSE (or on its own).
pause_ms=$(( (CATCH_UP_SECONDS + SWITCH_SECONDS + 5) * 1000 ))
[ "$(here CLIENT PAUSE "$pause_ms" WRITE 2>&1)" = OK ] || give_up "CLIENT PAUSE WRITE failed"
say "writes paused; waiting for the replicas to catch up"

# caught_up: "N M": N online replicas, M of them at the master's replication offset.
caught_up() {
  here INFO replication | tr -d '\r' | awk -F'[:,=]' '
    $1 == "master_repl_offset" { master = $2 }
    $1 ~ /^slave[0-9]+$/ {
      for (i = 2; i < NF; i += 2) { if ($i == "state") state = $(i + 1); if ($i == "offset") off = $(i + 1) }
      if (state == "online") { online++; offsets[online] = off }
    }
    END { n = 0; for (i = 1; i <= online; i++) if (offsets[i] + 0 >= master + 0) n++; print online + 0, n }'
}

waited=0
counts=$(caught_up)
while [ "${counts% *}" != "${counts#* }" ] && [ "$waited" -lt "$CATCH_UP_SECONDS" ]; do
  sleep 1
  waited=$((waited + 1))
  counts=$(caught_up)
done
[ "${counts#* }" -gt 0 ] || give_up "no online replica reached this master's offset within ${CATCH_UP_SECONDS}s (online, caught up: $counts)"
[ "${counts% *}" = "${counts#* }" ] || say "only ${counts#* } of ${counts% *} online replicas caught up; Sentinel prefers the one with the highest offset"

asked=""
for sentinel in $(echo "$SENTINELS" | tr ',' ' '); do
  reply=$(cli admin "$ADMIN_PASSWORD" "${sentinel%:*}" "${sentinel##*:}" \
    SENTINEL FAILOVER "$MASTER_NAME" 2>&1) || true
  case "$reply" in
    OK | INPROG*)
      asked=$sentinel
      say "Sentinel $sentinel: ${reply}"
      break ;;
    *) say "Sentinel $sentinel refused SENTINEL FAILOVER: ${reply:-no answer}" ;;
  esac
done
[ -n "$asked" ] || give_up "no Sentinel started a failover"

waited=0
promoted=$(named_master)
while [ -z "$promoted" ] && [ "$waited" -lt "$SWITCH_SECONDS" ]; do
  sleep 1
  waited=$((waited + 1))
  promoted=$(named_master)
done
[ -n "$promoted" ] || give_up "no Sentinel named a new master within ${SWITCH_SECONDS}s"

# shellcheck disable=SC2086 # "HOST PORT": two arguments
[ "$(here REPLICAOF $promoted 2>&1)" = OK ] || say "REPLICAOF $promoted failed here; Sentinel will reconfigure this node"
here CLIENT UNPAUSE >/dev/null 2>&1 || true
say "switched over to $promoted"
