"""The training loop: one optimizer step per `train_step`, logging and checkpoints around it."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from tqdm import tqdm

from dslm.checkpoint import Checkpointer, TrainState
from dslm.data.loader import DeviceBatches, split_batch
from dslm.errors import DslmError
from dslm.metrics import Metrics
from dslm.stop import StopSignal


@dataclass
class TrainConfig:
    micro_batch_size: int = 8
    """Sequences per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on each rank."""
    max_steps: int = 1000
    """Optimizer steps in the whole run."""
    lr: float = 6e-4
    min_lr: float = 6e-5
    """Where the decay ends, at max_steps."""
    warmup_steps: int = 100
    schedule: str = "cosine"
    """After the linear warmup: "cosine" decays to min_lr over the rest of the run; "wsd"
    (warmup-stable-decay) holds lr, then decays linearly to min_lr over the last `decay_fraction`
    of the steps."""
    decay_fraction: float = 0.2
    """wsd only: the share of max_steps spent decaying."""
    weight_decay: float = 0.1
    """Applied to Linear weights only: not to biases, norms or embeddings."""
    beta1: float = 0.9
    beta2: float = 0.95
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory, ~30% more compute."""
    compile: bool = False
    """torch.compile the model (through DeepSpeed's engine.compile)."""
    seed: int = 1234
    """Seeds model init and the data order."""
    log_interval: int = 10
    checkpoint_interval: int = 500
    """Save every N steps; the last step is always saved."""
    val_interval: int = 500
    """Every N steps (and at the last step), val/loss and val/ppl on `val_batches` micro-batches
    per rank spread evenly over the val split (the same samples every time); 0 turns it off."""
    val_batches: int = 8
    max_skipped_in_a_row: int = 10
    """Steps whose gradients were not finite are skipped on every rank together (DeepSpeed's
    `check_grad_overflow`); this many in a row stop the run, before any of them is checkpointed."""
    keep_last: int = 3
    """Checkpoints kept (the newest); older ones are removed once a newer one is sealed. 0 keeps all."""

    def __post_init__(self) -> None:
        for name in ("keep_last", "val_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}={getattr(self, name)} must not be negative")
        for name in ("micro_batch_size", "grad_accum", "max_steps", "log_interval", "checkpoint_interval",
                     "max_skipped_in_a_row", "val_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be at least 1")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"train.warmup_steps={self.warmup_steps} must be within 0..train.max_steps={self.max_steps}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} must be within 0..train.lr={self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"train.decay_fraction={self.decay_fraction} must be within (0, 1]")


SCHEDULES = ("cosine", "wsd")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The lr after `step` optimizer steps as a factor of cfg.lr: linear warmup, then the decay
    of `cfg.schedule` down to cfg.min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr / cfg.lr
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_steps, cfg.max_steps - round(cfg.decay_fraction * cfg.max_steps))
        progress = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return 1.0 - (1 - floor) * min(max(progress, 0.0), 1.0)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_step(engine, batches: DeviceBatches, grad_accum: int) -> torch.Tensor:
    """One optimizer step over `grad_accum` micro-batches; returns the mean loss, still on device.
    No host sync of its own: the loss is read at log steps."""
    total = torch.zeros((), device=engine.device)
    for _ in range(grad_accum):
        inputs, targets = next(batches)
        loss = engine(inputs, targets)
        engine.backward(loss)
        batches.prefetch()  # the next micro-batch, while the device runs this backward pass
        engine.step()  # DeepSpeed steps the optimizer and the lr schedule at the accumulation boundary
        total += loss.detach().float()
    return total / grad_accum


def grad_norm(engine) -> float:
    """The global gradient norm of the last step, before clipping (nan where DeepSpeed keeps none)."""
    norm = engine.get_global_grad_norm()
    return math.nan if norm is None else float(norm)


def global_mean(value: torch.Tensor) -> float:
    """Mean over ranks: the only host sync, done at log steps."""
    value = value.clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


