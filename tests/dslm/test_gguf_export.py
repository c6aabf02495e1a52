"""dslm-export --format gguf, run by llama.cpp itself (llama-cpp-python, built from llama.cpp's
source): greedy continuations, next-token agreement and bits per byte against dslm's model, token
ids against dslm's tokenizer, the metadata llama.cpp and Ollama read, and the inputs it refuses."""

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from dslm.config import RunConfig, save_config
from dslm.data.loader import DataConfig
from dslm.data.templates import Framing
from dslm.data.tokens import BOS_ID, EOS_ID, FIM_TOKENS, SPECIAL_TOKENS, load_text_tokenizer
from dslm.export import main as export_main
from dslm.hf import chat_template
from dslm.model import GPT, ModelConfig
from dslm_eval.generate import generate
from dslm_local.decoding import GenerationConfig
from tests.conftest import write_tag

pytest.importorskip("llama_cpp", reason="llama-cpp-python (make install builds it) runs the GGUF files")
from dslm_eval.gguf_model import GgufModel  # noqa: E402

BIN = Path(sys.executable).parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])
HELDOUT = ("textwrap.py", "glob.py", "fnmatch.py", "sched.py")
"""stdlib files the tokenizer and the model never saw (they saw json/ and email/), all ASCII."""


def heldout_ids(tokenizer, n: int, length: int) -> list[list[int]]:
    """`n` held-out code windows of `length` ids, <bos> first, spread over HELDOUT."""
    ids = [BOS_ID, *tokenizer.encode("\n".join((STDLIB / f).read_text() for f in HELDOUT)).ids]
    stride = (len(ids) - length) // n
    return [ids[i * stride : i * stride + length] for i in range(n)]


@pytest.fixture
def loaded():
    """GgufModel of an export folder's file for a model, closed after the test."""
    models = []

    def load(folder: Path, model) -> GgufModel:
        models.append(GgufModel(next(folder.glob("*.gguf")), model.cfg.block_size, threads=2))
        return models[-1]

    yield load
    for m in models:
        m.close()


def test_f32_greedy_continuations_equal_dslms_token_for_token(loaded, gguf_exports, tiny_shards):
    _, model, folders = gguf_exports
    tokenizer = load_text_tokenizer(tiny_shards[0] / "tokenizer.json")
    prompts = heldout_ids(tokenizer, 12, 24)
    llama = loaded(folders["f32"], model)
    ours = generate(model, prompts, GenerationConfig(max_new_tokens=40, stop_tokens=(EOS_ID,)))
    assert [llama.greedy(p, 40, stop=EOS_ID) for p in prompts] == ours
    assert sum(map(len, ours)) >= 12 * 20


def test_f32_and_f16_logits_match_dslms(loaded, gguf_exports, tiny_shards):
    _, model, folders = gguf_exports
    tokenizer = load_text_tokenizer(tiny_shards[0] / "tokenizer.json")
    (window,) = heldout_ids(tokenizer, 1, model.cfg.block_size)
    with torch.no_grad():
        expected = model(torch.tensor([window]))[0].numpy()
    scale = np.abs(expected).max()
    assert np.abs(loaded(folders["f32"], model).logits(np.array(window)) - expected).max() < 1e-3 * scale
    assert np.abs(loaded(folders["f16"], model).logits(np.array(window)) - expected).max() < 2e-2 * scale


