"""A run directory's layout: the one place that names what dslm-train writes under runs/NAME and
what dslm-eval and dslm-export add to it.

    runs/NAME/config.yaml            the resolved config; outside paths absolute (dslm.config)
    runs/NAME/tokenizer.json         the shards' tokenizer, copied (its sha256 is the manifest's)
    runs/NAME/ds_config.json         the DeepSpeed config as resolved for the run (batch sizes filled in)
    runs/NAME/checkpoints/           DeepSpeed tags global_stepN/, `latest`, `best`
    runs/NAME/tb/  metrics.csv       TensorBoard events and the same scalars as CSV
    runs/NAME/logs/rankR.log         what the libraries printed on each rank
    runs/NAME/logs/eval-stepN.log    what the eval of checkpoint N printed (train.evals, dslm.evals)
    runs/NAME/export/stepN[-onnx]    dslm-export's default folders
    runs/NAME/eval/stepN.json        dslm-eval's results on the run's own shards
    runs/NAME/eval/stepN/SET.json    ... and on another shard set (`dslm-eval --shards SET`)

A run is found by its folder: nothing in it depends on the directory it was trained from or on the
name it was trained under, so it can be moved or copied to another machine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

TAG_PATTERN = re.compile(r"global_step(\d+)$")
"""A checkpoint tag's folder name (DeepSpeed's default tag, global_step<optimizer step>)."""
EXPORT_PATTERN = re.compile(r"step(\d+)(-onnx(-int8)?)?$")
"""dslm-export's default folder names under runs/NAME/export."""


@dataclass(frozen=True)
class RunDir:
    """The layout of one run directory, `path` (runs/NAME)."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def ds_config(self) -> Path:
        return self.path / "ds_config.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tb(self) -> Path:
        return self.path / "tb"

    @property
    def metrics_csv(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.log"

    def eval_log(self, step: int) -> Path:
        return self.logs / f"eval-step{step}.log"

    def tag(self, step: int) -> Path:
        return self.checkpoints / tag_for(step)

    def export(self, step: int, suffix: str = "") -> Path:
        """dslm-export's default folder for the checkpoint at `step`; `suffix` "-onnx" or "-onnx-int8"."""
        return self.path / "export" / f"step{step}{suffix}"

    def eval_result(self, step: int, shard_set: str = "") -> Path:
        """Where dslm-eval writes its result for `step`: on the run's own shards, or on the shard
        set named `shard_set` (dslm_eval.cli.shard_set_name)."""
        return self.path / "eval" / (f"step{step}/{shard_set}.json" if shard_set else f"step{step}.json")

    def eval_results(self, step: int) -> list[Path]:
        """The dslm-eval results there are for `step`: on the run's own shards, then on each other
        shard set (by name)."""
        own = self.eval_result(step)
        return ([own] if own.is_file() else []) + sorted(self.eval_result(step, "SET").parent.glob("*.json"))

    @staticmethod
    def at(path: Path) -> RunDir | None:
        """The run directory `path` is (it holds config.yaml), else None."""
        return RunDir(path) if RunDir(path).config.is_file() else None


def tag_for(step: int) -> str:
    return f"global_step{step}"


def tag_step(tag_dir: Path) -> int | None:
    """The step of a checkpoint tag's folder name, None for another name."""
    match = TAG_PATTERN.match(tag_dir.name)
    return int(match.group(1)) if match else None


def run_of_tag(tag_dir: Path) -> tuple[RunDir, int] | None:
    """(run directory, step) of a checkpoint runs/NAME/checkpoints/global_stepN, None when
    `tag_dir` is not one."""
    step = tag_step(tag_dir)
    run = RunDir.at(tag_dir.parent.parent)
    return (run, step) if step is not None and run is not None and tag_dir.parent == run.checkpoints else None


def run_of_export(folder: Path) -> tuple[RunDir, int] | None:
    """(run directory, step) of an export at its default place runs/NAME/export/stepN[-onnx[-int8]],
    None for an export anywhere else."""
    match = EXPORT_PATTERN.match(folder.name)
    run = RunDir.at(folder.parent.parent)
    return (run, int(match.group(1))) if match and run is not None and folder.parent.name == "export" else None
