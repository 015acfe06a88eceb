#!/bin/sh
# Starts this data node: the main container's command, so it runs on every start of the
# container (a container restart does not re-run init containers). Renders the
# configuration into the writable volume CONF_DIR from the ConfigMap (TEMPLATE_DIR) and the
# passwords in the environment (Secret redis-users), decides master or replica, then execs
# redis-server.
#
# Which node is master is Sentinel's business: after a failover redis-0 may well be a
# replica. So a starting node follows the master the Sentinels name. When no Sentinel
# answers, it follows a data node that reports itself master, and only when there is none
# either (the very first start) takes the initial layout: ordinal 0 is master, the others
# replicate it.
#
# A node the Sentinels still name as master has restarted in place (a crash, an OOM kill)
# before they noticed. It must not serve as master again: with `appendfsync everysec` it
# may have come back without its last second of writes, under a new replication id, and
# its replicas would full-resync from it and drop writes they had acknowledged for WAIT.
# So it holds redis-server back: not running, it is seen down after down-after-milliseconds
# and Sentinel promotes the replica that has the acknowledged writes; this node then starts
# as that master's replica. If no master is named within MASTER_HOLD_SECONDS, it starts as
# master only when no other data node answers (nobody holds newer writes); otherwise it
# exits with a message and the kubelet restarts it to hold again.
set -eu

SCRIPT=redis-start
TEMPLATE_DIR=${TEMPLATE_DIR:-/etc/redis-template}
CONF_DIR=${CONF_DIR:-/conf}
MASTER_NAME=${MASTER_NAME:-mymaster}
MASTER_PORT=${MASTER_PORT:-6379}
REDIS_PORT=${REDIS_PORT:-6379}
MASTER_HOLD_SECONDS=${MASTER_HOLD_SECONDS:-45}
. "$TEMPLATE_DIR/topology.sh"
for var in POD_NAME ANNOUNCE_HOST INITIAL_MASTER_HOST; do
  eval "value=\${$var:-}"
  [ -n "$value" ] || { say "$var must be set (see the StatefulSet redis)"; exit 1; }
done
require_addresses SENTINELS REDIS_NODES
require_passwords SERVER_PASSWORD BIDDER_PASSWORD SENTINEL_PASSWORD REPLICA_PASSWORD \
  PROBE_PASSWORD ADMIN_PASSWORD LOOKUP_PASSWORD
require_number MASTER_HOLD_SECONDS
require_number REDIS_PORT
require_number MASTER_PORT
SELF="$ANNOUNCE_HOST $REDIS_PORT"

# An ACL file takes no comments: they stay in the ConfigMap only.
sed -e '/^[[:space:]]*#/d' -e '/^[[:space:]]*$/d' \
    -e "s/@SERVER_PASSWORD@/$SERVER_PASSWORD/g" \
    -e "s/@BIDDER_PASSWORD@/$BIDDER_PASSWORD/g" \
    -e "s/@SENTINEL_PASSWORD@/$SENTINEL_PASSWORD/g" \
    -e "s/@REPLICA_PASSWORD@/$REPLICA_PASSWORD/g" \
    -e "s/@PROBE_PASSWORD@/$PROBE_PASSWORD/g" \
    -e "s/@ADMIN_PASSWORD@/$ADMIN_PASSWORD/g" \
    "$TEMPLATE_DIR/users.acl" > "$CONF_DIR/users.acl.new"
mv "$CONF_DIR/users.acl.new" "$CONF_DIR/users.acl"

# Holds until a Sentinel names another master that confirms it (prints "HOST PORT"), or
# MASTER_HOLD_SECONDS pass (prints "self" if this node may serve as master after all).
hold_restarted_master() {
  say "the Sentinels still name this node ($SELF) as master of $MASTER_NAME: it restarted before they noticed; holding redis-server back (up to ${MASTER_HOLD_SECONDS}s) so that Sentinel promotes the replica that holds the acknowledged writes"
  waited=0
  while [ "$waited" -lt "$MASTER_HOLD_SECONDS" ]; do
    sleep 1
    waited=$((waited + 1))
    promoted=$(named_master)
    if [ -n "$promoted" ]; then
      say "Sentinel promoted $promoted after ${waited}s; starting as its replica"
      echo "$promoted"
      return 0
    fi
  done
  others=$(other_nodes)
  if [ -z "$others" ]; then
    say "no master named after ${MASTER_HOLD_SECONDS}s and no other data node answers: nobody holds newer writes; starting as master"
    echo self
    return 0
  fi
  say "no replica was promoted within ${MASTER_HOLD_SECONDS}s although other data nodes answer ($(echo "$others" | tr '\n' ';')): refusing to serve as master over them. Check the Sentinels (a majority must be up: SENTINEL CKQUORUM $MASTER_NAME as admin) and the replicas (SENTINEL REPLICAS $MASTER_NAME); this container restarts and holds again. If the data on the other nodes is to be given up, run SENTINEL FAILOVER $MASTER_NAME or stop them."
  exit 1
}

answers=$(sentinel_answers)
if [ -z "$answers" ]; then
  # No Sentinel answers: the very first start, or every Sentinel is down. A node that
  # reports itself master is followed, so a restart never makes a second master.
  master=$(other_nodes | while read -r host port role; do
    if [ "$role" = master ]; then echo "$host $port"; break; fi
  done)
  if [ -n "$master" ]; then
    say "no Sentinel knows $MASTER_NAME; $master reports itself master: following it"
  elif [ "${POD_NAME##*-}" = 0 ]; then
    master=$SELF
    say "no Sentinel knows $MASTER_NAME and no data node is master; initial layout: this node is master"
  else
    master="$INITIAL_MASTER_HOST $MASTER_PORT"
    say "no Sentinel knows $MASTER_NAME and no data node is master; initial layout: replica of $master"
  fi
elif ! echo "$answers" | grep -qvxF "$SELF"; then
  master=$(hold_restarted_master)
  [ "$master" = self ] && master=$SELF
else
  # Another node is named: prefer one that confirms it is master; following a stale name is
  # harmless for a replica (Sentinel reconfigures it).
  master=$(named_master)
  [ -n "$master" ] || master=$(echo "$answers" | grep -vxF "$SELF" | sed -n 1p)
  say "Sentinel names the master $master: starting as its replica"
fi

{
  cat "$TEMPLATE_DIR/redis.conf"
  echo
  echo "# Added by redis-start.sh at container start."
  echo "replica-announce-ip $ANNOUNCE_HOST"
  echo "masteruser replica"
  echo "masterauth $REPLICA_PASSWORD"
  if [ "$master" != "$SELF" ]; then
    echo "replicaof $master"
  fi
} > "$CONF_DIR/redis.conf.new"
mv "$CONF_DIR/redis.conf.new" "$CONF_DIR/redis.conf"
exec redis-server "$CONF_DIR/redis.conf"
