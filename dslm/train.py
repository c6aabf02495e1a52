"""Train a GPT with DeepSpeed: `deepspeed dslm/train.py --deepspeed ds_configs/zero2.json
[--config RECIPE] [key=value ...]`, or `dslm-train` with the same arguments under any launcher."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script path: import the dslm package, not the files beside this one
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import dataclasses
import signal

import torch
import torch.distributed as dist

from dslm.checkpoint import (Checkpointer, TrainState, convert_to_universal, list_checkpoints, newest_resumable,
                             rng_file, seal_problem, sealed_state, set_rng_state, set_seeds)
from dslm.cli import run_command, warn
from dslm.errors import DslmError
from dslm.config import RunConfig, check_against_manifest, load_config, save_config, to_yaml
from dslm.data.loader import DeviceBatches, ShardSamples, train_loader
from dslm.data.manifest import Manifest
from dslm.engine import DistEnv, build_engine, describe, init_distributed, load_ds_config
from dslm.metrics import Metrics
from dslm.mfu import device_peak_flops, flops_per_token
from dslm.model import GPT
from dslm.stop import EXIT_STOPPED, StopSignal
from dslm.trainer import Validation, train


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dslm-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed", metavar="JSON", help="DeepSpeed config (sets ds_config; default ds_configs/zero2.json)")
    p.add_argument("--config", metavar="RECIPE", help="YAML recipe, e.g. launch/recipes/demo.yaml")
    p.add_argument("--resume", metavar="auto|CHECKPOINT", default=None,
                   help="auto: continue from the run's newest intact checkpoint (falling back to an older one "
                        "with a warning); or a checkpoint folder. Without it, a run directory that already "
                        "holds checkpoints is an error")
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
    env = init_distributed()
    manifest = Manifest.load(cfg.data.shards)
    check_against_manifest(cfg, manifest)
    ds_config = load_ds_config(cfg.ds_config, cfg.train, env.world_size)
    if env.rank == 0:
        print(to_yaml(cfg), flush=True)
        save_config(cfg)
    stop = StopSignal()  # from here on, SIGUSR1/SIGTERM end the run at a step boundary with a checkpoint
    validation = make_validation(cfg, manifest)
    checkpoints = Checkpointer(cfg.run_dir / "checkpoints", cfg.train.keep_last)
    resume_from = find_resume(args.resume, checkpoints.folder, env)
    load_from = None if resume_from is None else loadable_form(resume_from, manifest, cfg, env, ds_config)
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    mfu_per_token = mfu_scale(model, manifest.seq_len, env.world_size)
    engine = build_engine(model, cfg.train, ds_config)
    if env.rank == 0:
        print(describe(engine, env.world_size), flush=True)
    state = TrainState(world_size=env.world_size, shards=shards_identity(manifest))
    if resume_from is not None and load_from is not None:
        state = resume(engine, resume_from, load_from, env, cfg.train.seed)
    loader = train_loader(cfg.data, manifest, cfg.train.seed, env.rank, env.world_size, cfg.train.micro_batch_size,
                          start=state.samples)
    # purge_step: events a killed run wrote after the checkpoint are dropped, so each step appears once
    metrics = Metrics(cfg.run_dir / "tb", enabled=env.rank == 0, purge_step=state.step + 1 if state.step else None)
    batches = DeviceBatches(iter(loader), engine.device)
    stopped_by = train(engine, batches, cfg.train, checkpoints, metrics, state, manifest.seq_len, validation, stop,
                       mfu_per_token)
    metrics.close()
    report(cfg, env)
    dist.destroy_process_group()
    if stopped_by:
        if env.rank == 0:
            print(f"stopped at step {state.step} on {signal.Signals(stopped_by).name} after a checkpoint; "
                  f"continue with --resume auto", flush=True)
        raise SystemExit(EXIT_STOPPED)


def mfu_scale(model: GPT, seq_len: int, world_size: int) -> float | None:
    """MFU per global token/s: FLOPs per token over the peak of all ranks' GPUs (None off a known GPU)."""
    peak = device_peak_flops()
    return None if peak is None else flops_per_token(model, seq_len) / (peak * world_size)


