"""bench/shard_tasks.py end to end at a small size, on this machine (the local launcher)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_one_and_two_tasks_time_every_stage_and_build_what_one_process_does(tmp_path):
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [
            sys.executable,
            REPO / "bench" / "shard_tasks.py",
            "--corpus-mb",
            "1",
            "--launcher",
            "local",
            "--work",
            tmp_path / "work",
            "--json",
            out,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # it fails when a split build's counts differ
    figures = json.loads(out.read_text())
    for run in ("tasks_1", "tasks_2"):
        assert list(figures[run]["seconds"]) == ["digests", "dedup", "write", "merge"]
        assert all(s > 0 for s in figures[run]["seconds"].values())
    assert figures["tokens"] > 100_000 and figures["speedup_2_over_1_task"] > 0
    paper = figures["paper"]
    assert paper["total_h"] == pytest.approx(paper["digests_h"] + paper["write_h"])
