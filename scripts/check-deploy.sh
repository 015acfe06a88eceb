#!/usr/bin/env bash
# Static checks of the Kubernetes manifests in deploy/ (run by .ci/run before the tests):
#   1. `kubectl kustomize` renders the base and every overlay;
#   2. kubernetes-validate --strict accepts every rendered resource (current Kubernetes and
#      the oldest we support);
#   3. checkov finds no failed check (skips only as checkov.io/skipN annotations, each with
#      its justification, beside the resource).
# The agreement between manifests and binaries is tested with real processes by
# tests/manifests.rs (part of `bash scripts/test.sh`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prereqs.sh
ensure_deploy_tools
tools="$PWD/target/tools/deploy/bin"
kubectl=$(command -v kubectl || echo "$tools/kubectl")
out="target/deploy-rendered"
# The Secrets' values are generated at install, never committed: make them as an operator would.
sh deploy/make-secrets.sh
rm -rf "$out"
mkdir -p "$out"

dirs=(deploy deploy/base)
for overlay in deploy/overlays/*/; do
  dirs+=("${overlay%/}")
done

for dir in "${dirs[@]}"; do
  name=$(basename "$dir")
  echo "check-deploy: kubectl kustomize $dir"
  "$kubectl" kustomize "$dir" > "$out/$name.yaml"
  for version in 1.37.0 1.32.0; do
    echo "check-deploy: kubernetes-validate --strict -k $version ($name)"
    "$tools/kubernetes-validate" --strict --quiet -k "$version" "$out/$name.yaml"
  done
done

echo "check-deploy: checkov (${dirs[*]})"
# BC_SKIP_MAPPING: no call home for the guideline mapping (offline).
BC_SKIP_MAPPING=TRUE "$tools/checkov" -d "$out" --framework kubernetes --compact --quiet
echo "check-deploy: all manifests render, validate and pass checkov"
