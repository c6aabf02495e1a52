"""Mixing shard folders at load time (`data.mix`): which source each global position reads, and
how far each source's own cursor has gone.

The interleave is a chain of Bresenham splits: position q goes to source 0 when
floor(a0 * (q + 1)) > floor(a0 * q), with a0 source 0's share of the weights; the positions left
go on to source 1 with its share of the rest, and so on. Each source's count over positions
[0, q) is then a closed form, so a resume on any world size computes every cursor from the global
cursor alone, and each source's count over any run of positions stays within as many samples of its share as
there are sources. GPT-NeoX, OLMo and litgpt mix by weight at load time too; theirs draw
at random, this one is exact.

A resume may change the weights: the run then records where (`base`) and each source's cursor
there, and the new weights interleave the positions after it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from dslm.data.order import WindowOrder


@dataclass
class MixSource:
    """One entry of `data.mix`."""

    shards: str = ""
    """Folder written by `dslm-shard build` (or `sft`); every source shares one tokenizer."""
    weight: float = 1.0
    """Share of the training samples, > 0; the weights are normalized to sum to 1."""
    name: str = ""
    """Name in TensorBoard (train/loss/NAME, data/samples/NAME); "" takes the folder's name."""

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError("each data.mix entry needs shards: FOLDER")
        if not 0 < self.weight < math.inf:
            raise ValueError(f"data.mix weight={self.weight} for {self.shards} must be above 0 and finite")


@dataclass
class MixBase:
    """Where the current weights took over: at global position `samples`, source i had read
    `cursors[i]` samples (all zero for a run that kept its weights from the start)."""

    samples: int = 0
    cursors: list[int] = field(default_factory=list)


class Interleave:
    """Source of each global position for `weights` (one per source), from `base` on."""

    def __init__(self, weights: Sequence[float], base: MixBase | None = None):
        left = np.cumsum(np.asarray(weights, dtype=np.float64)[::-1])[::-1]  # weight of source i and those after it
        self.shares = np.asarray(weights, dtype=np.float64) / left  # share of source i among the positions it sees
        self.shares[-1] = 1.0
        self.base = base or MixBase(0, [0] * len(weights))

    def counts(self, q: np.ndarray) -> np.ndarray:
        """(sources, len(q)) int64: each source's samples among the first q positions after base.samples
        (the chain of splits: source i takes floor(share * q) of the positions that reach it)."""
        counts = np.empty((len(self.shares), len(q)), dtype=np.int64)
        for i, share in enumerate(self.shares):
            counts[i] = np.floor(share * q)
            q = q - counts[i]
        return counts

    def cursors(self, position: int) -> list[int]:
        """Samples each source has read before global `position` (>= base.samples)."""
        counts = self.counts(np.array([position - self.base.samples], dtype=np.int64))[:, 0]
        return [int(c) + b for c, b in zip(counts, self.base.cursors)]

    def assign(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(sources, cursors), each (count,) int64, for global positions start .. start + count - 1:
        the source each one reads (the one source whose count it raises) and that source's own
        position (its cursor) there."""
        q = np.arange(start, start + count, dtype=np.int64) - self.base.samples
        before = self.counts(q)
        sources = np.argmax(self.counts(q + 1) > before, axis=0)
        columns = np.arange(count)
        return sources, before[sources, columns] + np.asarray(self.base.cursors, dtype=np.int64)[sources]


class MixedOrder:
    """The training order over several sources: global position -> (source, sample index in that
    source's train split). Each source reads its own samples in its own WindowOrder, through its
    epochs at its own pace."""

    def __init__(self, orders: Sequence[WindowOrder], interleave: Interleave):
        self.orders, self.interleave = list(orders), interleave

    def draw(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(sources, indices), each (count,) int64, for global positions start .. start + count - 1."""
        sources, cursors = self.interleave.assign(start, count)
        indices = np.empty(count, dtype=np.int64)
        for i, order in enumerate(self.orders):
            mine = sources == i
            if mine.any():  # a source's positions within one draw are consecutive in its own cursor
                indices[mine] = order.indices(int(cursors[mine][0]), int(mine.sum()))
        return sources, indices
