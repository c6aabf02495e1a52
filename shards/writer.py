"""Packing framed documents into fixed-length samples and writing them into tar shards."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import webdataset as wds

from dslm.data.manifest import ShardEntry
from dslm.files import sha256_file


def split_of(text: str, val_fraction: float) -> str:
    """Train or val from a hash of the document, so a document (and its duplicates) sits in one split."""
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % 1_000_000
    return "val" if bucket < val_fraction * 1_000_000 else "train"


class Packer:
    """Concatenates token sequences and cuts the stream into samples of `sample_len` tokens."""

    def __init__(self, sample_len: int, dtype: np.dtype):
        self.sample_len = sample_len
        self.dtype = dtype
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0

    def add(self, ids: list[int]) -> Iterator[np.ndarray]:
        self.pending.append(np.asarray(ids, dtype=self.dtype))
        self.pending_tokens += len(ids)
        if self.pending_tokens < self.sample_len:
            return
        stream = np.concatenate(self.pending)
        full = len(stream) // self.sample_len * self.sample_len
        yield from stream[:full].reshape(-1, self.sample_len)
        self.pending = [stream[full:]]
        self.pending_tokens = len(stream) - full

    @property
    def leftover(self) -> int:
        """Tokens at the end of the stream that never filled a sample (dropped)."""
        return self.pending_tokens


class ShardWriter:
    """Writes one split's samples into `{split}-NNNNNN.tar` files of `samples_per_shard` samples.

    Each tar is written under a hidden temporary name and renamed only once complete.
    """

    def __init__(self, out: Path, split: str, samples_per_shard: int):
        self.out = out
        self.split = split
        self.samples_per_shard = samples_per_shard
        self.entries: list[ShardEntry] = []
        self.total = 0
        self._tar: wds.TarWriter | None = None
        self._in_shard = 0

    @property
    def _name(self) -> str:
        return f"{self.split}-{len(self.entries):06d}.tar"

    def add(self, tokens: np.ndarray) -> None:
        if self._tar is None:
            # a fixed mtime keeps the bytes (and sha256) of a shard the same on every build
            self._tar = wds.TarWriter(str(self.out / f".{self._name}.tmp"), mtime=0)
        self._tar.write({"__key__": f"{self.split}-{self.total:09d}", "tokens.npy": tokens})
        self._in_shard += 1
        self.total += 1
        if self._in_shard == self.samples_per_shard:
            self._finish_shard(tokens.size)

    def close(self, sample_len: int) -> list[ShardEntry]:
        if self._tar is not None:
            self._finish_shard(sample_len)
        return self.entries

    def _finish_shard(self, sample_len: int) -> None:
        assert self._tar is not None
        self._tar.close()
        tmp, final = self.out / f".{self._name}.tmp", self.out / self._name
        entry = ShardEntry(
            name=final.name,
            split=self.split,
            samples=self._in_shard,
            tokens=self._in_shard * sample_len,
            bytes=tmp.stat().st_size,
            sha256=sha256_file(tmp),
        )
        os.replace(tmp, final)
        self.entries.append(entry)
        self._tar, self._in_shard = None, 0
