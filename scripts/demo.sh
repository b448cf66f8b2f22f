#!/usr/bin/env bash
# The README's first command: set-up, then `ulens demo` (services up, simulate, replay +
# consume, decision-time report). Extra arguments go to `ulens demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ulens demo "$@"
