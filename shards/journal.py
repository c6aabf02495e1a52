"""The journal of an unfinished `dslm-shard build`: enough state, saved each time a shard is
finished, for a rerun after a crash to keep the finished shards and continue from there.

    OUT/.build-journal.json   where the build stands (rewritten atomically)
    OUT/.build-digests.bin    the dedup digests (16 bytes each) of every document kept so far,
                              appended as they come; the journal says how many are valid

Both are removed once manifest.json is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from dslm.data.manifest import ShardEntry, SourceStats
from dslm.files import atomic_write_text, open_at
from dslm_shards.writer import WriterState

JOURNAL_NAME = ".build-journal.json"
DIGESTS_NAME = ".build-digests.bin"
DIGEST_BYTES = 16


@dataclass
class Position:
    """A point between two documents of the input."""

    source: int = 0
    """Index of the source being read."""
    documents: int = 0
    """Documents of that source (as it yields them, before filters) already consumed."""


@dataclass
class BuildState:
    fingerprint: str
    """Hash of everything that decides the output: tokenizer, settings, sources."""
    position: Position = field(default_factory=Position)
    sources: dict[str, SourceStats] = field(default_factory=dict)
    writers: dict[str, WriterState] = field(default_factory=dict)
    pending: dict[str, list[int]] = field(default_factory=dict)
    """Tokens waiting in each packing stream for the next sample."""
    owners: dict[str, list[list[int]]] = field(default_factory=dict)
    """Which source each stream's pending tokens came from: runs [source index, tokens] (Packer.owners)."""
    digests: int = 0
    """Valid digests at the start of the digest log."""


def save_state(out: Path, state: BuildState) -> None:
    atomic_write_text(out / JOURNAL_NAME, json.dumps(dataclasses.asdict(state)) + "\n")


def load_state(out: Path) -> BuildState | None:
    """The journal of an unfinished build in `out`, or None."""
    path = out / JOURNAL_NAME
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return BuildState(
        fingerprint=raw["fingerprint"],
        position=Position(**raw["position"]),
        sources={spec: SourceStats(**s) for spec, s in raw["sources"].items()},
        writers={
            split: WriterState(**{**w, "entries": [ShardEntry(**e) for e in w["entries"]]})
            for split, w in raw["writers"].items()
        },
        pending=raw["pending"],
        owners=raw.get("owners", {}),  # absent from journals written before it was kept
        digests=raw["digests"],
    )


def remove_journal(out: Path) -> None:
    for name in (JOURNAL_NAME, DIGESTS_NAME):
        (out / name).unlink(missing_ok=True)


class DigestLog:
    """The append-only file of kept documents' digests, which a resumed build reloads instead of
    re-reading and re-filtering everything it already wrote."""

    def __init__(self, out: Path, valid: int):
        self.path = out / DIGESTS_NAME
        self.count = valid
        self._file: BinaryIO = open_at(self.path, valid * DIGEST_BYTES)

    def load(self) -> set[bytes]:
        with open(self.path, "rb") as f:
            data = f.read(self.count * DIGEST_BYTES)
        return {data[i : i + DIGEST_BYTES] for i in range(0, len(data), DIGEST_BYTES)}

    def add(self, digest: bytes) -> None:
        self._file.write(digest)
        self.count += 1

    def sync(self) -> int:
        self._file.flush()
        os.fsync(self._file.fileno())
        return self.count

    def close(self) -> None:
        self._file.close()
