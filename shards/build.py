"""`dslm-shard tokenizer` and `dslm-shard build`: the two passes over the sources."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from dslm.data.fim import FimConfig, check_fim_tokens, fim_record
from dslm.data.manifest import MANIFEST_NAME, Manifest, ShardEntry, SourceStats, check_build_tokenizer, shard_problem
from dslm.data.tokens import load_text_tokenizer
from dslm.errors import DslmError
from dslm.files import atomic_copy, atomic_write_text, check_creatable, exclusive, make_folder, sha256_file, tmp_path
from dslm.logs import warning
from dslm.memory import USABLE, available_host_memory, gib
from dslm_shards.dedup import (
    DocPosition,
    ListedDuplicates,
    SeenDigests,
    Stamp,
    find_duplicates,
    is_done,
    lock_file,
    records,
    write_digest_buckets,
)
from dslm_shards.encode import Encoded, EncoderConfig, encode_batches
from dslm_shards.filters import DocumentFilter, FilterConfig
from dslm_shards.journal import DIGEST_BYTES, DIGESTS_NAME, BuildState, Position, load_state, remove_journal, save_state
from dslm_shards.sources import Document, Partition, Source, Units, skip
from dslm_shards.tasks import (
    LOCK_NAME,
    TaskTails,
    clear_build,
    finished_task,
    refuse_finished,
    refuse_tasks,
    remove_finished_build,
    remove_unfinished_build,
    save_tails,
    task_dir,
)
from dslm_shards.tokenizer import check_vocab_size, train_tokenizer
from dslm_shards.verify import count_samples
from dslm_shards.writer import TOKENIZER_NAME, Packer, ShardWriter, check_packing, shard_path, warn_unsampled


@dataclass
class ShardConfig:
    """The settings of `dslm-shard build`; all but `filters`, `batch_documents` and `batch_bytes`
    are its options. Raises DslmError for a value out of its range."""

    out: Path
    """Output folder (created if missing) for tokenizer.json, the train/val tar shards and
    manifest.json, and for the journal of a build not finished yet (--out)."""
    tokenizer: Path
    """tokenizer.json to encode with, from `dslm-shard tokenizer` (--tokenizer); copied into `out`
    unless it is that file. Its vocab must fit `dtype`."""
    seq_len: int = 1024
    """Model context in tokens, within 1..MAX_SEQ_LEN (--seq-len; dslm_shards.writer); each sample holds
    seq_len + 1 tokens (inputs and the targets shifted by one). Training on the shards needs
    model.block_size >= seq_len."""
    samples_per_shard: int = 10_000
    """Samples per tar shard, >= 1 (--samples-per-shard); the last shard of each split holds the
    rest. The build journals its progress each time a shard is finished, so a rerun after a crash
    redoes at most the work since then."""
    val_fraction: float = 0.01
    """Share of documents that go to the val split, in [0, 1) (--val-fraction): chosen by a hash
    of the kept text (in steps of 1e-6), so a document and its duplicates sit in one split. A val
    document is written at most once, whatever its source's weight."""
    dtype: str = "auto"
    """Token dtype in the shards (--dtype): "uint16", "uint32", or "auto" (uint16 when the vocab
    has at most 65,536 ids, else uint32); one too small for the vocab is an error."""
    workers: int = field(default_factory=lambda: all_cores())
    """Processes that filter and tokenize, >= 0 (--workers), as many as the available memory holds
    (WORKER_BYTES each); 0 does it in the main process.
    Default: every core this process may use (its CPU affinity). The output is the same for any
    number."""
    batch_documents: int = 256
    """Most documents in one batch, the unit a worker encodes at once, >= 1."""
    batch_bytes: int = 1 << 20
    """Text in one batch, in characters (str length; bytes for ASCII text), >= 1: a batch ends
    once its documents reach this much, so its last document may pass it. With `batch_documents`
    and at most 2 batches per worker in flight, this bounds the text in flight. Neither batch
    size changes the output."""
    overwrite: bool = False
    """Replace a finished build in `out`, or start an unfinished one over (--overwrite). Without
    it a finished build is an error, and an unfinished one is resumed (an error if it was of
    other sources or settings)."""
    fim: FimConfig = field(default_factory=FimConfig)
    """Fill-in-the-middle for the train split (dslm.data.fim; --fim-rate, --fim-spm-rate): off by
    default. The tokenizer must hold the FIM tokens (`dslm-shard tokenizer --fim`)."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """Thresholds of the document filters (dslm_shards.filters.FilterConfig); no option sets them.
    Part of the settings a resumed build must share, with seq_len, samples_per_shard,
    val_fraction, dtype, the tokenizer and the sources."""

    def __post_init__(self) -> None:
        check_packing(self.seq_len, self.samples_per_shard)
        if min(self.batch_documents, self.batch_bytes) < 1:
            raise DslmError("batch_documents and batch_bytes must be positive")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DslmError(f"val_fraction {self.val_fraction} must be in [0, 1)")
        if self.workers < 0:
            raise DslmError(f"workers {self.workers} must not be negative")
        if self.workers * WORKER_BYTES > USABLE * (available := available_host_memory()):
            raise DslmError(
                f"--workers {self.workers} would take at least {gib(self.workers * WORKER_BYTES)} (each "
                f"worker process about {WORKER_BYTES >> 20} MiB), more than {USABLE:.0%} of the "
                f"{gib(available)} of memory available; use at most {int(USABLE * available) // WORKER_BYTES} "
                f"(this process may use {all_cores()} cores)"
            )
        if self.dtype not in DTYPES:
            raise DslmError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")


WORKER_BYTES = 100 << 20
"""Memory one --workers process takes at least: a spawned interpreter with tokenizers and numpy
(98 MB of RSS measured on 2 cores) and its two batches in flight."""


def all_cores() -> int:
    """The cores this process may run on (its CPU affinity, which SLURM and taskset narrow)."""
    return len(os.sched_getaffinity(0))


DTYPES = {"auto": None, "uint16": np.dtype(np.uint16), "uint32": np.dtype(np.uint32)}


def token_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    """The dtype that holds every id of the vocab: `requested`, or the smallest for "auto"."""
    dtype = DTYPES[requested] or (np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32))
    if vocab_size - 1 > np.iinfo(dtype).max:
        raise DslmError(
            f"the tokenizer's vocab of {vocab_size:,} ids does not fit {dtype.name} "
            f"(ids up to {np.iinfo(dtype).max:,}); use --dtype uint32"
        )
    return dtype


def kept_documents(
    source: Source, doc_filter: DocumentFilter, stats: SourceStats, units: Units | None = None
) -> Iterator[Document]:
    """The source's documents (of the selected units) that pass the filters, as kept (long
    headers stripped); drops are counted by reason in `stats`."""
    for doc in source.documents(stats, units):
        verdict = doc_filter.apply(doc)
        stats.headers_stripped += verdict.header_stripped
        if verdict.text is None:
            skip(stats, verdict.reason)
            continue
        yield replace(doc, text=verdict.text)


TOKENIZER_PARTS = 64
"""Contiguous runs of units that a source's tokenizer sample is drawn from, in equal shares."""


