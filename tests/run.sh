#!/usr/bin/env bash
# Sets up .venv, then runs the unit and integration tests. Ray's services listen on every interface, so the
# tests run inside a private loopback-only network namespace (unshare -n; user namespace when not root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# checkov (security checks of the k8s manifests) lives in its own venv: its pins clash with the ML stack.
ckv="$HOME/.cache/slimray/checkov"
[ -x "$ckv/bin/checkov" ] || { python3 -m venv "$ckv" && "$ckv/bin/pip" install -q checkov==3.3.30; } \
  || echo "checkov could not be installed: its test will be skipped" >&2
if [ "$(id -u)" = 0 ]; then ns="unshare -n"; else ns="unshare -rn"; fi
exec $ns sh -c 'ip link set lo up && exec .venv/bin/python -m pytest --integration -p no:cacheprovider "$@"' sh "$@"
