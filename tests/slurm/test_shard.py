"""`dslm-submit shard` with submitit's SLURM executor on the test cluster: a build in two tasks across
the two nodes, one write task stopped and requeued mid-way, then a training run on the result."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dslm.data.manifest import Manifest
from dslm.metrics import read_scalars
from dslm_shards.journal import JOURNAL_NAME
from tests.conftest import STDLIB
from tests.shards.test_tasks import same_documents

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def build_args(tokenizer: Path, out: Path) -> list[str]:
    """The Python of the whole standard library (a few million tokens, one language) in shards of
    20 samples of 64 tokens, one worker: a write stage of thousands of shards, long enough to be
    stopped mid-way."""
    excluded = ("site-packages/*", "dist-packages/*", "test/*", "idlelib/*", "*.c", "*.h", "*.java")
    return [
        "--source",
        f"code:{STDLIB}",
        *(a for glob in excluded for a in ("--exclude", glob)),
        "--tokenizer",
        str(tokenizer),
        "--out",
        str(out),
        "--seq-len",
        "64",
        "--samples-per-shard",
        "20",
        "--val-fraction",
        "0.1",
        "--workers",
        "1",
    ]


def submitted_ids(submitter: subprocess.Popen) -> dict[str, str]:
    """The job (array) id of each step, from dslm-submit's lines `  STEP: job [array ]ID...`."""
    ids: dict[str, str] = {}
    for line in submitter.stdout:
        if match := re.match(r"  (\w+): +job (?:array )?(\d+)", line):
            ids[match[1]] = match[2]
        if line.startswith("  logs:"):
            return ids
    raise AssertionError(f"dslm-submit ended without submitting (status {submitter.wait()})")


def wait_for_file(path: Path, alive, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end and alive(), f"{path} never appeared"
        time.sleep(0.2)


def test_a_shard_build_in_two_array_tasks_requeues_mid_write_and_trains(cluster, logs, tiny_shards, tmp_path):
    tokenizer, out = tiny_shards[0] / "tokenizer.json", tmp_path / "out"
    submitter = subprocess.Popen(
        [
            BIN / "dslm-submit",
            "shard",
            "--executor",
            "slurm",
            "--tasks",
            "2",
            "--cpus-per-task",
            "2",
            "--time",
            "30",
            "--max-requeues",
            "2",
            "--wait",
            *build_args(tokenizer, out),
        ],
        env=cluster.env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ids = submitted_ids(submitter)
    assert list(ids) == ["digests", "dedup", "write", "merge"], ids
    for before, step in (("dedup", "write"), ("write", "merge")):  # (dedup's may be met already)
        assert cluster.job_field(ids[step], "Dependency").startswith(f"afterok:{ids[before]}"), step
    # what SLURM does `--signal-delay` seconds before the time limit, to write task 1 once its journal
    # holds finished shards (it writes the journal after each batch that finished one)
    wait_for_file(out / "task-00001" / JOURNAL_NAME, lambda: submitter.poll() is None)
    subprocess.run(["scancel", "--signal=USR2", f"{ids['write']}_1"], env=cluster.env, check=True)
    text, _ = submitter.communicate(timeout=900)
    assert submitter.returncode == 0, text[-3000:]
    assert f"merge task 0 (job {ids['merge']}) finished" in text, text[-3000:]

    log = logs.read(out / "submitit" / f"{ids['write']}_1_0_log.out")
    assert "Caught signal SIGUSR2" in log and "(requeue 1)" in log, log[-3000:]
    assert "task 1 of 2, stage write: done" in log.split("(requeue 1)")[1], log[-3000:]
    nodes = {cluster.job_field(f"{ids['digests']}_{k}", "NodeList") for k in (0, 1)}
    assert nodes == {"dslm-n1", "dslm-n2"}, "one task per node (each takes both of a node's CPUs)"
    verify = subprocess.run([BIN / "dslm-shard", "verify", out], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    # the documents and counts of one process's build of the same inputs
    subprocess.run(
        [BIN / "dslm-shard", "build", *build_args(tokenizer, tmp_path / "one")],
        check=True,
        capture_output=True,
        timeout=900,
    )
    one, many = Manifest.load(tmp_path / "one"), Manifest.load(out)
    assert many.sources == one.sources and many.dropped_tokens == one.dropped_tokens
    for split in ("train", "val"):
        same_documents(tmp_path / "one", out, split)

    # and they train
    settings = dict(
        micro_batch_size=4,
        grad_accum=2,
        max_steps=4,
        warmup_steps=2,
        log_interval=1,
        checkpoint_interval=4,
        val_interval=0,
    )
    train = [
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
        "name=sharded",
        f"runs_dir={tmp_path}",
        f"data.shards={out}",
        "model.preset=tiny",
        *(f"train.{k}={v}" for k, v in settings.items()),
    ]
    printed = subprocess.run(train, env=cluster.env, cwd=REPO, check=True, capture_output=True, text=True).stdout
    job = printed.split("submitted train job ")[1].split()[0]
    cluster.wait_done(job)
    train_log = logs.read(tmp_path / "sharded" / "submitit" / f"{job}_0_log.out")
    assert "Job completed successfully" in train_log, train_log[-3000:]
    assert [s for s, _ in read_scalars(tmp_path / "sharded" / "tb", "train/loss")] == [1, 2, 3, 4]

    # the requeued write task went on from its journaled shards instead of starting over (with
    # 20-sample shards, the journal's open shard is always finished and renamed by the stop: the
    # resume takes it back, shards/build.py's roll_back_unjournaled)
    resumed = log.split("(requeue 1)")[1]
    assert "cannot resume" not in resumed and "build (kept " in resumed, resumed[:3000]


def test_a_failed_step_is_one_line_and_the_steps_after_it_never_run(cluster, tiny_shards, tmp_path):
    (tmp_path / "web.jsonl").write_text('{"text": "a page of the web"}\n')  # found only when read: in the queue
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
    submitter = subprocess.Popen(
        [BIN / "dslm-submit", "shard", "--executor", "slurm", "--tasks", "2", "--wait", *args],
        env=cluster.env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ids = submitted_ids(submitter)
    _, errors = submitter.communicate(timeout=900)
    assert submitter.returncode == 1
    [line] = [e for e in errors.splitlines() if e.startswith("dslm-submit:")]
    assert line.startswith(
        f"dslm-submit: digests task 0 (job {ids['digests']}_0) failed: dslm-shard: error: source "
    ), line
    assert "lack FineWeb's columns id, dump" in line, line
    assert f"(log: {tmp_path / 'out' / 'submitit' / ids['digests']}_0_0_log.out)" in line, line
    for step in ("dedup", "write", "merge"):
        cluster.wait_done(ids[step], timeout=600)
        assert not list((tmp_path / "out" / "submitit").glob(f"{ids[step]}_*log.out")), f"{step} never ran"


def test_a_submission_sbatch_refuses_is_one_line(cluster, tiny_shards, code_corpus, tmp_path):
    args = [
        "--source",
        f"code:{code_corpus}",
        "--tokenizer",
        str(tiny_shards[0] / "tokenizer.json"),
        "--out",
        str(tmp_path / "out"),
    ]
    result = subprocess.run(
        [BIN / "dslm-submit", "shard", "--executor", "slurm", "--tasks", "2", "--partition", "nope", *args],
        env=cluster.env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = [e for e in result.stderr.splitlines() if e.startswith("dslm-submit:")]
    assert line.startswith("dslm-submit: error: the job was not submitted: sbatch: error: ") and "partition" in line, (
        line
    )
    assert "Traceback" not in result.stderr