def spread(units: int, parts: int) -> list[range]:
    """`units` unit indices cut into at most `parts` contiguous runs of near-equal length."""
    parts = max(1, min(parts, units))
    return [range(units * i // parts, units * (i + 1) // parts) for i in range(parts)]


@dataclass
class TokenizerSample:
    """The training text drawn from each source, and a slice of it per (source, language) kept
    aside to report tokens per byte once the tokenizer exists."""

    sample_bytes: int
    report_bytes: int = 1 << 20
    report: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    parts: int = TOKENIZER_PARTS

    def texts(self, sources: list[Source], doc_filter: DocumentFilter) -> Iterator[str]:
        """Each source's filtered documents until its share of `sample_bytes` (by weight), drawn
        from the start of each of `parts` even runs of its units (what a run does not use passes
        to the next), so that the sample spans the source as a distributed build does."""
        total_weight = sum(s.weight for s in sources)
        for source in sources:
            budget, taken = self.sample_bytes * source.weight / total_weight, 0
            runs = spread(source.units(), self.parts)
            for i, run in enumerate(runs):
                share = budget * (i + 1) / len(runs)
                for doc in kept_documents(source, doc_filter, SourceStats(), run.__contains__):
                    if taken >= share:
                        break
                    taken += len(doc.text.encode())
                    self._keep_for_report((source.spec, doc.language), doc.text)
                    yield doc.text

    def _keep_for_report(self, group: tuple[str, str], text: str) -> None:
        texts = self.report.setdefault(group, [])
        if sum(map(len, texts)) < self.report_bytes:
            texts.append(text)

    def tokens_per_byte(self, tok: Tokenizer) -> dict[tuple[str, str], float]:
        # encode_batch_fast, as the build's workers: the same ids, without the character offsets
        return {
            group: sum(len(e.ids) for e in tok.encode_batch_fast(texts)) / sum(len(t.encode()) for t in texts)
            for group, texts in self.report.items()
        }


def train_and_save_tokenizer(
    sources: list[Source],
    vocab_size: int,
    sample_bytes: int,
    out: Path,
    filters: FilterConfig | None = None,
    overwrite: bool = False,
    fim: bool = False,
) -> dict[tuple[str, str], float]:
    """Train on a weighted, filtered sample of the sources, write `out`, and return tokens per
    byte for each (source, language). Raises DslmError, before reading anything, for a vocab_size
    or sample_bytes out of range, or when `out` exists and not `overwrite`: a tokenizer replaced
    under shards built with it would make their ids mean other text (every reader checks it
    against the manifest, Manifest.tokenizer_file), or a folder above `out` that is a file. With
    `fim`, the tokenizer holds the four FIM tokens (dslm_local.fim) after dslm's own."""
    check_creatable(out)
    if out.is_dir():
        raise DslmError(f"{out} is a folder; name the file to write, e.g. {out / TOKENIZER_NAME}")
    if out.exists() and not overwrite:
        raise DslmError(
            f"{out} already exists; pass --overwrite to replace it (shards built with it then need a rebuild)"
        )
    check_vocab_size(vocab_size, fim)
    if sample_bytes < 1:
        raise DslmError(f"--sample-bytes {sample_bytes} must be at least 1")
    sample = TokenizerSample(sample_bytes)
    texts = tqdm(sample.texts(sources, DocumentFilter(filters)), desc="tokenizer", unit="doc")
    tok = train_tokenizer(texts, vocab_size, fim)
    if texts.n == 0:
        raise DslmError("no text to train the tokenizer on: the sources are empty or everything was filtered")
    atomic_write_text(out, tok.to_str())
    tok.encode_special_tokens = True  # measure as the build encodes
    return sample.tokens_per_byte(tok)


@dataclass
class Batch:
    """Documents read together from one source, and what the source skipped while reading them."""

    source: int
    documents: list[Document]
    positions: list[tuple[int, int]]
    """Each document's (unit, index within the unit): with `source`, its place in the global order."""
    skipped: dict[str, int]
    end: Position
    """The input position just after this batch."""

    def position(self, i: int) -> DocPosition:
        return (self.source, *self.positions[i])


def numbered(docs: Iterator[Document]) -> Iterator[tuple[Document, int]]:
    """Each document with its index within its unit."""
    unit, index = -1, 0
    for doc in docs:
        index = index + 1 if doc.unit == unit else 0
        unit = doc.unit
        yield doc, index


def read_batches(
    sources: list[Source], start: Position, cfg: ShardConfig, units: Units | None = None
) -> Iterator[Batch]:
    """Every document of the selected units (all when None) from `start` on, in order, in batches
    of at most `cfg.batch_documents` documents or about `cfg.batch_bytes` of text. The last batch
    of a source ends at the next source, so that the source's trailing skips are counted once."""
    for index in range(start.source, len(sources)):
        source, stats = sources[index], SourceStats()
        docs = numbered(source.documents(stats, units))
        consumed = start.documents if index == start.source else 0
        if sum(1 for _ in islice(docs, consumed)) < consumed:
            raise DslmError(
                f"source {source.spec!r} now holds fewer than the {consumed:,} documents the "
                f"unfinished build read from it; pass --overwrite to start over"
            )
        stats.filtered.clear()  # the journal counted the skips before `start`
        batch: list[tuple[Document, int]] = []
        size = 0
        for doc, number in docs:
            batch.append((doc, number))
            size += len(doc.text)
            if len(batch) == cfg.batch_documents or size >= cfg.batch_bytes:
                consumed += len(batch)
                yield make_batch(index, batch, stats, Position(index, consumed))
                batch, size = [], 0
        yield make_batch(index, batch, stats, Position(index + 1, 0))


def make_batch(source: int, numbered_docs: list[tuple[Document, int]], stats: SourceStats, end: Position) -> Batch:
    """A Batch, taking the skips counted in `stats` since the last one."""
    batch = Batch(
        source,
        [doc for doc, _ in numbered_docs],
        [(doc.unit, n) for doc, n in numbered_docs],
        dict(stats.filtered),
        end,
    )
    stats.filtered.clear()
    return batch


@dataclass
class BuildReport:
    manifest: Manifest
    seconds: float
    """This run's wall time."""
    documents: int
    """Documents written by this run."""
    tokens: int
    """Tokens written by this run."""
    resumed_shards: int
    """Shards kept from an unfinished earlier run."""


@dataclass(frozen=True)
class Stream:
    """Documents packed together: of one split and one language (so each sample has one language),
    and copy k of a document goes to stream k, so that repeats never share a sample."""

    split: str
    copy: int
    language: str

    @property
    def name(self) -> str:
        """The key of the stream's packer in the journal."""
        return f"{self.split}.{self.copy}.{self.language}"


class ShardBuild:
    """The ordered half of a build, in the main process: dedup, copies by weight, packing,
    writing, and the journal that lets a rerun continue."""

    def __init__(
        self,
        cfg: ShardConfig,
        home: Path,
        sources: list[Source],
        dtype: np.dtype,
        state: BuildState,
        dedup: SeenDigests | ListedDuplicates,
    ):
        self.cfg = cfg
        self.home = home
        """The folder written: `cfg.out`, or a task's folder in it."""
        self.sources = sources
        self.sample_len = cfg.seq_len + 1
        self.state = state
        self.stats = {s.spec: state.sources.get(s.spec, SourceStats()) for s in sources}
        self.dedup = dedup
        self.writers = {
            split: ShardWriter(home, split, cfg.samples_per_shard, self.sample_len, state.writers.get(split))
            for split in SPLITS
        }
        self.packers: dict[str, Packer] = {
            name: Packer(self.sample_len, dtype, pending, state.owners.get(name))
            for name, pending in state.pending.items()
        }
        self.dtype = dtype

    def consume(self, batch: Batch, results: list[Encoded]) -> bool:
        """Write a batch's documents; True when a shard was finished on the way."""
        source = self.sources[batch.source]
        stats = self.stats[source.spec]
        for reason, n in batch.skipped.items():
            stats.filtered[reason] = stats.filtered.get(reason, 0) + n
        finished = False
        for i, (doc, enc) in enumerate(zip(batch.documents, results, strict=True)):
            if enc.reason is None and self.dedup.duplicate(batch.position(i), enc.digest):
                enc = Encoded("duplicate")
            if enc.reason is not None:
                skip(stats, enc.reason)
                continue
            if not enc.copies:
                skip(stats, "downsampled")
                continue
            stats.headers_stripped += enc.header_stripped
            for copy, ids in enumerate(enc.copies):
                finished |= self.write(Stream(enc.split, copy, doc.language), ids, batch.source)
                stats.documents += 1
                stats.bytes += enc.bytes
                stats.tokens += len(ids)
        return finished

    def write(self, stream: Stream, ids: np.ndarray, source: int) -> bool:
        """Pack a document of sources[source] into its stream; True when a shard was finished."""
        packer = self.packers.setdefault(stream.name, Packer(self.sample_len, self.dtype))
        finished = False
        for sample in packer.add(ids, source):
            finished |= self.writers[stream.split].add(sample, stream.language) is not None
        return finished

    def checkpoint(self, position: Position) -> None:
        """Journal the build as it stands after the document at `position`."""
        self.state.position = position
        self.state.sources = self.stats
        self.state.writers = {split: w.sync() for split, w in self.writers.items()}
        self.state.pending, self.state.owners = self.leftovers()
        self.state.digests = self.dedup.sync()
        save_state(self.home, self.state)

    def leftovers(self) -> tuple[dict[str, list[int]], dict[str, list[list[int]]]]:
        """The tokens waiting in each stream for its next sample, and the sources they came from."""
        return (
            {name: p.leftover() for name, p in self.packers.items()},
            {name: [list(run) for run in p.owners] for name, p in self.packers.items()},
        )

    def finish(self) -> list[ShardEntry]:
        """Close the last shards; the tokens left in each stream, fewer than a sample, are dropped
        (see `dropped_tokens`)."""
        self.dedup.close()
        return [entry for w in self.writers.values() for entry in w.close()]

    def dropped_tokens(self) -> dict[str, int]:
        """The tokens left in each stream, fewer than a sample, which are not written: per stream
        name, and added to each source's SourceStats.dropped_tokens. Call once, at the end.
        Dropped rather than padded: at most seq_len tokens per stream, while a padded sample would
        need a loss mask, which pretraining shards do not carry, and would change their bytes."""
        for packer in self.packers.values():
            for source, tokens in packer.owners:
                if source >= 0:
                    self.stats[self.sources[source].spec].dropped_tokens += tokens
        return {name: self.packers[name].pending_tokens for name in sorted(self.packers)}


SPLITS = ("train", "val")


def build_shards(cfg: ShardConfig, sources: list[Source], part: Partition | None = None) -> BuildReport:
    """Filter and encode every document in worker processes; in order, drop duplicates, frame
    <bos> ... <eos>, pack and write train/val shards; then the manifest. Resumes an unfinished
    build of the same inputs in `cfg.out`.

    With `part`, stage `write` of one task of a distributed build (dslm_shards.tasks): only its units,
    into its folder OUT/task-K/, dropping the duplicates that stage `dedup` listed for it. Its
    manifest there is that of a build of its units alone; the tokens of its streams' last,
    partial samples are kept in task.json for `dslm-shard merge`. A task already finished is
    kept. Raises DslmError for a finished build in `cfg.out`, or a stage before not finished."""
    started = time.monotonic()
    check_build_tokenizer(cfg.tokenizer, cfg.out)
    tok = load_text_tokenizer(cfg.tokenizer)
    check_fim_tokens(cfg.fim, tok, cfg.tokenizer)
    dtype = token_dtype(tok.get_vocab_size(), cfg.dtype)
    if part is None:
        home, key, listed = cfg.out, fingerprint(build_settings(cfg, sources)), None
    else:
        home = task_dir(cfg.out, part.task)
        refuse_finished(cfg.out)
        stamp = task_stamp(cfg, sources, part.tasks)
        if not cfg.overwrite and (kept := finished_task(home, stamp, part)) is not None:
            return BuildReport(kept, time.monotonic() - started, 0, 0, len(kept.shards))
        listed = ListedDuplicates(cfg.out, part.task, stamp)  # before anything is written: dedup has finished
        key = fingerprint({**stamp.settings, "part": dataclasses.asdict(part)})
    with exclusive(home / LOCK_NAME, f"the build in {home}"):
        return write_build(cfg, sources, part, home, key, listed, tok, dtype, started)


def write_build(
    cfg: ShardConfig,
    sources: list[Source],
    part: Partition | None,
    home: Path,
    key: str,
    listed: ListedDuplicates | None,
    tok: Tokenizer,
    dtype: np.dtype,
    started: float,
) -> BuildReport:
    """build_shards' writing, in `home`, which this process holds."""
    state = start_or_resume(cfg, home, key, part is not None)
    dedup = SeenDigests(home, state.digests, cfg.filters) if listed is None else listed
    build = ShardBuild(cfg, home, sources, dtype, state, dedup)
    resumed = sum(len(w.entries) for w in state.writers.values())
    encoder = EncoderConfig(cfg.tokenizer, cfg.filters, cfg.val_fraction, dtype.name, fim=cfg.fim)
    batches = read_batches(sources, state.position, cfg, part)
    with BuildProgress(build.stats, resumed) as progress:
        for batch, results in encode_batches(
            encoder, batches, lambda b: (b.documents, sources[b.source].weight), cfg.workers
        ):
            if build.consume(batch, results):
                build.checkpoint(batch.end)
            progress.update(batch)
            if (
                part is None
                and batch.end.source != batch.source
                and not build.stats[sources[batch.source].spec].documents
            ):
                warning(f"source {sources[batch.source].spec!r} gave no documents to write")
    manifest = Manifest(
        tokenizer=TOKENIZER_NAME if part is None else f"../{TOKENIZER_NAME}",
        tokenizer_sha256=sha256_file(cfg.tokenizer),
        vocab_size=tok.get_vocab_size(),
        seq_len=cfg.seq_len,
        dtype=dtype.name,
        shards=build.finish(),
        sources=build.stats,
        dropped_tokens=build.dropped_tokens(),
        fim=fim_record(cfg.fim),
    )
    if part is None:
        warn_unsampled(manifest)
        if not manifest.split("train"):
            raise DslmError(f"too little text for one training sample of {build.sample_len} tokens")
    else:
        save_tails(
            home, TaskTails(listed.stamp.settings, part.tasks, part.task, cfg.samples_per_shard, *build.leftovers())
        )
    manifest.save(home)  # the commit point
    remove_journal(home)
    return BuildReport(manifest, time.monotonic() - started, *progress.written(), resumed)


def write_digests(cfg: ShardConfig, sources: list[Source], part: Partition) -> int:
    """Stage `digests` of task `part.task` of a distributed build: filter its units' documents in
    worker processes (no tokenizing) and write the digests of those kept, bucketed by hash
    (dslm_shards.dedup). Returns the documents kept; a task already finished is kept (returns -1).
    Started over when rerun: it writes nothing until its end."""
    check_build_tokenizer(cfg.tokenizer, cfg.out)  # a bad tokenizer is one line, before anything is written
    tok = load_text_tokenizer(cfg.tokenizer)
    dtype = token_dtype(tok.get_vocab_size(), cfg.dtype)
    refuse_finished(cfg.out)
    stamp = task_stamp(cfg, sources, part.tasks)
    if part.task == 0:
        place_tokenizer(cfg.tokenizer, cfg.out)  # one writer: the tasks share the folder
    if is_done(cfg.out, "digests", part.task, stamp) and not cfg.overwrite:
        return -1
    encoder = EncoderConfig(cfg.tokenizer, cfg.filters, cfg.val_fraction, dtype.name, tokenize=False)
    with exclusive(lock_file(cfg.out, "digests", part.task), f"stage digests of task {part.task}"):
        rows = []
        batches = read_batches(sources, Position(), cfg, part)
        with tqdm(desc=f"digests (task {part.task} of {part.tasks})", unit="doc", dynamic_ncols=True) as bar:
            for batch, results in encode_batches(
                encoder, batches, lambda b: (b.documents, sources[b.source].weight), cfg.workers
            ):
                kept = [i for i, enc in enumerate(results) if enc.reason is None]
                rows.append(records([results[i].digest for i in kept], [batch.position(i) for i in kept]))
                bar.update(len(batch.documents) + sum(batch.skipped.values()))
        kept_rows = np.concatenate(rows) if rows else records([], [])
        write_digest_buckets(cfg.out, part.task, kept_rows, stamp)
    return len(kept_rows)


def find_task_duplicates(cfg: ShardConfig, sources: list[Source], part: Partition) -> tuple[int, int] | None:
    """Stage `dedup` of task `part.task` (dslm_shards.dedup.find_duplicates): (digests in its bucket,
    later copies), or None when it finished before for these inputs (kept)."""
    refuse_finished(cfg.out)
    stamp = task_stamp(cfg, sources, part.tasks)
    if is_done(cfg.out, "dedup", part.task, stamp) and not cfg.overwrite:
        return None
    with exclusive(lock_file(cfg.out, "dedup", part.task), f"stage dedup of task {part.task}"):
        return find_duplicates(cfg.out, part.task, stamp)


class BuildProgress:
    """A tqdm bar of documents read, with documents/s and tokens/s of this run."""

    def __init__(self, stats: dict[str, SourceStats], resumed_shards: int):
        self.stats = stats
        self.before = self.totals()
        desc = f"build (kept {resumed_shards} shards)" if resumed_shards else "build"
        self.bar = tqdm(desc=desc, unit="doc", dynamic_ncols=True)

    def totals(self) -> tuple[int, int]:
        return sum(s.documents for s in self.stats.values()), sum(s.tokens for s in self.stats.values())

    def written(self) -> tuple[int, int]:
        """Documents and tokens written since the bar started."""
        (documents, tokens), (documents0, tokens0) = self.totals(), self.before
        return documents - documents0, tokens - tokens0

    def update(self, batch: Batch) -> None:
        self.bar.update(len(batch.documents) + sum(batch.skipped.values()))
        elapsed = self.bar.format_dict["elapsed"] or 1e-9
        self.bar.set_postfix_str(f"{self.written()[1] / elapsed:,.0f} tokens/s", refresh=False)

    def __enter__(self) -> BuildProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def build_settings(cfg: ShardConfig, sources: list[Source]) -> dict:
    """What decides a build's bytes: a journal of other settings cannot be resumed."""
    return {
        "tokenizer": sha256_file(cfg.tokenizer),
        "seq_len": cfg.seq_len,
        "samples_per_shard": cfg.samples_per_shard,
        "val_fraction": cfg.val_fraction,
        "dtype": cfg.dtype,
        "filters": dataclasses.asdict(cfg.filters),
        "sources": [repr(s) for s in sources],
        **({"fim": fim_record(cfg.fim)} if cfg.fim.enabled else {}),  # a build journaled before FIM resumes
    }


def task_stamp(cfg: ShardConfig, sources: list[Source], tasks: int) -> Stamp:
    """What the stages and tasks of a build split over `tasks` must share: the settings, and
    each source's number of units, which changes when files are added or removed between stages
    (the duplicate lists name documents by their unit)."""
    return Stamp({**build_settings(cfg, sources), "units": [s.units() for s in sources]}, tasks)


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def start_or_resume(cfg: ShardConfig, home: Path, key: str, task: bool) -> BuildState:
    """Prepare `home` (the build's folder, or a `task`'s): refuse to clobber a finished build
    unless asked, place the tokenizer, and return the journal of an unfinished build whose
    fingerprint is `key` (or a fresh state)."""
    make_folder(home)
    if not task and cfg.overwrite:
        clear_build(home)  # a merged build of tasks too
    if not task:
        refuse_tasks(home)
    if (home / MANIFEST_NAME).exists():
        if not cfg.overwrite:
            raise DslmError(f"{home} already holds a finished build; pass --overwrite to replace it")
        remove_finished_build(home)
    fresh = BuildState(key)
    state = load_state(home)
    if state is not None and state.fingerprint != fresh.fingerprint and not cfg.overwrite:
        raise DslmError(
            f"{home} holds an unfinished build of other sources or settings; rerun it "
            f"with the same ones to resume, or pass --overwrite to start over"
        )
    if state is not None and not cfg.overwrite:
        roll_back_unjournaled(home, state)
    problem = None if state is None or cfg.overwrite else resume_problem(home, state)
    if problem:
        warning(f"cannot resume the unfinished build in {home} ({problem}); starting over")
    if state is not None and (cfg.overwrite or problem):
        remove_unfinished_build(home, state)
        state = None
    if not task:
        place_tokenizer(cfg.tokenizer, cfg.out)
    return state or fresh


def roll_back_unjournaled(out: Path, state: BuildState) -> None:
    """Undo the shards a build finished after its journal's last save (the journal is saved
    between batches, and a batch can finish shards): the one the journal has open goes back to
    its temporary name, which the resumed writer cuts to the journaled offset; later ones are
    removed, and written again."""
    for split, writer in state.writers.items():
        index = len(writer.entries)
        while (final := shard_path(out, split, index)).exists():
            if index == len(writer.entries) and writer.in_shard:
                os.replace(final, tmp_path(final))
            else:
                final.unlink()
            index += 1


def resume_problem(out: Path, state: BuildState) -> str | None:
    """Why the files in `out` do not match the journal, or None when the build can continue."""
    for writer in state.writers.values():
        for entry in writer.entries:
            if (problem := shard_problem(out / entry.name, entry, count_samples)) is not None:
                return f"{entry.name}: {problem}"
    for split, writer in state.writers.items():
        tmp = tmp_path(shard_path(out, split, len(writer.entries)))
        if writer.in_shard and (not tmp.is_file() or tmp.stat().st_size < writer.offset):
            return f"{tmp.name} is shorter than journaled"
    digests = out / DIGESTS_NAME
    if state.digests and (not digests.is_file() or digests.stat().st_size < state.digests * DIGEST_BYTES):
        return f"{DIGESTS_NAME} is shorter than journaled"
    return None


def place_tokenizer(tokenizer: Path, out: Path) -> None:
    """Copy `tokenizer` to `out`/tokenizer.json, unless it is that file."""
    target = out / TOKENIZER_NAME
    if not target.exists() or not target.samefile(tokenizer):
        atomic_copy(tokenizer, target)
