"""dslm-generate: continue prompts with trained models (a checkpoint, a run's newest checkpoint or
an export folder). Greedy decoding by default; --strategy sample draws with --temperature,
--top-k and --top-p (seeded: the same --seed gives the same text); --strategy beam keeps
--num-beams hypotheses. Decoding stops at the end of a text, at a --stop string (cut from the
output) or after --max-new-tokens.

Each model reads prompts as it was trained: a backward model (data.direction=backward) takes the
prompt as the end of a text and writes what comes before it; a model trained on instruction
shards wraps the prompt in its template and answers until <|im_end|> (--template overrides).
A model trained to fill in the middle (`dslm-shard build --fim-rate`) completes at a cursor:
--suffix TEXT is the code after it, the prompt the code before it, and the model writes the
middle, which is shown between them (the prompt laid out as dslm-complete lays it out).
Given several models, each prompt's outputs are shown side by side; --prompts FILE --out
FILE.jsonl keeps them as a fixed evaluation set. --interactive reads prompts from the terminal,
sampling as the BackChat card does (temperature 0.8, top-k 200, 500 tokens), and takes
`temp=X`, `top_k=X` and `tokens=X` lines to change them as you go.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch

from dslm.cli import ArgumentParser, run_command
from dslm.data.templates import TEMPLATES, Framing
from dslm.errors import DslmError
from dslm.files import atomic_write_text, check_creatable
from dslm.logs import VERBOSE_HELP, LibraryOutput
from dslm_eval.generate import complete
from dslm_eval.load import LoadedModel, load_for_eval, parse_device
from dslm_local.decoding import STRATEGIES, GenerationConfig, checked_config
from dslm_local.prompts import read_prompt_set, read_text

SEPARATOR = "-" * 40
CARD_SAMPLER = {"strategy": "sample", "temperature": 0.8, "top_k": 200, "max_new_tokens": 500}
"""--interactive's defaults: the sampler the BackChat model card gives (docs/architecture.md)."""
PLAIN = {"strategy": "greedy", "temperature": 1.0, "top_k": 0, "max_new_tokens": 64}
"""The defaults otherwise."""
SETTINGS = {"temp": "temperature", "top_k": "top_k", "tokens": "max_new_tokens"}
"""--interactive's `NAME=VALUE` lines -> GenerationConfig fields."""


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    """The models, and the prompts they continue: --prompt, --prompt-file, --prompts, --suffix."""
    p.add_argument(
        "targets",
        type=Path,
        nargs="+",
        metavar="CHECKPOINT_OR_EXPORT",
        help="runs/NAME/checkpoints/global_stepN, runs/NAME (its newest intact checkpoint), "
        "or a dslm-export folder; several: their outputs side by side",
    )
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument(
        "--prompt-file",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="a file whose whole text is one prompt (repeatable)",
    )
    p.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE",
        help='a fixed prompt set: one prompt per line, or .jsonl records with a "prompt" field',
    )
    p.add_argument(
        "--suffix",
        metavar="TEXT",
        help="the code after the cursor, for a model trained to fill in the middle: it writes the middle "
        "between the one prompt and TEXT",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="dslm-generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prompt_args(p)
    p.add_argument(
        "--out",
        type=Path,
        metavar="FILE.jsonl",
        help="also write one JSON line per prompt: the prompt, the settings and each model's output "
        "(a new file: see --overwrite)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the --out file when it exists")
    p.add_argument(
        "--interactive",
        action="store_true",
        help="read prompts from the terminal (temp=X, top_k=X, tokens=X change the sampler; quit ends)",
    )
    p.add_argument(
        "--template",
        choices=("auto", "none", *TEMPLATES),
        default="auto",
        help="how prompts are wrapped: auto, as the model was trained; none, as plain text (default: %(default)s)",
    )
    add_decoding_args(p)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="rows decoded together (default: %(default)s)")
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default: %(default)s)"
    )
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    args = p.parse_args(argv)
    if args.suffix is not None and args.template not in ("auto", "none"):
        p.error("--suffix: a prompt at a cursor is plain code; drop --template")
    return args


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    """The options of GenerationConfig; those left out are PLAIN's or (--interactive) CARD_SAMPLER's."""
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="(default: 64; --interactive: 500)")
    p.add_argument("--strategy", choices=STRATEGIES, help="(default: greedy; --interactive: sample)")
    p.add_argument("--temperature", type=float, help="sample only (default: 1.0; --interactive: 0.8)")
    p.add_argument(
        "--top-k",
        type=int,
        metavar="K",
        help="sample only: draw from the K most likely tokens (default: 0, no limit; --interactive: 200)",
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        metavar="P",
        help="sample only: draw from the most likely tokens whose probability reaches P (default: 1.0, no limit)",
    )
    p.add_argument("--num-beams", type=int, default=1, metavar="K", help="beam only (default: %(default)s)")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STR",
        help="stop when the new text contains STR, and cut it there (repeatable)",
    )


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    """The decoding settings: the options given, the rest from PLAIN or (--interactive) CARD_SAMPLER."""
    defaults = CARD_SAMPLER if args.interactive else PLAIN
    given = {name: getattr(args, name) for name in defaults if getattr(args, name) is not None}
    chosen = {**defaults, **given}
    if chosen["strategy"] != "sample":  # the card's sampler settings apply to sampling only
        chosen |= {name: PLAIN[name] for name in ("temperature", "top_k") if name not in given}
    return checked_config(
        **chosen,
        top_p=args.top_p,
        num_beams=args.num_beams,
        stop_strings=tuple(args.stop),
        seed=args.seed,
        batch_size=args.batch_size,
    )


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = args.prompt + [read_text(path, "--prompt-file") for path in args.prompt_file]
    prompts += read_prompt_set(args.prompts) if args.prompts else []
    if args.interactive:
        if prompts:
            raise DslmError(
                "--interactive reads its prompts from the terminal; drop --prompt, --prompt-file and --prompts"
            )
        return []
    if not prompts:
        raise DslmError("give at least one --prompt, --prompt-file or --prompts, or --interactive")
    return prompts


