"""Reading a model's weights, the one way every command does: from a sealed checkpoint tag (its
DeepSpeed files, any ZeRO stage, a LoRA run's adapters merged), a run directory or a
`dslm-export` folder (dslm.model_source). Fine-tuning (`train.init_from`), eval, generate and
export read them here; resuming a run (optimizer, RNG, data cursor too) is
dslm.checkpoint.resume.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dslm.checkpoint.format import check_loads_safely, load_weights_only, seal_problem
from dslm.compat import require
from dslm.config import Origin
from dslm.errors import DslmError
from dslm.hf import dslm_state_dict, model_config_from_hf
from dslm.logs import libraries
from dslm.lora import LoraConfig, add_adapters, merge_lora_weights
from dslm.model import GPT, ModelConfig
from dslm.model_source import ModelSource, resolve_source
from dslm.optim import freeze, parameter_order


def export_model_config(folder: Path) -> ModelConfig:
    """The model config of a dslm-export folder, from its config.json (no head bias: the export
    folds it). Raises DslmError for a config.json it cannot read."""
    return model_config_from_hf(json.loads((folder / "config.json").read_text()), folder / "config.json")


def read_export(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config and fp32 weights of a dslm-export folder (no head bias: the export folds it).
    Raises DslmError for a config or safetensors file it cannot read."""
    cfg = export_model_config(folder)
    try:
        hf = load_file(str(folder / "model.safetensors"))
    except SafetensorError as e:
        raise DslmError(f"{folder / 'model.safetensors'}: {e}") from None
    return cfg, dslm_state_dict(hf, cfg, folder / "model.safetensors")


def read_tag(source: ModelSource) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config (from its run's config.yaml) and fp32 weights of a checkpoint tag, as the
    plain GPT names them (a LoRA run's adapters merged)."""
    cfg = source.run_config
    return cfg.model, load_model_weights(source.path, cfg.model, cfg.train.lora)


def model_config_of(path: str | Path) -> ModelConfig:
    """The model config of the weights at `path` (a tag, a run directory or an export folder), read
    from its run's config.yaml or the export's config.json, without the weights: what a run that
    starts from them (train.init_from) builds. Raises DslmError as resolve_source does."""
    source = resolve_source(path)
    return export_model_config(source.path) if source.is_export else source.run_config.model


def model_from(cfg: ModelConfig, weights: dict[str, torch.Tensor], source: str | Path = "the weights") -> GPT:
    """A GPT of `cfg` in fp32 with `weights` (as read_tag and read_export give them), in eval mode.
    Raises DslmError naming `source` and the first tensor that does not fit `cfg` (a checkpoint
    whose run config.yaml describes another model)."""
    model = GPT(cfg)
    load_into(model, weights, source)
    return model.eval()


def read_source(source: ModelSource) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config and fp32 weights of a tag or an HF export, as they are (read_weights
    checks the seal first and picks a run's tag)."""
    return read_export(source.path) if source.kind == "hf" else read_tag(source)


def read_weights(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Origin]:
    """The model config, fp32 weights and origin of `path`: a checkpoint tag, a run directory
    (ModelSource.chosen_tag) or an HF export folder. Raises DslmError for anything else, or a tag
    that is not sealed and intact, its files' checksums included (about 0.6 s per GB)."""
    source = resolve_source(path)
    source.need_weights()
    if source.kind != "hf":
        source = resolve_source(source.chosen_tag())
        if (problem := seal_problem(source.path, checksums=True)) is not None:
            raise DslmError(f"cannot read weights from {source.path}: {problem}")
    cfg, weights = read_source(source)
    return cfg, weights, Origin(path=str(source.path), step=source.step, sha256=weights_sha256(weights))


def weights_sha256(weights: dict[str, torch.Tensor]) -> str:
    """sha256 over each tensor's name, shape and fp32 bytes, in name order: the same weights give
    the same digest whatever file they came from."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().to(torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def load_into(model: GPT, weights: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy `weights` into `model` (fp32 master copies, before the engine is built). A head bias
    the source lacks (an export folds it into the head) starts at zero, which leaves the logits
    unchanged. Raises DslmError naming the first tensor missing, extra or of another shape."""
    own = model.state_dict()
    if "lm_head.bias" in own and "lm_head.bias" not in weights:
        weights = {**weights, "lm_head.bias": torch.zeros_like(own["lm_head.bias"])}
    for name, tensor in own.items():
        if name not in weights:
            raise DslmError(f"{source} has no tensor {name} ({tuple(tensor.shape)} in this model)")
        if weights[name].shape != tensor.shape:
            raise DslmError(
                f"{source}: {name} is {tuple(weights[name].shape)} there and {tuple(tensor.shape)} in "
                f"this model; set model.* as the source model has them"
            )
    if extra := sorted(set(weights) - set(own)):
        raise DslmError(f"{source} has tensor {extra[0]}, which this model lacks; set model.* as the source has them")
    model.load_state_dict(weights)


def load_fp32_weights(tag_dir: Path, model_cfg: ModelConfig, lora: LoraConfig | None = None) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a checkpoint, named as the trained module names them (with
    `lora`, the run's train.lora, its adapters and peft's names): consolidated across ranks for
    ZeRO-1/2/3, from the optimizer's fp32 copy for ZeRO-0 with bf16, or the module itself for
    ZeRO-0 in fp32. Frozen parameters (TrainState.frozen), which have no master copy under
    ZeRO-0/1, come from the module's own weights, in the precision they were trained with."""
    check_loads_safely(tag_dir)  # every file, before DeepSpeed's loader below unpickles without restriction
    whole = tag_dir / "mp_rank_00_model_states.pt"  # the whole module; ZeRO-3 writes none
    state = load_weights_only(whole) if whole.is_file() else {"module": {}}
    module = {name: t.float() for name, t in state["module"].items()}
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        # DeepSpeed's loader unpickles without restriction, but only files just checked above
        with libraries():  # its import and its loader print their progress
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return {**module, **get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)}
    masters = (state.get("optimizer") or {}).get("fp32_groups")
    if masters is None:
        require(
            "deepspeed",
            "a ZeRO-0 checkpoint of bf16 weights keeps its fp32 masters in optimizer['fp32_groups']",
            all(t.dtype == torch.float32 for t in state["module"].values()),
        )
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
