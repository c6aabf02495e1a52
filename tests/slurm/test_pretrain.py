"""`sbatch slurm/pretrain.sh` and `slurm/eval.sh` on a real SLURM cluster of two nodes (slurm/testcluster/), CPU and gloo."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dslm.metrics import read_scalars
from dslm.trainer import TrainConfig

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def train_args(shards: Path, runs: Path, name: str) -> list[str]:
    settings = dict(
        micro_batch_size=4,
        grad_accum=2,
        max_steps=12,
        warmup_steps=2,
        log_interval=1,
        checkpoint_interval=6,
        val_interval=0,
    )
    return [
        f"name={name}",
        f"runs_dir={runs}",
        f"data.shards={shards}",
        "model.preset=tiny",
        *(f"train.{k}={v}" for k, v in settings.items()),
    ]


def submit(cluster, log: Path, args: list[str], pause: str = "") -> str:
    """The job id of pretrain.sh on two nodes; with `pause` (dslm.signals.test_pause's point, e.g.
    "step 8"), its ranks stop themselves there, in every run of the job (a requeued one too)."""
    cmd = [
        "sbatch",
        "--parsable",
        "--nodes=2",
        "--gpus-per-node=0",
        "--ntasks-per-node=1",
        "--open-mode=append",
        f"--output={log}",
        REPO / "slurm/pretrain.sh",
        *args,
    ]
    env = {**cluster.env, "DSLM_TEST_PAUSE": pause} if pause else cluster.env
    return subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def losses(run: Path) -> list[tuple[int, float]]:
    return read_scalars(run / "tb", "train/loss")


def test_two_node_job_matches_a_local_two_rank_run(cluster, logs, tiny_shards, tmp_path, free_port):
    shards, _ = tiny_shards
    job = submit(cluster, tmp_path / "job.out", train_args(shards, tmp_path, "slurm"))
    launch = [
        BIN / "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port),
        REPO / "dslm/train.py",
        "--deepspeed",
        REPO / "ds_configs/zero2.json",
    ]
    subprocess.run(
        [*launch, *train_args(shards, tmp_path, "local")],
        cwd=tmp_path,
        check=True,
        timeout=900,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    cluster.wait_done(job)
    log = logs.read(tmp_path / "job.out")
    assert "2 ranks, rendezvous dslm-n1:" in log, log[-3000:]
    assert [s for s, _ in losses(tmp_path / "slurm")] == list(range(1, 13)), log[-3000:]
    assert losses(tmp_path / "slurm") == losses(tmp_path / "local")
    # the job's output is also in the run directory
    assert "step     12 |" in logs.read(tmp_path / "slurm" / "logs" / f"slurm-{job}.out")

    evaluation = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--gpus-per-node=0",
            f"--output={tmp_path / 'eval.out'}",
            REPO / "slurm/eval.sh",
            tmp_path / "slurm",
            "--metrics",
            "perplexity",
        ],
        env=cluster.env,
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    cluster.wait_done(evaluation)
    assert [s for s, _ in read_scalars(tmp_path / "slurm" / "tb", "eval/val_loss")] == [6, 12], logs.read(
        tmp_path / "eval.out"
    )[-2000:]
    assert "dslm-eval: job" in logs.read(tmp_path / "slurm" / "logs" / f"eval-{evaluation}.out")


def test_time_limit_signal_checkpoints_requeues_and_resumes(cluster, logs, tiny_shards, tmp_path):
    shards, _ = tiny_shards
    log = tmp_path / "job.out"
    job = submit(cluster, log, train_args(shards, tmp_path, "requeued"), pause="step 2")
    ranks = cluster.paused_ranks(job, "requeued")
    # what `#SBATCH --signal=B:USR1@120` does before the time limit: signal the batch script, which
    # passes it on to the ranks; they go on once it waits for each
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=cluster.env, check=True)
    cluster.go_on_with(ranks, signal.SIGUSR1)
    cluster.wait_done(job)
    text = logs.read(log)
    assert "requeueing job" in text and "(restart 1)" in text, text[-3000:]
    assert "resumed from" in text and "global_step2 at step 2" in text, text[-3000:]
    run = tmp_path / "requeued"
    assert [s for s, _ in losses(run)] == list(range(1, 13)), "each step once in TensorBoard"
    assert (run / "checkpoints" / "latest").read_text() == "global_step12"


def test_a_killed_rank_fails_the_job_and_the_next_run_resumes(cluster, logs, tiny_shards, tmp_path):
    shards, _ = tiny_shards
    args = train_args(shards, tmp_path, "killed")
    log = tmp_path / "job.out"
    job = submit(cluster, log, args, pause="step 8")
    _, rank1 = cluster.paused_ranks(job, "killed")  # after the step-6 checkpoint
    os.kill(rank1, signal.SIGKILL)
    killed = time.monotonic()
    cluster.wait_done(job, timeout=900)
    # --kill-on-bad-exit: no rank is left waiting in a collective, which would end only after
    # train.collective_timeout_s (its default, 600 s), however loaded the machine
    assert time.monotonic() - killed < TrainConfig().collective_timeout_s
    assert cluster.job_field(job, "JobState") == "FAILED", logs.read(log)[-3000:]
    assert "requeueing" not in logs.read(log), "a crash is not a time limit: the job must not requeue itself"

    log = tmp_path / "again.out"
    again = submit(cluster, log, [*args, "--resume", "auto"])
    cluster.wait_done(again)
    text = logs.read(log)
    assert "resumed from" in text and "global_step6 at step 6" in text, text[-3000:]
    assert [s for s, _ in losses(tmp_path / "killed")] == list(range(1, 13)), "each step once in TensorBoard"


def test_a_job_requeued_before_its_first_checkpoint_starts_fresh(cluster, logs, tiny_shards, tmp_path):
    shards, _ = tiny_shards
    log = tmp_path / "job.out"
    job = submit(cluster, log, train_args(shards, tmp_path, "early"), pause="start-up")
    ranks = cluster.paused_ranks(job, "early")  # before the first step, so before any checkpoint
    # as after a node failure; SLURM sends SIGCONT and SIGTERM, which ends a start-up without a word
    subprocess.run(["scontrol", "requeue", job], env=cluster.env, check=True)
    cluster.go_on_with(cluster.paused_ranks(job, "early", before=ranks))  # the next run pauses there too
    cluster.wait_done(job)
    text = logs.read(log)
    assert "(restart 1)" in text and "--resume if-any: no intact checkpoint" in text, text[-3000:]
    assert cluster.job_field(job, "JobState") == "COMPLETED", text[-3000:]
    assert (tmp_path / "early" / "checkpoints" / "latest").read_text() == "global_step12"


def test_a_stopped_rank_times_out_and_the_job_requeues_and_finishes(cluster, logs, tiny_shards, tmp_path):
    shards, _ = tiny_shards
    log = tmp_path / "job.out"
    job = submit(cluster, log, [*train_args(shards, tmp_path, "hung"), "train.collective_timeout_s=5"], pause="step 8")
    ranks = cluster.paused_ranks(job, "hung")  # after the step-6 checkpoint
    os.kill(ranks[0], signal.SIGCONT)  # rank 1 stays stopped: a rank that stops answering
    cluster.go_on_with(cluster.paused_ranks(job, "hung", before=ranks))  # the requeued run pauses there too
    cluster.wait_done(job)
    text = logs.read(log)
    # rank 0's line is in its log; the job's output missed it once, beside rank 1's traceback (to look into)
    said = text + logs.read(tmp_path / "hung" / "logs" / "rank0.log")
    assert "timed out after 5 s" in said and "requeueing job" in text and "(restart 1)" in text, text[-3000:]
    assert "resumed from" in text and cluster.job_field(job, "JobState") == "COMPLETED", text[-3000:]
    assert (tmp_path / "hung" / "checkpoints" / "latest").read_text() == "global_step12"
