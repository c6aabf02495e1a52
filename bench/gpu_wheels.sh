#!/usr/bin/env bash
# Fill .whl/ (in .gitignore) with what the lent GPU machine lacks to run dslm: its image has
# Python 3.12 with torch, tokenizers, tensorboard, safetensors, tqdm, numpy and pytest, but no
# DeepSpeed, webdataset/wids, submitit or omegaconf, and it cannot reach a package index.
# Run here (with network to the registries), then on the device: bash bench/gpu_check.sh, carrying .whl.
#   usage: bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .whl && mkdir .whl
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
# Pure-Python wheels at the versions this checkout's .venv runs, and pydantic-core for CPython 3.12.
pure=(webdataset wids braceexpand submitit omegaconf hjson pydantic annotated-types typing-inspection)
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl \
    $(for p in "${pure[@]}"; do echo "$p==$(version "$p")"; done)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "pydantic-core==$(version pydantic-core)"
# DeepSpeed comes as source only: build it here without its ops (dslm uses torch's fused AdamW).
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(version deepspeed)"
ls -l .whl
du -sh .whl
