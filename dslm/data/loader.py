"""Training batches from tar shards, in a world-size-independent order.

A sample is a dict of two (seq_len + 1,) int64 tensors, as Hugging Face and litgpt name them:
`input_ids`, the tokens, and `labels`, the same tokens with IGNORE_INDEX where a token is not a
training target (from KEY.mask.npy in instruction shards; every token is one in pretraining
shards). With data.direction=backward both are reversed in token order as they are read, so the
same shards train a previous-token model. A training sample also carries three () int64 tensors:
`source` (its data.mix entry), `index` (its sample index in that source's train split) and
`skipped` (1 when its shard failed the check against the manifest: its labels are then all
IGNORE_INDEX). A batch is the same dict with a leading batch dimension B.

A global cursor counts the samples consumed so far. Each global position reads one source
(dslm.data.mix) and that source's next sample in its own order (dslm.data.order). Each
micro-step takes the next micro_batch * world_size positions and rank r reads its own contiguous
slice of them.
"""

from __future__ import annotations

import errno
import itertools
import os
import resource
import sys
import traceback
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from wids.wids import IndexedTarSamples

from dslm.data.manifest import Manifest, shard_problem
from dslm.data.mix import Interleave, MixBase, MixedOrder, MixSource
from dslm.data.order import WindowOrder
from dslm.data.templates import check_direction
from dslm.errors import BadShard, DslmError
from dslm.logs import warning
from dslm.model import IGNORE_INDEX
from dslm.stop import ignore_stop_signals, kill_workers_at_exit
from dslm_local.cli import counted

TOKENS_SUFFIX, MASK_SUFFIX, LANGUAGE_SUFFIX = ".tokens.npy", ".mask.npy", ".language.txt"
"""The members of a sample in a shard (dslm_shards.writer writes them)."""
Batch = dict[str, torch.Tensor]
VERIFY_LEVELS = ("size", "full")
BAD_SHARD_POLICIES = ("stop", "skip")
DEFAULT_SHARDS = "data/shards"


