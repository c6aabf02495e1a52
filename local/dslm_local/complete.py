"""dslm-complete: code completion with a model exported by `dslm-export --format onnx`, run by
ONNX Runtime, tokenizers and numpy only (no torch), small enough for a laptop.

It completes the line at a cursor: --prompt TEXT (the code before the cursor; --suffix TEXT the
code after it), --file F --line N [--column C] (the cursor in a file: at the end of line N, or
before its column C), or --prompts FILE (one prompt per line, or .jsonl records with a "prompt").
A model trained to fill in the middle (`dslm-shard build --fim-rate`; its export's config.json
says dslm_fim) is given the code after the cursor too, in the PSM layout (dslm_local.fim), and
writes the middle; any other sees the code before the cursor only. The completion stops at the end of
the line (--multiline: at the end of the text), at a --stop string or after --max-new-tokens, and
is printed alone, for an editor to insert. Greedy decoding by default, as dslm-generate decodes:
the same export gives the same tokens; --strategy sample draws with --temperature, --top-k and
--top-p (seeded by --seed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from dslm_local.cli import ArgumentParser, run_command
from dslm_local.decoding import GenerationConfig, Stopper, checked_config, cut_at_stop, pick
from dslm_local.errors import DslmError
from dslm_local.fim import FimIds, fit_around
from dslm_local.onnx_model import OnnxModel
from dslm_local.prompts import read_prompt_set, read_text

MAX_THREADS = 256
"""--threads at most: each is an OS thread with its own stack; far more than cores only slows."""


class Completer:
    """Completions of code with an ONNX export of a forward model without a template (a code
    model); `cfg.stop_tokens` is replaced by the export's <eos>. Raises DslmError for an export
    of another framing."""

    def __init__(self, model: OnnxModel, cfg: GenerationConfig):
        if model.config.direction != "forward" or model.config.template:
            raise DslmError(
                f"this export reads text {model.config.direction}"
                f"{' with the template ' + model.config.template if model.config.template else ''}; "
                f"dslm-complete continues code (forward, no template): use dslm-generate"
            )
        if cfg.strategy == "beam":
            raise DslmError("dslm-complete decodes greedy or sample; beam search is dslm-generate's")
        self.model, self.tokenizer = model, model.tokenizer
        self.cfg = replace(cfg, stop_tokens=(model.config.eos_token_id,))
        self.stopper = Stopper(frozenset(self.cfg.stop_tokens), self.cfg.stop_strings, self.decode)
        self.rng = np.random.default_rng(self.cfg.seed)
        self.fim = FimIds.of(self.tokenizer) if model.config.fim else None
        """The FIM tokens of a model trained to fill in the middle, else None."""
        self.new_tokens = 0
        """Tokens generated so far (a final stop token not counted, as dslm-generate returns them)."""

    def decode(self, ids: list[int]) -> str:
        """Text of new ids, special tokens left out, as dslm-generate decodes."""
        return self.tokenizer.decode(ids)

    def prompt_ids(self, prompt: str, keep_last: bool = False, suffix: str | None = None) -> list[int]:
        """<bos> and the prompt's tokens, as the model was trained; with `suffix` (the code after
        the cursor) and a FIM model, `<bos> <fim_prefix> prompt <fim_suffix> suffix <fim_middle>`.
        A prompt that leaves no room for max_new_tokens in the context is a DslmError, or with
        `keep_last` keeps the code nearest the cursor: the prompt's last tokens and the suffix's
        first (learned positions cannot slide)."""
        room = self.model.config.block_size - self.cfg.max_new_tokens
        before = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        if suffix is not None and self.fim is not None:
            after = self.tokenizer.encode(suffix, add_special_tokens=False).ids
            if keep_last and room > 4:
                before, after = fit_around(before, after, room - 4)
            ids = [self.model.config.bos_token_id, *self.fim.psm(before, after, [])]
        else:
            ids = [self.model.config.bos_token_id, *before]
        if len(ids) <= room:
            return ids
        if keep_last and room > 0 and (suffix is None or self.fim is None):
            return ids[-room:]
        raise DslmError(
            f"the prompt is {len(ids)} tokens with <bos>; the context of {self.model.config.block_size} "
            f"leaves room for {max(room, 0)} beside --max-new-tokens {self.cfg.max_new_tokens}: "
            f"shorten the prompt or lower --max-new-tokens"
        )

    def new_ids(self, prompt_ids: list[int]) -> list[int]:
        """Greedy or sampled new token ids after `prompt_ids`, without a final stop token."""
        self.model.reset()
        logits = self.model.last_logits(prompt_ids)
        new: list[int] = []
        while True:
            new.append(int(pick(logits[None], self.cfg, self.rng)[0]))
            if self.stopper.stopped(new) or len(new) == self.cfg.max_new_tokens:
                break
            logits = self.model.last_logits(new[-1:])
        new = self.stopper.output(new)
        self.new_tokens += len(new)
        return new

    def complete(self, prompt: str, keep_last: bool = False) -> str:
        """The text that follows `prompt`, cut before the first stop string."""
        return self.text(self.new_ids(self.prompt_ids(prompt, keep_last)))

    def text(self, new: list[int]) -> str:
        """New ids as the completion's text, cut before the first stop string."""
        return cut_at_stop(self.decode(new), self.cfg.stop_strings, self.cfg.keep_stop_string)


