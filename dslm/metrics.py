"""TensorBoard scalars, the same scalars in runs/NAME/metrics.csv, and console lines, written by
rank 0 only."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from dslm.files import atomic_write_text

FIXED_COLUMNS = ["step", "wall_time"]
"""The first columns of metrics.csv; the scalars' tags follow in the order they were first logged."""


class ScalarLog:
    """A run's scalars as CSV (the model card keeps a loss_log.csv): one row per logged step, with
    the step, the wall time (Unix seconds, as TensorBoard's events) and every scalar logged at it
    (an empty cell where a scalar was not logged at that step); `pandas.read_csv` reads it.

    It follows TensorBoard's purge rule: opened to continue after `start_step` (a resumed run's
    checkpoint step, 0 for a fresh run), it drops the rows of later steps, which a killed run wrote
    after its last checkpoint, so each step appears once. Rows are appended one complete line at a
    time and flushed; a line cut off by a crash belongs to a step after the last checkpoint and is
    dropped with it. A second call at the same step (validation after the training scalars)
    rewrites that step's row with both. A scalar first seen after the header was written rewrites
    the file with the longer header, under a temporary name renamed into place."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        self.columns, rows = read_rows(path) if start_step else (list(FIXED_COLUMNS), [])
        if path.exists():
            self.rewrite([row for row in rows if int(row["step"]) <= start_step])
        self.file = None
        self.last: tuple[int, dict] | None = None
        """The step and values of the last row, and where in the file that row starts."""

    def log(self, step: int, values: dict[str, float]) -> None:
        """Append the row of `step` (tag -> number), or merge `values` into it if it is the last."""
        row = {"step": step, "wall_time": round(time.time(), 3)}
        if self.last is not None and self.last[1]["step"] == step:
            offset, row = self.last[0], self.last[1]
            self.file.truncate(offset)  # the crash between this and the write below loses only this step
            self.file.seek(offset)
        row = {**row, **{tag: value if isinstance(value, int) else float(value) for tag, value in values.items()}}
        if new := [tag for tag in row if tag not in self.columns]:
            self.close()
            self.columns += new
            self.rewrite(read_rows(self.path)[1])
        if self.file is None:
            self.file = self.path.open("a", newline="")
        self.last = (self.file.tell(), row)
        self.file.write(csv_line(self.columns, row))
        self.file.flush()

    def merge(self, step: int, values: dict[str, float]) -> None:
        """Add `values` (tag -> number) to the row of `step`, a step logged before (a row in step
        order where it has none), rewriting the file under a temporary name renamed into place:
        a reader sees the old file or the new one, never half of it."""
        self.close()
        columns, rows = read_rows(self.path)
        self.columns = columns + [tag for tag in values if tag not in columns]
        row = next((row for row in rows if int(row["step"]) == step), None)
        if row is None:
            row = {"step": str(step), "wall_time": str(round(time.time(), 3))}
            rows = sorted([*rows, row], key=lambda r: int(r["step"]))
        row.update({tag: float(value) for tag, value in values.items()})
        self.rewrite(rows)
        self.file = self.path.open("a", newline="")
        if self.last is not None:  # the last row moved: a longer header or row before it
            last = {**rows[-1], "step": int(rows[-1]["step"])}
            self.last = (self.file.tell() - len(csv_line(self.columns, last).encode()), last)

    def rewrite(self, rows: list[dict[str, str]]) -> None:
        atomic_write_text(
            self.path,
            csv_line(self.columns, dict(zip(self.columns, self.columns)))
            + "".join(csv_line(self.columns, row) for row in rows),
        )

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def csv_line(columns: list[str], row: dict) -> str:
    """One CSV line (with its line break) of `row`'s values in `columns` order; "" where missing."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow([row.get(column, "") for column in columns])
    return out.getvalue()


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows) of a metrics.csv: FIXED_COLUMNS and no rows when there is none; a last line
    without its line break (cut off by a crash) is left out."""
    if not path.exists():
        return list(FIXED_COLUMNS), []
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(complete))
    rows = list(reader)
    return list(reader.fieldnames or FIXED_COLUMNS), rows


class Metrics:
    def __init__(
        self,
        logdir: Path,
        enabled: bool,
        purge_step: int | None = None,
        console: bool = True,
        csv_path: Path | None = None,
    ):
        """Scalars into TensorBoard's event files in `logdir` (`purge_step`: drop the events of this
        step on, which a killed run wrote after its checkpoint) and, with `csv_path`, into a
        ScalarLog there that continues after step purge_step - 1. Nothing is written unless
        `enabled` (rank 0); the event file is opened at the first scalar, so a run or an eval that
        fails before it has one leaves none."""
        self.logdir, self.purge_step, self.enabled = logdir, purge_step, enabled
        self.writer: SummaryWriter | None = None
        self.scalar_log = ScalarLog(csv_path, (purge_step or 1) - 1) if enabled and csv_path else None
        self.console = console
        """Print a line per log() call as well."""

    def log(self, step: int, values: dict[str, float]) -> None:
        """Write `values` (tag -> number) at `step`; calls at the same step share one metrics.csv row."""
        if not self.enabled:
            return
        if self.writer is None:
            self.writer = SummaryWriter(str(self.logdir), purge_step=self.purge_step)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()
        if self.scalar_log is not None:
            self.scalar_log.log(step, values)
        if self.console:
            line = f"step {step:>6} | " + " | ".join(
                f"{tag.removeprefix('train/')} {value:.4g}" for tag, value in values.items()
            )
            # flushed before the bar is drawn again: a batch job's log (stdout and stderr in one
            # file) or a pipe shows each line as it comes, at the start of a line of its own
            with tqdm.external_write_mode():
                print(line, flush=True)

    def merge_into_csv(self, step: int, values: dict[str, float]) -> None:
        """metrics.csv only: add `values` (tag -> number) to the row of `step`, a step logged before;
        their TensorBoard copy is written by whoever made them (dslm-eval)."""
        if self.scalar_log is not None and values:
            self.scalar_log.merge(step, values)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.scalar_log is not None:
            self.scalar_log.close()


def read_scalars(logdir: str | Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar tag from the event files in `logdir`, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0}).Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]
