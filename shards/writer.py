"""Packing framed documents into fixed-length samples and writing them into tar shards."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from dslm.data.manifest import Manifest, ShardEntry
from dslm.errors import DslmError
from dslm.files import open_at, sha256_file, tmp_path
from dslm.logs import warning

TOKENIZER_NAME = "tokenizer.json"
"""The tokenizer's copy in a build's folder."""
SAMPLE_SUFFIX = ".tokens.npy"
MASK_SUFFIX = ".mask.npy"
"""A sample's loss mask in instruction shards (`dslm-shard sft`): (seq_len + 1,) uint8, 1 where the
token is a training target."""
LANGUAGE_SUFFIX = ".language.txt"
"""The language of the documents packed in a sample (one per sample): python, c, java, text, en, ..."""
MAX_SEQ_LEN = 1 << 20
"""Longest --seq-len, 1,048,576 tokens: a model reads a sample whole, with a learned position per
token (model.block_size), and at 2**20 positions a 1,024-wide model's position table alone holds
1.07B parameters, past the largest model dslm trains. (`dslm-shard sft` holds each sample whole in
memory, 8 bytes a token: --seq-len 1000000000 asked for 7.45 GiB and died.)"""


def check_packing(seq_len: int, samples_per_shard: int) -> None:
    """DslmError for a --seq-len outside 1..MAX_SEQ_LEN or a --samples-per-shard below 1."""
    if not 1 <= seq_len <= MAX_SEQ_LEN:
        raise DslmError(f"--seq-len {seq_len} must be within 1..{MAX_SEQ_LEN:,} tokens")
    if samples_per_shard < 1:
        raise DslmError(f"--samples-per-shard {samples_per_shard} must be at least 1")


def split_of(text: str, val_fraction: float) -> str:
    """Train or val from a hash of the document, so a document (and its duplicates) sits in one split."""
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % 1_000_000
    return "val" if bucket < val_fraction * 1_000_000 else "train"


class Packer:
    """Concatenates token sequences and cuts the stream into samples of `sample_len` tokens.
    `owners` says which source the tokens still waiting for a sample came from: runs
    [source index, tokens], oldest first, covering `pending` (-1: unknown, as in a journal
    written before owners were kept)."""

    def __init__(
        self, sample_len: int, dtype: np.dtype, pending: list[int] | None = None, owners: list[list[int]] | None = None
    ):
        self.sample_len = sample_len
        self.dtype = dtype
        self.pending: list[np.ndarray] = [np.asarray(pending or [], dtype=dtype)]
        self.pending_tokens = len(pending or [])
        if owners is None:
            owners = [[-1, self.pending_tokens]] if self.pending_tokens else []
        self.owners = [list(run) for run in owners]

    def add(self, ids: np.ndarray, owner: int = -1) -> Iterator[np.ndarray]:
        """The samples that `ids` (from source `owner`) completed, in order."""
        self.pending.append(ids)
        self.pending_tokens += len(ids)
        if self.owners and self.owners[-1][0] == owner:
            self.owners[-1][1] += len(ids)
        else:
            self.owners.append([owner, len(ids)])
        if self.pending_tokens < self.sample_len:
            return
        stream = np.concatenate(self.pending)
        full = len(stream) // self.sample_len * self.sample_len
        yield from stream[:full].reshape(-1, self.sample_len)
        self.pending = [stream[full:]]
        self.pending_tokens = len(stream) - full
        self._release(full)

    def _release(self, tokens: int) -> None:
        """Forget the owners of the first `tokens` pending tokens, now written."""
        while tokens:
            taken = min(tokens, self.owners[0][1])
            self.owners[0][1] -= taken
            tokens -= taken
            if not self.owners[0][1]:
                self.owners.pop(0)

    def leftover(self) -> list[int]:
        """Tokens at the end of the stream that have not filled a sample yet (dropped at the end)."""
        return np.concatenate(self.pending).tolist()


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` in .npy format, as np.save writes it."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def shard_path(out: Path, split: str, index: int) -> Path:
    return out / f"{split}-{index:06d}.tar"


@dataclass
class WriterState:
    """Where a split's writing stands between two documents: what a resumed build continues from."""

    entries: list[ShardEntry] = field(default_factory=list)
    """Finished shards, in order."""
    total: int = 0
    """Samples written so far, finished shards and the open one."""
    in_shard: int = 0
    """Samples in the open shard's temporary file."""
    offset: int = 0
    """Bytes of the open shard's temporary file that hold those samples (a member boundary)."""
    languages: dict[str, int] = field(default_factory=dict)
    """Samples per language in the open shard."""


