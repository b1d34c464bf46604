#!/usr/bin/env bash
# The GPU checks, in one short script (under 5 minutes on one H100): the CUDA tests
# (tests/test_cuda.py: accounting, no per-step syncs, bf16, torch.compile, channels_last cnn,
# a stacked sweep),
# then the quick benchmark on the GPU. Run from anywhere: bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_SILENT=true
PY=${PYTHON:-python3}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible")'
timeout 200 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py
timeout 120 "$PY" scripts/bench.py --quick --device cuda "$@"
