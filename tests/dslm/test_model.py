import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dslm.model import GPT, PRESETS, ModelConfig

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
    with pytest.raises(ValueError, match="model.context"):
        model(torch.zeros(1, cfg.context + 1, dtype=torch.long))


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
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
