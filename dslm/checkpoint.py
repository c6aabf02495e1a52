"""DeepSpeed checkpoints in runs/NAME/checkpoints/global_stepN, and reading weights back for eval/export."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from dslm.model import GPT, ModelConfig

TAG_PATTERN = re.compile(r"global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


def save_checkpoint(engine, folder: Path, step: int) -> None:
    """Collective: every rank writes its part. DeepSpeed updates `latest` after the tag."""
    # universal_checkpoint_info lets ds_to_universal convert the tag for another world size
    client_state = {"step": step, "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
    engine.save_checkpoint(str(folder), tag=tag_for(step), client_state=client_state)


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, tag folder) for every global_stepN under `folder`, oldest first."""
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := TAG_PATTERN.match(p.name))]
    return sorted(found)


def load_fp32_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a ZeRO-1/2/3 checkpoint, consolidated across ranks."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def load_model(model_cfg: ModelConfig, tag_dir: Path) -> GPT:
    """A GPT in fp32 with the weights of checkpoint `tag_dir`, in eval mode."""
    model = GPT(model_cfg)
    model.load_state_dict(load_fp32_weights(tag_dir))
    return model.eval()
