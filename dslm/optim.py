"""The optimizer and its learning-rate schedule: parameter groups, AdamW, warmup + decay.

Torch only: the DeepSpeed engine (dslm.engine) and the weight loader (dslm.checkpoint.weights, which
needs the order of the parameter groups) both build on it.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from dslm.errors import DslmError

SCHEDULES = ("cosine", "wsd")


@dataclass
class OptimConfig:
    """AdamW and its schedule. TrainConfig extends this class, so these fields are the `train.*`
    keys `train.lr`, `train.warmup_steps`, ... of recipes and overrides.
    Raises ValueError (naming the field) for a value out of its range."""

    lr: float = 6e-4
    """Peak learning rate, reached at the end of the warmup; > 0."""
    min_lr: float = 6e-5
    """Where the decay ends, at max_steps; within [0, lr]."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup from lr / warmup_steps to lr; within [0, max_steps]."""
    schedule: str = "cosine"
    """After the warmup: "cosine" decays to min_lr over the rest of the run; "wsd"
    (warmup-stable-decay, Hu et al. 2024, MiniCPM) holds lr, then decays linearly to min_lr over
    the last `decay_fraction` of the steps."""
    decay_fraction: float = 0.2
    """wsd only: the share of max_steps spent decaying, within (0, 1]."""
    weight_decay: float = 0.1
    """AdamW's decoupled weight decay, >= 0, on Linear weights only: not on biases, norms or
    embeddings (as nanoGPT and GPT-NeoX)."""
    beta1: float = 0.9
    """AdamW's first-moment decay, within [0, 1)."""
    beta2: float = 0.95
    """AdamW's second-moment decay, within [0, 1) (0.95 as GPT-3 and nanoGPT)."""

    def __post_init__(self) -> None:
        if not 0 < self.lr < math.inf:
            raise ValueError(f"train.lr={self.lr} must be positive and finite")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} must be within 0..train.lr={self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"train.decay_fraction={self.decay_fraction} must be within (0, 1]")
        if self.weight_decay < 0:
            raise ValueError(f"train.weight_decay={self.weight_decay} must not be negative")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"train.{name}={getattr(self, name)} must be within [0, 1)")


def freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Turn off the gradient of every parameter whose name (as in `model.named_parameters()`)
    matches one of the fnmatch `patterns`; returns their names. Raises DslmError for a pattern
    that matches no parameter (a typo would otherwise train everything)."""
    names = [name for name, _ in model.named_parameters()]
    if unmatched := [p for p in patterns if not fnmatch.filter(names, p)]:
        raise DslmError(
            f"train.freeze: {unmatched[0]!r} matches no parameter (names look like {names[0]!r}, {names[-1]!r})"
        )
    frozen = [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return frozen


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[decayed, not decayed] over the trainable parameters: weight decay on Linear weights only;
    biases, LayerNorms and embeddings are not decayed (a head tied to the embedding counts as the
    embedding, which comes first). Frozen parameters are in no group, and a group left without
    parameters (LoRA adapters are all Linear weights) is left out: DeepSpeed's engine drops it
    from the optimizer, and the schedule built on the optimizer would still count it. Checkpoints
    of ZeRO-0 store the fp32 masters in this order."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen and p.requires_grad:
                seen.add(id(p))
                (decay if isinstance(module, nn.Linear) and name == "weight" else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def parameter_order(model: nn.Module) -> list[str]:
    """The names of `model`'s parameters in the order the optimizer holds them."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in param_groups(model, 0.0) for p in group["params"]]


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """The lr after `step` optimizer steps as a factor of cfg.lr: linear warmup, then the decay
    of `cfg.schedule` down to cfg.min_lr at `max_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr / cfg.lr
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_steps, max_steps - round(cfg.decay_fraction * max_steps))
        progress = (step - decay_start) / max(1, max_steps - decay_start)
        return 1.0 - (1 - floor) * min(max(progress, 0.0), 1.0)
    progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def apply_schedule(schedule: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set each parameter group's lr to what `schedule` gives at the step it stands at. A resumed
    optimizer holds the rate the checkpointed run's schedule set for the next step; a resume that
    changed max_steps or the decay's shape would run that step at the old schedule's rate."""
    rates = [base * factor(schedule.last_epoch) for base, factor in zip(schedule.base_lrs, schedule.lr_lambdas)]
    for group, lr in zip(schedule.optimizer.param_groups, rates):
        group["lr"] = lr


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, max_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `param_groups` (PyTorch's fused kernel on CUDA) and its schedule, stepped once
    per optimizer step."""
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=torch.cuda.is_available()
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))
    return optimizer, schedule
