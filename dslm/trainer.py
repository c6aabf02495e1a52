"""The training loop: `Trainer.fit` runs the optimizer steps, with validation, logging,
checkpoints and the stop signal around each; `train_step` is one optimizer step."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, default_collate
from tqdm import tqdm

from dslm.checkpoint.format import TrainState
from dslm.checkpoint.save import Checkpointer
from dslm.data.loader import Batch, DeviceBatches, ShardDamage, to_device
from dslm.data.mix import Interleave
from dslm.errors import DslmError
from dslm.evals import METRICS, BackgroundEvals
from dslm.lora import LoraConfig
from dslm.metrics import Metrics
from dslm.mfu import hardware
from dslm.model import IGNORE_INDEX
from dslm.objective import Objective
from dslm.optim import OptimConfig
from dslm.signals import test_pause
from dslm.stop import Stop, StopSignal
from dslm_local.cli import counted


@dataclass
class TrainConfig(OptimConfig):
    """The training run's settings, the `train.*` keys. The optimizer's and the schedule's
    (lr, min_lr, warmup_steps, schedule, decay_fraction, weight_decay, beta1, beta2) are
    documented in dslm.optim.OptimConfig, which this class extends.
    Raises ValueError (naming the field) for a value out of its range."""

    micro_batch_size: int = 8
    """Sequences per rank per forward pass, >= 1."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on each rank, >= 1. The global batch is
    micro_batch_size * grad_accum * world size sequences."""
    max_steps: int = 1000
    """Optimizer steps in the whole run, >= 1; the schedule ends here."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory for about one more
    forward pass of compute."""
    compile: bool = False
    """torch.compile the model (through DeepSpeed's engine.compile)."""
    seed: int = 1234
    """Seeds model init and the data order, within 0..2**32 - 1 (numpy's legacy seeds; the seeds a
    resume derives from it stay within torch's 64 bits)."""
    freeze: list[str] = field(default_factory=list)
    """Parameters that do not train: fnmatch patterns of their names as in
    `model.named_parameters()`, e.g. ["wte.*", "blocks.0.*"]. Frozen parameters get no gradient
    and no optimizer state; a pattern that matches nothing is an error."""
    freeze_blocks: int = 0
    """Shorthand, >= 0: freeze the embeddings (wte, wpe) and the first N blocks, as the
    instruction-tuning card allows; adds to `freeze`."""
    init_from: str = ""
    """Fine-tune: start from the weights at this path, a sealed checkpoint tag, a run directory
    (its `best` tag, else `latest`) or a dslm-export folder; the optimizer, schedule, data cursor
    and step start fresh. model.* must describe the source's model. "" starts from random weights.
    A resumed run continues from its own checkpoint instead."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Low-rank adapters (`train.lora.rank`, `alpha`, `dropout`, `target_modules`; dslm.lora.LoraConfig):
    with rank > 0 only they train, on top of the frozen model (after init_from's weights)."""
    log_interval: int = 10
    """Log the train/* scalars every N steps (and at the last step), >= 1."""
    checkpoint_interval: int = 500
    """Save every N steps, >= 1; the last step is always saved."""
    val_interval: int = 500
    """Every N steps (and at the last step), val/loss and val/ppl on `val_batches` micro-batches
    per rank spread evenly over the val split (the same samples every time); 0 turns it off."""
    val_batches: int = 8
    """Micro-batches per rank in each validation, >= 1 (fewer if the val split is smaller)."""
    max_skipped_in_a_row: int = 10
    """Steps whose gradients were not finite are skipped on every rank together (DeepSpeed's
    `check_grad_overflow`); this many in a row, >= 1, stop the run before any of them is
    checkpointed."""
    keep_last: int = 3
    """Checkpoints kept (the newest), >= 0; older ones are removed once a newer one is sealed
    (the best by val/loss is always kept). 0 keeps all."""

    evals: list[str] = field(default_factory=list)
    """dslm-eval metrics measured on each checkpoint on the run's val split while the run trains, of
    perplexity, exact_match, compile_success, pass_at_k, bpb_humaneval and fim_exact_match (dslm-eval
    --metrics): rank 0 runs dslm-eval on each sealed tag in the background (dslm.evals), one at a
    time (a newer checkpoint takes the place of one still waiting), its output in
    logs/eval-stepN.log; the results go to eval/stepN.json and, at the checkpoint's step, to
    TensorBoard's eval/* and metrics.csv. A failed or timed-out eval is one warning. [] runs none."""
    eval_shards: list[str] = field(default_factory=list)
    """Other shard folders (same tokenizer, with a val split) each checkpoint's eval measures
    perplexity on too (dslm-eval --shards): results under eval/SET/*, SET being the folder's name and
    the first 8 hex digits of its manifest's sha256."""
    eval_args: list[str] = field(default_factory=list)
    """More dslm-eval options for those evals, as on its command line, e.g. [--fim-samples, 8,
    --batch-size, 4]; one it refuses fails each eval (a warning naming its log)."""
    eval_device: str = "cpu"
    """Those evals' torch device (dslm-eval --device). "cpu", the default, never takes memory from
    training (the eval runs at a lower CPU priority than the ranks); "cuda" evaluates on the first
    visible GPU, rank 0's, beside training: only where the model and an eval batch fit next to it."""
    eval_timeout_s: int = 3600
    """Seconds, >= 1, that each checkpoint's eval may run before its process group is killed (one
    warning; the run goes on). The run's end waits for its last eval this long at most; a stop
    signal kills it at once."""

    collective_timeout_s: int = 600
    """Seconds, >= 1, that any rank waits in a collective (an all-reduce, a barrier) for the others
    before dslm-train stops with one line naming it and the step and exits 69, which the wrappers
    requeue: a rank that stops answering (a stuck filesystem, a lost node) then costs this long, not
    torch's default 30 min. Raise it for a checkpoint or evaluation that keeps the ranks apart
    longer. On GPUs, NCCL's watchdog ends the process instead (SIGABRT, no line)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("keep_last", "val_interval", "freeze_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}={getattr(self, name)} must not be negative")
        for name in (
            "micro_batch_size",
            "grad_accum",
            "max_steps",
            "log_interval",
            "checkpoint_interval",
            "max_skipped_in_a_row",
            "val_batches",
            "collective_timeout_s",
            "eval_timeout_s",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be at least 1")
        if not all(isinstance(pattern, str) for pattern in self.freeze):
            raise ValueError(f"train.freeze={self.freeze} must be a list of name patterns, e.g. [wte.*, blocks.0.*]")
        if unknown := [name for name in self.evals if name not in METRICS]:
            raise ValueError(
                f"train.evals: {', '.join(map(str, unknown))} is not a dslm-eval metric; choose from {', '.join(METRICS)}"
            )
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"train.seed={self.seed} must be within 0..{2**32 - 1}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(
                f"train.warmup_steps={self.warmup_steps} must be within 0..train.max_steps={self.max_steps}"
            )


def freeze_patterns(cfg: TrainConfig) -> list[str]:
    """train.freeze with train.freeze_blocks spelled out as patterns."""
    blocks = [f"blocks.{i}.*" for i in range(cfg.freeze_blocks)]
    return [*cfg.freeze, *(["wte.*", "wpe.*", *blocks] if cfg.freeze_blocks else [])]


class SourceLoss:
    """Per source of the training samples (data.mix), the sums of its token losses and its
    targets, and the samples skipped for a damaged shard, kept on the device (no host sync)."""

    def __init__(self, sources: int, device: torch.device):
        self.loss = torch.zeros(sources, device=device)
        self.targets = torch.zeros(sources, device=device)
        self.skipped = torch.zeros((), device=device)

    def add(self, batch: Batch, row_losses: torch.Tensor, row_targets: torch.Tensor) -> None:
        """Count a micro-batch: its rows' (B,) summed token losses and numbers of targets."""
        rows = batch["source"]
        self.loss.index_add_(0, rows, row_losses)
        self.targets.index_add_(0, rows, row_targets.float())
        self.skipped += batch["skipped"].sum()

    def totals(self) -> torch.Tensor:
        """(2 * sources + 1,): the loss sums, the target counts, the skipped samples; then zeroed."""
        totals = torch.cat([self.loss, self.targets, self.skipped.view(1)])
        for t in (self.loss, self.targets, self.skipped):
            t.zero_()
        return totals


def train_step(
    engine, batches: DeviceBatches, objective: Objective, grad_accum: int, sources: SourceLoss | None = None
) -> torch.Tensor:
    """One optimizer step over `grad_accum` micro-batches per rank. The step's loss is the sum of
    its token losses over all its micro-batches on all ranks over their number of targets
    (step_targets), whatever the split into ranks x grad_accum x micro_batch: a micro-batch with
    few targets (instruction shards) weighs by its targets, as in transformers' fix of gradient
    accumulation (4.46, `num_items_in_batch`). Each micro-batch backpropagates its token losses'
    sum over the step's mean number of targets per micro-batch; DeepSpeed divides that by
    grad_accum and averages it over the ranks, which gives the gradients of the step's loss.
    Where every token is a target, that is each micro-batch's own mean, bit for bit as the plain
    loop. Returns this rank's share of the step's loss times the number of ranks, on device (its
    mean over the ranks is the step's loss); no host sync of its own: the loss is read at log
    steps. `sources` counts each source's share of it."""
    per_micro_batch = step_targets(batches, objective, grad_accum) / (grad_accum * dist.get_world_size())
    per_micro_batch = per_micro_batch.float()  # (), float32 as the losses: exact where it is an integer below 2**24
    total = torch.zeros((), device=engine.device)
    for _ in range(grad_accum):
        batch = next(batches)
        inputs, targets = objective(batch)
        token_losses = engine(inputs, targets, reduction="none")  # (B, T)
        loss = token_losses.sum() / per_micro_batch
        engine.backward(loss)
        batches.prefetch()  # the next micro-batch, while the device runs this backward pass
        engine.step()  # DeepSpeed steps the optimizer and the lr schedule at the accumulation boundary
        total += loss.detach().float()
        if sources is not None:
            sources.add(batch, token_losses.detach().sum(1), (targets != IGNORE_INDEX).sum(1))
    return total / grad_accum


def step_targets(batches: DeviceBatches, objective: Objective, grad_accum: int) -> torch.Tensor:
    """Collective: the number of targets in the next `grad_accum` micro-batches of every rank, at
    least 1 (a step without targets adds zero gradients), as a () float64 tensor on the device
    (one all-reduce, no host sync). Counted ahead: DeviceBatches holds the step's micro-batches."""
    count = sum((objective(batch)[1] != IGNORE_INDEX).sum() for batch in batches.upcoming(grad_accum))
    count = count.double()
    dist.all_reduce(count)
    return count.clamp(min=1)


def grad_norm(engine) -> float:
    """The global gradient norm of the last step, before clipping (nan where DeepSpeed keeps none)."""
    norm = engine.get_global_grad_norm()
    return math.nan if norm is None else float(norm)


def validation_batches(samples: int, micro_batch: int, world_size: int, batches_per_rank: int) -> int:
    """The micro-batches each rank's validation holds: train.val_batches, fewer when the val split
    of `samples` samples has fewer per rank."""
    return min(batches_per_rank, samples // (micro_batch * world_size))


class Validation:
    """val/loss and val/ppl on a fixed subset of the val split (samples spread evenly over it),
    computed by every rank together: each runs the same number of forward passes (ZeRO-3
    gathers weights in each). Each rank reads its part of the subset once, here: a shard damaged
    later cannot stop one rank alone inside a validation."""

    def __init__(self, samples: Dataset, objective: Objective, micro_batch: int, batches_per_rank: int):
        rank, world = dist.get_rank(), dist.get_world_size()
        batches = validation_batches(len(samples), micro_batch, world, batches_per_rank)
        if batches == 0:
            raise DslmError(
                f"the val split holds {len(samples)} samples, fewer than one micro-batch of "
                f"{micro_batch} per rank on {counted(world, 'rank')}; set train.val_interval=0 or rebuild "
                f"the shards with a larger --val-fraction"
            )
        used = batches * world * micro_batch
        # positions spread evenly over the split: its start alone is one corner of the corpus
        self.batches = [
            default_collate([samples[p * len(samples) // used] for p in range(first, first + micro_batch)])
            for first in ((k * world + rank) * micro_batch for k in range(batches))
        ]
        self.objective = objective

    @torch.no_grad()
    def __call__(self, engine) -> dict[str, float]:
        """Collective (one sync): the mean loss over all the subset's targets on all ranks (each
        micro-batch weighs by its targets, as in train_step); NaN when it holds none."""
        engine.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=engine.device)  # token losses, targets
        for batch in self.batches:
            inputs, targets = self.objective(to_device(batch, engine.device))
            sums[0] += engine(inputs, targets, reduction="none").sum()
            sums[1] += (targets != IGNORE_INDEX).sum()
        engine.train()
        dist.all_reduce(sums)
        total, count = sums.tolist()
        loss = total / count if count else math.nan
        return {"val/loss": loss, "val/ppl": math.exp(loss)}


class SkipGuard:
    """Counts steps skipped in a row for non-finite gradients and stops the run after too many."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0

    def after_step(self, step: int, skipped: bool) -> None:
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if self.in_a_row >= self.limit:
            raise DslmError(
                f"steps {step - self.in_a_row + 1}-{step} all had non-finite gradients and were skipped "
                f"(train.max_skipped_in_a_row={self.limit}); the last checkpoint before them is "
                f"intact: lower train.lr, or resume from an earlier checkpoint"
            )


class IntervalLog:
    """The train/* and data/* scalars of one log interval; the losses stay on the device until
    logged. With several sources (`names`, data.mix) also train/loss/NAME, each source's mean loss
    per target, and data/samples/NAME, the samples read from it so far (from `interleave`); with
    `count_skipped`, data/skipped_samples, the samples of damaged shards skipped in the interval."""

    def __init__(
        self,
        engine,
        global_batch: int,
        seq_len: int,
        mfu_per_token: float | None,
        names: list[str],
        interleave: Interleave,
        count_skipped: bool = False,
    ):
        self.engine = engine
        self.global_batch, self.seq_len, self.mfu_per_token = global_batch, seq_len, mfu_per_token
        self.names, self.interleave, self.count_skipped = names, interleave, count_skipped
        self.loss, self.steps = torch.zeros((), device=engine.device), 0
        self.sources = SourceLoss(len(names), engine.device)
        self.lr = math.nan
        """The learning rate the interval's last step used."""
        self.start = time.perf_counter()

    def step(self, run_step: Callable[[SourceLoss], torch.Tensor]) -> None:
        """Run one optimizer step (`run_step` returns its loss and counts each source's share in
        the SourceLoss it is given) and count it. Its learning rate is read before it runs: the
        schedule moves on inside the step, so afterwards the optimizer holds the next step's rate."""
        self.lr = self.engine.get_lr()[0]
        self.loss += run_step(self.sources)
        self.steps += 1

    def values(self, samples: int) -> dict[str, float]:
        """Collective (one sync): the interval's scalars, `samples` read so far by all ranks; the
        next interval starts now."""
        totals = torch.cat([self.loss.view(1), self.sources.totals()])
        dist.all_reduce(totals)
        totals = totals.tolist()
        n = len(self.names)
        targets = totals[1 + n : 1 + 2 * n]
        # no target in the interval (every sample skipped for a damaged shard): no loss, not 0
        loss = totals[0] / dist.get_world_size() / self.steps if sum(targets) else math.nan
        tokens_per_s = self.global_batch * self.seq_len * self.steps / (time.perf_counter() - self.start)
        values = {
            "train/loss": loss,
            "train/lr": self.lr,
            "train/grad_norm": grad_norm(self.engine),
            "train/tokens_per_s": tokens_per_s,
            "train/skipped_steps": self.engine.skipped_steps,
            "train/samples": samples,
            "train/tokens": samples * self.seq_len,
        }
        if self.mfu_per_token:
            values["train/mfu"] = tokens_per_s * self.mfu_per_token
        if n > 1:
            for i, (name, read) in enumerate(zip(self.names, self.interleave.cursors(samples))):
                if targets[i]:  # a source with no target in the interval has no loss to log
                    values[f"train/loss/{name}"] = totals[1 + i] / targets[i]
                values[f"data/samples/{name}"] = read
        if self.count_skipped:
            values["data/skipped_samples"] = totals[-1]
        self.loss.zero_()
        self.steps, self.start = 0, time.perf_counter()
        return values


@dataclass
class Trainer:
    """The loop and its collaborators, built by dslm.train."""

    cfg: TrainConfig
    engine: Any
    """DeepSpeed's engine around the model, optimizer and schedule (dslm.engine.build_engine)."""
    batches: DeviceBatches
    """This rank's training micro-batches, from the run's position on."""
    objective: Objective
    checkpointer: Checkpointer
    metrics: Metrics
    stop: StopSignal
    interval: IntervalLog
    validation: Validation | None = None
    damage: ShardDamage | None = None
    """data.on_bad_shard for the samples `batches` reads."""
    evals: BackgroundEvals | None = None
    """train.evals and train.eval_shards on each checkpoint (rank 0, where either is set)."""

    def fit(self, state: TrainState) -> Stop | None:
        """Train (steps); with `evals`, then wait for the last checkpoint's eval, unless the run
        stopped early or on a stop signal, which kill it, as does an error."""
        if self.evals is None:
            return self.steps(state)
        try:
            stopped = self.steps(state)
            if stopped is None:
                self.evals.finish(lambda: bool(self.stop.received))
            return stopped
        finally:
            self.evals.close()

    def steps(self, state: TrainState) -> Stop | None:
        """Steps `state.step + 1` .. `cfg.max_steps`, `state` updated after every step; returns
        None, or why the ranks stopped early: a signal, damaged shards in the next step's
        micro-batches (data.on_bad_shard=stop) or a loader that could not take them, after a
        checkpoint at that step (none when that is before this process's first step: the run
        stands at its last checkpoint). A resume in
        the middle of a log interval logs the mean of the steps since the resume."""
        global_batch = self.cfg.micro_batch_size * self.cfg.grad_accum * state.world_size
        guard = SkipGuard(self.cfg.max_skipped_in_a_row)
        state.hardware = hardware(self.engine.device, state.world_size)
        started, seconds_before = time.monotonic(), state.train_seconds
        _, damaged, failed = self.boundary()
        if damaged or failed:
            return Stop(state.step, damaged=damaged, failed=failed)
        with tqdm(
            total=self.cfg.max_steps, initial=state.step, desc="train", unit="step", disable=dist.get_rank() != 0
        ) as progress:
            for step in range(state.step + 1, self.cfg.max_steps + 1):
                skipped_before = self.engine.skipped_steps
                self.interval.step(
                    lambda sources: train_step(self.engine, self.batches, self.objective, self.cfg.grad_accum, sources)
                )
                state.step, state.samples = step, state.samples + global_batch
                state.train_seconds = seconds_before + time.monotonic() - started
                progress.update()
                guard.after_step(step, self.engine.skipped_steps > skipped_before)
                self.log(state)
                test_pause(f"step {step}")
                signum, damaged, failed = self.boundary(last=step == self.cfg.max_steps)
                stopping = bool(signum or damaged or failed)
                if self.checkpoint_due(step, stopping) and not guard.in_a_row:
                    tag = self.checkpointer.save(self.engine, state)
                    if self.evals is not None and not stopping:
                        self.evals.checkpointed(step, tag)
                if self.evals is not None:
                    self.evals.poll()
                if stopping and step < self.cfg.max_steps:
                    return Stop(step, signum, damaged, failed)
        return None

    def boundary(self, last: bool = False) -> tuple[int, list[str], list[str]]:
        """Collective, between two steps: take the next step's micro-batches (unless this was the
        `last` step), apply data.on_bad_shard to the damaged shards among them, and agree with the
        other ranks on (a stop signal or 0, the damaged shards that stop the run, the loaders'
        failures)."""
        if not last:
            self.batches.prefetch(self.cfg.grad_accum)
        return self.stop.agreed(self.damage.found(self.batches) if self.damage else "", self.batches.failure)

    def log(self, state: TrainState) -> None:
        """The train/* scalars at log steps; val/* (kept in `state` for the checkpoint) at val steps."""
        step, last = state.step, state.step == self.cfg.max_steps
        if step % self.cfg.log_interval == 0 or last:
            self.metrics.log(step, self.interval.values(state.samples))
        state.val_loss = None
        if self.validation is not None and (step % self.cfg.val_interval == 0 or last):
            values = self.validation(self.engine)
            self.metrics.log(step, values)
            state.val_loss = values["val/loss"]

    def checkpoint_due(self, step: int, stopping: bool) -> bool:
        return step % self.cfg.checkpoint_interval == 0 or step == self.cfg.max_steps or stopping