@dataclass
class DataConfig:
    """Where the training samples come from and how they are read. Raises ValueError (naming
    the field) for a value out of its range."""

    shards: str = DEFAULT_SHARDS
    """Folder written by `dslm-shard build` (holds manifest.json and the tar shards). With
    data.mix, one of its folders (the first unless set): its tokenizer and its val split serve
    validation, dslm-eval and dslm-export."""
    mix: list[MixSource] = field(default_factory=list)
    """Several shard folders read together by weight, e.g. [{shards: data/fineweb, weight: 0.7},
    {shards: data/code, weight: 0.3}] (dslm.data.mix.MixSource). They must share one tokenizer
    and seq_len. A resume may change the weights (each source's cursor continues), not the set
    of sources. [] reads data.shards alone."""
    num_workers: int = 1
    """Loader worker processes per rank, >= 0 (0: read in the training process)."""
    prefetch_factor: int = 2
    """Micro-batches each worker reads ahead, >= 1 (PyTorch DataLoader's prefetch_factor)."""
    direction: str = "forward"
    """"forward" trains a next-token model; "backward" reverses every training and validation
    sample in token order as it is read, which trains a previous-token model (the BackChat card)
    on the same shards. dslm-eval, dslm-generate and dslm-export follow the run's direction."""
    shuffle_window: int = 16
    """Shards whose samples are shuffled together, >= 1 (dslm.data.order): each epoch permutes
    the shards, then the samples within each window of this many. Memory per rank is O(shards)
    plus O(samples in a window); a window of all the shards is a full shuffle. Fixed for a run."""
    max_open_shards: int = 64
    """Shards each loader worker keeps open, >= 1, shared evenly by the sources (least recently
    used closed first); each costs two file descriptors. Each source's share must hold a window
    (shuffle_window, or all its shards when it has fewer)."""
    verify: str = "size"
    """How a shard is checked against its manifest entry when a worker opens it: "size" (its
    bytes and sample count) or "full" (also its sha256, one read of the shard per worker)."""
    on_bad_shard: str = "stop"
    """A shard that fails the check: "stop" (every rank stops at the step boundary before it is
    used, after a checkpoint; exit status 65) or "skip" (its samples train nothing: their labels
    are all ignored; counted in data/skipped_samples and named in a warning)."""

    def __post_init__(self) -> None:
        check_direction(self.direction, "data.direction")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} must not be negative")
        for name in ("prefetch_factor", "shuffle_window", "max_open_shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)} must be at least 1")
        for name, allowed in (("verify", VERIFY_LEVELS), ("on_bad_shard", BAD_SHARD_POLICIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"data.{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.mix:
            self.shards = self.mix[0].shards if self.shards == DEFAULT_SHARDS else self.shards
            if self.shards_source() is None:
                raise ValueError(f"data.shards={self.shards} is not one of data.mix's folders")
            names = [name for name, _ in self.sources()]
            if len(set(names)) < len(names):
                raise ValueError(f"data.mix names its sources {names}: give each a unique name")
            folders = [os.path.abspath(source.shards) for source in self.mix]
            if len(set(folders)) < len(folders):
                raise ValueError(
                    f"data.mix lists a folder twice ({', '.join(source.shards for source in self.mix)}): "
                    f"give it one entry with the sum of the weights"
                )

    def shards_source(self) -> int | None:
        """The position of data.shards among sources(), None when it is not one of them."""
        folders = [os.path.abspath(source.shards) for _, source in self.sources()]
        return folders.index(os.path.abspath(self.shards)) if os.path.abspath(self.shards) in folders else None

    def sources(self) -> list[tuple[str, MixSource]]:
        """(name, source) of each folder the training samples come from: data.mix, or data.shards."""
        return [(source.name or Path(source.shards).name, source) for source in self.mix or [MixSource(self.shards)]]


class ShardSamples(Dataset):
    """Random access to the samples of one split: index -> {"input_ids", "labels"}, each a
    (seq_len + 1,) int64 tensor. At most `max_open_shards` shards are open at a time (least
    recently used closed first); each is checked against its manifest entry when first opened
    (`verify`: "size" or "full"). Reading a sample raises BadShard for a shard that fails the
    check, and DslmError when it has a mask and the manifest says the samples carry none, or the
    other way round."""

    def __init__(
        self,
        root: str | Path,
        manifest: Manifest,
        split: str,
        direction: str = "forward",
        max_open_shards: int = 64,
        verify: str = "size",
    ):
        self.entries = manifest.split(split)
        if not self.entries:
            raise DslmError(f"{root}: the manifest lists no shards for the {split} split")
        self.root = Path(root)
        self.seq_len = manifest.seq_len
        """A sample holds seq_len + 1 tokens."""
        self.offsets = np.cumsum([0] + [s.samples for s in self.entries])
        self.masks, self.backward = manifest.masks, check_direction(direction) == "backward"
        self.max_open_shards, self.full_check = max_open_shards, verify == "full"
        self._open: OrderedDict[int, IndexedTarSamples] = OrderedDict()  # per process: workers open their own
        self._checked: dict[int, str | None] = {}  # shard -> its problem (None: intact), found once per process

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> Batch:
        sample = self._sample(index)
        tokens = torch.from_numpy(np.load(sample[TOKENS_SUFFIX]).astype(np.int64))
        labels = tokens.clone()
        if self.masks != (MASK_SUFFIX in sample):
            has = "has" if MASK_SUFFIX in sample else "lacks"
            raise DslmError(
                f"{self.path(self.shard_of(index))}: sample {sample['__key__']} {has} a mask, but the "
                f"manifest says the samples {'carry masks' if self.masks else 'carry none'}"
            )
        if self.masks:
            labels[torch.from_numpy(np.load(sample[MASK_SUFFIX])) == 0] = IGNORE_INDEX
        sample = {"input_ids": tokens, "labels": labels}
        return reverse(sample) if self.backward else sample

    def language(self, index: int) -> str:
        """The language of the documents in sample `index` ("" in shards from before languages were recorded)."""
        member = self._sample(index).get(LANGUAGE_SUFFIX)
        return member.read().decode() if member is not None else ""

    def shard_of(self, index: int) -> int:
        return int(np.searchsorted(self.offsets, index, side="right")) - 1

    def path(self, shard: int) -> Path:
        return self.root / self.entries[shard].name

    def damage(self, index: int) -> str | None:
        """One line on what is wrong with the shard that holds sample `index`: its path, how it
        differs from its manifest entry, what to run; None when it is intact (checked once per
        process)."""
        shard = self.shard_of(index)
        if shard not in self._checked and (reader := self._open_checked(shard)) is not None:
            reader.close()
        problem = self._checked[shard]
        return problem and f"{self.path(shard)}: {problem} (check the folder: dslm-shard verify {self.root})"

    def check_all(self) -> None:
        """Check every shard of the split now; BadShard naming the first that fails."""
        for shard in range(len(self.entries)):
            self._reader(shard)
            self._close(shard)

    def close(self) -> None:
        for shard in list(self._open):
            self._close(shard)

    def _sample(self, index: int) -> dict:
        shard = self.shard_of(index)
        return self._reader(shard)[index - int(self.offsets[shard])]

    def _reader(self, shard: int) -> IndexedTarSamples:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        if self._checked.get(shard):  # known bad: no need to make room for it
            raise BadShard(self.damage(int(self.offsets[shard])))
        while len(self._open) >= self.max_open_shards:
            self._close(next(iter(self._open)))
        if (reader := self._open_checked(shard)) is None:
            raise BadShard(self.damage(int(self.offsets[shard])))
        self._open[shard] = reader
        return reader

    def _open_checked(self, shard: int) -> IndexedTarSamples | None:
        """Open `shard` and check it against its manifest entry, recording what is wrong; its
        reader, or None when it fails. sha256 (with verify="full") once per process: a shard
        closed and opened again is checked for its size and count only."""
        opened: list[IndexedTarSamples] = []  # the reader shard_problem counts the samples with

        def count_samples(path: Path) -> int:
            opened.append(IndexedTarSamples(path=str(path)))
            return len(opened[0])

        problem = shard_problem(
            self.path(shard), self.entries[shard], count_samples, sha256=self.full_check and shard not in self._checked
        )
        self._checked[shard] = problem
        if problem:
            for reader in opened:
                reader.close()
            return None
        return opened[0]

    def _close(self, shard: int) -> None:
        self._open.pop(shard).close()


class TrainSamples(Dataset):
    """The training samples of every source: (source, index) -> a sample of source `source`'s train
    split with its `source`, `index` and `skipped` tensors. A sample of a shard that fails its
    check is not an error here: it comes back with skipped=1, every label IGNORE_INDEX and
    input_ids 0, and the trainer applies data.on_bad_shard."""

    def __init__(self, cfg: DataConfig, manifests: list[Manifest]):
        self.names = [name for name, _ in cfg.sources()]
        per_source = cfg.max_open_shards // len(manifests)  # one budget per worker, whatever the mix
        for (name, _), manifest in zip(cfg.sources(), manifests):
            if per_source < (window := min(cfg.shuffle_window, len(manifest.split("train")))):
                raise DslmError(
                    f"data.max_open_shards={cfg.max_open_shards} leaves "
                    f"{counted(per_source, 'open shard')} to each of {counted(len(manifests), 'source')}, "
                    f"fewer than {name}'s window of {window} (data.shuffle_window): a loader worker would "
                    f"open shards again for most samples; raise it, or lower data.shuffle_window"
                )
        self.sources = [
            ShardSamples(source.shards, manifest, "train", cfg.direction, per_source, cfg.verify)
            for (_, source), manifest in zip(cfg.sources(), manifests)
        ]
        self.seq_len = manifests[0].seq_len

    def __len__(self) -> int:
        return sum(len(source) for source in self.sources)

    def __getitem__(self, item: tuple[int, int]) -> Batch:
        source, index = item
        try:
            sample, skipped = self.sources[source][index], 0
        except BadShard:
            sample, skipped = self.blank(), 1
        return {
            **sample,
            "source": torch.tensor(source),
            "index": torch.tensor(index),
            "skipped": torch.tensor(skipped),
        }

    def blank(self) -> Batch:
        tokens = torch.zeros(self.seq_len + 1, dtype=torch.int64)
        return {"input_ids": tokens, "labels": torch.full_like(tokens, IGNORE_INDEX)}

    def damage(self, source: int, index: int) -> str:
        """ShardSamples.damage for sample `index` of source `source`, which a loader worker found
        damaged (also when it reads intact in this process: a read that failed once)."""
        samples = self.sources[source]
        return samples.damage(index) or (
            f"{samples.path(samples.shard_of(index))}: a loader worker could not read "
            f"it, though it matches its manifest now (check the folder: dslm-shard "
            f"verify {samples.root})"
        )


class ShardDamage:
    """data.on_bad_shard at a step boundary, for the skipped samples of the micro-batches taken
    so far (DeviceBatches.skipped; the next step's are all taken by then)."""

    def __init__(self, samples: TrainSamples, policy: str):
        self.samples, self.policy = samples, policy
        self.warned: set[str] = set()

    def found(self, batches: DeviceBatches) -> str:
        """With policy "stop", the damaged shards as one line ("" for none); with "skip", "" after
        one warning for each shard not named before."""
        lines = list(dict.fromkeys(self.samples.damage(source, index) for source, index in batches.skipped))
        batches.skipped.clear()
        if self.policy == "stop":
            return "; ".join(lines)
        for line in lines:
            if line not in self.warned:
                warning(f"{line}: its samples are skipped (data.on_bad_shard=skip)", every_rank=True)
                self.warned.add(line)
        return ""


FDS_PER_SHARD = 2
"""An open shard holds its file and wids' memory map of it (mmap duplicates the descriptor)."""
FDS_PER_BATCH = 2 * 6
"""A micro-batch in flight from a worker (input_ids, labels, mask, source, index, skipped): torch's
default `file_descriptor` sharing passes each tensor as a descriptor of its shared memory, which
the worker holds twice (the tensor's, and its resource sharer's copy until the trainer takes it)
and the trainer once for each batch it holds."""
FD_HEADROOM = 32
"""Besides what is counted: the loader's sockets and pipes, a shard's check (a second reader of
it), the imports of a worker's first batch."""


def open_files() -> int:
    """The file descriptors this process holds now (a worker started now inherits them)."""
    return len(os.listdir("/proc/self/fd"))


def file_limit_need(cfg: DataConfig, held_batches: int, open_now: int) -> int:
    """Open files a process of the loader needs at most, with `open_now` held already and
    `held_batches` micro-batches held by the trainer (DeviceBatches: a step's, and one ahead): a
    worker its shards and the batches it prefetches; the trainer the batches it holds and those the
    workers send it (or, without workers, the shards)."""
    in_flight = cfg.num_workers * cfg.prefetch_factor
    trainer = FDS_PER_BATCH * (held_batches + in_flight) + 4 * cfg.num_workers  # a pipe pair, a queue per worker
    shards = FDS_PER_SHARD * cfg.max_open_shards
    worker = shards + FDS_PER_BATCH * cfg.prefetch_factor if cfg.num_workers else 0
    return open_now + max(worker, trainer + (0 if cfg.num_workers else shards)) + FD_HEADROOM


def ensure_file_limit(cfg: DataConfig, held_batches: int) -> None:
    """Raise this process's soft open-file limit (RLIMIT_NOFILE, which loader workers inherit) to
    what the loader needs (file_limit_need, counted from the descriptors open now: call it right
    before the loader starts), up to the hard limit; DslmError when the hard limit is lower."""
    open_now = open_files()
    need = file_limit_need(cfg, held_batches, open_now)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        shards = (hard - need + FDS_PER_SHARD * cfg.max_open_shards) // FDS_PER_SHARD
        lower = (
            f"lower data.max_open_shards to {shards}"
            if shards >= 1
            else "lower data.max_open_shards, data.num_workers, data.prefetch_factor or train.grad_accum"
        )
        raise DslmError(
            f"the data loader needs about {need} open files per process (data.max_open_shards="
            f"{cfg.max_open_shards}, data.num_workers={cfg.num_workers}, data.prefetch_factor="
            f"{cfg.prefetch_factor}, {open_now} open already), but the limit is {hard} (ulimit -n): "
            f"{lower}, or raise the limit"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def reverse(batch: Batch) -> Batch:
    """A sample (..., T+1) or batch read right to left, as data.direction=backward trains on it."""
    return {name: t.flip(-1) for name, t in batch.items()}


class GlobalOrderSampler(Sampler[tuple[int, int]]):
    """This rank's (source, sample index) pairs, forever, from global position `start`."""

    def __init__(self, order: MixedOrder, rank: int, world_size: int, micro_batch: int, start: int = 0):
        self.order = order
        self.rank, self.world_size, self.micro_batch = rank, world_size, micro_batch
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start
        while True:
            sources, indices = self.order.draw(position + self.rank * self.micro_batch, self.micro_batch)
            yield from zip(sources.tolist(), indices.tolist())
            position += self.micro_batch * self.world_size


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch's tensors on `device` (non-blocking from pinned memory)."""
    return {name: t.to(device, non_blocking=True) for name, t in batch.items()}


class DeviceBatches:
    """Micro-batches (Batch) on `device` from the loader, taken ahead of use: `prefetch()` takes
    the next one (receiving it from the worker costs the main process time) and starts its copy to
    the device (non-blocking from pinned memory). The training step calls it while the device
    still works through the backward pass, not after the optimizer step's host sync, when the
    device would idle; `prefetch(n)` at a step boundary holds the whole next step. The
    (source, index) of each skipped sample taken is added to `skipped`, read on the host before
    the batch is used."""

    def __init__(self, batches: Iterator[Batch], device: torch.device):
        self.batches, self.device = batches, device
        self.ready: deque[Batch] = deque()
        self.skipped: list[tuple[int, int]] = []
        self.failure = ""
        """Why the loader could not pass the last micro-batch asked for (out_of_files), "" if it
        could: then nothing more is taken, and the run stops at the step boundary."""

    def prefetch(self, count: int = 1) -> None:
        """Hold at least `count` micro-batches taken from the loader, or as many as it could pass
        (`failure`)."""
        while len(self.ready) < count and not self.failure:
            try:
                batch = next(self.batches)
            except Exception as e:
                if not (failure := out_of_files(e)):
                    raise
                self.failure = failure
                return
            if "skipped" in batch and batch["skipped"].any():
                rows = batch["skipped"].bool()
                self.skipped += zip(batch["source"][rows].tolist(), batch["index"][rows].tolist())
            self.ready.append(to_device(batch, self.device))

    def upcoming(self, count: int) -> list[Batch]:
        """The next `count` micro-batches, taken from the loader where not held yet, left in place."""
        self.prefetch(count)
        return list(itertools.islice(self.ready, count))

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> Batch:
        self.prefetch()
        return self.ready.popleft()


def out_of_files(error: BaseException) -> str:
    """One line on `error` when it is the loader running out of open files, else "": EMFILE or
    ENFILE in a worker or here, or a failure to receive a tensor at all (torch passes each one from
    a worker as a file descriptor, through the worker's resource sharer, which drops the
    connection once the worker is out of them: ConnectionResetError or EOFError inside
    rebuild_storage_fd, "received 0 items of ancdata")."""
    chain, seen = [], error
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if not any(
        isinstance(e, OSError)
        and e.errno in (errno.EMFILE, errno.ENFILE)
        or receiving_descriptor(e)
        or "Too many open files" in str(e)
        or "received 0 items of ancdata" in str(e)
        for e in chain
    ):
        return ""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    what = str(error).splitlines()[0] if str(error) else ""
    return (
        f"the data loader ran out of open files ({type(error).__name__}{': ' if what else ''}{what}; the limit "
        f"is {soft} per process, ulimit -Sn, hard limit {hard}): raise the soft limit, or lower "
        f"data.max_open_shards, data.num_workers or data.prefetch_factor"
    )


def receiving_descriptor(error: BaseException) -> bool:
    """Whether `error` was raised while receiving a tensor's file descriptor from a worker."""
    return any(frame.f_code.co_name == "rebuild_storage_fd" for frame, _ in traceback.walk_tb(error.__traceback__))


def train_order(cfg: DataConfig, manifests: list[Manifest], seed: int, base: MixBase | None = None) -> MixedOrder:
    """The run's order over the train splits of its sources (`manifests`, in DataConfig.sources'
    order): each source's own WindowOrder, interleaved by weight from `base` on."""
    orders = [
        WindowOrder([e.samples for e in manifest.split("train")], seed, cfg.shuffle_window, key=[i])
        for i, manifest in enumerate(manifests)
    ]
    return MixedOrder(orders, Interleave([source.weight for _, source in cfg.sources()], base))


def init_worker(worker_id: int) -> None:
    """DataLoader's worker_init_fn: the stop signals are the trainer's (dslm.stop.ignore_stop_signals),
    and so is reporting the worker's failures. Its Python error output goes to /dev/null: an error
    of its sample code reaches the trainer with the batch (torch re-raises it there), and out of
    descriptors its resource sharer prints a traceback for every failed accept, forever, and its
    exit one more, while the trainer reports the batch it could not take in one line (out_of_files)."""
    ignore_stop_signals()
    sys.stderr = open(os.devnull, "w")


def train_loader(
    cfg: DataConfig,
    samples: TrainSamples,
    order: MixedOrder,
    rank: int,
    world_size: int,
    micro_batch: int,
    start: int = 0,
) -> DataLoader:
    """This rank's training micro-batches, from global position `start` on. The loader draws its
    workers' seeds from a generator of its own: from torch's global one, starting the loader would
    move the RNG state a resume has just restored, and every dropout mask after it would differ.
    Its workers ignore the stop signals and are killed at exit (init_worker)."""
    kill_workers_at_exit()
    return DataLoader(
        samples,
        batch_size=micro_batch,
        sampler=GlobalOrderSampler(order, rank, world_size, micro_batch, start),
        num_workers=cfg.num_workers,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator(),
        worker_init_fn=init_worker,
    )
