"""The CUDA path end to end on one GPU: NCCL, bf16 ZeRO-2, torch's fused AdamW, torch.compile, a
checkpoint resumed, and eval on the GPU. Runs where torch sees a GPU (`bash bench/gpu_check.sh
tests` on a lent machine); CI has none, so there it skips."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dslm.metrics import read_scalars

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CUDA path of dslm)")

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def train(shards: Path, runs: Path, name: str, max_steps: int, *extra: str) -> subprocess.CompletedProcess:
    args = [
        "--deepspeed",
        str(REPO / "ds_configs/zero2.json"),
        f"name={name}",
        f"runs_dir={runs}",
        f"data.shards={shards}",
        "model.preset=tiny",
        "train.compile=true",
        "train.micro_batch_size=8",
        "train.grad_accum=2",
        f"train.max_steps={max_steps}",
        "train.warmup_steps=2",
        "train.lr=3e-3",
        "train.log_interval=1",
        "train.checkpoint_interval=10",
        "train.keep_last=0",
        "train.val_interval=10",
        "train.val_batches=2",
        *extra,
    ]
    proc = subprocess.run([BIN / "dslm-train", *args], cwd=runs, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_one_gpu_trains_with_nccl_compiled_resumes_and_evaluates(tiny_shards, tmp_path):
    shards, _ = tiny_shards
    straight = train(shards, tmp_path, "straight", 20)
    assert (
        "engine: 1 rank on cuda, backend nccl, ZeRO stage 2, bfloat16 weights, fused AdamW, compiled\n"
        in straight.stdout
    )
    loss = dict(read_scalars(tmp_path / "straight" / "tb", "train/loss"))
    assert list(loss) == list(range(1, 21)) and loss[20] < loss[1] - 1.0, loss
    assert all(0 < v < 1 for _, v in read_scalars(tmp_path / "straight" / "tb", "train/mfu"))

    # a second run continues from a copy of the straight run's step-10 checkpoint (a run resumes
    # only from its own tags)
    tag = tmp_path / "resumed" / "checkpoints" / "global_step10"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "global_step10", tag)
    train(shards, tmp_path, "resumed", 20, "--resume", str(tag))
    resumed = dict(read_scalars(tmp_path / "resumed" / "tb", "train/loss"))
    assert list(resumed) == list(range(11, 21))
    # the same steps; GPU kernels (atomics in the backward) need not repeat bit for bit
    for step in resumed:
        assert resumed[step] == pytest.approx(loss[step], abs=2e-2), (step, resumed[step], loss[step])

    ev = subprocess.run(
        [BIN / "dslm-eval", str(tmp_path / "straight"), "--metrics", "perplexity"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads((tmp_path / "straight" / "eval" / "step20.json").read_text())
    assert result["perplexity"]["all"]["loss"] == pytest.approx(loss[20], abs=1.0), result["perplexity"]
