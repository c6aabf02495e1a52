"""dslm-eval: perplexity of saved checkpoints on the val shards, written to runs/NAME/eval/stepN.json
and to TensorBoard (eval/*) at the checkpoint's step. A run directory evaluates every checkpoint
in it that has no result yet."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from dslm.checkpoint import list_checkpoints, load_model
from dslm.cli import run_command
from dslm.config import CONFIG_NAME, RunConfig, load_config, run_of
from dslm.data.loader import ShardSamples
from dslm.data.manifest import Manifest
from dslm.errors import DslmError
from dslm.files import atomic_write_text
from dslm.metrics import Metrics
from eval.perplexity import perplexity


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dslm-eval", description=__doc__)
    p.add_argument("target", type=Path, metavar="RUN_OR_CHECKPOINT",
                   help="a run directory (runs/NAME) or one checkpoint (runs/NAME/checkpoints/global_stepN)")
    p.add_argument("--shards", type=Path, help="shard folder to evaluate on (default: the run's data.shards)")
    p.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    p.add_argument("--force", action="store_true", help="evaluate checkpoints that already have a result again")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device to evaluate on (default: %(default)s)")
    return p.parse_args(argv)


def find_checkpoints(target: Path) -> tuple[Path, list[tuple[int, Path]]]:
    """The run directory and the (step, tag folder) pairs that `target` names."""
    if (target / CONFIG_NAME).is_file():
        return target, list_checkpoints(target / "checkpoints")
    if (found := run_of(target)) is not None:
        run_dir, step = found
        return run_dir, [(step, target)]
    raise DslmError(f"{target} is neither a run directory (with {CONFIG_NAME}) nor a checkpoint in one")


def evaluate(run_cfg: RunConfig, step: int, tag_dir: Path, val_samples: ShardSamples, batch_size: int,
             device: torch.device) -> dict:
    model = load_model(run_cfg.model, tag_dir).to(device)
    return {"step": step, "checkpoint": str(tag_dir), "val": dataclasses.asdict(perplexity(model, val_samples, batch_size, device))}


def run(args: argparse.Namespace) -> None:
    run_dir, checkpoints = find_checkpoints(args.target)
    run_cfg = load_config(run_dir / CONFIG_NAME, [])
    shards = args.shards or Path(run_cfg.data.shards)
    val_samples = ShardSamples(shards, Manifest.load(shards).split("val"))  # read once for every checkpoint
    metrics = Metrics(run_dir / "tb", enabled=True)
    for step, tag_dir in checkpoints:
        out = run_dir / "eval" / f"step{step}.json"
        if out.exists() and not args.force:
            print(f"step {step}: already evaluated ({out})")
            continue
        result = {**evaluate(run_cfg, step, tag_dir, val_samples, args.batch_size, torch.device(args.device)),
                  "shards": str(shards)}
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        val = result["val"]
        metrics.log(step, {"eval/val_loss": val["loss"], "eval/val_ppl": val["ppl"]})
        print(f"step {step}: val loss {val['loss']:.4f}, perplexity {val['ppl']:.2f} "
              f"over {val['tokens']} tokens -> {out}")
    metrics.close()


def main(argv: list[str] | None = None) -> None:
    run_command("dslm-eval", lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
