#!/bin/sh
# Renders this data node's configuration into the writable volume CONF_DIR, from the
# ConfigMap (TEMPLATE_DIR) and the passwords in the environment (Secret redis-users).
#
# Which node is master is Sentinel's business: after a failover redis-0 may well be a
# replica. So a starting node asks the Sentinels first, and only when none answers (the very
# first start) takes the initial layout: ordinal 0 is master, the others replicate it.
set -eu

TEMPLATE_DIR=${TEMPLATE_DIR:-/etc/redis-template}
CONF_DIR=${CONF_DIR:-/conf}
MASTER_NAME=${MASTER_NAME:-mymaster}
MASTER_PORT=${MASTER_PORT:-6379}
REDIS_PORT=${REDIS_PORT:-6379}
: "${POD_NAME:?}" "${ANNOUNCE_HOST:?}" "${INITIAL_MASTER_HOST:?}" "${SENTINELS:?}"

# Passwords go through sed below: letters and digits only, so none can break the rendering.
for var in SERVER_PASSWORD BIDDER_PASSWORD SENTINEL_PASSWORD REPLICA_PASSWORD PROBE_PASSWORD ADMIN_PASSWORD LOOKUP_PASSWORD; do
  eval "value=\${$var:-}"
  case "$value" in
    '' | *[!A-Za-z0-9]*)
      echo "redis-init: $var must be set to letters and digits only (see deploy/README.md)" >&2
      exit 1 ;;
  esac
done

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

# Ask each Sentinel (bounded) where the master is; prints "HOST PORT" or nothing.
current_master() {
  for sentinel in $(echo "$SENTINELS" | tr ',' ' '); do
    reply=$(REDISCLI_AUTH="$LOOKUP_PASSWORD" timeout 3 redis-cli --no-auth-warning --raw \
      --user lookup -h "${sentinel%:*}" -p "${sentinel##*:}" \
      SENTINEL get-master-addr-by-name "$MASTER_NAME" 2>/dev/null) || continue
    host=$(echo "$reply" | sed -n 1p)
    port=$(echo "$reply" | sed -n 2p)
    case "$port" in '' | *[!0-9]*) continue ;; esac
    echo "$host $port"
    return 0
  done
}

master=$(current_master || true)
if [ -z "$master" ]; then
  if [ "${POD_NAME##*-}" = 0 ]; then
    master="$ANNOUNCE_HOST $REDIS_PORT"
  else
    master="$INITIAL_MASTER_HOST $MASTER_PORT"
  fi
  echo "redis-init: no Sentinel knows $MASTER_NAME yet; initial layout, master is ${master% *}"
else
  echo "redis-init: Sentinel says the master is $master"
fi

{
  cat "$TEMPLATE_DIR/redis.conf"
  echo
  echo "# Added by redis-init.sh at pod start."
  echo "replica-announce-ip $ANNOUNCE_HOST"
  echo "masteruser replica"
  echo "masterauth $REPLICA_PASSWORD"
  if [ "$master" != "$ANNOUNCE_HOST $REDIS_PORT" ]; then
    echo "replicaof $master"
  fi
} > "$CONF_DIR/redis.conf.new"
mv "$CONF_DIR/redis.conf.new" "$CONF_DIR/redis.conf"