class Validation:
    """val/loss and val/ppl on a fixed subset of the val split (samples spread evenly over it),
    computed by every rank together: each runs the same number of forward passes (ZeRO-3
    gathers weights in each)."""

    def __init__(self, samples: Dataset, micro_batch: int, batches_per_rank: int):
        world = dist.get_world_size()
        self.batches = min(batches_per_rank, len(samples) // (micro_batch * world))
        if self.batches == 0:
            raise DslmError(f"the val split holds {len(samples)} samples, fewer than one micro-batch of "
                            f"{micro_batch} per rank on {world} ranks; set train.val_interval=0 or rebuild the "
                            f"shards with a larger --val-fraction")
        self.samples, self.micro_batch = samples, micro_batch

    @torch.no_grad()
    def __call__(self, engine) -> dict[str, float]:
        rank, world = dist.get_rank(), dist.get_world_size()
        engine.eval()
        total = torch.zeros((), device=engine.device)
        used = self.batches * world * self.micro_batch
        for k in range(self.batches):
            first = (k * world + rank) * self.micro_batch
            # positions spread evenly over the split: its start alone is one corner of the corpus
            batch = torch.stack([self.samples[p * len(self.samples) // used] for p in range(first, first + self.micro_batch)])
            total += engine(*split_batch(batch, engine.device)).float()
        engine.train()
        loss = global_mean(total) / self.batches  # equal batches: the mean of means is per token
        return {"val/loss": loss, "val/ppl": math.exp(loss)}


class SkipGuard:
    """Counts steps skipped in a row for non-finite gradients and stops the run after too many."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0

    def after_step(self, step: int, skipped: bool) -> None:
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if self.in_a_row >= self.limit:
            raise DslmError(f"steps {step - self.in_a_row + 1}-{step} all had non-finite gradients and were skipped "
                            f"(train.max_skipped_in_a_row={self.limit}); the last checkpoint before them is "
                            f"intact: lower train.lr, or resume from an earlier checkpoint")


class IntervalLog:
    """The train/* scalars of one log interval; the loss stays on the device until logged."""

    def __init__(self, engine, state: TrainState, global_batch: int, seq_len: int, mfu_per_token: float | None):
        self.engine, self.state = engine, state
        self.global_batch, self.seq_len, self.mfu_per_token = global_batch, seq_len, mfu_per_token
        self.loss, self.steps = torch.zeros((), device=engine.device), 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.steps += 1

    def values(self) -> dict[str, float]:
        """Collective (one sync): the interval's scalars; the next interval starts now."""
        loss = global_mean(self.loss) / self.steps
        tokens_per_s = self.global_batch * self.seq_len * self.steps / (time.perf_counter() - self.start)
        values = {
            "train/loss": loss,
            "train/lr": self.engine.get_lr()[0],
            "train/grad_norm": grad_norm(self.engine),
            "train/tokens_per_s": tokens_per_s,
            "train/skipped_steps": self.engine.skipped_steps,
            "train/samples": self.state.samples,
            "train/tokens": self.state.samples * self.seq_len,
        }
        if self.mfu_per_token:
            values["train/mfu"] = tokens_per_s * self.mfu_per_token
        self.loss.zero_()
        self.steps, self.start = 0, time.perf_counter()
        return values


def train(engine, batches: DeviceBatches, cfg: TrainConfig, checkpoints: Checkpointer,
          metrics: Metrics, state: TrainState, seq_len: int, validation: Validation | None,
          stop: StopSignal, mfu_per_token: float | None) -> int:
    """Steps `state.step + 1` .. `cfg.max_steps`, `state` updated after every step; returns 0, or
    the signal that stopped the run early (after a checkpoint at that step). A resume in the
    middle of a log interval logs the mean of the steps since the resume."""
    global_batch = cfg.micro_batch_size * cfg.grad_accum * state.world_size
    guard = SkipGuard(cfg.max_skipped_in_a_row)
    interval = IntervalLog(engine, state, global_batch, seq_len, mfu_per_token)
    with tqdm(total=cfg.max_steps, initial=state.step, desc="train", unit="step",
              disable=dist.get_rank() != 0) as progress:
        for step in range(state.step + 1, cfg.max_steps + 1):
            skipped_before = engine.skipped_steps
            interval.add(train_step(engine, batches, cfg.grad_accum))
            state.step, state.samples = step, state.samples + global_batch
            progress.update()
            guard.after_step(step, engine.skipped_steps > skipped_before)
            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                metrics.log(step, interval.values())
            state.val_loss = None
            if validation is not None and (step % cfg.val_interval == 0 or step == cfg.max_steps):
                values = validation(engine)
                metrics.log(step, values)
                state.val_loss = values["val/loss"]
            signum = stop.agreed()
            if (step % cfg.checkpoint_interval == 0 or step == cfg.max_steps or signum) and not guard.in_a_row:
                checkpoints.save(engine, state)
            if signum and step < cfg.max_steps:
                return signum
    return 0
