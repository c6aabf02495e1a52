"""Byte-level BPE tokenizer (HF `tokenizers`) with dslm's fixed special tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# Fixed ids: the model and the loader rely on <pad>=0 <unk>=1 <bos>=2 <eos>=3.
SPECIAL_TOKENS = [
    "<pad>", "<unk>", "<bos>", "<eos>",
    "<|im_start|>", "<|im_end|>", "<|instruction|>", "<|response|>",
]
BOS_ID = SPECIAL_TOKENS.index("<bos>")
EOS_ID = SPECIAL_TOKENS.index("<eos>")


def new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Learn merges from `texts`; every byte is in the base alphabet, so nothing is ever <unk>."""
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok = new_tokenizer()
    tok.train_from_iterator(texts, trainer)
    return tok


def load_text_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer for corpus text: "<bos>" written in a document stays text, never the special id.

    (tokenizers does not save this setting in tokenizer.json, so it is set on every load.)
    """
    tok = Tokenizer.from_file(str(path))
    tok.encode_special_tokens = True
    return tok
