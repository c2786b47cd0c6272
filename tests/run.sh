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
# pip-audit over the pinned dependencies (its own venv, like checkov): fails on a known vulnerability that has a
# fixed release; the summary line says how many packages the vulnerability service could audit.
pa="$HOME/.cache/slimray/pip-audit"
[ -x "$pa/bin/pip-audit" ] || { python3 -m venv "$pa" && "$pa/bin/pip" install -q pip-audit==2.10.1; } \
  || echo "pip-audit could not be installed: the dependencies are not audited" >&2
if [ -x "$pa/bin/pip-audit" ]; then python3 scripts/audit.py "$pa/bin/pip-audit"; fi
# PostgreSQL for the monitor store's tests (Debian's package; each test session starts its own server on a
# Unix socket in a temporary folder, so the package's own cluster is never used).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo -n"; fi
  { $sudo apt-get install -y -q postgresql >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q postgresql >/dev/null; }; } \
    || echo "PostgreSQL could not be installed: the monitor's PostgreSQL tests will fail" >&2
fi
# Chromium and its WebDriver for the page's browser test (tests/test_page.py): Debian's packages.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo -n"; fi
  { $sudo apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null \
         && $sudo apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; }; } \
    || echo "Chromium could not be installed: the page's browser test will fail" >&2
fi
if [ "$(id -u)" = 0 ]; then ns="unshare -n"; else ns="unshare -rn"; fi
exec $ns sh -c 'ip link set lo up && exec .venv/bin/python -m pytest --integration -p no:cacheprovider "$@"' sh "$@"
