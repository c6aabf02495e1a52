"""Runs that stop early (issue 27): on stop signals as schedulers and terminals send them (to every
process of the job, to the launch's process group, Ctrl-C; during start-up and during training),
and when a loader runs out of open files. Each test pauses the run at a known point
(DSLM_TEST_PAUSE: the ranks stop themselves) before it acts."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from dslm.checkpoint.weights import load_fp32_weights
from dslm.model import ModelConfig
from dslm_local.errors import EXIT_STOPPED

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def args_for(shards: Path, runs: Path, max_steps: int) -> list[str]:
    return [
        "--deepspeed",
        str(REPO / "ds_configs/zero2.json"),
        "name=t",
        f"runs_dir={runs}",
        f"data.shards={shards}",
        "model.preset=tiny",
        "model.dropout=0.1",
        "train.micro_batch_size=4",
        "train.grad_accum=2",
        f"train.max_steps={max_steps}",
        "train.warmup_steps=1",
        "train.log_interval=1",
        "train.checkpoint_interval=100",
        "train.val_interval=0",
        "train.keep_last=0",
        "data.num_workers=1",
    ]


def start(args: list[str], cwd: Path, pause: str, nproc: int = 2) -> subprocess.Popen:
    """dslm-train with `nproc` ranks (its own launcher) in a process group of its own, each rank
    stopping itself at `pause`."""
    command = [BIN / "dslm-train", "--nproc-per-node", str(nproc), *args] if nproc > 1 else [BIN / "dslm-train", *args]
    return subprocess.Popen(
        command,
        cwd=cwd,
        env={**os.environ, "DSLM_TEST_PAUSE": pause},
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def resume(proc: subprocess.Popen, ranks: list[psutil.Process]) -> tuple[int, str, str]:
    for rank in ranks:
        rank.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=900)
    return proc.returncode, out, err


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_fp32_weights(run / "checkpoints" / f"global_step{step}", ModelConfig(preset="tiny", dropout=0.1))


@pytest.mark.slow
def test_sigterm_to_every_process_and_ctrl_c_stop_with_a_checkpoint_and_resume_bitwise(tiny_shards, tmp_path, paused):
    """SIGTERM to every process of the job (what SLURM's job end and scancel do, loader workers too),
    then Ctrl-C (SIGINT to the launch's foreground group): each stops the 2 ranks at the step
    boundary with a checkpoint and exit 75; the run resumed twice ends bitwise as one that was never
    stopped."""
    shards = tiny_shards[0]
    straight = subprocess.run(
        [BIN / "dslm-train", "--nproc-per-node", "2", *args_for(shards, tmp_path / "a", 6)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    args = args_for(shards, tmp_path / "b", 6)

    proc = start(args, tmp_path, "step 2")
    ranks = paused(proc, 2)
    everything = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert len(everything) >= 5, "the launcher, 2 ranks and their loader workers"
    for p in everything:
        p.send_signal(signal.SIGTERM)
    code, out, err = resume(proc, ranks)
    assert code == EXIT_STOPPED, err[-3000:]
    assert "Traceback" not in err and "stopped at step 2 on SIGTERM after a checkpoint" in out, err[-3000:]

    proc = start([*args, "--resume", "auto"], tmp_path, "step 4")
    ranks = paused(proc, 2)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground process group
    code, out, err = resume(proc, ranks)
    assert code == EXIT_STOPPED, err[-3000:]
    assert "stopped at step 4 on SIGINT after a checkpoint; continue with --resume auto" in out, out[-3000:]
    said = "SIGINT: stopping at the next step boundary after a checkpoint (Ctrl-C again to stop at once)"
    assert err.count(said) == 1

    last = subprocess.run(
        [BIN / "dslm-train", "--nproc-per-node", "2", *args, "--resume", "auto"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert last.returncode == 0, last.stderr[-3000:]
    expected, got = weights(tmp_path / "a" / "t", 6), weights(tmp_path / "b" / "t", 6)
    assert all(torch.equal(expected[name], got[name]) for name in expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    "point, nproc, sig",
    [
        ("start-up", 1, signal.SIGTERM),
        ("start-up", 2, signal.SIGINT),
        ("imports", 1, signal.SIGTERM),
        ("imports", 1, signal.SIGINT),
    ],
)
def test_a_stop_signal_during_start_up_is_one_line_and_a_clean_exit(tiny_shards, tmp_path, point, nproc, sig, paused):
    """From the first instruction on: "imports" is while Python imports torch (dslm.signals), before
    dslm.stop's handlers exist (a new user's try: exit 143 without a word, or a KeyboardInterrupt
    traceback)."""
    proc = start(args_for(tiny_shards[0], tmp_path, 6), tmp_path, point, nproc)
    ranks = paused(proc, nproc)
    os.killpg(proc.pid, sig)
    code, out, err = resume(proc, ranks)
    assert code == EXIT_STOPPED, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("dslm-train:")]
    assert lines == [
        f"dslm-train: error: stopped on {sig.name} during start-up, before the first step: no checkpoint "
        f"was written and the run stands as it was; run the same command again"
    ], err[-3000:]
    assert "Traceback" not in err
    assert not list((tmp_path / "t" / "checkpoints").glob("global_step*"))


@pytest.mark.slow
def test_a_loader_out_of_open_files_stops_at_a_step_boundary_after_a_checkpoint_with_one_line(
    many_shards, tmp_path, paused
):
    """The worker's soft limit lowered under it (as another limit or process could): it cannot open
    its next shard. That is the process's limit, not a damaged shard (data.on_bad_shard): the run
    stops after a checkpoint and names the limit and the settings."""
    args = [
        a.replace("train.micro_batch_size=4", "train.micro_batch_size=8")
        for a in args_for(many_shards[0], tmp_path, 50)
    ]
    proc = start(args, tmp_path, "step 3", nproc=1)
    [rank] = paused(proc, 1)
    [worker] = rank.children()
    worker.rlimit(psutil.RLIMIT_NOFILE, (16, worker.rlimit(psutil.RLIMIT_NOFILE)[1]))
    code, out, err = resume(proc, [rank])
    assert code == 2 and "Traceback" not in err, err[-3000:]
    [line] = [line for line in err.splitlines() if line.startswith("dslm-train: error:")]
    stopped = re.search(r"The run stopped at step (\d+) after a checkpoint", line)
    assert "the data loader ran out of open files" in line and "data.max_open_shards" in line, line
    assert stopped and int(stopped.group(1)) >= 3, line
    assert (tmp_path / "t" / "checkpoints" / "latest").read_text() == f"global_step{stopped.group(1)}"