def cursor_text(path: Path, line: int, column: int | None) -> tuple[str, str]:
    """The text of `path` before and after the cursor: at the end of 1-based `line`, or before its
    1-based `column`. Raises DslmError for a line or column the file does not have."""
    text = read_text(path, "--file")
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        raise DslmError(f"--line {line}: {path} has lines 1..{len(lines)}")
    current = lines[line - 1]
    if column is not None and not 1 <= column <= len(current) + 1:
        raise DslmError(f"--column {column}: line {line} of {path} has columns 1..{len(current) + 1}")
    cut = len(current) if column is None else column - 1
    before = "".join(f"{ln}\n" for ln in lines[: line - 1]) + current[:cut]
    return before, text[len(before) :]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="dslm-complete", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path, metavar="ONNX_EXPORT", help="a folder written by dslm-export --format onnx")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--prompt", metavar="TEXT", help="the code before the cursor")
    p.add_argument(
        "--suffix",
        metavar="TEXT",
        help="--prompt: the code after the cursor, for a model trained to fill in the middle",
    )
    where.add_argument("--file", type=Path, metavar="F", help="complete at a cursor in file F (with --line)")
    where.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE",
        help='a prompt set: one prompt per line, or .jsonl records with a "prompt" field',
    )
    p.add_argument("--line", type=int, metavar="N", help="--file: the cursor's line, 1-based")
    p.add_argument(
        "--column",
        type=int,
        metavar="C",
        help="--file: the cursor is before character C of the line, 1-based, counted in Unicode "
        "characters, a tab as one (default: at its end)",
    )
    p.add_argument(
        "--multiline",
        action="store_true",
        help="go on past the end of the line (to <eos>, a --stop or --max-new-tokens)",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STR",
        help="stop when the new text contains STR, and cut it there (repeatable)",
    )
    add_decoding_args(p)
    p.add_argument(
        "--threads", type=int, default=0, metavar="N", help="CPU threads for ONNX Runtime (default: 0, one per core)"
    )
    p.add_argument(
        "--jsonl",
        action="store_true",
        help="print one JSON line per prompt (prompt, completion, new tokens, seconds) instead of the text",
    )
    args = p.parse_args(argv)
    if (args.file is None) != (args.line is None) or (args.column is not None and args.file is None):
        p.error("--line (and --column) go with --file, and --file needs --line")
    if args.suffix is not None and args.prompt is None:
        p.error("--suffix goes with --prompt (--file takes the code after the cursor from the file)")
    if not 0 <= args.threads <= MAX_THREADS:
        p.error(f"--threads {args.threads}: must be within 0..{MAX_THREADS}")
    return args


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    """The options of GenerationConfig."""
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="(default: %(default)s)")
    p.add_argument("--strategy", choices=("greedy", "sample"), default="greedy", help="(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="sample only (default: %(default)s)")
    p.add_argument(
        "--top-k",
        type=int,
        default=0,
        metavar="K",
        help="sample only: draw from the K most likely tokens (default: 0, no limit)",
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        metavar="P",
        help="sample only: draw from the most likely tokens whose probability reaches P (default: 1.0)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    stops = tuple(args.stop) + (() if args.multiline else ("\n",))
    return checked_config(
        strategy=args.strategy,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop_strings=stops,
        seed=args.seed,
    )


def prompts_of(args: argparse.Namespace) -> list[tuple[str, bool, str | None]]:
    """(prompt, keep_last, suffix) triples: a file's text before the cursor keeps its last tokens,
    and the text after it is the suffix; a prompt given as such must fit."""
    if args.file is not None:
        before, after = cursor_text(args.file, args.line, args.column)
        return [(before, True, after)]
    if args.prompts is not None:
        return [(prompt, False, None) for prompt in read_prompt_set(args.prompts)]
    return [(args.prompt, False, args.suffix)]


def run(args: argparse.Namespace) -> None:
    cfg = generation_config(args)
    prompts = prompts_of(args)
    completer = Completer(OnnxModel(args.export, args.threads), cfg)
    if completer.fim is None and args.suffix is not None:
        raise DslmError(
            f"--suffix: {args.export} was not trained to fill in the middle (no dslm_fim in its config.json); "
            f"complete with --prompt alone, or export a model trained with `dslm-shard build --fim-rate`"
        )
    if completer.fim is None and args.file is not None:
        print(
            f"dslm-complete: warning: {args.export} was not trained to fill in the middle: the code after the "
            f"cursor is not used",
            file=sys.stderr,
        )
    ids = [completer.prompt_ids(prompt, keep_last, suffix) for prompt, keep_last, suffix in prompts]  # all fit, first
    for (prompt, *_), prompt_ids in zip(prompts, ids):
        start, before = time.perf_counter(), completer.new_tokens
        text = completer.text(completer.new_ids(prompt_ids))
        if args.jsonl:
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "completion": text,
                        "new_tokens": completer.new_tokens - before,
                        "seconds": round(time.perf_counter() - start, 4),
                    }
                ),
                flush=True,
            )
        else:
            print(text, flush=True)


def main(argv: list[str] | None = None) -> None:
    run_command("dslm-complete", lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
