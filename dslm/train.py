"""Train a GPT with DeepSpeed: `deepspeed dslm/train.py --deepspeed ds_configs/zero2.json
[--config RECIPE] [key=value ...]`, or `dslm-train` with the same arguments under any launcher."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script path: import the dslm package, not the files beside this one
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import signal

import torch
import torch.distributed as dist

from dslm.checkpoint import Checkpointer, TrainState
from dslm.cli import ArgumentParser, run_command
from dslm.config import Origin, RunConfig, check_against_manifest, load_config, save_config, to_yaml
from dslm.data.loader import DeviceBatches, ShardSamples, train_loader
from dslm.data.manifest import Manifest
from dslm.engine import DistEnv, build_engine, describe, init_distributed, load_ds_config, timed_out_collective
from dslm.errors import DslmError
from dslm.lora import add_adapters
from dslm.metrics import METRICS_CSV, Metrics
from dslm.mfu import device_peak_flops, flops_per_token
from dslm.model import GPT
from dslm.objective import next_token
from dslm.optim import freeze
from dslm.resume import Resume, fresh_state, plan_resume
from dslm.stop import EXIT_STOPPED, StopSignal
from dslm.trainer import IntervalLog, Trainer, Validation, freeze_patterns
from dslm.weights import framing_of, load_into, read_weights, tokenizer_sha256s

OBJECTIVE = next_token
"""Every run's objective; the previous-token model is this one on reversed samples (data.direction)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="dslm-train", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed", metavar="JSON", help="DeepSpeed config (sets ds_config; default ds_configs/zero2.json)")
    p.add_argument("--config", metavar="RECIPE", help="YAML recipe, e.g. launch/recipes/demo.yaml")
    p.add_argument("--resume", metavar="auto|if-any|CHECKPOINT", default=None,
                   help="auto: continue from the run's newest intact checkpoint (falling back to an older one "
                        "with a warning), an error when there is none; if-any (what slurm/pretrain.sh and "
                        "dslm-submit pass on a requeue): the same, or, with none, start fresh, removing tags "
                        "never sealed and moving damaged ones into checkpoints/abandoned/; or a checkpoint "
                        "folder. Without it, a run directory that already holds checkpoints is an error. "
                        "Exit statuses: 2 bad input, 69 a rank or the rendezvous failed (run again), "
                        "74 a checkpoint could not be written (free space first), 75 stopped after a checkpoint")
    p.add_argument("--print-run-dir", action="store_true",
                   help="print the run directory these arguments resolve to and exit (slurm/pretrain.sh logs there)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides on top of the recipe, e.g. train.max_steps=200 model.preset=tiny")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> RunConfig:
    overrides = list(args.overrides) + ([f"ds_config={args.deepspeed}"] if args.deepspeed else [])
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise DslmError(f"override {bad[0]!r} is not key=value")
    return load_config(args.config, overrides)


def run(args: argparse.Namespace) -> None:
    cfg = resolve_config(args)
    if args.print_run_dir:
        print(cfg.run_dir.resolve())
        return
    env = init_distributed(cfg.train.collective_timeout_s)
    states: list[TrainState] = []  # the run's state once it exists: a timed-out collective names its step
    try:
        stopped_by = train(args, cfg, env, states)
    except RuntimeError as e:
        if (failure := timed_out_collective(e, states[0].step if states else None, cfg.train.collective_timeout_s)):
            raise failure from e
        raise
    report(cfg, env)
    dist.destroy_process_group()
    if stopped_by:
        if env.rank == 0:
            print(f"stopped at step {states[0].step} on {signal.Signals(stopped_by).name} after a checkpoint; "
                  f"continue with --resume auto", flush=True)
        raise SystemExit(EXIT_STOPPED)


def train(args: argparse.Namespace, cfg: RunConfig, env: DistEnv, states: list[TrainState]) -> int:
    """Build the run and train it; returns 0, or the signal that stopped it after a checkpoint.
    The run's state is appended to `states` as soon as it exists."""
    manifest = load_shards(cfg)
    validation = build_validation(cfg, manifest)
    ds_config = load_ds_config(cfg.ds_config, cfg.train, env.world_size)
    stop = StopSignal()  # from here on, SIGUSR1/SIGTERM end the run at a step boundary with a checkpoint
    resume = plan_resume(args.resume, cfg, manifest, env)
    model = build_model(cfg)
    cfg.origin = initial_weights(cfg, resume, model, manifest, env)
    add_adapters(model, cfg.train.lora)  # train.lora: around the initial weights; a resume loads its own adapters
    frozen = freeze_parameters(model, cfg, env)
    mfu_per_token = mfu_scale(model, manifest.seq_len, env.world_size)  # before ZeRO-3 partitions the weights
    engine = build_engine(model, cfg.train, ds_config, load_universal=resume is not None and resume.load_universal)
    if env.rank == 0:
        print(describe(engine, env.world_size), flush=True)
    state = resume.load(engine, env, cfg.train.seed) if resume else fresh_state(env.world_size, manifest, frozen)
    states.append(state)
    save_run_config(cfg, env)  # only now: a refused or failed start leaves the run's config.yaml as it was
    trainer = build_trainer(cfg, env, manifest, engine, state, stop, validation, mfu_per_token)
    stopped_by = trainer.fit(state)
    trainer.metrics.close()
    return stopped_by


def load_shards(cfg: RunConfig) -> Manifest:
    """The shards' manifest, checked against the model."""
    manifest = Manifest.load(cfg.data.shards)
    check_against_manifest(cfg, manifest)
    return manifest