def nats(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed cross-entropy of `targets` (T,) under `logits` (T, V), in nats."""
    return float(
        torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets), reduction="sum")
    )


def test_q8_0_agrees_on_95_percent_of_next_tokens_and_bits_per_byte_within_1_percent(loaded, gguf_exports, tiny_shards):
    _, model, folders = gguf_exports
    tokenizer = load_text_tokenizer(tiny_shards[0] / "tokenizer.json")
    llama = loaded(folders["q8_0"], model)
    agree, ours, theirs = [], 0.0, 0.0
    for window in heldout_ids(tokenizer, 16, model.cfg.block_size):
        ids, targets = np.array(window[:-1]), np.array(window[1:])
        with torch.no_grad():
            expected = model(torch.from_numpy(ids)[None])[0].numpy()
        got = llama.logits(ids)
        agree.append(got.argmax(-1) == expected.argmax(-1))
        ours, theirs = ours + nats(expected, targets), theirs + nats(got, targets)
    # bits per byte of the same text: the ratio of the summed losses
    assert np.concatenate(agree).mean() >= 0.95
    assert abs(theirs / ours - 1) <= 0.01
    f32, q8 = (next(folders[t].glob("*.gguf")).stat().st_size for t in ("f32", "q8_0"))
    assert q8 < 0.4 * f32


@pytest.mark.parametrize("name", HELDOUT)
def test_llama_cpp_tokenizes_ascii_code_to_dslms_ids(loaded, gguf_exports, tiny_shards, name):
    _, model, folders = gguf_exports
    tokenizer = load_text_tokenizer(tiny_shards[0] / "tokenizer.json")
    text = (STDLIB / name).read_text()
    assert text.isascii()
    llama = loaded(folders["q8_0"], model)
    assert llama.tokenize(text, nfkc=False) == tokenizer.encode(text).ids
    assert llama.tokenize(text, add_bos=True, nfkc=False) == [BOS_ID, *tokenizer.encode(text).ids]
    assert llama.tokenize("x = '<eos>'", nfkc=False) == tokenizer.encode("x = '<eos>'").ids  # special tokens stay text


def test_text_that_nfkc_changes_tokenizes_as_dslm_after_normalizing(loaded, gguf_exports, tiny_shards):
    _, model, folders = gguf_exports
    tokenizer = load_text_tokenizer(tiny_shards[0] / "tokenizer.json")
    llama = loaded(folders["f32"], model)
    text = "ﬁle = open('ｄａｔａ①.txt')  # ½ of the ㎏"
    assert llama.tokenize(text, nfkc=False) != tokenizer.encode(text).ids  # llama.cpp does not normalize
    assert llama.tokenize(text) == tokenizer.encode(text).ids


def metadata(folder: Path) -> dict:
    reader = gguf.GGUFReader(next(folder.glob("*.gguf")))
    return {name: field.contents() for name, field in reader.fields.items()}


def test_the_file_holds_gpt2_keys_and_dslms_tokenizer(gguf_exports, tiny_shards):
    _, model, folders = gguf_exports
    tokenizer = load_text_tokenizer(tiny_shards[0] / "tokenizer.json")
    keys = metadata(folders["f16"])
    assert keys["general.architecture"] == "gpt2"
    assert keys["gpt2.context_length"] == model.cfg.block_size
    assert keys["gpt2.block_count"] == model.cfg.n_layer
    assert keys["tokenizer.ggml.model"] == "gpt2" and keys["tokenizer.ggml.pre"] == "gpt-2"
    assert len(keys["tokenizer.ggml.tokens"]) == tokenizer.get_vocab_size() == model.cfg.vocab_size
    assert keys["tokenizer.ggml.bos_token_id"] == BOS_ID and keys["tokenizer.ggml.eos_token_id"] == EOS_ID
    assert keys["tokenizer.ggml.add_bos_token"] is True
    types = keys["tokenizer.ggml.token_type"]
    assert [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL] == list(range(8))
    assert "tokenizer.chat_template" not in keys and "tokenizer.ggml.fim_pre_token_id" not in keys
    assert (folders["f16"] / "Modelfile").read_text().startswith("FROM ./model-f16.gguf\n")


def small_run(runs_dir: Path, shards: Path, direction: str = "forward") -> Path:
    """A run of a 1-layer model on `shards` (its tokenizer's vocabulary) with a sealed tag at step 3."""
    tokenizer = load_text_tokenizer(shards / "tokenizer.json")
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, intermediate_size=64, vocab_size=tokenizer.get_vocab_size())
    run = RunConfig(
        name="small", runs_dir=str(runs_dir), model=cfg, data=DataConfig(shards=str(shards), direction=direction)
    )
    save_config(run)
    write_tag(run.run_dir.path, 3, {"module": GPT(cfg).state_dict(), "global_steps": 3})
    return run.run_dir.path


def test_a_fim_model_records_its_fim_tokens(tmp_path, fim_shards):
    tokenizer = load_text_tokenizer(fim_shards / "tokenizer.json")
    export_main([str(small_run(tmp_path, fim_shards)), "--format", "gguf", "--type", "f32", str(tmp_path / "out")])
    keys = metadata(tmp_path / "out")
    names = ("fim_pre", "fim_mid", "fim_suf", "fim_pad")
    assert [keys[f"tokenizer.ggml.{n}_token_id"] for n in names] == [tokenizer.token_to_id(t) for t in FIM_TOKENS]
    assert keys["dslm.fim"] is False  # the tokenizer has FIM tokens; the run records no FIM training


def test_a_backward_model_is_refused_in_one_line_before_any_file(tmp_path, tiny_shards):
    run = small_run(tmp_path, tiny_shards[0], direction="backward")
    done = run_export(run, "--format", "gguf")
    assert done.returncode == 2, done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("dslm-export: error: --format gguf: this model reads text backward")
    )
    assert not (run / "export").exists()


