"""dslm-generate: continue prompts with a trained model (a checkpoint, a run's newest checkpoint or
an export folder). Greedy decoding by default; --strategy sample draws with --temperature,
--top-k and --top-p (seeded: the same --seed gives the same text); --strategy beam keeps
--num-beams hypotheses. Decoding stops at <eos>, at a --stop string (cut from the output) or
after --max-new-tokens. Each prompt is printed followed by its continuation."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dslm.cli import run_command
from dslm.errors import DslmError
from eval.generate import STRATEGIES, GenerationConfig, complete
from eval.load import load_for_eval, parse_device

SEPARATOR = "-" * 40


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dslm-generate", description=__doc__)
    p.add_argument("target", type=Path, metavar="CHECKPOINT_OR_EXPORT",
                   help="runs/NAME/checkpoints/global_stepN, runs/NAME (its newest intact checkpoint), "
                        "or a dslm-export folder")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--prompt-file", action="append", default=[], type=Path, metavar="FILE",
                   help="a file whose whole text is one prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="(default: %(default)s)")
    p.add_argument("--strategy", choices=STRATEGIES, default="greedy", help="(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="sample only (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample only: draw from the K most likely tokens (default: 0, no limit)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample only: draw from the most likely tokens whose probability reaches P "
                        "(default: 1.0, no limit)")
    p.add_argument("--num-beams", type=int, default=1, metavar="K", help="beam only (default: %(default)s)")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop when the new text contains STR, and cut it there (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="rows decoded together (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: %(default)s)")
    return p.parse_args(argv)


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    try:
        return GenerationConfig(strategy=args.strategy, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                num_beams=args.num_beams, stop_strings=tuple(args.stop), seed=args.seed,
                                batch_size=args.batch_size)
    except ValueError as e:  # a __post_init__ check, in the config's field names
        raise DslmError(str(e)) from None


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = args.prompt + [path.read_text() for path in args.prompt_file]
    if not prompts:
        raise DslmError("give at least one --prompt or --prompt-file")
    return prompts


def run(args: argparse.Namespace) -> None:
    cfg, prompts = generation_config(args), read_prompts(args)
    loaded = load_for_eval(args.target, parse_device(args.device))
    for i, (prompt, text) in enumerate(zip(prompts, complete(loaded.model, loaded.tokenizer, prompts, cfg,
                                                             progress=True))):
        if i:
            print(SEPARATOR)
        print(prompt + text)


def main(argv: list[str] | None = None) -> None:
    run_command("dslm-generate", lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