def check_suffix(args: argparse.Namespace, prompts: list[str]) -> None:
    """--suffix goes with one prompt, the code before the cursor (not --interactive)."""
    if args.suffix is not None and (args.interactive or len(prompts) != 1):
        raise DslmError(
            f"--suffix goes with one prompt (--prompt or --prompt-file: the code before the cursor), "
            f"not {'--interactive' if args.interactive else f'{len(prompts)} prompts'}"
        )


def check_fim(models: list[Model], suffix: str | None) -> None:
    """A --suffix needs every model to have been trained to fill in the middle (forward, no template)."""
    if suffix is None:
        return
    for m in models:
        if not m.frame.fim or m.frame.template or m.frame.direction != "forward":
            raise DslmError(
                f"--suffix: {m.path} was not trained to fill in the middle of plain code (its config records no "
                f"fim); continue the --prompt alone, or train on shards built with `dslm-shard build --fim-rate`"
            )


def check_out(out: Path | None, overwrite: bool) -> None:
    """Refuse an --out that cannot be written, or that exists without --overwrite, before any
    generating."""
    if out is None:
        return
    check_creatable(out)
    if out.is_dir() or not out.parent.is_dir():
        raise DslmError(f"--out {out}: {'a folder' if out.is_dir() else 'its folder does not exist'}; name a file")
    if out.exists() and not overwrite:
        raise DslmError(f"--out {out} already exists; pass --overwrite to replace it")


def framing(loaded: LoadedModel, template: str) -> Framing:
    """The model's own framing, with --template's choice of template."""
    if template == "auto":
        return loaded.framing
    return replace(loaded.framing, template="" if template == "none" else template)


def shown(prompt: str, text: str, frame: Framing, suffix: str | None = None) -> str:
    """A prompt with its output as a reader wants them: a reply below the prompt, new text where
    it belongs in the page (after a forward prompt, before a backward one, a middle before its
    suffix)."""
    if frame.template:
        return f"{prompt}\n=> {text}"
    return text + prompt if frame.direction == "backward" else prompt + text + (suffix or "")


@dataclass
class Model:
    path: Path
    loaded: LoadedModel
    frame: Framing

    def outputs(
        self, prompts: list[str], cfg: GenerationConfig, progress: bool = True, suffix: str | None = None
    ) -> list[str]:
        return complete(
            self.loaded.model, self.loaded.tokenizer, prompts, cfg, progress=progress, framing=self.frame, suffix=suffix
        )


def load_models(args: argparse.Namespace) -> list[Model]:
    if len(set(map(str, args.targets))) < len(args.targets):
        raise DslmError("a model is named twice; name each checkpoint, run or export once")
    device = parse_device(args.device)
    models = []
    for path in args.targets:
        loaded = load_for_eval(path, device)
        models.append(Model(path, loaded, framing(loaded, args.template)))
    return models


