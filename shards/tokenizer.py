"""Training the byte-level BPE tokenizer (HF `tokenizers`) with dslm's fixed special tokens
(dslm.data.tokens holds them and the loading rule)."""

from __future__ import annotations

import re
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from dslm.data.tokens import SPECIAL_TOKENS, special_tokens
from dslm.errors import DslmError

SAMPLE_PIECE_CHARS = 64
"""Longest run of non-whitespace (or of whitespace) characters that the tokenizer's trainer sees
whole; a longer run is cut into pieces of this many characters, trained on as separate texts.
The trainer's cost per run grows faster than quadratically with the run's length (measured on 2
cores: a 100,000-letter word 4-8 s, 100,000 CJK characters ~1 min, 1,000,000 letters minutes), as
every merge rescans each word holding the pair. 64 is
far past any token worth learning (SentencePiece's max_sentencepiece_length defaults to 16) and
leaves ordinary words, identifiers and URLs whole."""
SAMPLE_RUN_CHARS = 1000
"""Characters of a long run kept in the tokenizer's sample; the rest of the run is left out. Runs
this long are data, not words (the code filter's max_line_length, 1,000 as in Codex and
StarCoder), and their first 1,000 characters show the trainer their pairs; the cap keeps one
pathological document from costing more than this per run (bench/RESULTS.md)."""
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
"""The byte-level alphabet and dslm's special tokens: every tokenizer holds them before its first
merge, so a smaller --vocab-size would still give this many."""
MAX_VOCAB_SIZE = 1 << 20
"""Largest --vocab-size, 1,048,576: above the largest vocabularies in use (XLM-V's 901,629; GPT-4o's
o200k, Gemma's 262,144), and where one embedding table of a 1,024-wide model alone holds 1.07B
parameters, past the largest model dslm trains. (The shards' uint32 would hold 2**32 ids; the BPE
trainer reserves about 71 bytes per id asked for before reading any text, so --vocab-size
1000000000 made it abort, asking for 71 GB.)"""
LONG_RUN = re.compile(rf"\S{{{SAMPLE_PIECE_CHARS + 1},}}|\s{{{SAMPLE_PIECE_CHARS + 1},}}")


def new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def sample_pieces(text: str) -> list[str]:
    """`text` as the tokenizer's trainer sees it: cut into pieces so that none holds a run of more
    than SAMPLE_PIECE_CHARS characters without whitespace (or of whitespace), a run's characters
    past SAMPLE_RUN_CHARS left out. Runs are measured in characters (str length), before NFKC.
    Only the sample is cut; `dslm-shard build` encodes documents whole."""
    pieces: list[str] = []
    start = 0
    for run in LONG_RUN.finditer(text):
        kept = min(run.end(), run.start() + SAMPLE_RUN_CHARS)
        for cut in range(run.start() + SAMPLE_PIECE_CHARS, kept, SAMPLE_PIECE_CHARS):
            pieces.append(text[start:cut])
            start = cut
        pieces.append(text[start:kept])
        start = run.end()
    pieces.append(text[start:])
    return [piece for piece in pieces if piece]


def check_vocab_size(vocab_size: int, fim: bool = False) -> None:
    """DslmError for a --vocab-size outside MIN_VOCAB_SIZE..MAX_VOCAB_SIZE (with `fim`, the four FIM
    tokens on top of the minimum)."""
    least = MIN_VOCAB_SIZE + len(special_tokens(fim)) - len(SPECIAL_TOKENS)
    if not least <= vocab_size <= MAX_VOCAB_SIZE:
        raise DslmError(
            f"--vocab-size {vocab_size} must be within {least:,}..{MAX_VOCAB_SIZE:,} (the 256 "
            f"bytes and {len(special_tokens(fim))} special tokens come first)"
        )


def train_tokenizer(texts: Iterable[str], vocab_size: int, fim: bool = False) -> Tokenizer:
    """Learn merges from `texts`, each cut by `sample_pieces` (which bounds the trainer's cost per
    character); every byte is in the base alphabet, so nothing is ever <unk>. The vocabulary holds
    at most `vocab_size` tokens (check_vocab_size), fewer when the text has no more pairs to merge;
    its special tokens are dslm.data.tokens.special_tokens(fim). Raises DslmError for a vocab_size
    out of range."""
    check_vocab_size(vocab_size, fim)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens(fim),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok = new_tokenizer()
    tok.train_from_iterator((sample_pieces(text) for text in texts), trainer)
    return tok