def make_validation(cfg: RunConfig, manifest: Manifest) -> Validation | None:
    if not cfg.train.val_interval:
        return None
    if not manifest.split("val"):
        raise DslmError(f"{cfg.data.shards} has no val split for train.val_interval={cfg.train.val_interval}; "
                        f"set train.val_interval=0 or rebuild the shards with --val-fraction above 0")
    return Validation(ShardSamples(cfg.data.shards, manifest.split("val")), cfg.train.micro_batch_size,
                      cfg.train.val_batches)


def find_resume(resume: str | None, folder: Path, env: DistEnv) -> Path | None:
    """The checkpoint to resume from: None for a fresh run; an error when resuming is asked for
    and nothing loadable exists, or when a fresh run would mix with existing checkpoints."""
    if resume is None:
        if list_checkpoints(folder):
            raise DslmError(f"{folder} already holds checkpoints: pass --resume auto to continue the run, "
                            f"or choose another name=")
        return None
    if resume != "auto":
        tag_dir = Path(resume)
        if (problem := seal_problem(tag_dir)) is not None:
            raise DslmError(f"cannot resume from {tag_dir}: {problem}")
        return tag_dir
    tag_dir, skipped = newest_resumable(folder)
    if env.rank == 0:
        for line in skipped:
            warn("dslm-train", line)
    if tag_dir is None:
        raise DslmError(f"--resume auto: no intact checkpoint in {folder}")
    return tag_dir


def loadable_form(tag_dir: Path, manifest: Manifest, cfg: RunConfig, env: DistEnv, ds_config: dict) -> Path:
    """What DeepSpeed loads to resume from `tag_dir`: the tag itself, or on another world size
    its universal form (and `ds_config` is told so)."""
    state = sealed_state(tag_dir)
    check_same_shards(state, manifest, cfg.data.shards)
    if state.world_size == env.world_size:
        return tag_dir
    ds_config["checkpoint"] = {"load_universal": True}
    return convert_to_universal(tag_dir)


def resume(engine, tag_dir: Path, load_from: Path, env: DistEnv, seed: int) -> TrainState:
    """Load DeepSpeed's state from `load_from` (the tag, or its universal form on another world
    size) and this rank's RNG; the state to continue from."""
    state = sealed_state(tag_dir)
    path, _ = engine.load_checkpoint(str(load_from.parent), tag=load_from.name)
    if path is None:
        raise DslmError(f"DeepSpeed could not load {load_from}")
    if state.world_size == env.world_size:
        set_rng_state(torch.load(tag_dir / rng_file(env.rank), weights_only=False))
    else:  # other ranks, other streams: seeded from the run, the step and the rank
        set_seeds(seed * 1_000_003 + state.step * 1_009 + env.rank)
    if env.rank == 0:
        print(f"resumed from {tag_dir} at step {state.step} ({state.samples:,} samples read)", flush=True)
        if state.world_size != env.world_size:
            print(f"  on {env.world_size} ranks instead of {state.world_size} (through {load_from.name}): "
                  f"the global batch is now {env.world_size}/{state.world_size} of what it was", flush=True)
    return dataclasses.replace(state, world_size=env.world_size)


def shards_identity(manifest: Manifest) -> dict:
    return {"tokenizer_sha256": manifest.tokenizer_sha256, "seq_len": manifest.seq_len,
            "train_samples": sum(e.samples for e in manifest.split("train"))}


def check_same_shards(state: TrainState, manifest: Manifest, folder: str) -> None:
    """A resumed run must read the shards it started on: its cursor counts their samples."""
    now = shards_identity(manifest)
    changed = [f"{key} {state.shards[key]} -> {now[key]}" for key in now if state.shards.get(key) != now[key]]
    if changed:
        raise DslmError(f"data.shards={folder} is not what the run was trained on ({'; '.join(changed)}); "
                        f"point data.shards at the run's shards")


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
