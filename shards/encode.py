"""The per-document work of `dslm-shard build` that needs no shared state: the filter rules,
the dedup digest, the split and the tokens. It runs in worker processes, one batch at a time;
the main process keeps everything that depends on order (dedup, packing, writing)."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np

from dslm.data.fim import FimConfig, FimCut, fim_cut, fim_layout, fim_pieces
from dslm.data.tokens import BOS_ID, EOS_ID, load_text_tokenizer
from dslm_local.fim import FimIds
from dslm_shards.filters import DocumentFilter, FilterConfig, text_digest
from dslm_shards.sources import Document
from dslm_shards.writer import split_of

T = TypeVar("T")
R = TypeVar("R")
Work = tuple[list[Document], float]
"""A batch of documents, and the weight of the source they came from."""


def copies(digest: bytes, weight: float) -> int:
    """How many times a document of a source with this weight is written: floor(weight), plus one
    more for a share frac(weight) of documents chosen by their digest."""
    whole, fraction = divmod(weight, 1.0)
    return int(whole) + (int.from_bytes(digest[:8], "little") / 2**64 < fraction)


@dataclass(frozen=True)
class Encoded:
    """One document after the stateless rules: dropped for `reason`, or its framed tokens."""

    reason: str | None
    header_stripped: bool = False
    digest: bytes = b""
    split: str = "train"
    bytes: int = 0
    """UTF-8 size of the kept text."""
    copies: tuple[np.ndarray, ...] = ()
    """What is written of it: <bos> tokens <eos> in the shard dtype, once per copy that its source's
    weight asks for (`copies`; a val document at most once), none when it is downsampled. With
    EncoderConfig.fim each copy of a train document has its own cut (dslm.data.fim), else the copies
    are one array."""


@dataclass(frozen=True)
class EncoderConfig:
    """What each worker of `dslm-shard build` needs to filter, split and tokenize documents on its
    own; build_shards makes it from its ShardConfig, whose checks cover the values, and every worker
    process gets a pickled copy. No checks of its own."""

    tokenizer: Path
    """tokenizer.json that each worker loads (the copy in the build's `out` folder)."""
    filters: FilterConfig
    """Thresholds of the filter rules, applied without dedup (the main process drops duplicates)."""
    val_fraction: float
    """Share of documents sent to the val split by a hash of their kept text, in [0, 1)
    (ShardConfig.val_fraction)."""
    dtype: str
    """numpy dtype name of the framed token arrays, "uint16" or "uint32" (ShardConfig's "auto"
    already resolved for the vocab)."""
    tokenize: bool = True
    """False: filter, split and digest only (stage `digests` of a distributed build); no `copies`."""
    fim: FimConfig = field(default_factory=FimConfig)
    """Fill-in-the-middle for the train split (ShardConfig.fim, whose tokens the tokenizer holds)."""


class Encoder:
    def __init__(self, cfg: EncoderConfig):
        self.tok = load_text_tokenizer(cfg.tokenizer)
        self.filter = DocumentFilter(cfg.filters)
        self.cfg = cfg
        self.fim_ids = FimIds.of(self.tok) if cfg.fim.enabled else None

    def __call__(self, work: Work) -> list[Encoded]:
        docs, weight = work
        verdicts = [self.filter.check(doc) for doc in docs]
        kept = [v.text for v in verdicts if v.text is not None]
        if not self.cfg.tokenize:
            return [
                Encoded(None, v.header_stripped, text_digest(v.text)) if v.text is not None else Encoded(v.reason)
                for v in verdicts
            ]
        splits = [split_of(text, self.cfg.val_fraction) for text in kept]
        digests = [text_digest(text) for text in kept]
        n_copies = [
            copies(digest, weight) if split == "train" else min(1, copies(digest, weight))  # val: at most once
            for digest, split in zip(digests, splits)
        ]
        cuts = [self.cuts(text, split, n) for text, split, n in zip(kept, splits, n_copies)]
        # encode_batch_fast skips the character offsets, which shards never use
        pieces = [piece for text, cuts_of in zip(kept, cuts) for cut in cuts_of for piece in fim_pieces(text, cut)]
        encodings = iter(self.tok.encode_batch_fast(pieces))

        def framed(text: str, cut: FimCut | None) -> np.ndarray:
            return self.frame(fim_layout(self.fim_ids, cut, [next(encodings).ids for _ in fim_pieces(text, cut)]))

        written = iter([[framed(text, cut) for cut in cuts_of] for text, cuts_of in zip(kept, cuts)])
        places = iter(zip(digests, splits, n_copies))
        return [
            self.encoded(v.text, v.header_stripped, next(written), *next(places))
            if v.text is not None
            else Encoded(v.reason)
            for v in verdicts
        ]

    def cuts(self, text: str, split: str, n: int) -> list[FimCut | None]:
        """What is encoded of each of a document's `n` copies: with FIM, a train document's copy k
        is cut for copy k (dslm.data.fim); else one encoding (None: whole) serves every copy."""
        if self.fim_ids is None or split != "train":
            return [None] if n else []
        return [fim_cut(text, self.cfg.fim, copy) for copy in range(n)]

    def frame(self, ids: list[int]) -> np.ndarray:
        framed = np.empty(len(ids) + 2, dtype=self.cfg.dtype)
        framed[0], framed[1:-1], framed[-1] = BOS_ID, ids, EOS_ID
        return framed

    @staticmethod
    def encoded(
        text: str, header_stripped: bool, framed: list[np.ndarray], digest: bytes, split: str, n: int
    ) -> Encoded:
        return Encoded(
            reason=None,
            header_stripped=header_stripped,
            digest=digest,
            split=split,
            bytes=len(text.encode()),
            copies=tuple(framed) if len(framed) == n else n * (framed[0],),  # one encoding for every copy
        )


_worker_encoder: Encoder | None = None


def start_worker(cfg: EncoderConfig) -> None:
    global _worker_encoder
    # One tokenizer thread per worker: the workers are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encoder = Encoder(cfg)


def encode_in_worker(work: Work) -> list[Encoded]:
    assert _worker_encoder is not None, "start_worker did not run"
    return _worker_encoder(work)


def encode_batches(
    cfg: EncoderConfig, batches: Iterable[T], work_of: Callable[[T], Work], workers: int
) -> Iterator[tuple[T, list[Encoded]]]:
    """Each batch with its encoded documents, in input order. `workers` processes encode at most
    2 x `workers` batches ahead of the consumer, so memory stays bounded; 0 encodes inline."""
    if workers == 0:
        encoder = Encoder(cfg)
        yield from ((batch, encoder(work_of(batch))) for batch in batches)
        return
    with ProcessPoolExecutor(
        workers, mp_context=get_context("spawn"), initializer=start_worker, initargs=(cfg,)
    ) as pool:
        pending: deque[tuple[T, Future[list[Encoded]]]] = deque()
        for batch in batches:
            pending.append((batch, pool.submit(encode_in_worker, work_of(batch))))
            if len(pending) >= 2 * workers:
                yield next_result(pending)
        while pending:
            yield next_result(pending)


def next_result(pending: deque[tuple[T, Future[R]]]) -> tuple[T, R]:
    batch, future = pending.popleft()
    return batch, future.result()
