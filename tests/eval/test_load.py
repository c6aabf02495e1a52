"""load_for_eval: checkpoints, run directories and export folders, and refusing pickled code."""

import argparse

import pytest
import torch
from tokenizers import Tokenizer

from dslm.config import RunConfig, save_config
from dslm.data.loader import DataConfig
from dslm.data.tokens import EOS_ID, load_text_tokenizer
from dslm.errors import DslmError
from dslm.export import export
from dslm.model import GPT, ModelConfig
from dslm.run_dir import RunDir, tag_for
from dslm_eval.load import load_for_eval

CFG = ModelConfig(n_layer=2, n_head=4, n_embd=64, intermediate_size=128, vocab_size=600, block_size=32)


@pytest.fixture
def model(trained_looking) -> GPT:
    return trained_looking(CFG)


@pytest.fixture
def run(tmp_path, tiny_shards, model, write_checkpoint):
    """A run directory holding a sealed checkpoint at step 7 of `model`."""
    shards, _ = tiny_shards
    cfg = RunConfig(name="r", runs_dir=str(tmp_path), model=CFG, data=DataConfig(shards=str(shards)))
    save_config(cfg)
    write_checkpoint(cfg.run_dir.path, 7, {"module": model.state_dict(), "global_steps": 7})
    return cfg.run_dir.path


def logits(model: GPT) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(2 * CFG.block_size).view(2, CFG.block_size) % CFG.vocab_size)


def test_a_checkpoint_and_its_run_load_the_trained_weights_and_the_tokenizer(run, tiny_shards, model, write_checkpoint):
    shards, manifest = tiny_shards
    newer_unsealed = write_checkpoint(run, 9, {"module": GPT(CFG).state_dict()}, sealed=False)
    for path in (run / "checkpoints" / tag_for(7), run):  # the run: its newest intact checkpoint
        loaded = load_for_eval(path, "cpu")
        assert (loaded.run, loaded.step) == (RunDir(run), 7)
        assert not loaded.model.training
        assert torch.equal(logits(loaded.model), logits(model))
        assert loaded.tokenizer.get_vocab() == Tokenizer.from_file(str(shards / manifest.tokenizer)).get_vocab()
    assert load_for_eval(newer_unsealed, "cpu").step == 9  # named explicitly, a tag loads even unsealed


def test_an_export_gives_the_logits_of_the_model_it_was_exported_from(run, tiny_shards, model):
    shards, manifest = tiny_shards
    out = run / "export" / "step7"  # dslm-export's default folder, so the run and step are known
    export(run / "checkpoints" / tag_for(7), out)
    loaded = load_for_eval(out, "cpu")
    assert (loaded.run, loaded.step) == (RunDir(run), 7)
    assert loaded.model.lm_head.bias is None  # folded into the final LayerNorm by the export
    assert (logits(loaded.model) - logits(model)).abs().max().item() < 1e-4
    text = "def f(x):\n    return '<eos>'"  # special tokens in text stay text, as in training
    assert loaded.tokenizer.encode(text).ids == load_text_tokenizer(shards / manifest.tokenizer).encode(text).ids
    assert EOS_ID not in loaded.tokenizer.encode(text).ids


def test_a_checkpoint_that_needs_arbitrary_unpickling_is_refused(tmp_path, tiny_shards, write_checkpoint):
    shards, _ = tiny_shards
    cfg = RunConfig(name="r", runs_dir=str(tmp_path), model=CFG, data=DataConfig(shards=str(shards)))
    save_config(cfg)
    # old training scripts pickled their argparse Namespace next to the weights
    tag_dir = write_checkpoint(cfg.run_dir.path, 3, {"module": GPT(CFG).state_dict(), "args": argparse.Namespace(lr=1)})
    with pytest.raises(DslmError, match=r"arbitrary unpickling \(argparse.Namespace\)"):
        load_for_eval(tag_dir, "cpu")


@pytest.mark.parametrize("make", ["missing", "empty folder", "run without checkpoints"])
def test_a_path_that_is_none_of_these_is_one_clear_error(tmp_path, tiny_shards, make):
    path = tmp_path / "p"
    if make != "missing":
        path.mkdir()
    if make == "run without checkpoints":
        save_config(RunConfig(name="p", runs_dir=str(tmp_path), model=CFG))
    with pytest.raises(DslmError) as error:
        load_for_eval(path, "cpu")
    assert "\n" not in str(error.value) and str(path) in str(error.value)
