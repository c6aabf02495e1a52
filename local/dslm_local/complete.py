"""dslm-complete: code completion with a model exported by `dslm-export --format onnx`, run by
ONNX Runtime, tokenizers and numpy only (no torch), small enough for a laptop.

It completes the line at a cursor: --prompt TEXT (the code before the cursor; --suffix TEXT the
code after it), --file F --line N [--column C] (the cursor in a file: at the end of line N, or
before its column C), --prompts FILE (one prompt per line, or .jsonl records with a "prompt"),
or --stdio (below). A model trained to fill in the middle (`dslm-shard build --fim-rate`; its
export's config.json says dslm_fim) is given the code after the cursor too, in the PSM layout
(dslm_local.fim), and writes the middle; any other sees the code before the cursor only. The
completion stops at the end of the line (--multiline: at the end of the text), at a --stop string
or after --max-new-tokens, and is printed alone, for an editor to insert. Greedy decoding by
default, as dslm-generate decodes: the same export gives the same tokens; --strategy sample draws
with --temperature, --top-k and --top-p (seeded by --seed).

--stdio serves an editor: the model loaded once, one JSON request a line on stdin (a file's text,
a cursor, settings), one JSON reply a line on stdout (the completion, timing), until stdin ends:

  {"id": 7, "text": "import os\\nos.pa", "line": 2, "column": 6, "max_new_tokens": 16}
  {"id": 7, "completion": "th.join(", "prompt_tokens": 9, "new_tokens": 3, "time_ms": 41.5}

The cursor is "line" (1-based) with "column" (1-based, default: the line's end), as --line and
--column, or "offset" (0-based); both count Unicode characters (code points, not UTF-16 units),
and the text is read as --file reads a file (a byte-order mark dropped, \\r\\n read as \\n).
Optional settings, each the option of the same name by default: max_new_tokens, strategy,
temperature, top_k, top_p, seed, multiline (true or false) and stop (a list of strings). "id",
any JSON value, is echoed. A request that cannot be answered gets {"id": ..., "error": "..."}
and the next is read; each reply is flushed as it is written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import numpy as np
from tokenizers import Tokenizer

from dslm_local.cli import ArgumentParser, run_command
from dslm_local.decoding import GenerationConfig, Stopper, checked_config, cut_at_stop, pick
from dslm_local.errors import DslmError
from dslm_local.fim import FimIds
from dslm_local.onnx_model import OnnxModel
from dslm_local.prompts import read_prompt_set, read_text
from dslm_local.tokens import first_ids, last_ids

MAX_THREADS = 256
"""--threads at most: each is an OS thread with its own stack; far more than cores only slows."""
REQUEST_SETTINGS: dict[str, type] = {
    "max_new_tokens": int,
    "strategy": str,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "seed": int,
    "multiline": bool,
    "stop": list,
}
"""A --stdio request's optional settings and their JSON types (a float may be written as an
integer, stop is a list of strings); each left out is the command line's option of that name."""
REQUEST_FIELDS = ("id", "text", "line", "column", "offset", *REQUEST_SETTINGS)


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
        the cursor) and a FIM model, the PSM prompt of FimIds.cursor_prompt. A prompt that leaves
        no room for max_new_tokens in the context is a DslmError, or with `keep_last` keeps the
        code nearest the cursor: the prompt's last tokens (and the suffix's first)."""
        room = self.model.config.block_size - self.cfg.max_new_tokens
        before = self.encode(prompt, room, keep_last, last_ids)
        if suffix is not None and self.fim is not None:
            after = self.encode(suffix, room, keep_last, first_ids)
            ids = self.fim.cursor_prompt(self.model.config.bos_token_id, before, after, room if keep_last else None)
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

    def encode(
        self, text: str, room: int, keep_last: bool, window: Callable[[Tokenizer, str, int], list[int]]
    ) -> list[int]:
        """The ids of `text`; with `keep_last`, only the `room` of them nearest the cursor that
        `window` encodes (last_ids before it, first_ids after it), all that a prompt cut to the
        context keeps, so that a long file costs what its lines near the cursor cost."""
        if keep_last and room > 0:
            return window(self.tokenizer, text, room)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

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
    """The text of `path` before and after the cursor (split_at_line). Raises DslmError for a
    line or column the file does not have."""
    return split_at_line(read_text(path, "--file"), line, column, str(path), "--")


def split_at_line(text: str, line: int, column: int | None, source: str, prefix: str = "") -> tuple[str, str]:
    """`text` before and after the cursor: at the end of 1-based `line`, or before its 1-based
    `column` (in characters). Raises DslmError, naming `source` and the fields `line` and
    `column` after `prefix` ("--" for the options), for a line or column the text does not have."""
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        raise DslmError(f"{prefix}line {line}: {source} has lines 1..{len(lines)}")
    current = lines[line - 1]
    if column is not None and not 1 <= column <= len(current) + 1:
        raise DslmError(f"{prefix}column {column}: line {line} of {source} has columns 1..{len(current) + 1}")
    cut = len(current) if column is None else column - 1
    before = "".join(f"{ln}\n" for ln in lines[: line - 1]) + current[:cut]
    return before, text[len(before) :]


@dataclass(frozen=True)
class Request:
    """One --stdio request: a file's text split at its cursor, and settings over the command line's."""

    before: str
    """The text before the cursor."""
    after: str
    """The text after it: the suffix of a FIM model."""
    settings: dict[str, object]
    """Some of REQUEST_SETTINGS, checked for their types."""

    @classmethod
    def of(cls, fields: dict) -> Request:
        """The request a JSON object holds. Raises DslmError, in the request's field names, for an
        unknown field, a missing or ill-typed one, or a cursor outside the text."""
        unknown = sorted(set(fields) - set(REQUEST_FIELDS))
        if unknown:
            raise DslmError(f"unknown field {', '.join(unknown)} (a request's fields: {', '.join(REQUEST_FIELDS)})")
        text = fields.get("text")
        if not isinstance(text, str):
            raise DslmError('a request needs "text": the file\'s text, a string')
        for name, kind in REQUEST_SETTINGS.items():
            if name in fields and not of_type(fields[name], kind):
                raise DslmError(f"{name}: {json.dumps(fields[name])} is not {JSON_TYPES[kind]}")
        settings = {name: fields[name] for name in REQUEST_SETTINGS if name in fields}
        return cls(*request_cursor(text, fields), settings)


def request_cursor(text: str, fields: dict) -> tuple[str, str]:
    """`text` before and after a request's cursor: "line" (and "column") as split_at_line takes
    them, or "offset" (0-based, in characters of the text as sent); each side as --file reads a
    file (as_read). Raises DslmError for a cursor that is missing, given twice, not integers, or
    outside the text."""
    line, column, offset = (fields.get(name) for name in ("line", "column", "offset"))
    if any(value is not None and not of_type(value, int) for value in (line, column, offset)):
        raise DslmError("line, column and offset are integers")
    if (line is None) == (offset is None) or (column is not None and line is None):
        raise DslmError('a request\'s cursor is "line" (and "column") or "offset"')
    if offset is None:
        return split_at_line(as_read(text), line, column, "the text")
    if not 0 <= offset <= len(text):
        raise DslmError(f"offset {offset}: the text has offsets 0..{len(text)}")
    return as_read(text[:offset]), as_read(text[offset:])


def as_read(text: str) -> str:
    """`text` as read_text reads a file: a byte-order mark at its start dropped, "\\r\\n" and "\\r"
    read as "\\n" (Python's universal newlines)."""
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


JSON_TYPES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list of strings"}
"""How an error names the JSON type of each REQUEST_SETTINGS type."""


def of_type(value: object, kind: type) -> bool:
    """Whether a JSON value is of a REQUEST_SETTINGS type (true and false are not numbers)."""
    if isinstance(value, bool) or kind is bool:
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float))
    if kind is list:
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    return isinstance(value, kind)


