"""Exact deduplication of a build's kept documents: in one process, or across the tasks of a
distributed build in two passes over digest files bucketed by hash.

A document is a duplicate when the MD5 digest of its kept text (dslm_shards.filters.text_digest)
equals that of a document before it in the global order: (source index, unit index, document
index within the unit), the order a one-process build reads in. So the first copy wins, and
which one does not depend on how many tasks the build is split into.

The distributed passes follow datatrove's exact dedup (ExactDedupSignature, ExactFindDedups,
ExactDedupFilter, the stages that built FineWeb), on files of our own:

    OUT/dedup/digests/task-K.npy    pass `digests`, task K: the digest records of its kept
                                    documents, grouped by bucket (digest modulo N)
    OUT/dedup/digests/task-K.json   written last: task K is complete; where each bucket starts
    OUT/dedup/dups/bucket-B.npy     pass `dedup`, task B: the positions (source, unit, document)
                                    whose digest, in bucket B, is that of an earlier document,
                                    grouped by the task that reads them
    OUT/dedup/dups/bucket-B.json    written last: bucket B is complete; where each task's start

There are as many buckets as tasks, so a dedup task holds one bucket of the corpus's records
(28 bytes each) in memory, not the corpus. datatrove's blocks are not used: their tie-break
among equal hashes is a document's index within its writer's rank, so the copy kept would
depend on the number of tasks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from numpy.lib.recfunctions import repack_fields

from dslm.errors import DslmError
from dslm.files import atomic_path, atomic_write_text
from dslm_shards.filters import DocumentFilter, FilterConfig
from dslm_shards.journal import DigestLog

DEDUP_DIR = "dedup"


@dataclass(frozen=True)
class Stamp:
    """What every stage and task of a build split over tasks must share: the settings that decide
    its bytes (dslm_shards.build.task_settings: tokenizer, options, filters, sources and their units)
    and the number of tasks. Every file a stage finishes with records it."""

    settings: dict
    tasks: int

    def matches(self, record: dict) -> bool:
        return (record.get("settings"), record.get("tasks")) == (self.settings, self.tasks)

    def differences(self, record: dict) -> str:
        """What differs between this stamp and a recorded one, for an error line."""
        if record.get("tasks") != self.tasks:
            return f"--tasks {record.get('tasks')} there, {self.tasks} here"
        theirs = record.get("settings") or {}
        keys = sorted(k for k in {*theirs, *self.settings} if theirs.get(k) != self.settings.get(k))
        return "differing " + ", ".join(keys)


RECORD = np.dtype([("d0", "<u8"), ("d1", "<u8"), ("source", "<u4"), ("unit", "<u4"), ("doc", "<u4")])
"""A kept document's digest (MD5, 16 bytes as two little-endian uint64) and its position in the
global order: source index, unit index within the source, document index within the unit."""
POSITION = ["source", "unit", "doc"]

DocPosition = tuple[int, int, int]
"""(source index, unit index, document index within the unit): a document's place in the
global order of a build's input."""


def records(digests: Iterable[bytes], positions: Iterable[DocPosition]) -> np.ndarray:
    """RECORD rows for kept documents' 16-byte digests and their positions."""
    positions = list(positions)
    out = np.zeros(len(positions), RECORD)
    raw = np.frombuffer(b"".join(digests), dtype="<u8").reshape(-1, 2) if positions else np.zeros((0, 2), "<u8")
    out["d0"], out["d1"] = raw[:, 0], raw[:, 1]
    for i, name in enumerate(POSITION):
        out[name] = [p[i] for p in positions]
    return out


def bucket_of(rows: np.ndarray, buckets: int) -> np.ndarray:
    return rows["d1"] % np.uint64(buckets)


def in_order(rows: np.ndarray) -> np.ndarray:
    """Rows sorted by digest, then by global position: each digest's first copy comes first."""
    return rows[np.lexsort([rows[name] for name in reversed(["d0", "d1", *POSITION])])]


def later_copies(rows: np.ndarray) -> np.ndarray:
    """The rows (sorted by `in_order`) whose digest is the same as the row before: every copy but
    the first of each digest."""
    same = (rows["d0"][1:] == rows["d0"][:-1]) & (rows["d1"][1:] == rows["d1"][:-1])
    return rows[1:][same]


def digests_dir(out: Path) -> Path:
    return out / DEDUP_DIR / "digests"


def dups_dir(out: Path) -> Path:
    return out / DEDUP_DIR / "dups"


def save_parts(path: Path, rows: np.ndarray, part: np.ndarray, parts: int) -> list[int]:
    """Write `rows` grouped by `part` (in [0, parts)) into one .npy file; return where each part
    starts and ends in it (parts + 1 offsets). One file per task and pass, not one per task and
    bucket: at N tasks a pass writes N files, not N^2 (a shared filesystem's metadata cost)."""
    order = np.argsort(part, kind="stable")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, rows[order], allow_pickle=False)
    return np.searchsorted(part[order], np.arange(parts + 1)).tolist()


def write_digest_buckets(out: Path, task: int, rows: np.ndarray, stamp: Stamp) -> None:
    """Pass `digests`, the end of task `task`: its records grouped by bucket, then the file that
    says they are complete (and where each bucket is)."""
    offsets = save_parts(digests_dir(out) / f"task-{task:05d}.npy", rows, bucket_of(rows, stamp.tasks), stamp.tasks)
    save_done(out, "digests", task, stamp, offsets, documents=len(rows))


