"""A model and its tokenizer for evaluation and generation, from a DeepSpeed checkpoint (any ZeRO
stage, consolidated on the fly), a run directory (its newest intact checkpoint) or a `dslm-export`
folder. Weights are read as safetensors or with torch.load(weights_only=True) (dslm.checkpoint)."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer

from dslm.checkpoint import load_model, newest_resumable
from dslm.config import CONFIG_NAME, load_config, run_of
from dslm.data.manifest import Manifest
from dslm.data.tokens import load_text_tokenizer
from dslm.errors import DslmError
from dslm.hf import dslm_state_dict, model_config_from_hf
from dslm.model import GPT

EXPORT_FILES = ("model.safetensors", "config.json", "tokenizer.json")
EXPORT_STEP = re.compile(r"step(\d+)$")
"""dslm-export's default folder runs/NAME/export/stepN."""


@dataclass
class LoadedModel:
    model: GPT
    """fp32, in eval mode, on the device asked for."""
    tokenizer: Tokenizer
    run_dir: Path | None
    """The run the weights come from, where known."""
    step: int | None
    """The checkpoint's optimizer step, where known."""


def load_for_eval(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """`path`: runs/NAME/checkpoints/global_stepN, runs/NAME, or an export folder."""
    path = Path(path)
    if not path.exists():
        raise DslmError(f"{path} does not exist")
    if is_export(path):
        loaded = load_export(path)
    elif (path / CONFIG_NAME).is_file():
        loaded = load_checkpoint(newest_checkpoint(path))
    elif run_of(path) is not None:
        loaded = load_checkpoint(path)
    else:
        raise DslmError(f"{path} is not a checkpoint (runs/NAME/checkpoints/global_stepN), a run directory "
                        f"or an export folder ({', '.join(EXPORT_FILES)})")
    loaded.model.to(device).eval()
    return loaded


def newest_checkpoint(run_dir: Path) -> Path:
    tag_dir, _ = newest_resumable(run_dir / "checkpoints")
    if tag_dir is None:
        raise DslmError(f"{run_dir} holds no sealed, intact checkpoint")
    return tag_dir


def load_checkpoint(tag_dir: Path) -> LoadedModel:
    run_dir, step = run_of(tag_dir)
    cfg = load_config(run_dir / CONFIG_NAME, [])
    tokenizer = Path(cfg.data.shards) / Manifest.load(cfg.data.shards).tokenizer
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's consolidation prints its progress
        model = load_model(cfg.model, tag_dir)
    return LoadedModel(model, load_text_tokenizer(tokenizer), run_dir, step)


def load_export(folder: Path) -> LoadedModel:
    cfg = model_config_from_hf(json.loads((folder / "config.json").read_text()), folder / "config.json")
    try:
        hf = load_file(str(folder / "model.safetensors"))
    except SafetensorError as e:
        raise DslmError(f"{folder / 'model.safetensors'}: {e}") from None
    model = GPT(cfg)
    model.load_state_dict(dslm_state_dict(hf, cfg, folder / "model.safetensors"))
    return LoadedModel(model, load_text_tokenizer(folder / "tokenizer.json"), *export_origin(folder))


def is_export(path: Path) -> bool:
    return all((path / name).is_file() for name in EXPORT_FILES)


def export_origin(folder: Path) -> tuple[Path | None, int | None]:
    """(run directory, step) of an export at dslm-export's default place runs/NAME/export/stepN,
    else (None, None)."""
    if (match := EXPORT_STEP.match(folder.name)) and (folder.parent.parent / CONFIG_NAME).is_file():
        return folder.parent.parent, int(match.group(1))
    return None, None
