#!/usr/bin/env bash
# The README's main job: set up .venv if needed, then run the demo (cache-targets, train TEC and
# the control, compare with the base). Extra arguments go to `tec-pipeline demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tec-pipeline demo "$@"
