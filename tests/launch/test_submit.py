"""dslm-submit: options, --dry-run, and real jobs with submitit's local executor (2 ranks, gloo)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dslm.checkpoint import list_checkpoints
from dslm.engine import rendezvous_port
from dslm.errors import DslmError
from dslm.metrics import read_scalars
from launch.submit import parse_minutes

REPO = Path(__file__).resolve().parents[2]
SUBMIT = Path(sys.executable).parent / "dslm-submit"


@pytest.mark.parametrize("text, minutes", [("90", 90), ("2:30", 3), ("1:00:00", 60), ("24:00:00", 1440),
                                           ("1-0", 1440), ("1-2:30", 1590), ("0-0:0:30", 1)])
def test_slurm_time_formats(text, minutes):
    assert parse_minutes(text) == minutes


def test_bad_time_is_an_error():
    with pytest.raises(DslmError, match="not a SLURM time"):
        parse_minutes("1h")


def dslm_submit(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([SUBMIT, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="the sbatch script text comes from submitit's SLURM executor, "
                    "which needs sbatch on the PATH (.ci/run installs slurm-client)")
def test_dry_run_prints_the_sbatch_script_and_submits_nothing(tmp_path):
    result = dslm_submit("train", "--executor", "slurm", "--dry-run", "--nodes", "2", "--gpus-per-node", "8",
                         "--partition", "gpu", "--time", "4:00:00", "--slurm", "account=lm",
                         "launch/recipes/demo.yaml", f"runs_dir={tmp_path}", "train.max_steps=500")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=240", "#SBATCH --signal=USR2@120", "#SBATCH --account=lm",
                 "--kill-on-bad-exit=1"):
        assert line in out, line
    assert "dslm-train --config launch/recipes/demo.yaml" in out and "train.max_steps=500" in out
    assert f"logs: {tmp_path / 'demo' / 'submitit'}" in out
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("args, message", [
    (["train", "--executor", "local", "--nodes", "2", "launch/recipes/demo.yaml"], "--nodes 2 needs SLURM"),
    (["train", "--executor", "local", "--time", "soon", "launch/recipes/demo.yaml"], "not a SLURM time"),
    (["train", "--executor", "local", "launch/recipes/demo.yaml", "train.max_steps=-1"], "train.max_steps=-1"),
    (["train", "--executor", "local", "a.yaml", "b.yaml"], "one recipe at most"),
    (["eval", "--executor", "local", "runs/no-such-run"], "does not exist"),
])
def test_bad_input_is_one_line_and_status_2(args, message, tmp_path):
    result = dslm_submit(*args, "--dry-run")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "dslm-submit: error" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr


def tiny_run(shards: Path, runs: Path, name: str, steps: int) -> list[str]:
    settings = dict(micro_batch_size=4, grad_accum=2, max_steps=steps, warmup_steps=2, log_interval=1,
                    checkpoint_interval=6, val_interval=0)
    return [f"name={name}", f"runs_dir={runs}", f"data.shards={shards}", "model.preset=tiny",
            *(f"train.{k}={v}" for k, v in settings.items())]


def task_pids(folder: Path) -> list[int]:
    """The processes of submitit's tasks (not their dslm-train children)."""
    out = subprocess.run(["pgrep", "-f", f"submitit.core._submit {folder}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def submit_local(args: list[str], *options: str) -> subprocess.Popen:
    return subprocess.Popen([SUBMIT, "train", "--executor", "local", "--tasks-per-node", "2", "--wait", *options, *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def rank0_log(folder: Path, submitter: subprocess.Popen, timeout: float = 120) -> Path:
    """The log of task 0, once the job has started."""
    end = time.monotonic() + timeout
    while not (found := sorted(folder.glob("*_0_log.out"))):
        assert time.monotonic() < end and submitter.poll() is None, "the job never started"
        time.sleep(0.2)
    return found[0]


def time_out(folder: Path) -> None:
    """What submitit's local executor does `--signal-delay` seconds before the time limit: SIGUSR2 to every task."""
    for pid in task_pids(folder):
        os.kill(pid, signal.SIGUSR2)


@pytest.mark.slow
def test_local_job_requeues_on_its_timeout_signal_resumes_and_its_run_evaluates(tiny_shards, tmp_path, logs):
    shards, _ = tiny_shards
    submitter = submit_local(tiny_run(shards, tmp_path, "local", 16))
    folder = tmp_path / "local" / "submitit"
    log = rank0_log(folder, submitter)
    logs.wait_for(log, "step      3 |", lambda: submitter.poll() is None)
    time_out(folder)
    out, _ = submitter.communicate(timeout=600)
    assert submitter.returncode == 0, out
    text = logs.read(log)
    assert "Caught signal SIGUSR2" in text and "(requeue 1)" in text and "resumed from" in text, text[-3000:]
    steps = [s for s, _ in read_scalars(tmp_path / "local" / "tb", "train/loss")]
    assert steps == list(range(1, 17)), "each step once in TensorBoard"

    # and an eval job on the same executor evaluates the run's checkpoints
    result = dslm_submit("eval", "--executor", "local", "--wait", str(tmp_path / "local"), "--metrics", "perplexity")
    assert result.returncode == 0, result.stdout + result.stderr
    kept = sorted(step for step, _ in list_checkpoints(tmp_path / "local" / "checkpoints"))
    assert [s for s, _ in read_scalars(tmp_path / "local" / "tb", "eval/val_loss")] == kept


@pytest.mark.slow
def test_requeues_are_bounded_and_the_run_stays_resumable(tiny_shards, tmp_path, logs):
    shards, _ = tiny_shards
    submitter = submit_local(tiny_run(shards, tmp_path, "bounded", 400), "--max-requeues", "0")
    folder = tmp_path / "bounded" / "submitit"
    log = rank0_log(folder, submitter)
    logs.wait_for(log, "step      3 |", lambda: submitter.poll() is None)
    time_out(folder)
    out, _ = submitter.communicate(timeout=300)
    assert submitter.returncode == 1 and "failed" in out, out
    assert "--max-requeues 0 reached" in logs.read(log)
    latest = (tmp_path / "bounded" / "checkpoints" / "latest").read_text()
    assert int(latest.removeprefix("global_step")) >= 3, "stopped at a checkpoint"


def test_the_dry_run_script_guard_names_submitit_when_its_private_builder_changes(tmp_path, monkeypatch):
    import submitit

    from launch.submit import sbatch_script

    executor = submitit.SlurmExecutor(folder=tmp_path)
    assert "#SBATCH" in sbatch_script(executor)
    # a version whose builder takes other arguments
    monkeypatch.setattr(submitit.SlurmExecutor, "_make_submission_file_text", lambda self, text: text)
    with pytest.raises(DslmError, match=r"submitit .*_make_submission_file_text.*submitit==1\."):
        sbatch_script(executor)


def test_a_requeued_train_job_resumes_if_it_can_and_a_first_start_does_not(monkeypatch):
    from launch.submit import TrainJob

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    job = TrainJob(argv=["dslm-train", "name=x"], max_requeues=3)
    assert job.command() == ["dslm-train", "name=x"]
    assert TrainJob(argv=job.argv, max_requeues=3, requeues=1).command() == ["dslm-train", "name=x", "--resume", "if-any"]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # requeued by SLURM itself (preemption)
    assert job.command()[-2:] == ["--resume", "if-any"]
    typed = TrainJob(argv=["dslm-train", "--resume", "auto"], max_requeues=3, requeues=1)
    assert typed.command() == typed.argv, "a --resume the person gave is kept"


def test_the_tasks_rendezvous_port_follows_the_job_and_can_be_overridden(monkeypatch):
    from launch.submit import rank_env

    class Job:  # what submitit.JobEnvironment gives rank_env
        job_id, global_rank, local_rank, num_tasks, num_nodes, hostnames = "123456_0", 0, 0, 2, 1, ["n1"]

    monkeypatch.delenv("DSLM_MASTER_PORT", raising=False)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert rank_env(Job())["MASTER_PORT"] == str(rendezvous_port(1234560, 1))
    monkeypatch.setenv("DSLM_MASTER_PORT", "23456")
    assert rank_env(Job())["MASTER_PORT"] == "23456"


@pytest.mark.slow
def test_a_failed_rendezvous_requeues_the_job_within_max_requeues(tiny_shards, tmp_path, logs):
    shards, _ = tiny_shards
    # DSLM_MASTER_PORT names a port another process holds. One task: on the local executor a second rank,
    # connected to that process instead of rank 0, would wait until it answers (on SLURM, srun ends it)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args = [*tiny_run(shards, tmp_path, "taken", 4), "train.collective_timeout_s=5"]
        submitter = subprocess.Popen(
            [SUBMIT, "train", "--executor", "local", "--tasks-per-node", "1", "--wait", "--max-requeues", "1", *args],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "DSLM_MASTER_PORT": str(taken.getsockname()[1])})
        out, _ = submitter.communicate(timeout=600)
    assert submitter.returncode == 1, out
    text = logs.read(rank0_log(tmp_path / "taken" / "submitit", submitter))
    assert "EADDRINUSE" in text and "(a rank or the rendezvous failed): requeueing" in text, text[-3000:]
    assert "(requeue 1)" in text and "--max-requeues 1 reached" in text, text[-3000:]
