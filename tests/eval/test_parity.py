"""Exports against their checkpoints: dslm-export --check and dslm-eval EXPORT --parity pass an
intact export of each format within its bounds, record parity.json, and fail, in one line, an
export whose weights were damaged after writing."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dslm.export import export
from dslm_eval.parity import BOUNDS

BIN = Path(sys.executable).parent
TOKENS = ["--parity-tokens", "512"]


def parity_of(folder: Path) -> dict:
    return json.loads((folder / "parity.json").read_text())


def eval_parity(folder: Path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BIN / "dslm-eval", folder, "--parity", *TOKENS, *extra], capture_output=True, text=True, timeout=600
    )


def test_export_check_passes_an_hf_export_and_records_its_parity(base_run, tmp_path):
    tag = base_run / "checkpoints" / "global_step5"
    out = tmp_path / "hf"
    done = subprocess.run(
        [BIN / "dslm-export", tag, out, "--check", "--check-tokens", "512"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    parity = parity_of(out)
    assert parity["checkpoint"] == str(tag.absolute()) and parity["step"] == 5
    assert parity["tokens"] >= 512 and parity["passed"]
    (row,) = parity["rows"]
    assert row["format"] == "hf" and row["passed"] and row["top1_agreement"] == 1.0
    assert abs(row["delta_pct"]) < 0.01
    assert row["size_bytes"] == (out / "model.safetensors").stat().st_size
    assert row["bounds"] == {"delta_pct": 0.1, "top1_agreement": 1.0}
    assert row["bits_per_byte"] == pytest.approx(parity["reference"]["bits_per_byte"] * (1 + row["delta_pct"] / 100))
    assert "hf" in done.stdout and f"{row['bits_per_byte']:.4f}" in done.stdout


def test_export_check_that_fails_exits_non_zero_in_one_line_and_keeps_the_folder(base_run, tmp_path):
    """base_run's weights are a perturbed init: its logits are nearly flat, so int8 rounding flips
    many near-ties (83% of top-1 choices kept, measured), though bits per byte stay within 0.1%."""
    out = tmp_path / "int8"
    done = subprocess.run(
        [BIN / "dslm-export", base_run, out, "--format", "onnx", "--int8", "--check", "--check-tokens", "2048"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert errors == [line for line in done.stderr.splitlines() if line.startswith("dslm-export: error: --check: ")]
    assert len(errors) == 1 and "onnx-int8 top-1 agreement" in errors[0] and "bits per byte" not in errors[0]
    assert "FAILED" in done.stdout and (out / "model.onnx").is_file()
    assert not parity_of(out)["passed"] and not parity_of(out)["rows"][0]["passed"]


def test_an_hf_export_damaged_after_writing_fails_its_check_in_one_line(base_run, tmp_path):
    out = tmp_path / "hf"
    subprocess.run([BIN / "dslm-export", base_run / "checkpoints" / "global_step5", out], check=True, timeout=600)
    weights = load_file(out / "model.safetensors")
    weights["transformer.h.0.mlp.c_fc.weight"] *= 1.5
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    done = eval_parity(out)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert done.stderr.startswith("dslm-eval: error: ") and "failed its parity check: hf " in done.stderr
    assert not parity_of(out)["passed"]


def test_onnx_exports_pass_within_their_bounds(onnx_exports, tmp_path):
    for name, fmt in (("step7-onnx", "onnx"), ("step7-onnx-int8", "onnx-int8")):
        folder = shutil.copytree(onnx_exports[0] / "export" / name, tmp_path / name)  # the origin it records
        done = eval_parity(folder)
        assert done.returncode == 0, done.stderr
        (row,) = parity_of(folder)["rows"]
        assert row["format"] == fmt and row["passed"], row
        assert row["bounds"] == {"delta_pct": BOUNDS[fmt].delta_pct, "top1_agreement": BOUNDS[fmt].top1_agreement}
        print(f"{fmt}: {row['delta_pct']:+.4f}% bits per byte, top-1 agreement {row['top1_agreement']:.4f}")


def test_an_onnx_export_damaged_after_writing_fails_its_check(onnx_exports, tmp_path):
    folder = shutil.copytree(onnx_exports[0] / "export" / "step7-onnx", tmp_path / "onnx")
    data = np.memmap(folder / "model.onnx.data", dtype=np.float32, mode="r+")
    data[: len(data) // 4] *= 1.5  # the first initializers
    data.flush()
    del data
    done = eval_parity(folder)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "onnx " in done.stderr and "failed its parity check" in done.stderr


def test_parity_against_another_checkpoint_and_without_one(base_run, onnx_exports, tmp_path):
    folder = shutil.copytree(onnx_exports[0] / "export" / "step7-onnx", tmp_path / "onnx")
    config = json.loads((folder / "config.json").read_text())
    del config["dslm_origin"]
    (folder / "config.json").write_text(json.dumps(config))
    done = eval_parity(folder)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "records no checkpoint it came from: name it with --against CHECKPOINT" in done.stderr
    done = eval_parity(folder, "--against", onnx_exports[0])
    assert done.returncode == 0, done.stderr
    assert parity_of(folder)["checkpoint"] == str(onnx_exports[0] / "checkpoints" / "global_step7")


def test_an_export_of_an_export_records_the_checkpoint_of_the_first(base_run, tmp_path):
    tag = base_run / "checkpoints" / "global_step5"
    export(tag, tmp_path / "first")
    export(tmp_path / "first", tmp_path / "second")
    origins = [json.loads((tmp_path / name / "config.json").read_text())["dslm_origin"] for name in ("first", "second")]
    assert origins == [{"path": str(tag.absolute()), "step": 5}] * 2
