"""Train a GPT with DeepSpeed: `deepspeed dslm/train.py --deepspeed ds_configs/zero2.json
[--config RECIPE] [key=value ...]`, or `dslm-train` with the same arguments under any launcher."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script path: import the dslm package, not the files beside this one
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse

import torch
import torch.distributed as dist

from dslm.cli import run_command
from dslm.errors import DslmError
from dslm.config import RunConfig, check_against_manifest, load_config, save_config, to_yaml
from dslm.data.loader import train_loader
from dslm.data.manifest import Manifest
from dslm.engine import DistEnv, build_engine, init_distributed, load_ds_config
from dslm.metrics import Metrics
from dslm.model import GPT
from dslm.trainer import train


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dslm-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed", metavar="JSON", help="DeepSpeed config (sets ds_config; default ds_configs/zero2.json)")
    p.add_argument("--config", metavar="RECIPE", help="YAML recipe, e.g. launch/recipes/demo.yaml")
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
    env = init_distributed()
    manifest = Manifest.load(cfg.data.shards)
    check_against_manifest(cfg, manifest)
    ds_config = load_ds_config(cfg.ds_config, cfg.train, env.world_size)
    if env.rank == 0:
        print(to_yaml(cfg), flush=True)
        save_config(cfg)
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(GPT(cfg.model), cfg.train, ds_config)
    loader = train_loader(cfg.data, manifest, cfg.train.seed, env.rank, env.world_size, cfg.train.micro_batch_size)
    metrics = Metrics(cfg.run_dir / "tb", enabled=env.rank == 0)
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * env.world_size * manifest.seq_len
    train(engine, iter(loader), cfg.train, cfg.run_dir / "checkpoints", metrics, tokens_per_step)
    metrics.close()
    report(cfg, env)
    dist.destroy_process_group()


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
