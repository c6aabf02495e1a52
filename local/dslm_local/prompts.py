"""Prompts from files, as dslm-generate and dslm-complete read them."""

from __future__ import annotations

import json
from pathlib import Path

from dslm_local.errors import DslmError


def read_text(path: Path, option: str) -> str:
    """The UTF-8 text of a prompt file, a byte-order mark dropped (as dslm-shard drops it);
    DslmError naming `option` when it is missing, a folder or not text."""
    if not path.is_file():
        raise DslmError(f"{option} {path}: {'a folder, not a file' if path.is_dir() else 'no such file'}")
    try:
        return path.read_text(encoding="utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise DslmError(f"{option} {path}: not UTF-8 text") from None


def read_prompt_set(path: Path) -> list[str]:
    """One prompt per non-empty line, or per .jsonl record's "prompt". Raises DslmError naming the
    line of a record that is not JSON or lacks a string "prompt"."""
    lines = [(n, line) for n, line in enumerate(read_text(path, "--prompts").splitlines(), 1) if line.strip()]
    if path.suffix != ".jsonl":
        return [line for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            prompt = json.loads(line).get("prompt")
        except (json.JSONDecodeError, AttributeError):
            prompt = None
        if not isinstance(prompt, str):
            raise DslmError(f'{path}:{n}: not a JSON object with a string "prompt"')
        prompts.append(prompt)
    return prompts
