import pytest

from dslm.mfu import flops_per_token, peak_flops
from dslm.model import GPT, PRESETS, ModelConfig


def test_flops_per_token_of_the_headline_model():
    model = GPT(ModelConfig(**PRESETS["gpt-12l-1024d"]))
    n = 170_416_824 - 8888 * 1024 - 1024 * 1024  # less the token and position tables
    assert flops_per_token(model, 1024) == 6 * n + 12 * 12 * 16 * 64 * 1024


def test_tied_head_counts_as_a_matmul():
    base = dict(n_layer=1, n_head=2, n_embd=32, intermediate_size=64, vocab_size=100, block_size=16)
    untied, tied = GPT(ModelConfig(**base)), GPT(ModelConfig(**base, tie_embeddings=True))
    assert flops_per_token(untied, 16) == flops_per_token(tied, 16)


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_peak_by_device_name(name, peak):
    assert peak_flops(name) == peak
