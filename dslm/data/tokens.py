"""The token contract between the shards and everything that reads them: the special tokens, their
fixed ids, and how a tokenizer is loaded for corpus text. `dslm-shard` writes by it; the loader,
eval, generation and the export read by it."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from dslm.errors import DslmError

SPECIAL_TOKENS = [
    "<pad>", "<unk>", "<bos>", "<eos>",
    "<|im_start|>", "<|im_end|>", "<|instruction|>", "<|response|>",
]
"""Ids 0..7 of every dslm tokenizer, in this order: the model, the loader and the export rely on
<pad>=0 <unk>=1 <bos>=2 <eos>=3. The last four frame instruction data (chat-style markers)."""
PAD_ID = SPECIAL_TOKENS.index("<pad>")
BOS_ID = SPECIAL_TOKENS.index("<bos>")
"""Starts every document in the shards."""
EOS_ID = SPECIAL_TOKENS.index("<eos>")
"""Ends every document in the shards; generation stops on it."""


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
