"""bench/train_throughput.py end to end on the CPU, at its smallest settings."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cpu_run_prints_a_row_per_side_with_rate_and_ratio(tmp_path):
    out = tmp_path / "results.json"
    cmd = [
        sys.executable,
        REPO / "bench/train_throughput.py",
        "--micro-batch-sizes",
        "2",
        "--zero-stages",
        "2",
        "--warmup",
        "1",
        "--windows",
        "1",
        "--steps",
        "2",
        "--cache",
        tmp_path / "cache",
        "--json",
        out,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # the shards were built with the project's builder, at the tiny preset's vocab and context
    assert (tmp_path / "cache" / "stdlib-vocab2048-seq128" / "manifest.json").is_file()
    baseline = re.search(r"^\| .* \| 2 \| PyTorch baseline \| ([\d,]+) \|", proc.stdout, re.M)
    dslm = re.search(r"^\| .* \| 2 \| dslm ZeRO-2 \| ([\d,]+) \|.*\| \*\*(\d+\.\d+)\*\* \|$", proc.stdout, re.M)
    assert baseline and dslm, proc.stdout
    assert float(baseline[1].replace(",", "")) > 0 and float(dslm[1].replace(",", "")) > 0
    assert float(dslm[2]) > 0

    rows = json.loads(out.read_text())["rows"]
    assert [(r["side"], r["zero_stage"]) for r in rows] == [("baseline", None), ("dslm", 2)]
    assert rows[1]["ratio"] == pytest.approx(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"])
    # same initial weights and batches: both sides train alike
    assert abs(rows[0]["loss"] - rows[1]["loss"]) < 0.1, rows
    # a step's dispatches were counted: DeepSpeed's bookkeeping makes more ops than the plain loop;
    # dslm's step itself reads nothing back, ZeRO-2 a few values (overflow and norm decisions)
    baseline_census, dslm_census = rows[0]["census"], rows[1]["census"]
    assert 0 < baseline_census["ops"] < dslm_census["ops"], rows
    assert 0 < dslm_census["host_syncs"] < 10 and dslm_census["gpu_events"] is None, rows


def test_bad_input_is_one_line():
    proc = subprocess.run(
        [sys.executable, REPO / "bench/train_throughput.py", "--zero-stages", "3"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("train_throughput: error: --zero-stages")