def serve(model: OnnxModel, args: argparse.Namespace, lines: Iterable[bytes], out: TextIO) -> None:
    """--stdio: a reply on `out` to each line of `lines` (a JSON request), in order, each flushed as
    soon as it is written: the completion at the request's cursor as --file gives it, or the error
    that kept it from being answered. The request's "id", when given, is echoed; time_ms is the
    request's time in this process, from its line to its reply."""
    for line in lines:
        start, echo = time.perf_counter(), {}
        try:
            fields = request_fields(line)
            echo = {"id": fields["id"]} if "id" in fields else {}
            request = Request.of(fields)
            completer = Completer(model, generation_config(args, request.settings))
            ids = completer.prompt_ids(request.before, keep_last=True, suffix=request.after)
            text = completer.text(completer.new_ids(ids))
            reply = {"completion": text, "prompt_tokens": len(ids), "new_tokens": completer.new_tokens}
            reply["time_ms"] = round((time.perf_counter() - start) * 1000, 1)
        except DslmError as e:
            reply = {"error": str(e)}
        print(json.dumps({**echo, **reply}), file=out, flush=True)


def request_fields(line: bytes) -> dict:
    """The JSON object of a request line. Raises DslmError for a line that is not one."""
    try:
        fields = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise DslmError("a request is UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise DslmError(f"not JSON: {e}") from None
    if not isinstance(fields, dict):
        raise DslmError("a request is a JSON object")
    return fields


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="dslm-complete", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cursor_args(p)
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
    if args.jsonl and args.stdio:
        p.error("--stdio always replies in JSON lines; drop --jsonl")
    if not 0 <= args.threads <= MAX_THREADS:
        p.error(f"--threads {args.threads}: must be within 0..{MAX_THREADS}")
    return args


def add_cursor_args(p: argparse.ArgumentParser) -> None:
    """The export, and where the code to complete comes from: --prompt (and --suffix), --file at
    --line and --column, --prompts or --stdio."""
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
    where.add_argument(
        "--stdio",
        action="store_true",
        help="serve an editor: a JSON request a line on stdin (text, cursor, settings), a JSON reply a line on "
        "stdout, until stdin ends (the format is above)",
    )
    p.add_argument("--line", type=int, metavar="N", help="--file: the cursor's line, 1-based")
    p.add_argument(
        "--column",
        type=int,
        metavar="C",
        help="--file: the cursor is before character C of the line, 1-based, counted in Unicode "
        "characters, a tab as one (default: at its end)",
    )


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


def generation_config(args: argparse.Namespace, settings: dict[str, object] | None = None) -> GenerationConfig:
    """The decoding settings of the command line's options, with `settings` (a --stdio request's,
    REQUEST_SETTINGS) over them. Raises DslmError for a value out of range."""
    chosen = {name: getattr(args, name) for name in REQUEST_SETTINGS} | (settings or {})
    stops = tuple(chosen.pop("stop")) + (() if chosen.pop("multiline") else ("\n",))
    return checked_config(**chosen, stop_strings=stops)


def prompts_of(args: argparse.Namespace) -> list[tuple[str, bool, str | None]]:
    """(prompt, keep_last, suffix) triples: a file's text before the cursor keeps its last tokens,
    and the text after it is the suffix; a prompt given as such must fit."""
    if args.file is not None:
        before, after = cursor_text(args.file, args.line, args.column)
        return [(before, True, after)]
    if args.prompts is not None:
        return [(prompt, False, None) for prompt in read_prompt_set(args.prompts)]
    return [] if args.stdio else [(args.prompt, False, args.suffix)]


def run(args: argparse.Namespace) -> None:
    cfg = generation_config(args)
    prompts = prompts_of(args)
    completer = Completer(OnnxModel(args.export, args.threads), cfg)
    if completer.fim is None and args.suffix is not None:
        raise DslmError(
            f"--suffix: {args.export} was not trained to fill in the middle (no dslm_fim in its config.json); "
            f"complete with --prompt alone, or export a model trained with `dslm-shard build --fim-rate`"
        )
    if completer.fim is None and (args.file is not None or args.stdio):
        print(
            f"dslm-complete: warning: {args.export} was not trained to fill in the middle: the code after the "
            f"cursor is not used",
            file=sys.stderr,
        )
    if args.stdio:
        return serve(completer.model, args, sys.stdin.buffer, sys.stdout)
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
