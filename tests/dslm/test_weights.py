"""Weights for fine-tuning (train.init_from): from a tag, a run directory or an export, into a new model."""

import dataclasses

import pytest
import torch

from dslm.checkpoint.format import BEST_NAME, LATEST_NAME
from dslm.checkpoint.weights import load_into, read_weights, weights_sha256
from dslm.config import RunConfig, save_config
from dslm.data.loader import DataConfig
from dslm.data.templates import Framing
from dslm.errors import DslmError
from dslm.export import export, write_hf
from dslm.model import GPT, ModelConfig
from dslm.model_source import resolve_source
from dslm.run_dir import tag_for
from dslm.train import check_init_source

CFG = ModelConfig(n_layer=2, n_head=4, n_embd=64, intermediate_size=128, vocab_size=600, block_size=32)


@pytest.fixture
def source(tmp_path, tiny_shards, trained_looking, write_checkpoint):
    """(run directory with a sealed tag at step 7, the model in it)."""
    model = trained_looking(CFG)
    cfg = RunConfig(name="src", runs_dir=str(tmp_path), model=CFG, data=DataConfig(shards=str(tiny_shards[0])))
    save_config(cfg)
    write_checkpoint(cfg.run_dir.path, 7, {"module": model.state_dict()})
    return cfg.run_dir.path, model


def logits(model: GPT) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.arange(2 * CFG.block_size).view(2, CFG.block_size) % CFG.vocab_size)


def test_a_tag_a_run_and_an_export_give_the_source_logits_at_step_0(source, tiny_shards):
    run, model = source
    shards, manifest = tiny_shards
    export(run / "checkpoints" / tag_for(7), run / "export" / "step7")
    digests = set()
    for path in (run / "checkpoints" / tag_for(7), run, run / "export" / "step7"):
        _, weights, origin = read_weights(path)
        torch.manual_seed(99)
        fresh = GPT(CFG)  # the fine-tuned run's own model, random until loaded
        load_into(fresh, weights, origin.path)
        assert (logits(fresh) - logits(model)).abs().max().item() < 1e-4, path
        assert origin.step == 7
        digests.add(origin.sha256)
    assert origin.path == str(run / "export" / "step7")
    assert len(digests) == 2  # the tag and its run read the same weights; the export folds the head bias


def test_a_run_fine_tunes_from_best_then_latest_then_its_newest_intact_tag(source, write_checkpoint):
    run, model = source
    write_checkpoint(run, 9, {"module": model.state_dict()})
    unsealed = write_checkpoint(run, 11, {"module": model.state_dict()}, sealed=False)
    assert resolve_source(run).chosen_tag().name == tag_for(9)
    (run / "checkpoints" / LATEST_NAME).write_text(unsealed.name)
    assert resolve_source(run).chosen_tag().name == tag_for(9)
    (run / "checkpoints" / LATEST_NAME).write_text(tag_for(7))
    assert resolve_source(run).chosen_tag().name == tag_for(7)
    (run / "checkpoints" / BEST_NAME).write_text(tag_for(9))
    assert resolve_source(run).chosen_tag().name == tag_for(9)


def test_another_model_shape_is_one_line_naming_the_tensor_and_both_shapes(source):
    run, _ = source
    _, weights, origin = read_weights(run)
    wider = GPT(ModelConfig(n_layer=2, n_head=4, n_embd=32, intermediate_size=128, vocab_size=600, block_size=32))
    with pytest.raises(DslmError, match=r"wte.weight is \(600, 64\) there and \(600, 32\) in this model") as e:
        load_into(wider, weights, origin.path)
    assert "\n" not in str(e.value)
    with pytest.raises(DslmError, match="has no tensor blocks.2"):
        load_into(GPT(ModelConfig(**{**CFG.__dict__, "n_layer": 3})), weights, origin.path)


def test_what_is_not_a_source_is_refused(source, tmp_path, write_checkpoint):
    run, model = source
    unsealed = write_checkpoint(run, 11, {"module": model.state_dict()}, sealed=False)
    with pytest.raises(DslmError, match="incomplete"):
        read_weights(unsealed)
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(DslmError, match=str(path)):
            read_weights(path)


def test_the_weights_digest_sees_every_value():
    weights = GPT(CFG).state_dict()
    before = weights_sha256(weights)
    weights["blocks.1.mlp.fc.bias"][3] += 1e-6
    assert weights_sha256(weights) != before


def test_a_source_knows_its_tokenizer_and_direction_and_another_tokenizer_is_refused(
    source, tiny_shards, tmp_path, capsys
):
    run, _ = source
    shards, manifest = tiny_shards
    tag = run / "checkpoints" / tag_for(7)
    write_hf(
        run / "export" / "step7",
        CFG,
        read_weights(tag)[1],
        shards / manifest.tokenizer,
        Framing("backward", "instruct"),
    )
    for path in (tag, run, run / "export" / "step7"):
        assert manifest.tokenizer_sha256 in resolve_source(path).tokenizer_sha256s()
    assert resolve_source(run / "export" / "step7").framing() == Framing("backward", "instruct")
    assert resolve_source(tag).framing() == Framing("forward", "")

    cfg = RunConfig(name="tuned", runs_dir=str(tmp_path), model=CFG, data=DataConfig(shards=str(shards)))
    check_init_source(resolve_source(run), cfg, manifest)
    assert "was trained" not in capsys.readouterr().out
    check_init_source(resolve_source(run / "export" / "step7"), cfg, manifest)
    assert "step7 was trained backward; this run reads forward" in capsys.readouterr().out
    other = dataclasses.replace(manifest, tokenizer_sha256="0" * 64)
    with pytest.raises(DslmError, match="was trained with another tokenizer than the one of"):
        check_init_source(resolve_source(tag), cfg, other)

    moved = RunConfig(name="src", runs_dir=str(tmp_path), model=CFG, data=DataConfig(shards=str(tmp_path / "gone")))
    save_config(moved)
    assert resolve_source(run).tokenizer_sha256s() == set() and resolve_source(run).framing() == Framing()
    check_init_source(resolve_source(run), cfg, other)  # nothing to compare: a note, not an error
    assert "its tokenizer cannot be checked" in capsys.readouterr().out
