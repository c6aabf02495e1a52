#!/usr/bin/env bash
# On a lent GPU machine (the device tool's `run`, from the repository root, carrying .whl):
#   bash bench/gpu_check.sh tests   the CUDA path: tests/gpu (NCCL, fused AdamW, torch.compile,
#                                   resume, eval on the GPU) and tests/dslm/test_engine.py
#   bash bench/gpu_check.sh bench   bench/train_throughput.py with its GPU defaults (the table for
#                                   bench/RESULTS.md), extra arguments passed on
# Each fits one 10-minute call. Before the first, here: bash bench/gpu_wheels.sh (fills .whl/).
# Output goes to $OUT (the device tool's folder that comes back), else to /tmp/gpu-check.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
what=${1:?usage: bash bench/gpu_check.sh tests|bench [benchmark arguments]}
shift

# The image's python3 has torch; dslm and the carried wheels go into a venv on top of it.
VENV=/tmp/dslm-venv
if [ ! -x "$VENV/bin/dslm-train" ]; then
    python3 -m venv --system-site-packages "$VENV"
    "$VENV/bin/pip" install -q --no-index --no-deps .whl/*.whl
    "$VENV/bin/pip" install -q --no-index --no-deps --no-build-isolation -e .
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi; "$VENV/bin/python" -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, torch.cuda.get_device_name())"; } \
    | tee "$OUT/device.txt"

case "$what" in
    tests) "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/gpu tests/dslm/test_engine.py "$@" 2>&1 \
               | tee "$OUT/pytest.txt" ;;
    bench) "$VENV/bin/python" bench/train_throughput.py --json "$OUT/train_throughput.json" "$@" 2>&1 \
               | tee "$OUT/train_throughput.txt" ;;
    *) echo "gpu_check.sh: $what is not tests or bench" >&2; exit 2 ;;
esac
