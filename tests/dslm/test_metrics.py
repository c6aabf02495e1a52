"""metrics.csv (dslm.metrics.ScalarLog): one row per step, TensorBoard's purge rule on a resume,
new scalars widen the header, a line cut off by a crash is dropped."""

import csv

import pytest

from dslm.metrics import Metrics, ScalarLog, read_rows, read_scalars


def rows_of(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_rows_hold_every_scalar_of_their_step_and_read_as_csv(tmp_path):
    log = ScalarLog(tmp_path / "metrics.csv", start_step=0)
    log.log(1, {"train/loss": 5.25, "train/lr": 1e-4})
    log.log(2, {"train/loss": 4.5, "train/lr": 2e-4, "val/loss": 4.75})  # a new column mid-run
    log.log(3, {"train/loss": 4.0, "train/lr": 3e-4, "train/skipped_steps": 0})
    log.close()
    rows = rows_of(tmp_path / "metrics.csv")
    assert list(rows[0]) == ["step", "wall_time", "train/loss", "train/lr", "val/loss", "train/skipped_steps"]
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert [r["val/loss"] for r in rows] == ["", "4.75", ""]
    assert float(rows[1]["train/lr"]) == 2e-4 and rows[2]["train/skipped_steps"] == "0"
    assert all(float(r["wall_time"]) > 1.7e9 for r in rows)


def test_calls_at_one_step_share_its_row_even_when_the_second_widens_the_header(tmp_path):
    path = tmp_path / "metrics.csv"
    log = ScalarLog(path, start_step=0)
    log.log(5, {"train/loss": 3.0})
    log.log(10, {"train/loss": 2.5})
    log.log(10, {"val/loss": 2.75})  # validation after the step's training scalars
    log.log(15, {"train/loss": 2.25})
    log.log(20, {"train/loss": 2.0})
    log.log(20, {"val/loss": 2.125})
    log.close()
    assert [(r["step"], r["train/loss"], r["val/loss"]) for r in rows_of(path)] == [
        ("5", "3.0", ""),
        ("10", "2.5", "2.75"),
        ("15", "2.25", ""),
        ("20", "2.0", "2.125"),
    ]


def test_merged_scalars_join_an_earlier_row_and_the_last_row_still_takes_its_step(tmp_path):
    """A background eval's scalars reach the row of its checkpoint's step after later steps were
    logged; the row being written (the last) still merges a second call at its step."""
    path = tmp_path / "metrics.csv"
    log = ScalarLog(path, start_step=0)
    log.log(10, {"train/loss": 2.5})
    log.log(15, {"train/loss": 2.25})
    log.merge(10, {"eval/val_loss": 2.625})  # a new column, and a longer row before the last
    log.log(15, {"val/loss": 2.375})
    log.merge(12, {"eval/val_loss": 2.5})  # a step without a row gets one in step order
    log.log(20, {"train/loss": 2.0})
    log.close()
    assert [(r["step"], r["train/loss"], r["val/loss"], r["eval/val_loss"]) for r in rows_of(path)] == [
        ("10", "2.5", "", "2.625"),
        ("12", "", "", "2.5"),
        ("15", "2.25", "2.375", ""),
        ("20", "2.0", "", ""),
    ]


def test_a_resume_drops_the_rows_after_the_checkpoint_as_tensorboard_does(tmp_path):
    path = tmp_path / "metrics.csv"
    log = ScalarLog(path, start_step=0)
    for step in range(1, 7):
        log.log(step, {"train/loss": float(step)})
    log.close()
    with path.open("a") as f:
        f.write("7,17000")  # a row cut off by the kill
    resumed = ScalarLog(path, start_step=4)  # the checkpoint was at step 4
    assert [int(r["step"]) for r in rows_of(path)] == [1, 2, 3, 4]
    for step in range(5, 8):
        resumed.log(step, {"train/loss": step + 0.5})
    resumed.close()
    assert [(r["step"], r["train/loss"]) for r in rows_of(path)] == [
        ("1", "1.0"),
        ("2", "2.0"),
        ("3", "3.0"),
        ("4", "4.0"),
        ("5", "5.5"),
        ("6", "6.5"),
        ("7", "7.5"),
    ]


def test_a_fresh_start_in_a_run_directory_keeps_no_old_rows(tmp_path):
    path = tmp_path / "metrics.csv"
    log = ScalarLog(path, start_step=0)
    log.log(1, {"train/loss": 1.0})
    log.close()
    ScalarLog(path, start_step=0).close()
    assert read_rows(path) == (["step", "wall_time"], [])  # nor their columns


def test_metrics_writes_the_same_scalars_to_tensorboard_and_csv(tmp_path):
    metrics = Metrics(tmp_path / "tb", enabled=True, console=False, csv_path=tmp_path / "metrics.csv")
    for step in (10, 20):
        metrics.log(step, {"train/loss": 3.14159 / step, "val/loss": 2.0 + step})
    metrics.close()
    rows = rows_of(tmp_path / "metrics.csv")
    for tag in ("train/loss", "val/loss"):
        steps, values = zip(*read_scalars(tmp_path / "tb", tag))
        assert [int(r["step"]) for r in rows] == list(steps)
        assert [float(r[tag]) for r in rows] == pytest.approx(values, rel=1e-6)  # TensorBoard keeps float32


def test_metrics_that_log_nothing_leave_no_event_file(tmp_path):
    """A run or an eval that fails before its first scalar leaves its tb folder as it was."""
    Metrics(tmp_path / "tb", enabled=True, console=False).close()
    assert not (tmp_path / "tb").exists()


def test_a_disabled_rank_writes_no_csv(tmp_path):
    metrics = Metrics(tmp_path / "tb", enabled=False, csv_path=tmp_path / "metrics.csv")
    metrics.log(1, {"train/loss": 1.0})
    metrics.close()
    assert not (tmp_path / "metrics.csv").exists()
