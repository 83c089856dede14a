#!/usr/bin/env bash
# The README's main job: set up .venv if needed, then run the demo (cache-targets, train TEC and
# the control, compare with the base). Extra arguments go to `tec-pipeline demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One intra-op thread: the demo's models are tiny and its DataLoader worker needs the other core;
# two threads beside a worker on 2 cores made steps several times slower (OpenMP spin-waits).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/tec-pipeline demo "$@"
