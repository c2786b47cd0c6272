#!/bin/sh
# Runs inside the loopback-only network namespace that tests/run.sh makes. With no arguments: the unit tests
# and the integration (Ray) tests as two pytest processes side by side; the Ray tests spend much of their time
# waiting on processes to start, and the unit tests fill it. The unit tests' output follows the Ray tests'.
# With arguments (e.g. -k prepare): one pytest process over everything they select.
set -u
ip link set lo up
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest --integration -p no:cacheprovider "$@"
fi
unit_log=$(mktemp)
.venv/bin/python -m pytest -p no:cacheprovider -m "not integration" >"$unit_log" 2>&1 &
unit=$!
.venv/bin/python -m pytest --integration -p no:cacheprovider -m integration
ray_status=$?
wait "$unit"
unit_status=$?
echo
echo "==================== unit tests (run beside the integration tests) ===================="
cat "$unit_log"
rm -f "$unit_log"
echo "integration tests: exit status $ray_status; unit tests: exit status $unit_status"
[ "$ray_status" -eq 0 ] && [ "$unit_status" -eq 0 ]
