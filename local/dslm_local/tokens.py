"""How a dslm tokenizer is loaded for text: the same for the corpus (dslm.data.tokens, which
holds the rest of the token contract) and for completion without torch (dslm_local)."""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Tokenizer

from dslm_local.errors import DslmError


def load_text_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer for corpus text: "<bos>" written in a document stays text, never the special id,
    and encode adds no special tokens: dslm adds them itself. (tokenizers does not save the first
    setting in tokenizer.json, so it is set on every load; the post-processor that dslm-export
    writes for transformers, dslm.hf.hf_tokenizer, is dropped.)
    Raises DslmError when `path` is not a file or not a tokenizer `tokenizers` can read.
    """
    if not Path(path).is_file():
        raise DslmError(f"tokenizer {path}: no such file")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception for a file it cannot parse
        raise DslmError(f"tokenizer {path}: not a tokenizer.json ({str(e).splitlines()[0]})") from None
    tok.encode_special_tokens = True
    tok.post_processor = None
    return tok


WINDOW_CHARS_PER_TOKEN = 8
"""The first window of text tried for n tokens: n times this many characters (code averages 3-4
characters a token); each try that holds too few doubles it."""
CODE_LINE_END = re.compile(r"(?<=[!-~])\n")
"""A newline after a printable ASCII character other than a space: dslm's pre-tokenizer
(byte-level, GPT-2's pattern, no prefix space) always splits before it, and what it splits
after it, or before, is the same with the text on the other side of it cut off."""


def last_ids(tokenizer: Tokenizer, text: str, n: int) -> list[int]:
    """The ids of the last `n` tokens of `text` (all, when it has fewer), as encoding the whole
    text gives them, from encoding a window at its end only: a long file before a cursor costs
    what its last lines cost. The window starts at a CODE_LINE_END, so the tokens in it are the
    whole text's; it doubles until it holds n tokens or the whole text."""
    size = n * WINDOW_CHARS_PER_TOKEN
    while n:
        found = CODE_LINE_END.search(text, len(text) - size) if size < len(text) else None
        start = found.start() if found else 0
        ids = tokenizer.encode(text[start:], add_special_tokens=False).ids
        if len(ids) >= n or start == 0:
            return ids[-n:]
        size *= 2
    return []


def first_ids(tokenizer: Tokenizer, text: str, n: int) -> list[int]:
    """The ids of the first `n` tokens of `text` (all, when it has fewer), as encoding the whole
    text gives them, from encoding a window at its start only, which ends at a CODE_LINE_END
    (last_ids says why)."""
    size = n * WINDOW_CHARS_PER_TOKEN
    while n:
        found = CODE_LINE_END.search(text, size)
        end = found.start() if found else len(text)
        ids = tokenizer.encode(text[:end], add_special_tokens=False).ids
        if len(ids) >= n or end == len(text):
            return ids[:n]
        size *= 2
    return []