def find_duplicates(out: Path, bucket: int, stamp: Stamp) -> tuple[int, int]:
    """Pass `dedup`, task `bucket`: read every task's records of this bucket, and write the
    positions that are later copies, grouped by the task that owns them (round-robin units:
    unit % tasks). Returns (records, duplicates). Raises DslmError when a task of pass
    `digests` has not finished, or did with other settings."""
    done = require_done(out, "digests", stamp)
    rows = in_order(
        np.concatenate(
            [
                load_part(digests_dir(out) / f"task-{task:05d}.npy", done[task]["offsets"], bucket)
                for task in range(stamp.tasks)
            ]
        )
    )
    dups = later_copies(rows)
    offsets = save_parts(
        dups_dir(out) / f"bucket-{bucket:05d}.npy",
        repack_fields(dups[POSITION]),
        dups["unit"] % np.uint32(stamp.tasks),
        stamp.tasks,
    )
    save_done(out, "dedup", bucket, stamp, offsets, records=len(rows), duplicates=len(dups))
    return len(rows), len(dups)


def save_done(out: Path, stage: str, k: int, stamp: Stamp, offsets: list[int], **counts: int) -> None:
    record = {"settings": stamp.settings, "tasks": stamp.tasks, "offsets": offsets, **counts}
    atomic_write_text(done_file(out, stage, k), json.dumps(record) + "\n")


def lock_file(out: Path, stage: str, k: int) -> Path:
    """What task `k` of pass `stage` holds while it runs (dslm.files.exclusive)."""
    return done_file(out, stage, k).with_suffix(".lock")


def done_file(out: Path, stage: str, k: int) -> Path:
    """The file written last by task `k` of pass `stage` ("digests" or "dedup")."""
    return digests_dir(out) / f"task-{k:05d}.json" if stage == "digests" else dups_dir(out) / f"bucket-{k:05d}.json"


def read_record(path: Path) -> dict | None:
    """A JSON record a stage wrote last, or None when there is none. Raises DslmError for one
    that is not JSON (damaged)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise DslmError(
            f"{path} is damaged ({type(e).__name__}: {e}); rerun the stage that wrote it with --overwrite"
        ) from None
    if not isinstance(record, dict):
        raise DslmError(f"{path} is damaged (not a JSON object); rerun the stage that wrote it with --overwrite")
    return record


def is_done(out: Path, stage: str, k: int, stamp: Stamp) -> bool:
    """Whether task `k` of pass `stage` finished for a build of this stamp."""
    record = read_record(done_file(out, stage, k))
    return record is not None and stamp.matches(record)


def require_done(out: Path, stage: str, stamp: Stamp) -> list[dict]:
    """What every task of pass `stage` recorded, when all finished for a build of this stamp;
    else one line naming the first that did not, or what differs."""
    done = []
    for k in range(stamp.tasks):
        path = done_file(out, stage, k)
        record = read_record(path)
        if record is None:
            raise DslmError(
                f"{path} is missing: stage {stage} has not finished for task {k} of {stamp.tasks}; run "
                f"`dslm-shard build ... --tasks {stamp.tasks} --task {k} --stage {stage}` first"
            )
        if not stamp.matches(record):
            raise DslmError(
                f"stage {stage} of task {k} ran with other sources, settings or inputs than this one "
                f"({stamp.differences(record)}; {path}): give every stage and task the same "
                f"arguments, or rerun every stage with --overwrite if the inputs changed"
            )
        done.append(record)
    return done


def load_part(path: Path, offsets: list[int], k: int) -> np.ndarray:
    """Part `k` of a file written by `save_parts`, reading only its rows. Raises DslmError for a
    file that is not such an array (damaged)."""
    try:
        return np.array(np.load(path, mmap_mode="r")[offsets[k] : offsets[k + 1]])
    except (ValueError, OSError, IndexError) as e:
        raise DslmError(
            f"{path} is damaged ({type(e).__name__}: {e}); rerun the stage that wrote it with --overwrite"
        ) from None


class ListedDuplicates:
    """The duplicates of one task of a distributed build, from pass `dedup`'s lists. Memory: the
    task's duplicates, not its documents."""

    def __init__(self, out: Path, task: int, stamp: Stamp):
        self.stamp = stamp
        done = require_done(out, "dedup", stamp)
        lists = [load_part(dups_dir(out) / f"bucket-{b:05d}.npy", done[b]["offsets"], task) for b in range(stamp.tasks)]
        self.positions = {tuple(map(int, row)) for rows in lists for row in rows.tolist()}

    def duplicate(self, position: DocPosition, digest: bytes) -> bool:
        return position in self.positions

    def sync(self) -> int:
        return 0

    def close(self) -> None:
        pass


class SeenDigests:
    """The duplicates of a one-process build: the digests of the documents kept so far, in memory
    and in the journal's digest log (which a resumed build reloads)."""

    def __init__(self, home: Path, valid: int, filters: FilterConfig):
        self.log = DigestLog(home, valid)
        self.filter = DocumentFilter(filters, seen=self.log.load())

    def duplicate(self, position: DocPosition, digest: bytes) -> bool:
        if not self.filter.first_seen(digest):
            return True
        self.log.add(digest)
        return False

    def sync(self) -> int:
        return self.log.sync()

    def close(self) -> None:
        self.log.close()
