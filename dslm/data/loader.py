"""Training batches from tar shards, in a world-size-independent order.

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

from dslm.data.manifest import Manifest, ShardEntry
from dslm.errors import DslmError


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

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} must not be negative")
        if self.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor={self.prefetch_factor} must be at least 1")


class ShardSamples(Dataset):
    """Random access to the samples of one split: index -> (seq_len + 1,) int64 tokens."""

    def __init__(self, root: str | Path, shards: list[ShardEntry]):
        if not shards:
            raise DslmError(f"{root}: the manifest lists no shards for this split")
        self.paths = [str(Path(root) / s.name) for s in shards]
        self.offsets = np.cumsum([0] + [s.samples for s in shards])
        self._open: dict[int, IndexedTarSamples] = {}  # per process: workers open their own

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.load(self._sample(index)[".tokens.npy"]).astype(np.int64))

    def language(self, index: int) -> str:
        """The language of the documents in sample `index` ("" in shards from before languages were recorded)."""
        member = self._sample(index).get(".language.txt")
        return member.read().decode() if member is not None else ""

    def _sample(self, index: int) -> dict:
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        if shard not in self._open:
            self._open[shard] = IndexedTarSamples(path=self.paths[shard])
        return self._open[shard][index - int(self.offsets[shard])]


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


class DeviceBatches:
    """(B, T+1) token micro-batches on `device` from the loader, the next one taken ahead of use:
    `prefetch()` takes it from the loader (receiving it from the worker costs the main process
    time) and starts its copy to the device (non-blocking from pinned memory). The training step
    calls it while the device still works through the backward pass, not after the optimizer
    step's host sync, when the device would idle."""

    def __init__(self, batches: Iterator[torch.Tensor], device: torch.device):
        self.batches, self.device = batches, device
        self.ready: torch.Tensor | None = None

    def prefetch(self) -> None:
        """Take the next micro-batch now, unless one is already waiting."""
        if self.ready is None:
            self.ready = next(self.batches).to(self.device, non_blocking=True)

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> torch.Tensor:
        self.prefetch()
        ready, self.ready = self.ready, None
        return ready


def train_loader(cfg: DataConfig, manifest: Manifest, seed: int, rank: int, world_size: int,
                 micro_batch: int, start: int = 0) -> DataLoader:
    dataset = ShardSamples(cfg.shards, manifest.split("train"))
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
