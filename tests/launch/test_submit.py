"""dslm-submit: options, --dry-run, and real jobs with submitit's local executor (2 ranks, gloo; a 2-task shard build)."""

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dslm.checkpoint.format import list_checkpoints
from dslm.data.manifest import Manifest
from dslm.engine import rendezvous_port
from dslm.errors import DslmError
from dslm.metrics import read_scalars
from dslm_launch.submit import failure, parse_minutes
from tests.shards.test_tasks import same_documents

REPO = Path(__file__).resolve().parents[2]
SUBMIT = Path(sys.executable).parent / "dslm-submit"


@pytest.mark.parametrize(
    "text, minutes",
    [("90", 90), ("2:30", 3), ("1:00:00", 60), ("24:00:00", 1440), ("1-0", 1440), ("1-2:30", 1590), ("0-0:0:30", 1)],
)
def test_slurm_time_formats(text, minutes):
    assert parse_minutes(text) == minutes


def test_bad_time_is_an_error():
    with pytest.raises(DslmError, match="not a SLURM time"):
        parse_minutes("1h")


def test_a_failed_jobs_error_line_is_found_in_whichever_tasks_log_holds_it(tmp_path):
    """dslm-train's ranks print an error they share once (dslm.logs), in the log of the rank that
    reported it first."""
    error = "dslm-train: error: train.freeze_blocks=5 is more than the model's 2 blocks (model.n_layer)"
    (tmp_path / "7_0_log.out").write_text("dslm-submit: job 7 (requeue 0): dslm-train ...\n")
    (tmp_path / "7_1_log.out").write_text(f"dslm-submit: job 7 (requeue 0): dslm-train ...\n{error}\n")
    reported = RuntimeError("submitit's trace\nDslmError: dslm-train exited with status 2\n\n--- logs ---")
    assert failure(reported, tmp_path / "7_0_log.out") == error
    (tmp_path / "7_1_log.out").unlink()
    assert failure(reported, tmp_path / "7_0_log.out") == "DslmError: dslm-train exited with status 2"