def build_validation(cfg: RunConfig, manifest: Manifest) -> Validation | None:
    """Validation on the val split, or None when train.val_interval=0; a DslmError when the
    split is missing or too small for a micro-batch on every rank."""
    if not cfg.train.val_interval:
        return None
    if not manifest.split("val"):
        raise DslmError(f"{cfg.data.shards} has no val split for train.val_interval={cfg.train.val_interval}; "
                        f"set train.val_interval=0 or rebuild the shards with --val-fraction above 0")
    return Validation(ShardSamples(cfg.data.shards, manifest, "val", cfg.data.direction), OBJECTIVE,
                      cfg.train.micro_batch_size, cfg.train.val_batches)


def save_run_config(cfg: RunConfig, env: DistEnv) -> None:
    """Print the resolved config and save it as the run's config.yaml (rank 0)."""
    if env.rank == 0:
        print(to_yaml(cfg), flush=True)
        save_config(cfg)


def build_model(cfg: RunConfig) -> GPT:
    torch.manual_seed(cfg.train.seed)
    return GPT(cfg.model)


def initial_weights(cfg: RunConfig, resume: Resume | None, model: GPT, manifest: Manifest, env: DistEnv) -> Origin:
    """The run's origin. A resumed run keeps its own (its checkpoint's weights load later);
    otherwise `train.init_from` names the weights to copy into `model` now."""
    if resume is not None:
        if cfg.train.init_from and env.rank == 0:
            print(f"train.init_from={cfg.train.init_from} is ignored: --resume continues the run from "
                  f"{resume.tag_dir}", flush=True)
        return resume.origin
    if not cfg.train.init_from:
        return Origin()
    check_init_source(Path(cfg.train.init_from), cfg, manifest, env)
    _, weights, origin = read_weights(cfg.train.init_from)
    load_into(model, weights, origin.path)
    if env.rank == 0:
        print(f"initialized from {origin.path} (step {origin.step}, weights sha256 {origin.sha256})", flush=True)
    return origin


def check_init_source(source: Path, cfg: RunConfig, manifest: Manifest, env: DistEnv) -> None:
    """The weights at `source` suit the run's shards: DslmError when they were trained with
    another tokenizer (their token ids would mean other text); a note when that cannot be known,
    or when they were trained in the other direction (rank 0)."""
    tokenizers = tokenizer_sha256s(source)
    if tokenizers and manifest.tokenizer_sha256 not in tokenizers:
        raise DslmError(f"train.init_from={source} was trained with another tokenizer than the one of "
                        f"{cfg.data.shards}; build the shards with the base model's (--tokenizer)")
    if env.rank != 0:
        return
    if not tokenizers:
        print(f"note: the shards {source} was trained on are gone, so its tokenizer cannot be checked against "
              f"{cfg.data.shards}'s", flush=True)
    if (direction := framing_of(source).direction) != cfg.data.direction:
        print(f"note: {source} was trained {direction}; this run reads {cfg.data.direction} (data.direction)",
              flush=True)


def freeze_parameters(model: GPT, cfg: RunConfig, env: DistEnv) -> list[str]:
    """Freeze what train.freeze and train.freeze_blocks name, on top of what train.lora froze;
    print what trains (rank 0). Returns the names of all frozen parameters."""
    if cfg.train.freeze_blocks > cfg.model.n_layer:
        raise DslmError(f"train.freeze_blocks={cfg.train.freeze_blocks} is more than the model's "
                        f"{cfg.model.n_layer} blocks (model.n_layer)")
    freeze(model, freeze_patterns(cfg.train))
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if env.rank == 0 and frozen:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        adapters = f"; LoRA adapters of rank {cfg.train.lora.rank}" if cfg.train.lora.rank else ""
        print(f"trainable parameters: {trainable:,} of {model.num_params():,} ({len(frozen)} tensors frozen"
              f"{adapters})", flush=True)
    return frozen


def build_trainer(cfg: RunConfig, env: DistEnv, manifest: Manifest, engine, state: TrainState, stop: StopSignal,
                  validation: Validation | None, mfu_per_token: float | None) -> Trainer:
    """The loop and its collaborators, reading on from `state`: batches, checkpoints, metrics."""
    train = cfg.train
    loader = train_loader(cfg.data, manifest, train.seed, env.rank, env.world_size, train.micro_batch_size,
                          start=state.samples)
    global_batch = train.micro_batch_size * train.grad_accum * env.world_size
    return Trainer(
        cfg=train, engine=engine, batches=DeviceBatches(iter(loader), engine.device), objective=OBJECTIVE,
        checkpointer=Checkpointer(cfg.checkpoint_dir, train.keep_last),
        # purge_step: events a killed run (or a fresh start's failed attempt) wrote after the checkpoint
        # are dropped, so each step appears once
        metrics=Metrics(cfg.run_dir / "tb", enabled=env.rank == 0, purge_step=state.step + 1,
                        csv_path=cfg.run_dir / METRICS_CSV),
        stop=stop, validation=validation,
        interval=IntervalLog(engine, global_batch, manifest.seq_len, mfu_per_token))


def mfu_scale(model: GPT, seq_len: int, world_size: int) -> float | None:
    """MFU per global token/s: FLOPs per token over the peak of all ranks' GPUs (None off a known GPU)."""
    peak = device_peak_flops()
    return None if peak is None else flops_per_token(model, seq_len) / (peak * world_size)


def report(cfg: RunConfig, env: DistEnv) -> None:
    if env.rank != 0:
        return
    print(f"run directory: {cfg.run_dir}\n"
          f"  config:      {cfg.run_dir / 'config.yaml'}\n"
          f"  checkpoints: {cfg.run_dir / 'checkpoints'}\n"
          f"  tensorboard: tensorboard --logdir {cfg.run_dir / 'tb'}", flush=True)


def main(argv: list[str] | None = None) -> None:
    run_command("dslm-train", lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
