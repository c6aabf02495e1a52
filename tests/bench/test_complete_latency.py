"""bench/complete_latency.py end to end at its smallest: an untrained tiny model, a few requests."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_untrained_export_answers_every_request_and_the_percentiles_are_reported(tmp_path):
    out = tmp_path / "figures.json"
    cmd = [sys.executable, REPO / "bench/complete_latency.py", "--preset", "tiny", "--requests", "3"]
    cmd += ["--lines-before", "40", "--max-new-tokens", "4", "--json", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["requests"] == 3 and figures["model"] == "tiny, untrained, FIM, int8 ONNX"
    trip = figures["round_trip_ms"]
    assert 0 < trip["p50"] <= trip["p95"] <= trip["max"] and figures["server_ms"]["p50"] <= trip["p50"]
    assert 0 < figures["new_tokens_mean"] <= 4 and figures["prompt_tokens_mean"] > 40  # long files, cut to fit
    assert "| first reply (load + 1) |" in proc.stdout
