"""Weights for a model that starts from them rather than resuming a run: from a sealed checkpoint
tag, a run directory or a `dslm-export` folder. Fine-tuning (`train.init_from`) and eval read
them here; resuming a run (optimizer, RNG, data cursor too) is dslm.resume.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dslm.checkpoint import BEST_NAME, LATEST_NAME, load_model_weights, newest_resumable, seal_problem
from dslm.config import CONFIG_NAME, Origin, checkpoint_dir, load_config, run_of
from dslm.data.loader import DataConfig
from dslm.data.manifest import MANIFEST_NAME, Manifest
from dslm.data.templates import Framing
from dslm.errors import DslmError
from dslm.files import sha256_file
from dslm.hf import dslm_state_dict, export_tokenizer_sha256, framing_from_hf, model_config_from_hf
from dslm.model import GPT, ModelConfig

EXPORT_FILES = ("model.safetensors", "config.json", "tokenizer.json")
EXPORT_STEP = re.compile(r"step(\d+)$")
"""dslm-export's default folder runs/NAME/export/stepN."""


def is_export(path: Path) -> bool:
    return all((path / name).is_file() for name in EXPORT_FILES)


def export_origin(folder: Path) -> tuple[Path | None, int | None]:
    """(run directory, step) of an export at dslm-export's default place runs/NAME/export/stepN,
    else (None, None)."""
    if (match := EXPORT_STEP.match(folder.name)) and (folder.parent.parent / CONFIG_NAME).is_file():
        return folder.parent.parent, int(match.group(1))
    return None, None


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


def read_tag(tag_dir: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The model config (from its run's config.yaml) and fp32 weights of a checkpoint tag, as the
    plain GPT names them (a LoRA run's adapters merged)."""
    run_dir, _ = run_of(tag_dir)
    cfg = load_config(run_dir / CONFIG_NAME, [])
    return cfg.model, load_model_weights(tag_dir, cfg.model, cfg.train.lora)


def model_config_of(path: str | Path) -> ModelConfig:
    """The model config of the weights at `path` (a tag, a run directory or an export folder), read
    from its run's config.yaml or the export's config.json, without the weights: what a run that
    starts from them (train.init_from) builds. Raises DslmError as source_kind does."""
    path = Path(path)
    if source_kind(path) == "export":
        return export_model_config(path)
    return load_config(run_dir_of(path) / CONFIG_NAME, []).model


def run_dir_of(path: Path) -> Path:
    """The run directory of a tag or run directory `path`."""
    return path if source_kind(path) == "run" else run_of(path)[0]


def run_data(path: Path) -> tuple[DataConfig, Manifest | None]:
    """The data settings of the run that trained the tag or run directory `path`, and its shards'
    manifest (None when the shards are gone)."""
    data = load_config(run_dir_of(path) / CONFIG_NAME, []).data
    found = (Path(data.shards) / MANIFEST_NAME).is_file()
    return data, Manifest.load(data.shards) if found else None


def framing_of(path: Path) -> Framing:
    """How the model at `path` (a tag, a run directory or an export folder) reads its input: what
    the export's config.json records, or its run's data.direction and its shards' template (none
    when the shards are gone). Raises DslmError as source_kind does."""
    if source_kind(path) == "export":
        return framing_from_hf(json.loads((path / "config.json").read_text()), path / "config.json")
    data, manifest = run_data(path)
    return Framing(data.direction, manifest.template if manifest else "")


def tokenizer_sha256s(path: Path) -> set[str]:
    """The sha256s that name the tokenizer the model at `path` was trained with: an export's
    record of it (dslm.hf.export_tokenizer_sha256) and its own tokenizer.json, which shards built
    with `--tokenizer EXPORT/tokenizer.json` record; a tag's or run's shards' (none when those are
    gone). Raises DslmError as source_kind does."""
    if source_kind(path) == "export":
        return {export_tokenizer_sha256(path), sha256_file(path / "tokenizer.json")}
    _, manifest = run_data(path)
    return {manifest.tokenizer_sha256} if manifest else set()


def newest_checkpoint(run_dir: Path) -> Path:
    """The newest sealed, intact tag of a run (what eval reads from a run directory)."""
    tag_dir, _ = newest_resumable(checkpoint_dir(run_dir))
    if tag_dir is None:
        raise DslmError(f"{run_dir} holds no sealed, intact checkpoint")
    return tag_dir


def chosen_checkpoint(run_dir: Path) -> Path:
    """What a run directory fine-tunes from: the tag `best` names (lowest val/loss), else the one
    `latest` names, else the newest intact one; each only when sealed and intact."""
    folder = checkpoint_dir(run_dir)
    for pointer in (folder / BEST_NAME, folder / LATEST_NAME):
        if pointer.is_file() and seal_problem(tag_dir := folder / pointer.read_text().strip()) is None:
            return tag_dir
    return newest_checkpoint(run_dir)


def model_from(cfg: ModelConfig, weights: dict[str, torch.Tensor], source: str | Path = "the weights") -> GPT:
    """A GPT of `cfg` in fp32 with `weights` (as read_tag and read_export give them), in eval mode.
    Raises DslmError naming `source` and the first tensor that does not fit `cfg` (a checkpoint
    whose run config.yaml describes another model)."""
    model = GPT(cfg)
    load_into(model, weights, source)
    return model.eval()


def source_kind(path: Path) -> str:
    """What `path` is: "export" (a dslm-export folder), "run" (a run directory) or "tag" (a
    checkpoint runs/NAME/checkpoints/global_stepN). Raises DslmError for anything else."""
    if not path.exists():
        raise DslmError(f"{path} does not exist")
    if is_export(path):
        return "export"
    if (path / CONFIG_NAME).is_file():
        return "run"
    if run_of(path) is not None:
        return "tag"
    raise DslmError(f"{path} is not a checkpoint (runs/NAME/checkpoints/global_stepN), a run directory "
                    f"or an export folder ({', '.join(EXPORT_FILES)})")


def read_weights(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Origin]:
    """The model config, fp32 weights and origin of `path`: a checkpoint tag, a run directory
    (`chosen_checkpoint`) or an export folder. Raises DslmError for anything else, or a tag that
    is not sealed and intact, its files' checksums included (about 0.6 s per GB)."""
    path = Path(path)
    kind = source_kind(path)
    if kind == "export":
        (cfg, weights), step, source = read_export(path), export_origin(path)[1], path
    else:
        source = chosen_checkpoint(path) if kind == "run" else path
        if (problem := seal_problem(source, checksums=True)) is not None:
            raise DslmError(f"cannot read weights from {source}: {problem}")
        (cfg, weights), step = read_tag(source), run_of(source)[1]
    return cfg, weights, Origin(path=str(source), step=step, sha256=weights_sha256(weights))


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
            raise DslmError(f"{source}: {name} is {tuple(weights[name].shape)} there and {tuple(tensor.shape)} in "
                            f"this model; set model.* as the source model has them")
    if extra := sorted(set(weights) - set(own)):
        raise DslmError(f"{source} has tensor {extra[0]}, which this model lacks; set model.* as the source has them")
    model.load_state_dict(weights)
