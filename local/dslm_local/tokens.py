"""How a dslm tokenizer is loaded for text: the same for the corpus (dslm.data.tokens, which
holds the rest of the token contract) and for completion without torch (dslm_local)."""

from __future__ import annotations

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
