"""The tokenizer's sample: long runs without whitespace (or of whitespace) are cut and capped, so
that training costs bounded time per character whatever the text (issue 15, item 10)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from dslm.errors import DslmError
from dslm_shards.tokenizer import (
    MAX_VOCAB_SIZE,
    MIN_VOCAB_SIZE,
    SAMPLE_PIECE_CHARS,
    SAMPLE_RUN_CHARS,
    sample_pieces,
    train_tokenizer,
)

RUNS = re.compile(r"\S+|\s+")


def longest_run(texts):
    return max(len(run.group()) for text in texts for run in RUNS.finditer(text))


@pytest.mark.parametrize("unit", ["x", "ab", "中", "!#", "0", " ", "\n", "\t "])
def test_a_million_character_run_is_cut_into_pieces_and_capped(unit):
    text = "before " + unit * 1_000_000 + " after."
    pieces = sample_pieces(text)
    assert longest_run(pieces) <= SAMPLE_PIECE_CHARS
    assert sum(map(len, pieces)) <= SAMPLE_RUN_CHARS + len("before  after.") + 2
    assert pieces[0].startswith("before") and pieces[-1].endswith("after.")


@pytest.mark.parametrize(
    "length, cut", [(SAMPLE_PIECE_CHARS, False), (SAMPLE_PIECE_CHARS + 1, True), (SAMPLE_RUN_CHARS, True)]
)
def test_runs_up_to_the_cap_lose_nothing(length, cut):
    text = "x = 1  # " + "=" * length + "\n    return x\n"
    pieces = sample_pieces(text)
    assert "".join(pieces) == text
    assert (len(pieces) > 1) == cut
    assert longest_run(pieces) <= SAMPLE_PIECE_CHARS


def test_only_a_run_past_the_cap_loses_characters():
    text = "a" * (SAMPLE_RUN_CHARS + 5) + " b"
    assert "".join(sample_pieces(text)) == "a" * SAMPLE_RUN_CHARS + " b"


def test_ordinary_text_is_one_piece_unchanged():
    text = "def f(x):\n    return x  # café 中文 https://example.com/a/b?c=d\n\n\tplain words\n"
    assert sample_pieces(text) == [text]
    assert sample_pieces("") == []


def test_the_trainer_never_sees_a_run_longer_than_a_piece():
    """Trained on one huge word, the vocab would hold tokens thousands of letters long (x, xx,
    xxxx, ...): it holds none longer than a piece, so the trainer saw only pieces."""
    tok = train_tokenizer(["x" * 5_000 + " end", "y" * 300 + " end"], vocab_size=600)
    longest = max(len(token) for token in tok.get_vocab())
    assert 8 < longest <= SAMPLE_PIECE_CHARS


def test_the_command_reports_the_vocab_it_learned_and_warns_when_smaller(code_corpus, tmp_path):
    """Asked for more tokens than the sample has pairs to merge, the trainer stops early: the line
    says how many it learned, and a warning says why, instead of echoing --vocab-size."""
    out = tmp_path / "tokenizer.json"
    proc = subprocess.run(
        [
            Path(sys.executable).parent / "dslm-shard",
            "tokenizer",
            "--source",
            f"code:{code_corpus / 'json'}",
            "--vocab-size",
            "70000",
            "--out",
            out,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    learned = Tokenizer.from_file(str(out)).get_vocab_size()
    assert proc.returncode == 0 and MIN_VOCAB_SIZE < learned < 70_000, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == f"wrote {out} (vocab {learned:,})"
    assert f"dslm-shard: warning: --vocab-size 70,000 asked for, {learned:,} learned" in proc.stderr


@pytest.mark.parametrize("vocab_size", [-1, 0, MIN_VOCAB_SIZE - 1, MAX_VOCAB_SIZE + 1, 10**9])
def test_a_vocab_size_out_of_range_is_refused_before_training(vocab_size):
    with pytest.raises(DslmError, match=f"--vocab-size {vocab_size} must be within 264..1,048,576"):
        train_tokenizer(["some text"], vocab_size=vocab_size)
