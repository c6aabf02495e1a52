"""The run config: a YAML recipe plus dotted key=value overrides, resolved into typed dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dslm.checkpoint import TAG_PATTERN
from dslm.data.loader import DataConfig
from dslm.data.manifest import Manifest
from dslm.errors import DslmError
from dslm.files import atomic_write_text
from dslm.model import PRESETS, ModelConfig
from dslm.trainer import TrainConfig

CONFIG_NAME = "config.yaml"


@dataclass
class RunConfig:
    name: str = "run"
    """The run directory is runs_dir/name."""
    runs_dir: str = "runs"
    ds_config: str = "ds_configs/zero2.json"
    """DeepSpeed JSON (ZeRO stage, bf16, clipping); batch sizes in it are filled in from `train`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def load_config(recipe: str | Path | None, overrides: list[str]) -> RunConfig:
    """Defaults < model preset < recipe YAML < overrides (`train.lr=1e-3`, `model.preset=tiny`)."""
    try:
        user = OmegaConf.merge(
            OmegaConf.load(recipe) if recipe else OmegaConf.create(),
            OmegaConf.from_dotlist(overrides),
        )
        preset = OmegaConf.select(user, "model.preset", default="")
        if preset and preset not in PRESETS:
            raise DslmError(f"model.preset={preset!r} is not one of {', '.join(PRESETS)}")
        layers = [OmegaConf.structured(RunConfig), {"model": PRESETS.get(preset, {})}, user]
        return OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as e:
        raise DslmError(str(e).splitlines()[0] + (f" ({e.full_key})" if getattr(e, "full_key", None) else "")) from e
    except ValueError as e:  # a __post_init__ check
        raise DslmError(str(e)) from e


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: RunConfig) -> Path:
    path = cfg.run_dir / CONFIG_NAME
    atomic_write_text(path, to_yaml(cfg))
    return path


def check_against_manifest(cfg: RunConfig, manifest: Manifest) -> None:
    """Fail before training when the shards cannot feed this model."""
    if manifest.vocab_size > cfg.model.vocab_size:
        raise DslmError(f"the shards' tokenizer has {manifest.vocab_size} tokens but model.vocab_size="
                        f"{cfg.model.vocab_size}; set model.vocab_size >= {manifest.vocab_size}")
    if manifest.seq_len > cfg.model.context:
        raise DslmError(f"the shards hold sequences of {manifest.seq_len} tokens (seq_len) but model.context="
                        f"{cfg.model.context}; rebuild the shards with --seq-len {cfg.model.context} or raise model.context")


def run_of(tag_dir: Path) -> tuple[Path, int] | None:
    """(run directory, step) of a checkpoint folder runs/NAME/checkpoints/global_stepN, or None
    when `tag_dir` is not one."""
    match = TAG_PATTERN.match(tag_dir.name)
    run_dir = tag_dir.parent.parent
    if match and (run_dir / CONFIG_NAME).is_file():
        return run_dir, int(match.group(1))
    return None