def run_prompts(
    models: list[Model], prompts: list[str], cfg: GenerationConfig, out: Path | None, suffix: str | None = None
) -> None:
    """Every model on every prompt (each model with the same seed; at a cursor before `suffix`);
    print them, and write --out."""
    outputs = [m.outputs(prompts, cfg, suffix=suffix) for m in models]
    for i, prompt in enumerate(prompts):
        if i:
            print(SEPARATOR)
        for m, texts in zip(models, outputs):
            label = f"[{m.path}]\n" if len(models) > 1 else ""
            print(label + shown(prompt, texts[i], m.frame, suffix))
    if out is not None:
        settings = {
            "strategy": cfg.strategy,
            "temperature": cfg.temperature,
            "top_k": cfg.top_k,
            "top_p": cfg.top_p,
            "num_beams": cfg.num_beams,
            "max_new_tokens": cfg.max_new_tokens,
            "seed": cfg.seed,
        }
        steps = {str(m.path): m.loaded.step for m in models}
        rows = [
            {
                "prompt": p,
                **({} if suffix is None else {"suffix": suffix}),
                **settings,
                "steps": steps,
                "outputs": {str(m.path): texts[i] for m, texts in zip(models, outputs)},
            }
            for i, p in enumerate(prompts)
        ]
        atomic_write_text(out, "".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {out}")


def terminal_lines() -> Iterator[str]:
    while True:
        try:
            yield input("> ")
        except EOFError:
            return


def interactive(models: list[Model], cfg: GenerationConfig, lines: Iterator[str]) -> None:
    """A prompt loop: a line of `NAME=VALUE` words (SETTINGS) changes the sampler, `quit` ends, any
    other line is a prompt. A prompt that cannot be answered is reported and the loop goes on."""
    print(f"{status(cfg)}; change with NAME=VALUE ({', '.join(SETTINGS)}), quit to end", flush=True)
    for line in lines:
        words = [word.partition("=") for word in line.split()]
        if line.strip() in ("quit", "exit"):
            return
        if words and all(name in SETTINGS and sep for name, sep, _ in words):
            cfg = change(cfg, {SETTINGS[name]: value for name, _, value in words}, context(models))
        elif line.strip():
            for m in models:
                label = f"[{m.path}] " if len(models) > 1 else ""
                try:
                    print(label + shown(line, m.outputs([line], cfg, progress=False)[0], m.frame), flush=True)
                except DslmError as e:
                    print(f"{label}not generated: {e}", flush=True)


def status(cfg: GenerationConfig) -> str:
    return f"temp={cfg.temperature} top_k={cfg.top_k} tokens={cfg.max_new_tokens}"


def change(cfg: GenerationConfig, values: dict[str, str], context_size: int) -> GenerationConfig:
    """cfg with sampler settings changed; a bad value is reported and leaves cfg as it was."""
    try:
        new = replace(cfg, **{field: float(v) if field == "temperature" else int(v) for field, v in values.items()})
        if new.max_new_tokens >= context_size:
            raise ValueError(f"tokens={new.max_new_tokens} leaves no room for a prompt in a context of {context_size}")
    except ValueError as e:
        print(f"not changed: {e}", flush=True)
        return cfg
    print(status(new), flush=True)
    return new


def context(models: list[Model]) -> int:
    """The smallest context (model.block_size) of the models, in tokens."""
    return min(m.loaded.model.cfg.block_size for m in models)


def fit_budget(cfg: GenerationConfig, models: list[Model], given: bool) -> GenerationConfig:
    """cfg with room for a prompt in every model's context: a default max_new_tokens that leaves
    none is lowered to half the smallest context, with a line saying so; a given one is an error."""
    size = context(models)
    if cfg.max_new_tokens < size:
        return cfg
    if given:
        raise DslmError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in model.block_size={size}")
    print(f"max new tokens: {size // 2} (half of model.block_size={size}; --max-new-tokens sets it)", flush=True)
    return replace(cfg, max_new_tokens=size // 2)


def run(args: argparse.Namespace) -> None:
    cfg = generation_config(args)
    prompts = read_prompts(args)
    check_suffix(args, prompts)
    check_out(args.out, args.overwrite)
    models = load_models(args)
    check_fim(models, args.suffix)
    cfg = fit_budget(cfg, models, given=args.max_new_tokens is not None)
    if args.interactive:
        interactive(models, cfg, terminal_lines())
    else:
        run_prompts(models, prompts, cfg, args.out, args.suffix)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with LibraryOutput("dslm-generate", args.verbose):
        run_command("dslm-generate", lambda: run(args))


if __name__ == "__main__":
    main()
