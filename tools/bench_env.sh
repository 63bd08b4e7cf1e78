#!/usr/bin/env bash
# A separate environment for benchmarks against torchvision-backed ("fast") transformers processors.
# PyPI's torchvision does not import beside torch 2.13.0+cpu; torch 2.14.1 + torchvision 0.29.1 do (a 5.5 GB CUDA
# build on x86_64), so they stay out of the default .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv-bench/.mmlit-bench
want=$(cat settings.ini setup.py tools/bench_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv-bench/bin/python ] || python3 -m venv .venv-bench
.venv-bench/bin/pip install -q --disable-pip-version-check ${MMLIT_BENCH_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
.venv-bench/bin/pip install -q --disable-pip-version-check -e .
echo "$want" > "$stamp"
