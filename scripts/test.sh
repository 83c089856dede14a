#!/usr/bin/env bash
# The README's test command: set up .venv if needed, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# torch.compile's cache of one test run: a compile killed mid-write (a timed-out subprocess) can leave a
# truncated entry in the machine-wide cache (/tmp/torchinductor_$USER) that fails every later compile
if [ -z "${TORCHINDUCTOR_CACHE_DIR:-}" ]; then
  TORCHINDUCTOR_CACHE_DIR=$(mktemp -d -t tec-inductor-XXXX)
  export TORCHINDUCTOR_CACHE_DIR
  trap 'rm -rf "$TORCHINDUCTOR_CACHE_DIR"' EXIT
fi
.venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" "$@"
