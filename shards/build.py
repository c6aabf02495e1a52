"""`dslm-shard tokenizer` and `dslm-shard build`: the two passes over the sources."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from dslm.data.manifest import MANIFEST_NAME, Manifest, SourceStats
from dslm.errors import DslmError
from dslm.files import atomic_write_text, sha256_file
from shards.filters import DocumentFilter, FilterConfig
from shards.sources import Document, Source, skip
from shards.tokenizer import BOS_ID, EOS_ID, load_text_tokenizer, train_tokenizer
from shards.writer import Packer, ShardWriter, split_of

TOKENIZER_NAME = "tokenizer.json"


@dataclass
class ShardConfig:
    out: Path
    """Folder for tokenizer.json, the tar shards and manifest.json."""
    tokenizer: Path
    """Tokenizer to encode with (from `dslm-shard tokenizer`); copied into `out`."""
    seq_len: int = 1024
    """Model context; each sample holds seq_len + 1 tokens (inputs and shifted targets)."""
    samples_per_shard: int = 10_000
    val_fraction: float = 0.01
    """Share of documents (by content hash) that go to the val split."""
    batch_documents: int = 256
    """Documents encoded together by `Tokenizer.encode_batch`."""
    overwrite: bool = False
    filters: FilterConfig = field(default_factory=FilterConfig)

    def __post_init__(self) -> None:
        if self.seq_len < 1 or self.samples_per_shard < 1 or self.batch_documents < 1:
            raise DslmError("seq_len, samples_per_shard and batch_documents must be positive")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DslmError(f"val_fraction {self.val_fraction} must be in [0, 1)")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def kept_documents(source: Source, doc_filter: DocumentFilter, stats: SourceStats) -> Iterator[Document]:
    """The source's documents that pass the filters, as kept (long headers stripped); drops are
    counted by reason in `stats`."""
    for doc in source.documents(stats):
        verdict = doc_filter.apply(doc)
        stats.headers_stripped += verdict.header_stripped
        if verdict.text is None:
            skip(stats, verdict.reason)
            continue
        yield replace(doc, text=verdict.text)


@dataclass
class TokenizerSample:
    """The training text drawn from each source, and a slice of it per (source, language) kept
    aside to report tokens per byte once the tokenizer exists."""

    sample_bytes: int
    report_bytes: int = 1 << 20
    report: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def texts(self, sources: list[Source], doc_filter: DocumentFilter) -> Iterator[str]:
        """Each source's filtered documents until its share of `sample_bytes` (by weight)."""
        total_weight = sum(s.weight for s in sources)
        for source in sources:
            budget, taken = self.sample_bytes * source.weight / total_weight, 0
            for doc in kept_documents(source, doc_filter, SourceStats()):
                if taken >= budget:
                    break
                taken += len(doc.text.encode())
                self._keep_for_report((source.spec, doc.language), doc.text)
                yield doc.text

    def _keep_for_report(self, group: tuple[str, str], text: str) -> None:
        texts = self.report.setdefault(group, [])
        if sum(map(len, texts)) < self.report_bytes:
            texts.append(text)

    def tokens_per_byte(self, tok: Tokenizer) -> dict[tuple[str, str], float]:
        return {group: sum(len(e.ids) for e in tok.encode_batch(texts)) / sum(len(t.encode()) for t in texts)
                for group, texts in self.report.items()}


def train_and_save_tokenizer(sources: list[Source], vocab_size: int, sample_bytes: int, out: Path,
                             filters: FilterConfig | None = None) -> dict[tuple[str, str], float]:
    """Train on a weighted, filtered sample of the sources, write `out`, and return tokens per
    byte for each (source, language)."""
    sample = TokenizerSample(sample_bytes)
    texts = tqdm(sample.texts(sources, DocumentFilter(filters)), desc="tokenizer", unit="doc")
    tok = train_tokenizer(texts, vocab_size)
    if texts.n == 0:
        raise DslmError("no text to train the tokenizer on: the sources are empty or everything was filtered")
    atomic_write_text(out, tok.to_str())
    tok.encode_special_tokens = True  # measure as the build encodes
    return sample.tokens_per_byte(tok)


def batched(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    it = iter(docs)
    while batch := list(islice(it, size)):
        yield batch


def build_shards(cfg: ShardConfig, sources: list[Source]) -> Manifest:
    """Encode every document, frame it <bos> ... <eos>, pack and write train/val shards, then the manifest."""
    tok = load_text_tokenizer(cfg.tokenizer)
    dtype = token_dtype(tok.get_vocab_size())
    prepare_out(cfg)
    sample_len = cfg.seq_len + 1
    packers = {split: Packer(sample_len, dtype) for split in ("train", "val")}
    writers = {split: ShardWriter(cfg.out, split, cfg.samples_per_shard) for split in ("train", "val")}
    stats = {s.spec: SourceStats() for s in sources}
    doc_filter = DocumentFilter(cfg.filters)  # one for all sources: dedup is across the whole build
    progress = tqdm(desc="build", unit="doc")
    for source in sources:
        for batch in batched(kept_documents(source, doc_filter, stats[source.spec]), cfg.batch_documents):
            for doc, enc in zip(batch, tok.encode_batch([d.text for d in batch])):
                ids = [BOS_ID, *enc.ids, EOS_ID]
                record(stats[source.spec], doc, len(ids))
                split = split_of(doc.text, cfg.val_fraction)
                for sample in packers[split].add(ids):
                    writers[split].add(sample)
            progress.update(len(batch))
            progress.set_postfix(tokens=sum(s.tokens for s in stats.values()))
    progress.close()
    manifest = Manifest(
        tokenizer=TOKENIZER_NAME,
        tokenizer_sha256=sha256_file(cfg.out / TOKENIZER_NAME),
        vocab_size=tok.get_vocab_size(),
        seq_len=cfg.seq_len,
        dtype=dtype.name,
        shards=[e for w in writers.values() for e in w.close(sample_len)],
        sources=stats,
    )
    if not manifest.split("train"):
        raise DslmError(f"too little text for one training sample of {sample_len} tokens")
    manifest.save(cfg.out)
    return manifest


def record(stats: SourceStats, doc: Document, tokens: int) -> None:
    stats.documents += 1
    stats.bytes += len(doc.text.encode())
    stats.tokens += tokens


def prepare_out(cfg: ShardConfig) -> None:
    """Create `out`, refuse to clobber a finished build unless asked, and place the tokenizer in it."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    manifest = cfg.out / MANIFEST_NAME
    if manifest.exists():
        if not cfg.overwrite:
            raise DslmError(f"{cfg.out} already holds a finished build; pass --overwrite to replace it")
        old = Manifest.load(cfg.out)
        manifest.unlink()  # the old build stops being valid before any of its shards goes
        for entry in old.shards:
            (cfg.out / entry.name).unlink(missing_ok=True)
    target = cfg.out / TOKENIZER_NAME
    if not target.exists() or not target.samefile(cfg.tokenizer):
        shutil.copyfile(cfg.tokenizer, cfg.out / f".{TOKENIZER_NAME}.tmp")
        (cfg.out / f".{TOKENIZER_NAME}.tmp").replace(target)
