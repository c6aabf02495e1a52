"""What eval reads from a shard folder's val split: samples labelled by language, the held-out
documents of each language as text, and how many bytes each token stands for."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset
from tqdm import tqdm

from dslm.data.loader import ShardSamples
from dslm.data.tokens import BOS_ID, EOS_ID, SPECIAL_TOKENS


class LabeledSamples(Dataset):
    """(sample {"input_ids", "labels"}, language index) for each sample of a split; `languages[i]`
    names index i."""

    def __init__(self, samples: ShardSamples):
        self.samples = samples
        self.seq_len = samples.seq_len
        names = [samples.language(i) for i in range(len(samples))]
        self.languages = sorted(set(names))
        self.labels = [self.languages.index(name) for name in names]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], int]:
        return self.samples[index], self.labels[index]


def token_bytes(tokenizer: Tokenizer, vocab_size: int) -> torch.Tensor:
    """(V,) UTF-8 bytes of text each token id decodes to: a byte-level BPE token's string has one
    character per byte; special tokens stand for no text. Bits per byte divide by these, which
    makes losses of models with different tokenizers comparable."""
    special = set(SPECIAL_TOKENS)
    sizes = [0 if (t := tokenizer.id_to_token(i)) is None or t in special else len(t) for i in range(vocab_size)]
    return torch.tensor(sizes, dtype=torch.int64)


def heldout_documents(
    samples: LabeledSamples, tokenizer: Tokenizer, languages: set[str], limit: int
) -> dict[str, list[str]]:
    """Up to `limit` whole val documents per language, as text. The samples of one language,
    in order, are that language's packed stream cut into pieces, so their concatenation holds
    whole documents framed <bos> ... <eos>; a document cut off at the end of the stream is left out."""
    streams: dict[str, list[np.ndarray]] = defaultdict(list)
    for i in tqdm(range(len(samples)), desc="held-out documents", unit="sample", leave=False):
        if (language := samples.languages[samples.labels[i]]) in languages:  # labels read once, at init
            streams[language].append(samples.samples[i]["input_ids"].numpy())
    documents = {}
    for language, parts in streams.items():
        framed = split_documents(np.concatenate(parts))[:limit]
        documents[language] = [tokenizer.decode(ids.tolist(), skip_special_tokens=False) for ids in framed]
    return documents


def split_documents(stream: np.ndarray) -> list[np.ndarray]:
    """The token ids between each <bos> and its <eos>, for the documents complete in `stream`."""
    starts = np.flatnonzero(stream == BOS_ID)
    ends = np.flatnonzero(stream == EOS_ID)
    first_end = np.searchsorted(ends, starts)  # the <eos> closing each <bos>
    return [stream[start + 1 : ends[j]] for start, j in zip(starts, first_end) if j < len(ends)]
