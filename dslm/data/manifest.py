"""manifest.json: the commit marker and table of contents of a shard folder (see DESIGN.md)."""

from __future__ import annotations

import dataclasses
import errno
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dslm.errors import DslmError
from dslm.files import atomic_write_text, sha256_file

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass
class ShardEntry:
    name: str
    split: str
    samples: int
    tokens: int
    bytes: int
    sha256: str
    languages: dict[str, int] = field(default_factory=dict)
    """Samples per language (each sample holds documents of one language)."""


PROCESS_LIMITS = (errno.EMFILE, errno.ENFILE, errno.ENOMEM)
"""Errors of opening a file that say nothing about the file: too many open files (this process's
limit, the system's), no memory for the map."""


def shard_problem(
    path: Path, entry: ShardEntry, count_samples: Callable[[Path], int], sha256: bool = True
) -> str | None:
    """Why the shard at `path` does not match its manifest entry (its size, its sample count as
    `count_samples` reads them, then, with `sha256`, its checksum), or None when it does. An
    exception from `count_samples` is reported as an unreadable tar, except running out of open
    files or memory (PROCESS_LIMITS), which is the process's, not the shard's, and is raised."""
    if not path.is_file():
        return "missing"
    if (size := path.stat().st_size) != entry.bytes:
        return f"{size:,} bytes, the manifest says {entry.bytes:,}"
    try:
        samples = count_samples(path)
    except OSError as e:
        if e.errno in PROCESS_LIMITS:
            raise
        return f"unreadable tar ({type(e).__name__}: {e})"
    except Exception as e:  # a damaged tar fails in the tar reader's own ways (tarfile, struct, wids asserts)
        return f"unreadable tar ({type(e).__name__}: {e})"
    if samples != entry.samples:
        return f"{samples:,} samples, the manifest says {entry.samples:,}"
    if sha256 and sha256_file(path) != entry.sha256:
        return "sha256 differs from the manifest"
    return None


@dataclass
class SourceStats:
    documents: int = 0
    bytes: int = 0
    tokens: int = 0
    filtered: dict[str, int] = field(default_factory=dict)
    """Documents skipped or dropped, by reason."""
    headers_stripped: int = 0
    """Kept code documents whose long leading comment or docstring was removed."""
    dropped_tokens: int = 0
    """Of `tokens`, those not written because they were in the last, partial sample of a packing
    stream (see Manifest.dropped_tokens). 0 in manifests written before it was counted."""


@dataclass
class Manifest:
    tokenizer: str
    tokenizer_sha256: str
    vocab_size: int
    seq_len: int
    dtype: str
    shards: list[ShardEntry]
    sources: dict[str, SourceStats]
    format: int = FORMAT_VERSION
    template: str = ""
    """The instruction template the examples are framed with (dslm.data.templates), written by
    `dslm-shard sft`; "" for `dslm-shard build`'s documents."""
    masks: bool = False
    """Each sample carries KEY.mask.npy (1 where the token is a training target)."""
    direction: str = ""
    """The reading direction the masks were made for ("forward" or "backward"); training on the
    shards needs data.direction to match. "" for shards without masks, which train either way."""
    fim: dict = field(default_factory=dict)
    """The fill-in-the-middle settings of the train split (dslm.data.fim.FimConfig's fields), or {}
    for documents as they are (val is always as it is)."""
    dropped_tokens: dict[str, int] = field(default_factory=dict)
    """Tokens not written, per packing stream `SPLIT.COPY.LANGUAGE` of `dslm-shard build` (copy k
    of a document goes to stream k): each stream's last, partial sample (fewer than seq_len + 1
    tokens) is dropped, not padded. {} for `dslm-shard sft`, which pads its last samples, and in
    manifests written before it was counted."""

    def split(self, name: str) -> list[ShardEntry]:
        return [s for s in self.shards if s.split == name]

    def tokenizer_file(self, folder: str | Path) -> Path:
        """The tokenizer the shards in `folder` (this manifest's) were built with, checked against
        the sha256 the manifest records: every command that reads the shards' ids as text takes it
        from here. Raises DslmError, naming both hashes, when the file is missing or another one
        (replaced after the build: the shards' ids would mean other text)."""
        path = Path(folder) / self.tokenizer
        if not path.is_file():
            raise DslmError(
                f"{path} is missing: the shards in {folder} need the tokenizer they were built with "
                f"(sha256 {self.tokenizer_sha256}, {MANIFEST_NAME})"
            )
        if (found := sha256_file(path)) != self.tokenizer_sha256:
            raise DslmError(
                f"{path} has sha256 {found}, but the shards in {folder} were built with sha256 "
                f"{self.tokenizer_sha256} ({MANIFEST_NAME}): it was replaced after the build and their ids "
                f"would mean other text; put the build's tokenizer back, or rebuild the shards with this "
                f"one (--overwrite)"
            )
        return path

    def save(self, folder: str | Path) -> None:
        atomic_write_text(Path(folder) / MANIFEST_NAME, json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise DslmError(f"no {MANIFEST_NAME} in {folder}: run `dslm-shard build` first")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT_VERSION:
                raise DslmError(f"{path}: manifest format {raw.get('format')} is not {FORMAT_VERSION}")
            raw["shards"] = [ShardEntry(**s) for s in raw["shards"]]
            raw["sources"] = {k: SourceStats(**v) for k, v in raw["sources"].items()}
            return cls(**raw)
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # not JSON, or not a manifest's fields
            raise DslmError(f"{path}: not a dslm-shard manifest ({type(e).__name__}: {e})") from None


def check_build_tokenizer(tokenizer: Path, out: Path) -> None:
    """A tokenizer.json given to a new build that is a finished build's own (beside the manifest.json
    that names it, in another folder than `out`) must still be the one that build was made with
    (Manifest.tokenizer_file): a replaced one would make the new shards' ids disagree with the
    model trained on the old ones. Raises DslmError as Manifest.tokenizer_file does."""
    folder = tokenizer.parent
    if not (folder / MANIFEST_NAME).is_file() or folder.resolve() == Path(out).resolve():
        return
    manifest = Manifest.load(folder)
    if manifest.tokenizer == tokenizer.name:
        manifest.tokenizer_file(folder)