def dslm_submit(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([SUBMIT, *args], cwd=cwd, capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.skipif(
    shutil.which("sbatch") is None,
    reason="the sbatch script text comes from submitit's SLURM executor, "
    "which needs sbatch on the PATH (.ci/run installs slurm-client)",
)
def test_dry_run_prints_the_sbatch_script_and_submits_nothing(tmp_path):
    result = dslm_submit(
        "train",
        "--executor",
        "slurm",
        "--dry-run",
        "--nodes",
        "2",
        "--gpus-per-node",
        "8",
        "--partition",
        "gpu",
        "--time",
        "4:00:00",
        "--slurm",
        "account=lm",
        "launch/recipes/demo.yaml",
        f"runs_dir={tmp_path}",
        "train.max_steps=500",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=240",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --account=lm",
        "--kill-on-bad-exit=1",
    ):
        assert line in out, line
    assert "dslm-train --config launch/recipes/demo.yaml" in out and "train.max_steps=500" in out
    assert f"logs: {tmp_path / 'demo' / 'submitit'}" in out
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--executor", "local", "--nodes", "2", "launch/recipes/demo.yaml"], "--nodes 2 needs SLURM"),
        (["train", "--executor", "local", "--time", "soon", "launch/recipes/demo.yaml"], "not a SLURM time"),
        (["train", "--executor", "local", "launch/recipes/demo.yaml", "train.max_steps=-1"], "train.max_steps=-1"),
        (["train", "--executor", "local", "a.yaml", "b.yaml"], "one recipe at most"),
        (["eval", "--executor", "local", "runs/no-such-run"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_status_2(args, message, tmp_path):
    result = dslm_submit(*args, "--dry-run")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "dslm-submit: error" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr


def tiny_run(shards: Path, runs: Path, name: str, steps: int) -> list[str]:
    settings = dict(
        micro_batch_size=4,
        grad_accum=2,
        max_steps=steps,
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


def task_pids(folder: Path) -> list[int]:
    """The processes of submitit's tasks (not their dslm-train children)."""
    out = subprocess.run(["pgrep", "-f", f"submitit.core._submit {folder}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def submit_local(args: list[str], *options: str) -> subprocess.Popen:
    return subprocess.Popen(
        [SUBMIT, "train", "--executor", "local", "--tasks-per-node", "2", "--wait", *options, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


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
    out, _ = submitter.communicate(timeout=900)
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
    out, _ = submitter.communicate(timeout=900)
    assert submitter.returncode == 1 and "failed" in out, out
    assert "--max-requeues 0 reached" in logs.read(log)
    latest = (tmp_path / "bounded" / "checkpoints" / "latest").read_text()
    assert int(latest.removeprefix("global_step")) >= 3, "stopped at a checkpoint"


def test_the_dry_run_script_guard_names_submitit_when_its_private_builder_changes(tmp_path, monkeypatch):
    import submitit

    from dslm_launch.submit import sbatch_script

    executor = submitit.SlurmExecutor(folder=tmp_path)
    assert "#SBATCH" in sbatch_script(executor)
    # a version whose builder takes other arguments
    monkeypatch.setattr(submitit.SlurmExecutor, "_make_submission_file_text", lambda self, text: text)
    with pytest.raises(DslmError, match=r"submitit .*_make_submission_file_text.*submitit==1\."):
        sbatch_script(executor)


def test_a_requeued_train_job_resumes_if_it_can_and_a_first_start_does_not(monkeypatch):
    from dslm_launch.submit import TrainJob

    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    job = TrainJob(argv=["dslm-train", "name=x"], max_requeues=3)
    assert job.command() == ["dslm-train", "name=x"]
    assert TrainJob(argv=job.argv, max_requeues=3, requeues=1).command() == [
        "dslm-train",
        "name=x",
        "--resume",
        "if-any",
    ]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # requeued by SLURM itself (preemption)
    assert job.command()[-2:] == ["--resume", "if-any"]
    typed = TrainJob(argv=["dslm-train", "--resume", "auto"], max_requeues=3, requeues=1)
    assert typed.command() == typed.argv, "a --resume the person gave is kept"


def test_the_tasks_rendezvous_port_follows_the_job_and_can_be_overridden(monkeypatch):
    from dslm_launch.submit import rank_env

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
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "DSLM_MASTER_PORT": str(taken.getsockname()[1])},
        )
        out, _ = submitter.communicate(timeout=900)
    assert submitter.returncode == 1, out
    text = logs.read(rank0_log(tmp_path / "taken" / "submitit", submitter))
    assert "EADDRINUSE" in text and "(a rank or the rendezvous failed): requeueing" in text, text[-3000:]
    assert "(requeue 1)" in text and "--max-requeues 1 reached" in text, text[-3000:]


# --- dslm-submit shard -------------------------------------------------------------------------

BIN = Path(sys.executable).parent
STAGES = ("digests", "dedup", "write")


def build_args(corpus: Path, tokenizer: Path, out: Path, *more: str) -> list[str]:
    return [
        "--source",
        f"code:{corpus}",
        "--tokenizer",
        str(tokenizer),
        "--out",
        str(out),
        "--seq-len",
        "64",
        "--samples-per-shard",
        "50",
        *more,
    ]


@pytest.fixture
def a_build(code_corpus, tiny_shards, tmp_path) -> list[str]:
    """dslm-shard build's arguments."""
    return build_args(code_corpus, tiny_shards[0] / "tokenizer.json", tmp_path / "out")


@pytest.mark.skipif(
    shutil.which("sbatch") is None,
    reason="the sbatch script text comes from submitit's SLURM executor, "
    "which needs sbatch on the PATH (.ci/run installs slurm-client)",
)
def test_a_shard_dry_run_on_slurm_prints_three_chained_arrays_and_the_merge(a_build, tmp_path):
    result = dslm_submit(
        "shard",
        "--executor",
        "slurm",
        "--dry-run",
        "--tasks",
        "2",
        "--cpus-per-task",
        "4",
        "--time",
        "1:00:00",
        "--slurm",
        "account=lm",
        *a_build,
        "--overwrite",
    )
    assert result.returncode == 0, result.stderr
    out, folder = result.stdout, tmp_path / "out"
    assert f"logs: {folder / 'submitit'}" in out and "steps: digests -> dedup -> write -> merge" in out
    assert f"first: the earlier build in {folder} is cleared" in out
    for stage in STAGES:
        task_k = [BIN / "dslm-shard", "build", *a_build, "--tasks", "2", "--task", "K", "--stage", stage]
        assert f"{stage}: 2 tasks, K = 0 .. 1\n  {shlex.join(map(str, task_k))}\n" in out
    assert f"merge: 1 task\n  {BIN / 'dslm-shard'} merge {folder}\n" in out
    assert "--overwrite" not in out.split("steps:")[1], "the tasks do not get --overwrite"
    scripts = dict(zip(("digests", "dedup", "write", "merge"), out.split("sbatch script of ")[1:]))
    for name, script in scripts.items():
        for line in (
            f"#SBATCH --job-name=dslm-shard-{name}",
            "#SBATCH --nodes=1",
            "#SBATCH --ntasks-per-node=1",
            "#SBATCH --cpus-per-task=4",
            "#SBATCH --time=60",
            "#SBATCH --signal=USR2@120",
            "#SBATCH --account=lm",
            f"#SBATCH --output={folder / 'submitit'}",
        ):
            assert line in script, (name, line)
        assert ("#SBATCH --array=0-1%2" in script) == (name != "merge"), name
    assert "--dependency" not in scripts["digests"] and "--kill-on-invalid-dep" not in scripts["digests"]
    for before, name in (("digests", "dedup"), ("dedup", "write"), ("write", "merge")):
        assert f"#SBATCH --dependency=afterok:{before.upper()}_JOB_ID\n" in scripts[name]
        assert "#SBATCH --kill-on-invalid-dep=yes\n" in scripts[name], "ended by SLURM when the step before failed"
    assert not folder.exists(), "a dry run submits, clears and creates nothing"


def test_a_local_shard_dry_run_shares_the_cores_among_the_tasks(a_build, tmp_path):
    result = dslm_submit("shard", "--executor", "local", "--dry-run", "--tasks", "2", *a_build)
    assert result.returncode == 0, result.stderr
    workers = max(1, len(os.sched_getaffinity(0)) // 2)
    for stage in STAGES:
        task_k = [
            BIN / "dslm-shard",
            "build",
            "--workers",
            str(workers),
            *a_build,
            "--tasks",
            "2",
            "--task",
            "K",
            "--stage",
            stage,
        ]
        assert shlex.join(map(str, task_k)) in result.stdout
    assert "(dslm-submit waits)" in result.stdout and "sbatch" not in result.stdout
    given = dslm_submit("shard", "--executor", "local", "--dry-run", "--tasks", "2", *a_build, "--workers=3")
    assert given.returncode == 0, given.stderr
    assert given.stdout.count("--workers") == 3 and given.stdout.count("--workers=3") == 3, "the person's --workers"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "2", "--task", "1"], "--task: dslm-submit gives every task its --tasks, --task and --stage"),
        (["--tasks", "2", "--stage=write"], "--stage=write: dslm-submit gives every task"),
        (["--tasks", "2", "--tasks", "3"], "--tasks is given once"),
        (["--tasks", "0"], "--tasks 0 must be within 1..10,000"),
        (["--tasks", str(10**9), "--dry-run"], "--tasks 1000000000 must be within 1..10,000"),
        (["--tasks", "2", "--seq-len", "many"], "argument --seq-len: invalid int value"),
        (["--tasks", "2", "--workers", "-1"], "workers -1 must not be negative"),
        (["--tasks", "2", "--cpus-per-task", "0"], "--cpus-per-task must be at least 1"),
        (["--tasks", "2", "--val-fraction", "1"], "val_fraction 1.0 must be in [0, 1)"),
        (["--tasks", "2", "--no-such-option"], "unrecognized arguments: --no-such-option"),
        ([], "the following arguments are required: --tasks"),
    ],
)
def test_bad_shard_input_is_one_line_and_status_2(a_build, args, message, tmp_path):
    result = dslm_submit("shard", "--executor", "local", *args, *a_build)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_a_bad_tokenizer_is_one_line_before_anything_is_submitted(code_corpus, tmp_path):
    args = build_args(code_corpus, code_corpus / "json" / "decoder.py", tmp_path / "out")
    result = dslm_submit("shard", "--executor", "local", "--tasks", "2", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("error:") == 1 and "not a tokenizer.json" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_build_arguments_are_named_by_dslm_shard(code_corpus, tmp_path):
    result = dslm_submit("shard", "--executor", "local", "--tasks", "2", "--source", f"code:{code_corpus}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "dslm-shard build: error: the following arguments are required: --tokenizer, --out "
        "(see dslm-shard build --help)"
    ], result.stderr


def test_a_shard_build_into_a_finished_one_or_of_a_missing_source_is_refused_before_submitting(a_build, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.json").write_text("{}")
    result = dslm_submit("shard", "--executor", "local", "--tasks", "2", *a_build)
    assert result.returncode == 2 and "already holds a finished build" in result.stderr, result.stderr
    assert "--overwrite" in result.stderr and not (tmp_path / "out" / "submitit").exists()
    missing = dslm_submit(
        "shard", "--executor", "local", "--tasks", "2", "--source", f"code:{tmp_path / 'nothing'}", *a_build
    )
    assert missing.returncode == 2 and "nothing' is not a folder" in missing.stderr, missing.stderr


@pytest.mark.slow
def test_a_local_shard_build_runs_each_stage_then_the_merge(code_corpus, tiny_shards, tmp_path):
    shards, manifest = tiny_shards
    out = tmp_path / "out"
    args = build_args(code_corpus, shards / "tokenizer.json", out, "--val-fraction", "0.1", "--workers", "1")
    result = dslm_submit("shard", "--executor", "local", "--tasks", "2", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in STAGES:
        assert f"{stage}: 2 tasks on this machine" in result.stdout
        assert f"{stage} task 1 (job " in result.stdout
    assert "merge task 0 (job " in result.stdout
    verify = subprocess.run([BIN / "dslm-shard", "verify", out], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # the documents and counts of one process's build of the same inputs (tiny_shards: other shard sizes)
    assert Manifest.load(out).sources == manifest.sources
    for split in ("train", "val"):
        same_documents(shards, out, split)


@pytest.mark.slow
def test_a_failed_local_shard_task_is_one_line_naming_it_and_its_log(tiny_shards, tmp_path):
    """A fault only reading finds (FineWeb records without FineWeb's columns) fails in the task."""
    (tmp_path / "web.jsonl").write_text('{"text": "a page of the web"}\n')
    args = [
        "--source",
        f"fineweb:{tmp_path / 'web.jsonl'}",
        "--tokenizer",
        str(tiny_shards[0] / "tokenizer.json"),
        "--out",
        str(tmp_path / "out"),
        "--workers",
        "1",
    ]
    result = dslm_submit("shard", "--executor", "local", "--tasks", "2", *args)
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = [e for e in result.stderr.strip().splitlines() if e.startswith("dslm-submit:")]
    assert line.startswith("dslm-submit: digests task 0 (job ") and "lack FineWeb's columns id, dump" in line, line
    log = Path(line.rsplit("(log: ", 1)[1].rstrip(")"))
    assert log.parent == tmp_path / "out" / "submitit" and log.exists(), line
    assert "dedup" not in result.stdout, "the next stage never started"
