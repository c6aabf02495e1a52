"""Checkpoints in runs/NAME/checkpoints/global_stepN: DeepSpeed's files plus dslm's own, sealed
so that a crash at any moment never leaves `latest` naming an incomplete tag.

A tag is written by every rank (DeepSpeed's model and optimizer files, and `rng_rankR.pt` with
each rank's python/numpy/torch RNG), then, after a barrier, rank 0 seals it: `dslm_complete.json`
lists every file of the tag with its size, and only then is `latest` replaced (atomically).
A tag without the seal, or whose files no longer match it, is never resumed from.

This module is the checkpoint format: writing, sealing, finding and checking tags, and reading
their weights for eval and export. Continuing a run from a tag is dslm.resume.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import random
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dslm.compat import import_attr, require
from dslm.errors import DslmError
from dslm.files import atomic_write_text
from dslm.lora import LoraConfig, add_adapters, merge_lora_weights
from dslm.model import GPT, ModelConfig
from dslm.optim import freeze, parameter_order

TAG_PATTERN = re.compile(r"global_step(\d+)$")
SEAL_NAME = "dslm_complete.json"
LATEST_NAME = "latest"
BEST_NAME = "best"
"""Names the sealed tag with the lowest val/loss; pruning never removes it."""


@dataclass
class TrainState:
    """Where training stands after an optimizer step, beside DeepSpeed's own state."""

    step: int = 0
    """Optimizer steps done."""
    samples: int = 0
    """Training samples consumed by all ranks: the loader's global cursor, independent of the
    world size, so a resumed run reads the next unseen sample whatever its rank count."""
    world_size: int = 1
    """Ranks that wrote the checkpoint."""
    shards: dict = dataclasses.field(default_factory=dict)
    """What the cursor counts in: the shards' tokenizer_sha256, seq_len and train_samples."""
    val_loss: float | None = None
    """val/loss measured at this step, if it was."""
    frozen: list[str] = dataclasses.field(default_factory=list)
    """Parameters that did not train (train.freeze): they have no optimizer state."""


def tag_for(step: int) -> str:
    return f"global_step{step}"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Checkpointer:
    """Saves sealed tags under `folder`, keeping the newest `keep_last` (0: all)."""

    def __init__(self, folder: Path, keep_last: int):
        self.folder = folder
        self.keep_last = keep_last

    def save(self, engine, state: TrainState) -> Path:
        """Collective: every rank writes its part; returns the sealed tag folder."""
        tag = tag_for(state.step)
        # universal_checkpoint_info lets ds_to_universal convert the tag for another world size
        client_state = {"dslm": dataclasses.asdict(state),
                        "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
        tag_dir = self.folder / tag
        if dist.get_rank() == 0:  # a tag written again (after a resume) is unsealed until it is whole again
            (tag_dir / SEAL_NAME).unlink(missing_ok=True)
        dist.barrier()
        engine.save_checkpoint(str(self.folder), tag=tag, client_state=client_state, save_latest=False)
        torch.save(rng_state(), tag_dir / rng_file(dist.get_rank()))
        dist.barrier()
        if dist.get_rank() == 0:
            seal(tag_dir, state)
            atomic_write_text(self.folder / LATEST_NAME, tag)
            if (best := best_tag(self.folder)) is not None:
                atomic_write_text(self.folder / BEST_NAME, best.name)
            self.prune()
        dist.barrier()
        return tag_dir

    def prune(self) -> None:
        """Remove tags older than the newest `keep_last` sealed ones (sealed or not), except the best."""
        if not self.keep_last:
            return
        sealed = [step for step, tag_dir in list_checkpoints(self.folder) if (tag_dir / SEAL_NAME).is_file()]
        if len(sealed) <= self.keep_last:
            return
        oldest_kept, best = sealed[-self.keep_last], best_tag(self.folder)
        for step, tag_dir in list_checkpoints(self.folder):
            if step < oldest_kept and tag_dir != best:
                shutil.rmtree(tag_dir)
                shutil.rmtree(universal_dir(tag_dir), ignore_errors=True)


def seal(tag_dir: Path, state: TrainState) -> None:
    files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
             if p.is_file() and p.name != SEAL_NAME}
    atomic_write_text(tag_dir / SEAL_NAME, json.dumps({"state": dataclasses.asdict(state), "files": files}, indent=1))


def seal_problem(tag_dir: Path) -> str | None:
    """Why a tag cannot be resumed from (unsealed, or files missing or changed), or None."""
    seal_path = tag_dir / SEAL_NAME
    if not seal_path.is_file():
        return "incomplete (never sealed)"
    sealed = json.loads(seal_path.read_text())
    files = sealed["files"]
    for name, size in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, sealed with {size}"
    world_size = sealed["state"]["world_size"]
    ranks = sum(1 for name in files if name.startswith("rng_rank"))
    if ranks != world_size:
        return f"holds {ranks} ranks' state, sealed by {world_size}"
    return None


