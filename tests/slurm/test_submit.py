"""`dslm-submit train` with submitit's SLURM executor on the test cluster: two nodes, requeue on the timeout signal."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dslm.metrics import read_scalars

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_submitit_job_requeues_on_its_timeout_signal_and_resumes(cluster, logs, tiny_shards, tmp_path):
    shards, _ = tiny_shards
    settings = dict(
        micro_batch_size=4,
        grad_accum=2,
        max_steps=16,
        warmup_steps=2,
        log_interval=1,
        checkpoint_interval=8,
        val_interval=0,
    )
    cmd = [
        BIN / "dslm-submit",
        "train",
        "--executor",
        "slurm",
        "--nodes",
        "2",
        "--tasks-per-node",
        "1",
        "--time",
        "30",
        "--max-requeues",
        "2",
        "name=sub",
        f"runs_dir={tmp_path}",
        f"data.shards={shards}",
        "model.preset=tiny",
        *(f"train.{k}={v}" for k, v in settings.items()),
    ]
    env = {**cluster.env, "DSLM_TEST_PAUSE": "step 3"}  # every dslm-train of the job pauses after step 3
    out = subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True, text=True).stdout
    job = out.split("submitted train job ")[1].split()[0]
    log = tmp_path / "sub" / "submitit" / f"{job}_0_log.out"
    assert f"log:         {log}" in out
    ranks = cluster.paused_ranks(job, "sub")
    # what SLURM does `--signal-delay` seconds before the time limit: SIGUSR2 to every process of
    # every task; the ranks go on once it waits for each
    subprocess.run(["scancel", "--signal=USR2", job], env=cluster.env, check=True)
    cluster.go_on_with(ranks, signal.SIGUSR2)
    cluster.wait_done(job)
    text = logs.read(log)
    assert "Caught signal SIGUSR2" in text and "(requeue 1)" in text, text[-3000:]
    assert "resumed from" in text and "Job completed successfully" in text, text[-3000:]
    assert "dslm-n1" in text and "global_rank=0(2)" in text
    steps = [s for s, _ in read_scalars(tmp_path / "sub" / "tb", "train/loss")]
    assert steps == list(range(1, 17)), "each step once in TensorBoard"
