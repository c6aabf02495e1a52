"""The HF export: GPT2LMHeadModel gives dslm's logits (transformers is a test-only dependency)."""

import json

import pytest
import torch

from dslm.hf import fold_head_bias, hf_config, hf_state_dict
from dslm.model import GPT, ModelConfig

transformers = pytest.importorskip("transformers", reason="the HF export check needs `transformers` (pip install .[test])")


def hf_model(weights: dict, cfg: ModelConfig):
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config(cfg)))
    hf.load_state_dict(hf_state_dict(weights, cfg), strict=True)
    return hf.eval()


@pytest.mark.parametrize("options", [dict(), dict(lm_head_bias=False), dict(tie_embeddings=True, vocab_multiple=128)])
def test_hf_gpt2_logits_match(options, trained_looking):
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=64, intermediate_size=256, vocab_size=300, block_size=32, **options)
    model = trained_looking(cfg)
    hf = hf_model(model.state_dict(), cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.block_size))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_folded_head_bias_is_exact_for_any_normalized_input():
    torch.manual_seed(1)
    gain, shift = torch.rand(32) + 0.5, torch.randn(32)
    weight, bias = torch.randn(100, 32), torch.randn(100)
    new_gain, new_shift, new_weight = fold_head_bias(gain, shift, weight, bias)
    n = torch.nn.functional.layer_norm(torch.randn(50, 32), (32,))
    assert torch.allclose(n @ torch.diag(gain) @ weight.T + shift @ weight.T + bias,
                          (n * new_gain + new_shift) @ new_weight.T, atol=1e-4)


def test_config_is_gpt2s():
    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=32, intermediate_size=64, vocab_size=100, block_size=16)
    config = transformers.GPT2Config(**json.loads(json.dumps(hf_config(cfg))))
    assert (config.n_layer, config.n_head, config.n_embd, config.n_inner, config.n_positions) == (3, 2, 32, 64, 16)
    assert not config.tie_word_embeddings


def test_a_tied_head_is_written_as_a_tensor_of_its_own(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, intermediate_size=64, vocab_size=100, block_size=16,
                      tie_embeddings=True, lm_head_bias=False)
    weights = GPT(cfg).state_dict()  # lm_head.weight is wte.weight, as in a consolidated ZeRO-3 checkpoint
    assert weights["lm_head.weight"].data_ptr() == weights["wte.weight"].data_ptr()
    save_file(hf_state_dict(weights, cfg), str(tmp_path / "model.safetensors"))
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(saved["lm_head.weight"], saved["transformer.wte.weight"])
