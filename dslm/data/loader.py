"""Training batches from tar shards, in a world-size-independent order.

A sample is a dict of two (seq_len + 1,) int64 tensors, as Hugging Face and litgpt name them:
`input_ids`, the tokens, and `labels`, the same tokens with IGNORE_INDEX where a token is not a
training target (from KEY.mask.npy in instruction shards; every token is one in pretraining
shards). With data.direction=backward both are reversed in token order as they are read, so the
same shards train a previous-token model. A batch is the same dict with (B, seq_len + 1) tensors.

Every sample of a split has a global index. Epoch e visits all of them in the permutation drawn
from (seed, e); a global cursor counts the samples consumed so far. Each micro-step takes the next
micro_batch * world_size positions and rank r reads its own contiguous slice of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from wids.wids import IndexedTarSamples

from dslm.data.manifest import Manifest
from dslm.data.templates import check_direction
from dslm.errors import DslmError
from dslm.model import IGNORE_INDEX

TOKENS_SUFFIX, MASK_SUFFIX, LANGUAGE_SUFFIX = ".tokens.npy", ".mask.npy", ".language.txt"
"""The members of a sample in a shard (shards.writer writes them)."""
Batch = dict[str, torch.Tensor]


@dataclass
class DataConfig:
    """Where the training samples come from and how they are read. Raises ValueError (naming
    the field) for a value out of its range."""

    shards: str = "data/shards"
    """Folder written by `dslm-shard build` (holds manifest.json and the tar shards)."""
    num_workers: int = 1
    """Loader worker processes per rank, >= 0 (0: read in the training process)."""
    prefetch_factor: int = 2
    """Micro-batches each worker reads ahead, >= 1 (PyTorch DataLoader's prefetch_factor)."""
    direction: str = "forward"
    """"forward" trains a next-token model; "backward" reverses every training and validation
    sample in token order as it is read, which trains a previous-token model (the BackChat card)
    on the same shards. dslm-eval, dslm-generate and dslm-export follow the run's direction."""

    def __post_init__(self) -> None:
        check_direction(self.direction, "data.direction")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} must not be negative")
        if self.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor={self.prefetch_factor} must be at least 1")


class ShardSamples(Dataset):
    """Random access to the samples of one split: index -> {"input_ids", "labels"}, each a
    (seq_len + 1,) int64 tensor. Reading a sample raises DslmError when it has a mask and the
    manifest says the samples carry none, or the other way round."""

    def __init__(self, root: str | Path, manifest: Manifest, split: str, direction: str = "forward"):
        shards = manifest.split(split)
        if not shards:
            raise DslmError(f"{root}: the manifest lists no shards for the {split} split")
        self.paths = [str(Path(root) / s.name) for s in shards]
        self.offsets = np.cumsum([0] + [s.samples for s in shards])
        self.masks, self.backward = manifest.masks, check_direction(direction) == "backward"
        self._open: dict[int, IndexedTarSamples] = {}  # per process: workers open their own

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> Batch:
        sample = self._sample(index)
        tokens = torch.from_numpy(np.load(sample[TOKENS_SUFFIX]).astype(np.int64))
        labels = tokens.clone()
        if self.masks != (MASK_SUFFIX in sample):
            has = "has" if MASK_SUFFIX in sample else "lacks"
            raise DslmError(f"{self.paths[self._shard(index)]}: sample {sample['__key__']} {has} a mask, but the "
                            f"manifest says the samples {'carry masks' if self.masks else 'carry none'}")
        if self.masks:
            labels[torch.from_numpy(np.load(sample[MASK_SUFFIX])) == 0] = IGNORE_INDEX
        sample = {"input_ids": tokens, "labels": labels}
        return reverse(sample) if self.backward else sample

    def language(self, index: int) -> str:
        """The language of the documents in sample `index` ("" in shards from before languages were recorded)."""
        member = self._sample(index).get(LANGUAGE_SUFFIX)
        return member.read().decode() if member is not None else ""

    def _shard(self, index: int) -> int:
        return int(np.searchsorted(self.offsets, index, side="right")) - 1

    def _sample(self, index: int) -> dict:
        shard = self._shard(index)
        if shard not in self._open:
            self._open[shard] = IndexedTarSamples(path=self.paths[shard])
        return self._open[shard][index - int(self.offsets[shard])]


def reverse(batch: Batch) -> Batch:
    """A sample (..., T+1) or batch read right to left, as data.direction=backward trains on it."""
    return {name: t.flip(-1) for name, t in batch.items()}


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


class GlobalOrderSampler(Sampler[int]):
    """This rank's sample indices, forever, starting at global position `start`."""

    def __init__(self, num_samples: int, seed: int, rank: int, world_size: int, micro_batch: int, start: int = 0):
        self.num_samples, self.seed = num_samples, seed
        self.rank, self.world_size, self.micro_batch = rank, world_size, micro_batch
        self.start = start

    def __iter__(self) -> Iterator[int]:
        position = self.start
        epoch, order = -1, np.empty(0, dtype=np.int64)
        while True:
            first = position + self.rank * self.micro_batch
            for p in range(first, first + self.micro_batch):
                if p // self.num_samples != epoch:
                    epoch = p // self.num_samples
                    order = epoch_order(self.num_samples, self.seed, epoch)
                yield int(order[p % self.num_samples])
            position += self.micro_batch * self.world_size


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch's tensors on `device` (non-blocking from pinned memory)."""
    return {name: t.to(device, non_blocking=True) for name, t in batch.items()}


class DeviceBatches:
    """Micro-batches (Batch) on `device` from the loader, the next one taken ahead of use:
    `prefetch()` takes it from the loader (receiving it from the worker costs the main process
    time) and starts its copy to the device (non-blocking from pinned memory). The training step
    calls it while the device still works through the backward pass, not after the optimizer
    step's host sync, when the device would idle."""

    def __init__(self, batches: Iterator[Batch], device: torch.device):
        self.batches, self.device = batches, device
        self.ready: Batch | None = None

    def prefetch(self) -> None:
        """Take the next micro-batch now, unless one is already waiting."""
        if self.ready is None:
            self.ready = to_device(next(self.batches), self.device)

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> Batch:
        self.prefetch()
        ready, self.ready = self.ready, None
        return ready


def train_loader(cfg: DataConfig, manifest: Manifest, seed: int, rank: int, world_size: int,
                 micro_batch: int, start: int = 0) -> DataLoader:
    dataset = ShardSamples(cfg.shards, manifest, "train", cfg.direction)
    sampler = GlobalOrderSampler(len(dataset), seed, rank, world_size, micro_batch, start)
    return DataLoader(
        dataset,
        batch_size=micro_batch,
        sampler=sampler,
        num_workers=cfg.num_workers,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
