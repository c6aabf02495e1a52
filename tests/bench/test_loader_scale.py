"""bench/loader_scale.py and bench/loader_throughput.py end to end, at small sizes."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(script, *args, tmp_path, timeout=900):
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, REPO / "bench" / script, *map(str, args), "--json", out],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_window_order_holds_no_permutation_of_the_split_and_shuffles_within_its_window(tmp_path):
    # 5M samples: the old permutation is 40 MB, held twice while epoch 1's is drawn
    stdout, figures = run(
        "loader_scale.py",
        "--samples",
        5_000_000,
        "--shards",
        5_000,
        "--windows",
        "16,64",
        "--positions",
        100_000,
        tmp_path=tmp_path,
    )
    results = figures["results"]
    assert list(results) == ["before", "window 16", "window 64"]
    before, window = results["before"], results["window 16"]
    assert all(
        r[k] > 0
        for r in results.values()
        for k in ("first_index_s", "per_1m_small_s", "per_1m_large_s", "epoch_boundary_s", "rss_peak_mib")
    )
    assert window["per_1m_draw_s"] > 0 and "per_1m_draw_s" not in before
    assert before["rss_delta_mib"] > 65 and before["rss_delta_first_mib"] > 30  # 2 x 38.1 MiB, and 1 x
    assert window["rss_delta_mib"] < 15 and results["window 64"]["rss_delta_mib"] < 15
    assert window["rss_delta_mib"] < before["rss_delta_mib"] / 5
    # shuffle quality: 16 shards of 1,000 samples in each window, read in random order
    assert 0.03 < window["same_shard_fraction"] < 0.15 and before["same_shard_fraction"] < 0.01
    assert window["shards_per_1000_max"] <= 17 and results["window 64"]["shards_per_1000_max"] <= 65
    assert before["shards_per_1000_mean"] > 800
    assert "| window 16 |" in stdout and "window 16: meets the goal" in stdout


def test_bad_window_list_is_one_line():
    proc = subprocess.run(
        [sys.executable, REPO / "bench/loader_scale.py", "--windows", "16,x"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("loader_scale: error: argument --windows"), proc.stderr


def test_loader_throughput_on_real_shards_per_worker_count(tmp_path):
    stdout, figures = run(
        "loader_throughput.py",
        "--workers",
        "0,1",
        "--corpus-mb",
        1,
        "--seq-len",
        128,
        "--vocab-size",
        512,
        "--samples-per-shard",
        50,
        "--batches",
        20,
        "--warmup",
        2,
        "--work",
        tmp_path / "work",
        tmp_path=tmp_path,
    )
    assert (tmp_path / "work" / "shards" / "manifest.json").is_file()  # built by the project's builder, kept in --work
    assert figures["seq_len"] == 128 and figures["train_shards"] > 1
    rows = figures["results"]
    assert [r["num_workers"] for r in rows] == [0, 1]
    assert all(r["samples"] == 20 * 8 and r["tokens"] == 20 * 8 * 128 and r["tokens_per_s"] > 0 for r in rows)
    assert rows[1]["worker_cpu_ms_per_batch"] >= 0 and "worker_cpu_ms_per_batch" not in rows[0]
    assert "| 1 |" in stdout and "workers for 450,000 tokens/s" in stdout