def sealed_state(tag_dir: Path) -> TrainState:
    return TrainState(**json.loads((tag_dir / SEAL_NAME).read_text())["state"])


def best_tag(folder: Path) -> Path | None:
    """The sealed tag with the lowest val/loss (the newest of equals), or None when none has one."""
    scored = [(state.val_loss, -step, tag_dir) for step, tag_dir in list_checkpoints(folder)
              if (tag_dir / SEAL_NAME).is_file() and (state := sealed_state(tag_dir)).val_loss is not None]
    return min(scored)[2] if scored else None


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, tag folder) for every global_stepN under `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := TAG_PATTERN.match(p.name))]
    return sorted(found)


def newest_resumable(folder: Path) -> tuple[Path | None, list[str]]:
    """The newest tag that is sealed and intact, and a warning line for each newer one skipped."""
    skipped = []
    for _, tag_dir in reversed(list_checkpoints(folder)):
        problem = seal_problem(tag_dir)
        if problem is None:
            return tag_dir, skipped
        skipped.append(f"skipping checkpoint {tag_dir}: {problem}")
    return None, skipped


def universal_dir(tag_dir: Path) -> Path:
    """Where DeepSpeed's universal form of a tag is kept (dslm.resume writes it), beside the tag."""
    return tag_dir.with_name(f"{tag_dir.name}_universal")


def deepspeed_records() -> list[type]:
    """The record types DeepSpeed pickles into its checkpoint files, besides tensors and containers."""
    scalers = "deepspeed.runtime.fp16.loss_scaler"
    return [import_attr("deepspeed", module, name) for module, name in (
        (scalers, "LossScaler"), (scalers, "DynamicLossScaler"), ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
        ("deepspeed.utils.tensor_fragment", "fragment_address"))]


def load_weights_only(path: Path) -> dict:
    """torch.load(weights_only=True) of a DeepSpeed file: tensors, plain containers and the few
    record types DeepSpeed pickles into them; anything else (arbitrary code) is refused. A zip file
    (torch.save's format) is memory-mapped: its tensors are read only when used."""
    try:
        with torch.serialization.safe_globals(deepspeed_records()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise DslmError(f"{path}: refusing to load it: it needs arbitrary unpickling "
                        f"({found.group(1) if found else 'not only tensors and plain data'}), "
                        "and checkpoints are read with torch.load(weights_only=True)") from None


def load_fp32_weights(tag_dir: Path, model_cfg: ModelConfig, lora: LoraConfig | None = None) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a checkpoint, named as the trained module names them (with
    `lora`, the run's train.lora, its adapters and peft's names): consolidated across ranks for
    ZeRO-1/2/3, from the optimizer's fp32 copy for ZeRO-0 with bf16, or the module itself for
    ZeRO-0 in fp32. Frozen parameters (TrainState.frozen), which have no master copy under
    ZeRO-0/1, come from the module's own weights, in the precision they were trained with."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for path in sorted(tag_dir.glob("*_states.pt")):  # DeepSpeed's model and optimizer files
        load_weights_only(path)
    whole = tag_dir / "mp_rank_00_model_states.pt"  # the whole module; ZeRO-3 writes none
    state = load_weights_only(whole) if whole.is_file() else {"module": {}}
    module = {name: t.float() for name, t in state["module"].items()}
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        # DeepSpeed's loader unpickles without restriction, but only files just checked above
        return {**module, **get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)}
    masters = (state.get("optimizer") or {}).get("fp32_groups")
    if masters is None:
        require("deepspeed", "a ZeRO-0 checkpoint of bf16 weights keeps its fp32 masters in optimizer['fp32_groups']",
                all(t.dtype == torch.float32 for t in state["module"].values()))
        return module
    model = GPT(model_cfg)
    add_adapters(model, lora or LoraConfig())
    freeze(model, (state.get("dslm") or {}).get("frozen", []))
    ordered = parameter_order(model)  # the optimizer's groups hold the masters in this order
    return {**module, **dict(zip(ordered, (t for group in masters for t in group)))}



def load_model_weights(tag_dir: Path, model_cfg: ModelConfig, lora: LoraConfig) -> dict[str, torch.Tensor]:
    """A checkpoint's fp32 weights as the plain GPT of `model_cfg` names them: load_fp32_weights
    with the adapters of `lora` (the run's train.lora) merged into their layers. What eval,
    fine-tuning (train.init_from) and the export read."""
    return merge_lora_weights(load_fp32_weights(tag_dir, model_cfg, lora), lora)
