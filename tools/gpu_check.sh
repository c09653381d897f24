#!/usr/bin/env bash
# The driver's checks that need a CUDA device, for a fresh copy of the repo on
# a GPU machine: the gpu-marked tests (bf16, fp16, fp32 parity, swap) and the
# quick driver bench on the device. Results land in $OUT (default ./gpu-out).
#
#   OUT=/some/dir bash tools/gpu_check.sh
#
# Installs nothing heavy: it uses a Python whose torch already sees CUDA (the
# machine's, or .venv's if that one does), and otherwise makes a venv that
# inherits the system packages (so the machine's CUDA torch) and adds only
# llmos's own light dependencies.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"

has_cuda() { "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

PY=""
for cand in .venv/bin/python python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && has_cuda "$cand"; then PY=$cand; break; fi
done
if [ -z "$PY" ]; then
    echo "no Python with a CUDA torch found" | tee "$OUT/gpu-check.txt"
    exit 1
fi
if ! "$PY" -c 'import drivers.model.runner, pytest, transformers' 2>/dev/null; then
    python3 -m venv --system-site-packages .gpu-venv
    PY=.gpu-venv/bin/python
    # torch is already there (system site packages): pip keeps it.
    "$PY" -m pip install -q -e '.[drivers,test]' 2>&1 | tail -3
    has_cuda "$PY" || { echo "the venv lost CUDA torch" | tee -a "$OUT/gpu-check.txt"; exit 1; }
fi
{
    "$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'
    timeout 300 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/unit/test_model_cuda.py
    echo "pytest rc=$?"
    timeout 240 "$PY" -m tools.bench.driver --quick --device cuda --json "$OUT/gpu.json"
    echo "bench rc=$?"
} 2>&1 | tee "$OUT/gpu-check.txt"