def run_export(*args) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "dslm-export", *map(str, args)], capture_output=True, text=True)


def test_type_without_gguf_is_one_line(gguf_exports, tmp_path):
    run, _, _ = gguf_exports
    done = run_export(run, "--type", "q8_0", tmp_path / "x")
    line = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and line.startswith("dslm-export: error: --type goes with --format gguf"), line
    assert not (tmp_path / "x").exists()


def test_export_check_passes_q8_0_and_puts_the_parity_table_in_the_card(gguf_exports, tmp_path):
    run, _, _ = gguf_exports
    out = tmp_path / "q8"
    done = run_export(run, "--format", "gguf", "--type", "q8_0", out, "--check", "--check-tokens", "1024")
    assert done.returncode == 0, done.stderr
    parity = json.loads((out / "parity.json").read_text())
    (row,) = parity["rows"]
    assert row["format"] == "gguf-q8_0" and row["passed"] and row["top1_agreement"] >= 0.95
    assert row["size_bytes"] == (out / "model-q8_0.gguf").stat().st_size
    assert "gguf-q8_0" in done.stdout and "gguf-q8_0" in (out / "README.md").read_text()


def test_a_gguf_file_damaged_after_writing_fails_its_check_in_one_line(gguf_exports, tmp_path):
    _, _, folders = gguf_exports
    out = tmp_path / "f32"
    shutil.copytree(folders["f32"], out)
    reader = gguf.GGUFReader(out / "model-f32.gguf", "r+")
    (tensor,) = [t for t in reader.tensors if t.name == "output.weight"]
    tensor.data[: len(tensor.data) // 4] = 0  # a zeroed stretch, in place through the file's memory map
    reader.data.flush()
    del reader
    done = subprocess.run(
        [BIN / "dslm-eval", out, "--parity", "--parity-tokens", "1024"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()  # llama.cpp's own log is not on it
    assert line.startswith("dslm-eval: error: ") and "gguf-f32" in line, line


def test_a_templated_model_records_its_chat_template_and_stops_at_im_end(tmp_path, sft_shards):
    run = small_run(tmp_path, sft_shards[0])
    export_main([str(run), "--format", "gguf", "--type", "f32", str(tmp_path / "out")])
    keys = metadata(tmp_path / "out")
    assert keys["tokenizer.ggml.eos_token_id"] == SPECIAL_TOKENS.index("<|im_end|>")
    assert keys["tokenizer.chat_template"] == chat_template(Framing(template=keys["dslm.template"]))
    assert keys["dslm.template"] == "instruct"
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert 'TEMPLATE """<|im_start|><|instruction|>{{ .Prompt }}<|im_end|><|im_start|><|response|>"""' in modelfile
    assert "PARAMETER stop <|im_end|>" in modelfile


def test_an_hf_export_folder_exports_as_gguf_beside_it_with_the_same_logits(loaded, gguf_exports, tmp_path):
    run, model, _ = gguf_exports
    hf = tmp_path / "step9"
    export_main([str(run), str(hf)])
    export_main([str(hf), "--format", "gguf", "--type", "f32"])
    ids = np.arange(40) % model.cfg.vocab_size
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)[None])[0].numpy()
    got = loaded(tmp_path / "step9-gguf-f32", model).logits(ids)
    assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max()


def test_the_modelfile_keeps_ollama_within_the_models_context(gguf_exports):
    _, model, folders = gguf_exports
    assert f"PARAMETER num_ctx {model.cfg.block_size}\n" in (folders["q8_0"] / "Modelfile").read_text()


def test_check_tokens_without_check_is_one_line(gguf_exports, tmp_path):
    run, _, _ = gguf_exports
    done = run_export(run, "--format", "gguf", "--check-tokens", "10", tmp_path / "x")
    line = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and line.startswith("dslm-export: error: --check-tokens goes with --check"), line
    assert not (tmp_path / "x").exists()
