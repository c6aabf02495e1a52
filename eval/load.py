"""A model and its tokenizer for evaluation and generation, from a DeepSpeed checkpoint (any ZeRO
stage, consolidated on the fly), a run directory (its newest intact checkpoint) or a `dslm-export`
folder. Weights are read as safetensors or with torch.load(weights_only=True) (dslm.checkpoint.weights)."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from dslm.checkpoint.weights import model_from, read_source
from dslm.data.templates import Framing
from dslm.data.tokens import load_text_tokenizer
from dslm.errors import DslmError
from dslm.model import GPT
from dslm.model_source import resolve_source
from dslm.run_dir import RunDir
from dslm_local.cli import counted
from dslm_local.fim import check_model_tokenizer


@dataclass
class LoadedModel:
    model: GPT
    """fp32, in eval mode, on the device asked for."""
    tokenizer: Tokenizer
    run: RunDir | None
    """The run the weights come from, where known."""
    step: int | None
    """The checkpoint's optimizer step, where known."""
    framing: Framing = Framing()
    """How the model reads its input (direction, template), as it was trained."""


def parse_device(text: str) -> torch.device:
    """The torch device `text` names ("cpu", "cuda", "cuda:N"), checked to exist on this machine.
    Raises DslmError for another name or a CUDA device this machine lacks."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise DslmError(f"--device {text}: not a torch device (cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise DslmError(f"--device {text}: dslm evaluates on cpu or cuda")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DslmError(f"--device {text}: this machine has {counted(torch.cuda.device_count(), 'CUDA device')}")
    return device


def load_for_eval(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """`path`: runs/NAME/checkpoints/global_stepN, runs/NAME (its newest intact checkpoint), or an
    export folder (dslm.model_source). Raises DslmError for anything else. What DeepSpeed prints
    while checking and reading a checkpoint goes to stderr: stdout holds the command's own output."""
    source = resolve_source(path)
    source.need_weights()
    if source.kind == "run":
        source = resolve_source(source.newest_tag())
    with contextlib.redirect_stdout(sys.stderr):
        cfg, weights = read_source(source)
    model = model_from(cfg, weights, source.path).to(device).eval()
    tokenizer, framing = load_text_tokenizer(source.tokenizer_file()), source.framing()
    check_model_tokenizer(tokenizer, framing.fim, str(source.path))
    return LoadedModel(model, tokenizer, source.run, source.step, framing)
