# Who is master: what the Sentinels say and what the data nodes themselves report. Sourced
# (POSIX sh) by redis-start.sh and redis-prestop.sh, after they have checked the variables:
# SENTINELS, REDIS_NODES (comma-separated HOST:PORT), MASTER_NAME, LOOKUP_PASSWORD (Sentinel
# user lookup), SENTINEL_PASSWORD (data-node user sentinel: ROLE), and SELF ("HOST PORT" of
# this node as the Sentinels name it). Every call is bounded (timeout 3 s).

# say MESSAGE...: one line on stderr, prefixed with the script's name (SCRIPT).
say() {
  echo "$SCRIPT: $*" >&2
}

# require_passwords VAR...: each must be set, letters and digits only (they are put into
# files with sed), and not one of the public example values once committed to git.
require_passwords() {
  for var in "$@"; do
    eval "value=\${$var:-}"
    case "$value" in
      '' | *[!A-Za-z0-9]*)
        say "$var must be set to letters and digits only: generate the Secrets with \`sh deploy/make-secrets.sh\` (deploy/README.md \"Secrets\")"
        exit 1 ;;
      EXAMPLE*)
        say "$var is a public example value from git: generate real Secrets with \`sh deploy/make-secrets.sh\` (deploy/README.md \"Secrets\")"
        exit 1 ;;
    esac
  done
}

# require_number VAR: a whole number (seconds, a port).
require_number() {
  eval "value=\${$1:-}"
  case "$value" in
    '' | *[!0-9]*)
      say "$1 must be a whole number, not '$value'"
      exit 1 ;;
  esac
}

# require_addresses VAR...: each a comma-separated list of HOST:PORT.
require_addresses() {
  for var in "$@"; do
    eval "value=\${$var:-}"
    for address in $(echo "$value" | tr ',' ' '); do
      case "$address" in
        *:*) port=${address##*:} ;;
        *) port= ;;
      esac
      case "$port" in
        '' | *[!0-9]*)
          say "$var must be a comma-separated list of HOST:PORT, not '$value'"
          exit 1 ;;
      esac
    done
    [ -n "$value" ] || { say "$var must be set (HOST:PORT,...)"; exit 1; }
  done
}

# cli USER PASSWORD HOST PORT ARGS...: one redis-cli call, bounded.
cli() {
  cli_user=$1 cli_password=$2 cli_host=$3 cli_port=$4
  shift 4
  REDISCLI_AUTH="$cli_password" timeout 3 redis-cli --no-auth-warning --raw \
    --user "$cli_user" -h "$cli_host" -p "$cli_port" "$@"
}

# sentinel_answers: "HOST PORT" of the master, one line per Sentinel that answers.
sentinel_answers() {
  for sentinel in $(echo "$SENTINELS" | tr ',' ' '); do
    reply=$(cli lookup "$LOOKUP_PASSWORD" "${sentinel%:*}" "${sentinel##*:}" \
      SENTINEL get-master-addr-by-name "$MASTER_NAME" 2>/dev/null) || continue
    host=$(echo "$reply" | sed -n 1p)
    port=$(echo "$reply" | sed -n 2p)
    case "$port" in '' | *[!0-9]*) continue ;; esac
    echo "$host $port"
  done
}

# role_of HOST PORT: the node's role as it reports it (master, slave) or nothing.
role_of() {
  cli sentinel "$SENTINEL_PASSWORD" "$1" "$2" ROLE 2>/dev/null | sed -n 1p
}

# named_master: "HOST PORT" of another node that a Sentinel names as master and that
# confirms it (ROLE master), or nothing.
named_master() {
  sentinel_answers | grep -vxF "$SELF" | sort -u | while read -r host port; do
    if [ "$(role_of "$host" "$port")" = master ]; then
      echo "$host $port"
      break
    fi
  done
}

# other_nodes: "HOST PORT ROLE" of every other data node that answers.
other_nodes() {
  for node in $(echo "$REDIS_NODES" | tr ',' ' '); do
    [ "${node%:*} ${node##*:}" = "$SELF" ] && continue
    role=$(role_of "${node%:*}" "${node##*:}")
    [ -n "$role" ] && echo "${node%:*} ${node##*:} $role"
  done
  return 0
}
