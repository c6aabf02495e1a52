import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dslm.model import GPT, PRESETS, ModelConfig
from dslm.optim import param_groups

MODEL_FILE = Path(__file__).resolve().parents[2] / "dslm" / "model.py"


@pytest.mark.parametrize("preset, params", [("gpt-12l-1024d", 170_416_824), ("code-33m", 33_551_168)])
def test_preset_parameter_counts_match_model_cards(preset, params):
    with torch.device("meta"):
        model = GPT(ModelConfig(preset=preset, **PRESETS[preset]))
    assert model.num_params() == params


def test_forward_shapes_and_initial_loss():
    torch.manual_seed(0)
    cfg = ModelConfig(**PRESETS["tiny"])
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    assert model(idx).shape == (2, 16, cfg.vocab_size)
    # GPT-2 init gives near-uniform predictions: loss close to ln(vocab)
    assert model(idx, idx).item() == pytest.approx(math.log(cfg.vocab_size), abs=0.1)
    with pytest.raises(ValueError, match="model.block_size"):
        model(torch.zeros(1, cfg.block_size + 1, dtype=torch.long))


def test_causal_future_tokens_do_not_change_past_logits():
    model = GPT(ModelConfig(**PRESETS["tiny"])).eval()
    a = torch.randint(0, 100, (1, 12))
    b = a.clone()
    b[0, 8:] = 7
    assert torch.allclose(model(a)[0, :8], model(b)[0, :8], atol=1e-6)


def test_model_module_is_single_device_code():
    tree = ast.parse(MODEL_FILE.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {m for m in imported if m.startswith(("deepspeed", "torch.distributed"))}
    assert {m.split(".")[0] for m in imported} <= {"torch", "math", "dataclasses", "__future__"}
    code = "import sys, dslm.model; print('deepspeed' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_tied_embeddings_and_padded_vocab():
    base = dict(n_layer=1, n_head=2, n_embd=32, intermediate_size=64, vocab_size=300, block_size=16)
    untied, tied = GPT(ModelConfig(**base)), GPT(ModelConfig(**base, tie_embeddings=True))
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.num_params() - tied.num_params() == 300 * 32
    padded = GPT(ModelConfig(**base, vocab_multiple=128))
    assert padded.wte.num_embeddings == padded.lm_head.out_features == 384
    assert padded(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 300)  # padded ids never predicted
    groups = param_groups(tied, 0.1)
    flat = [id(p) for g in groups for p in g["params"]]
    assert len(flat) == len(set(flat)) == len(list(tied.parameters()))
    assert any(p is tied.wte.weight for p in groups[1]["params"])  # the tied weight is not decayed


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, intermediate_size=64, vocab_size=100, block_size=16))
    idx = torch.randint(0, 100, (2, 16))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.activation_checkpointing = flag
        model(idx, idx).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_a_preset_fills_the_sizes_left_unset_in_code():
    with torch.device("meta"):
        assert GPT(ModelConfig(preset="code-33m")).num_params() == 33_551_168
    variant = ModelConfig(preset="code-33m", n_layer=4)
    assert (variant.n_layer, variant.n_embd, variant.block_size) == (4, 512, 256)
    assert ModelConfig().n_embd == PRESETS["tiny"]["n_embd"]  # the default preset


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(preset="huge"), "model.preset='huge' is not one of"),
        (dict(preset="", n_layer=2), "model.n_head is not set"),
        (dict(dropout=1.0), "model.dropout=1.0"),
        (dict(n_layer=0), "model.n_layer=0 must be at least 1"),
        (dict(block_size=-1), "model.block_size=-1 must be at least 1"),
        (dict(vocab_multiple=0), "model.vocab_multiple=0 must be at least 1"),
    ],
)
def test_bad_model_configs_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(preset="tiny"),
        dict(preset="tiny", n_layer=3, tie_embeddings=True),
        dict(preset="tiny", lm_head_bias=False, vocab_multiple=128, vocab_size=500),
        dict(preset="code-33m", intermediate_size=1000),
        dict(preset="gpt-12l-1024d"),
    ],
)
def test_the_sizes_alone_give_the_models_parameters(kwargs):
    """ModelConfig's arithmetic (what dslm-train's memory check counts before building anything)
    against the model itself."""
    cfg = ModelConfig(**kwargs)
    with torch.device("meta"):
        model = GPT(cfg)
    shapes = {
        **cfg.outer_shapes(),
        **{f"blocks.{i}.{name}": shape for i in range(cfg.n_layer) for name, shape in cfg.block_shapes().items()},
    }
    assert shapes == {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert cfg.num_params() == model.num_params()
    assert cfg.largest_layer_params() == max(
        sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()
    )


def test_the_parameters_of_a_huge_model_are_counted_without_allocating_it():
    cfg = ModelConfig(preset="tiny", n_layer=100_000)
    assert cfg.num_params() == 100_000 * 198_272 + 2 * 2048 * 128 + 128 * 128 + 2 * 128 + 2048
