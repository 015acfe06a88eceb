#!/bin/sh
# Renders this Sentinel's configuration into the writable volume CONF_DIR, from the
# ConfigMap (TEMPLATE_DIR) and the passwords in the environment (Secret redis-users).
#
# A restarted Sentinel must monitor the master as it is now, not as it was at the first
# start, so it asks the other Sentinels, then the data nodes themselves (ROLE), and only
# when nobody answers (the very first start) takes the initial master.
set -eu

TEMPLATE_DIR=${TEMPLATE_DIR:-/etc/sentinel-template}
CONF_DIR=${CONF_DIR:-/conf}
MASTER_NAME=${MASTER_NAME:-mymaster}
MASTER_PORT=${MASTER_PORT:-6379}
: "${ANNOUNCE_HOST:?}" "${INITIAL_MASTER_HOST:?}" "${SENTINELS:?}" "${REDIS_NODES:?}"

# Passwords go through sed below: letters and digits only, so none can break the rendering.
for var in SENTINEL_PASSWORD LOOKUP_PASSWORD PROBE_PASSWORD ADMIN_PASSWORD; do
  eval "value=\${$var:-}"
  case "$value" in
    '' | *[!A-Za-z0-9]*)
      echo "sentinel-init: $var must be set to letters and digits only (see deploy/README.md)" >&2
      exit 1 ;;
  esac
done

# Prints "HOST PORT" of the master as the other Sentinels or the data nodes see it, or nothing.
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
  for node in $(echo "$REDIS_NODES" | tr ',' ' '); do
    role=$(REDISCLI_AUTH="$SENTINEL_PASSWORD" timeout 3 redis-cli --no-auth-warning --raw \
      --user sentinel -h "${node%:*}" -p "${node##*:}" ROLE 2>/dev/null | sed -n 1p) || continue
    if [ "$role" = master ]; then
      echo "${node%:*} ${node##*:}"
      return 0
    fi
  done
}

# Ordered start: give the data nodes time to come up (bounded) before falling back.
waited=0
master=$(current_master || true)
while [ -z "$master" ] && [ "$waited" -lt "${WAIT_FOR_MASTER_SECONDS:-60}" ]; do
  sleep 2
  waited=$((waited + 2))
  master=$(current_master || true)
done
if [ -z "$master" ]; then
  master="$INITIAL_MASTER_HOST $MASTER_PORT"
  echo "sentinel-init: nobody knows $MASTER_NAME yet; monitoring the initial master $master"
else
  echo "sentinel-init: monitoring the current master $master"
fi

sed -e "s/@MASTER_HOST@/${master% *}/g" \
    -e "s/@MASTER_PORT@/${master##* }/g" \
    -e "s/@SENTINEL_PASSWORD@/$SENTINEL_PASSWORD/g" \
    -e "s/@LOOKUP_PASSWORD@/$LOOKUP_PASSWORD/g" \
    -e "s/@PROBE_PASSWORD@/$PROBE_PASSWORD/g" \
    -e "s/@ADMIN_PASSWORD@/$ADMIN_PASSWORD/g" \
    "$TEMPLATE_DIR/sentinel.conf" > "$CONF_DIR/sentinel.conf.new"
{
  echo
  echo "# Added by sentinel-init.sh at pod start."
  echo "sentinel announce-ip $ANNOUNCE_HOST"
} >> "$CONF_DIR/sentinel.conf.new"
mv "$CONF_DIR/sentinel.conf.new" "$CONF_DIR/sentinel.conf"
