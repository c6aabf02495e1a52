"""dslm-export --format onnx: the graph's logits and KV cache against dslm's model, greedy tokens
against dslm-generate, int8 weights, the folder it writes and the inputs it refuses."""

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from dslm.config import RunConfig, load_config, save_config
from dslm.data.loader import DataConfig
from dslm.data.tokens import BOS_ID, load_text_tokenizer
from dslm.export import main as export_main
from dslm.model import ModelConfig
from dslm.onnx_export import WEIGHTS_KEY
from dslm_eval.generate import complete, generate
from dslm_local.complete import Completer
from dslm_local.decoding import GenerationConfig
from dslm_local.onnx_model import OnnxModel

BIN = Path(sys.executable).parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def heldout_lines(n: int) -> list[str]:
    """Line openings of a stdlib file the tokenizer was not trained on (it saw json/ and email/)."""
    lines = [ln for ln in (STDLIB / "textwrap.py").read_text().splitlines() if len(ln.strip()) > 12]
    return [ln[: len(ln) // 2] for ln in lines[:: max(1, len(lines) // n)][:n]]


def test_logits_match_the_model_in_one_pass_and_through_the_cache(onnx_exports):
    _, model, fp32, _ = onnx_exports
    onnx = OnnxModel(fp32)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 40))
    with torch.no_grad():
        expected = model(ids)[0].numpy()  # (T, V)
    whole = onnx.forward(ids[0].tolist())
    onnx.reset()
    chunks = [onnx.forward(ids[0, a:b].tolist()) for a, b in ((0, 17), (17, 18), (18, 25), (25, 40))]
    assert np.abs(whole - expected).max() < 1e-4
    assert np.abs(np.concatenate(chunks) - expected).max() < 1e-4
    assert onnx.past[0].shape == (model.cfg.n_layer, 1, model.cfg.n_head, 40, model.cfg.n_embd // model.cfg.n_head)


def test_greedy_tokens_equal_dslm_generates_on_heldout_prompts(onnx_exports, tiny_shards):
    _, model, fp32, _ = onnx_exports
    tokenizer = load_text_tokenizer(tiny_shards[0] / "tokenizer.json")
    prompts = heldout_lines(12)
    cfg = GenerationConfig(max_new_tokens=24, stop_strings=("\n",))
    completer = Completer(OnnxModel(fp32), cfg)
    ours = [completer.complete(p) for p in prompts]
    assert ours == complete(model, tokenizer, prompts, cfg)
    # the token ids too, stopping only at <eos>, from the same prompt ids
    free = GenerationConfig(max_new_tokens=30)
    ids = [[BOS_ID, *tokenizer.encode(p).ids] for p in prompts]
    completer = Completer(OnnxModel(fp32), free)
    assert [completer.new_ids(p) for p in ids] == generate(
        model, ids, GenerationConfig(max_new_tokens=30, stop_tokens=(3,))
    )
    assert sum(map(len, ours)) > 0


def test_int8_weights_are_smaller_and_agree_on_the_next_token(onnx_exports, tiny_shards):
    _, model, fp32, int8 = onnx_exports
    assert json.loads((int8 / "config.json").read_text())[WEIGHTS_KEY] == "int8"
    assert json.loads((fp32 / "config.json").read_text())[WEIGHTS_KEY] == "fp32"
    assert model_bytes(int8) < 0.5 * model_bytes(fp32)
    tokenizer = load_text_tokenizer(tiny_shards[0] / "tokenizer.json")
    text = (STDLIB / "textwrap.py").read_text()[:6000]
    ids = [BOS_ID, *tokenizer.encode(text).ids]
    windows = [ids[i : i + 96] for i in range(0, len(ids) - 96, 96)]
    full, small = OnnxModel(fp32), OnnxModel(int8)
    agree = []
    for window in windows:
        full.reset(), small.reset()
        agree.append(full.forward(window).argmax(-1) == small.forward(window).argmax(-1))
    assert np.concatenate(agree).mean() >= 0.95


def model_bytes(folder: Path) -> int:
    """model.onnx and its weights, model.onnx.data."""
    return sum(p.stat().st_size for p in folder.glob("model.onnx*"))


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_the_export_folder_holds_what_dslm_complete_needs(onnx_exports, precision):
    run, model, fp32, int8 = onnx_exports
    folder = fp32 if precision == "fp32" else int8
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",  # the model card (tests/dslm/test_model_card.py); no loss curve: the run logged none
        "config.json",
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert (folder / "model.onnx.data").stat().st_size > (folder / "model.onnx").stat().st_size
    assert len({p.stat().st_mode for p in folder.iterdir()}) == 1  # every file as the umask makes them
    config = json.loads((folder / "config.json").read_text())
    assert (config["n_layer"], config["n_positions"], config["dslm_direction"]) == (2, 96, "forward")
    assert "architectures" not in config  # no transformers model in the folder
    card = (folder / "README.md").read_text()
    assert "library_name: onnx" in card and ("int8 weights" in card) == (precision == "int8")
    assert not list(folder.parent.glob(".*tmp"))


def test_an_hf_export_folder_exports_beside_it_with_the_same_logits(onnx_exports, tmp_path):
    run, model, fp32, _ = onnx_exports
    hf = tmp_path / "model"
    export_main([str(run / "checkpoints" / "global_step7"), str(hf)])
    export_main([str(hf), "--format", "onnx"])
    ids = list(range(5, 60))
    from_hf, from_run = OnnxModel(tmp_path / "model-onnx").forward(ids), OnnxModel(fp32).forward(ids)
    assert np.abs(from_hf - from_run).max() < 1e-4  # the HF export folds the head bias; logits stay
    proc = subprocess.run([BIN / "dslm-export", hf, "--format", "onnx"], capture_output=True, text=True)
    assert (
        proc.returncode == 2
        and proc.stderr.strip().splitlines()[-1]
        == f"dslm-export: error: {tmp_path / 'model-onnx'} already exists; remove it or name another folder"
    )


def test_bad_input_is_one_line(onnx_exports, tmp_path):
    run, _, _, _ = onnx_exports
    proc = subprocess.run([BIN / "dslm-export", run, "--int8"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == "dslm-export: error: --int8 goes with --format onnx (see dslm-export --help)\n"
    no_tokenizer = tmp_path / "no-tokenizer"
    export_main([str(run / "checkpoints" / "global_step7"), str(no_tokenizer)])
    (no_tokenizer / "tokenizer.json").unlink()
    proc = subprocess.run([BIN / "dslm-export", no_tokenizer, "--format", "onnx"], capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"dslm-export: error: {no_tokenizer} is not a checkpoint"), proc.stderr
    assert not list(tmp_path.glob("no-tokenizer-onnx*")) and not list(tmp_path.glob(".*"))


def test_a_checkpoint_of_another_preset_than_its_run_config_is_one_line(onnx_exports, tmp_path, write_checkpoint):
    run, model, _, _ = onnx_exports
    shards = load_config(run / "config.yaml", []).data.shards
    cfg = RunConfig(
        name="other", runs_dir=str(tmp_path), model=ModelConfig(preset="code-33m"), data=DataConfig(shards=shards)
    )
    save_config(cfg)
    write_checkpoint(cfg.run_dir.path, 3, {"module": model.state_dict()})  # weights of the small model
    proc = subprocess.run([BIN / "dslm-export", cfg.run_dir.path, "--format", "onnx"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is (512, 64) there and (8000, 512) in this model" in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (cfg.run_dir.path / "export").exists()


def test_a_checkpoint_whose_bytes_changed_after_sealing_is_not_exported(onnx_exports, tmp_path):
    run, _, _, _ = onnx_exports
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("export"))
    states = copy / "checkpoints" / "global_step7" / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte, as a failing disk flips it
    states.write_bytes(bytes(data))
    for fmt in (["--format", "onnx"], ["--format", "hf"]):
        proc = subprocess.run(
            [BIN / "dslm-export", copy / "checkpoints" / "global_step7", tmp_path / "out", *fmt],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "does not match its xxh3_128 checksum" in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (tmp_path / "out").exists()
