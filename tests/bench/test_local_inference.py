"""bench/local_inference.py end to end on the tiny ONNX fixture's run, at its smallest settings: torch, ONNX
and llama.cpp (GGUF) paths."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_each_path_reports_memory_and_speed_and_onnx_and_llama_cpp_import_no_torch(onnx_exports, tmp_path):
    run, _, _, _ = onnx_exports
    out = tmp_path / "figures.json"
    cmd = [
        sys.executable,
        REPO / "bench/local_inference.py",
        run,
        "--lines",
        "2",
        "--max-new-tokens",
        "6",
        "--threads",
        "1",
        "--json",
        out,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    results = figures["results"]
    assert list(results) == [
        "torch fp32",
        "onnx fp32",
        "onnx int8",
        "onnx int8, memory patterns on",
        "llama.cpp q8_0",
        "llama.cpp f16",
    ]
    assert results["torch fp32"]["imported_torch"] and not results["onnx int8"]["imported_torch"]
    assert not any(results[mode]["imported_torch"] for mode in ("llama.cpp q8_0", "llama.cpp f16"))
    assert figures["llama_tokenizer_agreement"] == 1.0 and figures["sizes"]["llama.cpp q8_0"] > 0
    assert all(r["new_tokens"] > 0 and r["seconds"] > 0 for r in results.values())
    # the light path is lighter than torch's, whatever the machine
    assert results["onnx int8"]["peak_rss_mb"] < results["torch fp32"]["peak_rss_mb"] - 100
    assert figures["max_abs_logit_diff_fp32"] < 1e-4 and figures["int8_top1_agreement"] > 0.9
    assert "| onnx fp32 |" in proc.stdout and "100.0% |" in proc.stdout.split("| onnx fp32 |")[1].splitlines()[0]
