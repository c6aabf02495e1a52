"""The token contract between the shards and everything that reads them: the special tokens, their
fixed ids, and how a tokenizer is loaded for corpus text (load_text_tokenizer, whose home is
dslm_local.tokens, for dslm-complete without torch). `dslm-shard` writes by it; the loader, eval,
generation and the export read by it."""

from __future__ import annotations

from dslm_local.fim import FIM_TOKENS
from dslm_local.tokens import load_text_tokenizer

__all__ = ["SPECIAL_TOKENS", "FIM_TOKENS", "PAD_ID", "BOS_ID", "EOS_ID", "load_text_tokenizer", "special_tokens"]

SPECIAL_TOKENS = [
    "<pad>",
    "<unk>",
    "<bos>",
    "<eos>",
    "<|im_start|>",
    "<|im_end|>",
    "<|instruction|>",
    "<|response|>",
]
"""Ids 0..7 of every dslm tokenizer, in this order: the model, the loader and the export rely on
<pad>=0 <unk>=1 <bos>=2 <eos>=3. The last four frame instruction data (chat-style markers)."""
PAD_ID = SPECIAL_TOKENS.index("<pad>")
BOS_ID = SPECIAL_TOKENS.index("<bos>")
"""Starts every document in the shards."""
EOS_ID = SPECIAL_TOKENS.index("<eos>")
"""Ends every document in the shards; generation stops on it."""


def special_tokens(fim: bool = False) -> list[str]:
    """The special tokens of a tokenizer, in id order: SPECIAL_TOKENS, then with `fim` the four
    FIM tokens (dslm_local.fim), ids 8..11."""
    return SPECIAL_TOKENS + (FIM_TOKENS if fim else [])
