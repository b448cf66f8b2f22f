#!/usr/bin/env bash
# The README's test command: set up, start Kafka and Redis on loopback if they are
# not running, run the whole test suite, stop what this script started.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/unit -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

started=0
if [ -z "${ULENS_KAFKA_BOOTSTRAP:-}" ] && ! .venv/bin/ulens services status >/dev/null 2>&1; then
  .venv/bin/ulens services up
  started=1
fi
cleanup() { if [ "$started" = 1 ]; then .venv/bin/ulens services down || true; fi; }
trap cleanup EXIT

set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "test.sh: pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
