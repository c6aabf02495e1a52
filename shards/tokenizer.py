"""Training the byte-level BPE tokenizer (HF `tokenizers`) with dslm's fixed special tokens
(dslm.data.tokens holds them and the loading rule)."""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from dslm.data.tokens import SPECIAL_TOKENS


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

