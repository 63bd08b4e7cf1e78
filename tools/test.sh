#!/usr/bin/env bash
# The whole test suite: notebooks/package/README in sync, every notebook (slow cells included), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/ensure_chromium.sh
start=$(date +%s)
echo "== 1/3 notebooks, package and README agree"
.venv/bin/python tools/check_sync.py
echo "== 2/3 every notebook, slow cells included"
# two notebooks at a time, one torch thread each: two processes that each use every core run several times slower
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/nbdev_test --flags slow --n_workers "${MMLIT_NB_WORKERS:-2}" --timing
echo "== 3/3 pytest tests/ (notebooks took $(( $(date +%s) - start ))s so far)"
exec .venv/bin/python -m pytest tests/ -q -p no:cacheprovider --durations=10