class ShardWriter:
    """Writes one split's samples into `{split}-NNNNNN.tar` files of `samples_per_shard` samples.

    Each tar is written under a hidden temporary name and renamed only once complete. Members
    are `KEY.tokens.npy`, `KEY.mask.npy` (only for a sample given a mask) and `KEY.language.txt`,
    as webdataset's TarWriter names them (a sample packs documents of one language, so that eval
    can report per language), with fixed owner and mtime so a
    shard's bytes (and sha256) are the same on every build. Tar is written with `tarfile`
    directly because a resumed build needs the open file cut back to a member boundary
    (`state.offset`) and appended to, which webdataset's streaming writer cannot do.
    """

    def __init__(
        self, out: Path, split: str, samples_per_shard: int, sample_len: int, state: WriterState | None = None
    ):
        self.out = out
        self.split = split
        self.samples_per_shard = samples_per_shard
        self.sample_len = sample_len
        self.state = state or WriterState()
        self._file: BinaryIO | None = None
        self._tar: tarfile.TarFile | None = None
        if self.state.in_shard:
            self._open(self.state.offset)

    @property
    def _final(self) -> Path:
        return shard_path(self.out, self.split, len(self.state.entries))

    @property
    def _tmp(self) -> Path:
        return tmp_path(self._final)

    def add(self, tokens: np.ndarray, language: str, mask: np.ndarray | None = None) -> ShardEntry | None:
        """Write one sample, and its (sample_len,) loss mask as uint8 when given one; return the
        shard's entry when this sample completed it."""
        if self._tar is None:
            self._open(0)
        assert self._tar is not None
        key = f"{self.split}-{self.state.total:09d}"
        self._add_member(key + SAMPLE_SUFFIX, npy_bytes(tokens))
        if mask is not None:
            self._add_member(key + MASK_SUFFIX, npy_bytes(mask.astype(np.uint8)))
        self._add_member(key + LANGUAGE_SUFFIX, language.encode())
        self.state.in_shard += 1
        self.state.total += 1
        self.state.offset = self._tar.offset
        self.state.languages[language] = self.state.languages.get(language, 0) + 1
        if self.state.in_shard == self.samples_per_shard:
            return self._finish_shard()
        return None

    def _add_member(self, name: str, data: bytes) -> None:
        assert self._tar is not None
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime, info.uname, info.gname = len(data), 0o444, 0, "bigdata", "bigdata"
        self._tar.addfile(info, io.BytesIO(data))

    def sync(self) -> WriterState:
        """Put the open shard's samples on disk; the state then describes the files exactly."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        return self.state

    def close(self) -> list[ShardEntry]:
        """Finish the last, partly filled shard; the entries of all."""
        if self._tar is not None:
            self._finish_shard()
        return self.state.entries

    def _open(self, offset: int) -> None:
        """Open the temporary file at `offset`: 0 starts a new shard, more continues a resumed one."""
        self._file = open_at(self._tmp, offset)
        self._tar = tarfile.TarFile(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)

    def _finish_shard(self) -> ShardEntry:
        assert self._tar is not None and self._file is not None
        self._tar.close()  # end-of-archive blocks; the file object stays ours
        self.sync()
        self._file.close()
        tmp, final = self._tmp, self._final
        entry = ShardEntry(
            name=final.name,
            split=self.split,
            samples=self.state.in_shard,
            tokens=self.state.in_shard * self.sample_len,
            bytes=tmp.stat().st_size,
            sha256=sha256_file(tmp),
            languages=dict(sorted(self.state.languages.items())),
        )
        os.replace(tmp, final)
        self.state.entries.append(entry)
        self.state.in_shard = self.state.offset = 0
        self.state.languages = {}
        self._tar = self._file = None
        return entry


def warn_unsampled(manifest: Manifest) -> None:
    """One warning line for each language, and each source, that has documents but no sample:
    all their tokens were in the last, partial sample of their streams (Manifest.dropped_tokens)."""
    sampled = {language for entry in manifest.shards for language in entry.languages}
    dropped: dict[str, int] = {}
    for name, tokens in manifest.dropped_tokens.items():
        language = name.split(".", 2)[2]  # SPLIT.COPY.LANGUAGE; only the language may hold dots
        dropped[language] = dropped.get(language, 0) + tokens
    tail = (
        f"all in the last, partial sample of their streams (under {manifest.seq_len + 1} tokens), "
        f"which is dropped; lower --seq-len or add text"
    )
    for language, tokens in sorted(dropped.items()):
        if language not in sampled:
            warning(f"language {language!r} has no sample: its {tokens:,} tokens are {tail}")
    for spec, stats in manifest.sources.items():
        if stats.tokens and stats.dropped_tokens == stats.tokens:
            warning(f"source {spec!r} has no sample: its {stats.tokens:,} tokens are {tail}")
