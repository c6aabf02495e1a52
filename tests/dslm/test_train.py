import json
import subprocess
import sys
from pathlib import Path

import pytest

from dslm.config import load_config
from dslm.metrics import read_scalars

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def train_args(shards: Path, runs: Path, **train) -> list[str]:
    settings = dict(micro_batch_size=4, grad_accum=2, max_steps=30, warmup_steps=3, lr=3e-3, min_lr=3e-4,
                    log_interval=5, checkpoint_interval=15) | train
    return ["--deepspeed", str(REPO / "ds_configs/zero2.json"), "name=t", f"runs_dir={runs}",
            f"data.shards={shards}", "model.preset=tiny", *(f"train.{k}={v}" for k, v in settings.items())]


def test_bad_override_is_one_line(tmp_path):
    proc = subprocess.run([BIN / "dslm-train", "train.max_steps=many"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "train.max_steps" in proc.stderr


def test_missing_shards_is_one_line(tmp_path):
    proc = subprocess.run([BIN / "dslm-train", f"data.shards={tmp_path}/none"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("run `dslm-shard build` first")


@pytest.mark.slow
def test_two_rank_zero2_bf16_run_trains_checkpoints_and_evaluates(tiny_shards, tmp_path, free_port):
    shards, _ = tiny_shards
    launch = [BIN / "deepspeed", "--num_gpus", "2", "--master_port", str(free_port), REPO / "dslm/train.py"]
    subprocess.run([*launch, *train_args(shards, tmp_path)], cwd=tmp_path, check=True, timeout=900)
    run = tmp_path / "t"

    loss = read_scalars(run / "tb", "train/loss")
    assert [step for step, _ in loss] == [5, 10, 15, 20, 25, 30]
    assert loss[-1][1] < loss[0][1] - 1.0, loss
    assert [step for step, _ in read_scalars(run / "tb", "train/lr")] == [5, 10, 15, 20, 25, 30]
    assert all(v > 0 for _, v in read_scalars(run / "tb", "train/tokens_per_s"))

    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "global_step30"
    for tag in ("global_step15", "global_step30"):
        files = sorted(p.name for p in (ckpts / tag).iterdir())
        assert "mp_rank_00_model_states.pt" in files and sum("optim_states" in f for f in files) == 2
    assert load_config(run / "config.yaml", []).train.max_steps == 30

    subprocess.run([BIN / "dslm-eval", run], cwd=tmp_path, check=True, timeout=600)
    results = {s: json.loads((run / "eval" / f"step{s}.json").read_text()) for s in (15, 30)}
    assert results[30]["val"]["loss"] < results[15]["val"]["loss"] < 6.0
    assert [s for s, _ in read_scalars(run / "tb", "eval/val_loss")] == [15, 30]
    again = subprocess.run([BIN / "dslm-eval", run], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert again.stdout.count("already evaluated") == 2
    assert [s for s, _ in read_scalars(run / "tb", "eval/val_loss")] == [15, 30]


@pytest.mark.slow
def test_dslm_train_runs_as_a_single_process(tiny_shards, tmp_path):
    shards, _ = tiny_shards
    args = train_args(shards, tmp_path, max_steps=4, warmup_steps=1, log_interval=2, checkpoint_interval=4)
    subprocess.run([BIN / "dslm-train", *args], cwd=tmp_path, check=True, timeout=600)
    assert [s for s, _ in read_scalars(tmp_path / "t" / "tb", "train/loss")] == [2, 4]
    assert (tmp_path / "t" / "checkpoints" / "latest").read_text() == "global_step4"
