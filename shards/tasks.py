"""A build split over many processes or SLURM array tasks (`--tasks N --task K`), and
`dslm-shard merge`, which makes the tasks' output one build.

Task K of N reads the input units whose index is K modulo N (dslm_shards.sources.Partition) and runs
three stages, each a command; every task of a stage must finish before any of the next starts:

    digests   filter the task's documents; write their digests bucketed by hash (dslm_shards.dedup)
    dedup     task K reads bucket K of every task; lists the duplicates of each task
    write     filter, tokenize, drop the listed duplicates, pack and write shards into
              OUT/task-K/ (resumable: a rerun keeps the verified shards), then
              OUT/task-K/task.json (the tokens of its streams' last, partial samples) and
              OUT/task-K/manifest.json (its commit marker, names relative to the task's folder)

`dslm-shard merge OUT` checks every task finished with the same inputs and settings, packs the
tasks' leftover tokens (in task order, per stream) into the shards in OUT/tails/, and writes
OUT/manifest.json last: the shards of task 0, task 1, ..., then the tails, named relative to
OUT. So the documents in the shards, and the counts by reason, are those of a one-process build
of the same inputs, and only the last, partial sample of each stream is dropped, as there.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dslm.data.manifest import MANIFEST_NAME, Manifest, ShardEntry, SourceStats
from dslm.errors import DslmError
from dslm.files import atomic_write_text, sha256_file
from dslm.logs import warning
from dslm_shards.dedup import DEDUP_DIR, Stamp, read_record
from dslm_shards.journal import JOURNAL_NAME, BuildState, load_state, remove_journal
from dslm_shards.sources import Partition
from dslm_shards.writer import TOKENIZER_NAME, Packer, ShardWriter, warn_unsampled

STAGES = ("digests", "dedup", "write")
TAILS_NAME = "task.json"
TAILS_DIR = "tails"
LOCK_NAME = ".build.lock"
"""What a process writing a build's folder, or a task's, holds (dslm.files.exclusive)."""
TASK_DIR = re.compile(r"task-(\d{5})")


def task_dir(out: Path, task: int) -> Path:
    return out / f"task-{task:05d}"


@dataclass
class TaskTails:
    """OUT/task-K/task.json: what `dslm-shard merge` needs of a finished task beyond its manifest."""

    settings: dict
    """dslm_shards.build.task_settings of the build, the same for every task (dedup.Stamp)."""
    tasks: int
    task: int
    samples_per_shard: int
    pending: dict[str, list[int]]
    """The tokens of each stream (SPLIT.COPY.LANGUAGE) after its last full sample."""
    owners: dict[str, list[list[int]]]
    """Which source each stream's pending tokens came from (dslm_shards.writer.Packer.owners)."""


def save_tails(home: Path, tails: TaskTails) -> None:
    atomic_write_text(home / TAILS_NAME, json.dumps(dataclasses.asdict(tails)) + "\n")


def load_tails(home: Path) -> TaskTails | None:
    """A task's task.json, or None. Raises DslmError for a damaged one."""
    record = read_record(home / TAILS_NAME)
    try:
        return None if record is None else TaskTails(**record)
    except TypeError as e:
        raise DslmError(f"{home / TAILS_NAME} is damaged ({e}); rebuild the task with --overwrite") from None


def refuse_finished(out: Path) -> None:
    """A stage of a distributed build does not touch a finished build, or an unfinished one of
    one process."""
    if (out / MANIFEST_NAME).exists():
        raise DslmError(
            f"{out} already holds a finished build (manifest.json); to build it again, remove it "
            f"(dslm-submit shard --overwrite does)"
        )
    if (out / JOURNAL_NAME).exists():
        raise DslmError(
            f"{out} holds an unfinished build of one process ({JOURNAL_NAME}); finish it with "
            f"`dslm-shard build` without --tasks, or remove it"
        )


def refuse_tasks(out: Path) -> None:
    """A build of one process does not write beside the tasks of a split one."""
    if task_folders(out) or (out / DEDUP_DIR).exists():
        raise DslmError(
            f"{out} holds a build split over tasks (task-NNNNN/, dedup/); finish it with "
            f"`dslm-shard merge`, or pass --overwrite to replace it"
        )


def finished_task(home: Path, stamp: Stamp, part: Partition) -> Manifest | None:
    """The manifest of task `part` when it finished before with the same inputs, else None."""
    tails = load_tails(home)
    if not (home / MANIFEST_NAME).exists() or tails is None:
        return None
    return Manifest.load(home) if stamp.matches(dataclasses.asdict(tails)) and tails.task == part.task else None


def clear_build(out: Path) -> None:
    """Remove a build (finished or not, of one process or of tasks) from `out`: the manifest
    first, so that nothing half-removed looks finished. Other files in `out` are left."""
    if (out / MANIFEST_NAME).exists():
        remove_finished_build(out)
    if (state := load_state(out)) is not None:
        remove_unfinished_build(out, state)
    for folder in [*task_folders(out), out / TAILS_DIR, out / DEDUP_DIR]:
        shutil.rmtree(folder, ignore_errors=True)


def remove_finished_build(out: Path) -> None:
    """Remove the manifest in `out`, then the shards it lists."""
    old = Manifest.load(out)
    (out / MANIFEST_NAME).unlink()  # the old build stops being valid before any of its shards goes
    for entry in old.shards:
        (out / entry.name).unlink(missing_ok=True)


def remove_unfinished_build(out: Path, state: BuildState) -> None:
    """Remove the journal of an unfinished build of one process, the shards it lists and the
    open shards' temporary files."""
    remove_journal(out)
    for writer in state.writers.values():
        for entry in writer.entries:
            (out / entry.name).unlink(missing_ok=True)
    for tmp in out.glob(".*.tar.tmp"):
        tmp.unlink()


def task_folders(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("task-*") if p.is_dir() and TASK_DIR.fullmatch(p.name))


@dataclass
class Finished:
    """One task's output, as the merge reads it."""

    home: Path
    manifest: Manifest
    tails: TaskTails


def finished_tasks(out: Path) -> list[Finished]:
    """Every task's output, in task order. Raises DslmError (one line) for no tasks, a task that
    has not finished, or tasks of different inputs, settings or task counts."""
    folders = task_folders(out)
    if not folders:
        raise DslmError(
            f"{out} holds no task of a distributed build (task-NNNNN/ folders): run "
            f"`dslm-shard build ... --tasks N --task K` first"
        )
    first = next((tails for tails in map(load_tails, folders) if tails is not None), None)
    if first is None:
        raise DslmError(
            f"no task in {out} has finished stage write ({', '.join(f.name for f in folders)} "
            f"started); run every task's stage write, then merge"
        )
    stamp, done = Stamp(first.settings, first.tasks), []
    for k in range(first.tasks):
        home = task_dir(out, k)
        tails = load_tails(home)
        missing = [
            name
            for name, there in ((TAILS_NAME, tails is not None), (MANIFEST_NAME, (home / MANIFEST_NAME).exists()))
            if not there
        ]
        if missing:
            raise DslmError(
                f"task {k} of {first.tasks} has not finished ({home} has no {' or '.join(missing)}): "
                f"rerun `dslm-shard build ... --tasks {first.tasks} --task {k} --stage write`, then merge"
            )
        if not stamp.matches(dataclasses.asdict(tails)) or tails.task != k:
            raise DslmError(
                f"task {k} in {home} ran with other sources, settings or inputs than task {first.task} "
                f"({stamp.differences(dataclasses.asdict(tails))}); rebuild the tasks with the same "
                f"arguments"
            )
        done.append(Finished(home, Manifest.load(home), tails))
    extra = [f.name for f in folders if int(TASK_DIR.fullmatch(f.name).group(1)) >= first.tasks]
    if extra:
        raise DslmError(
            f"{out} holds {', '.join(extra)}, beyond the {first.tasks} tasks of this build: left by a "
            f"build with more --tasks; remove them"
        )
    return done


def merge_build(out: Path) -> Manifest:
    """`dslm-shard merge OUT`: check the tasks, pack their tails, write OUT/manifest.json (last),
    then remove the dedup files. Raises DslmError (one line) as `finished_tasks`, for a finished
    build in `out`, a missing or changed shard or tokenizer."""
    refuse_finished(out)
    done = finished_tasks(out)
    first = done[0].manifest
    tokenizer = out / TOKENIZER_NAME
    if not tokenizer.is_file() or sha256_file(tokenizer) != first.tokenizer_sha256:
        raise DslmError(
            f"{tokenizer} is missing or not the tasks' tokenizer: stage digests of task 0 places it; rerun that task"
        )
    entries = [entry for f in done for entry in task_entries(out, f)]
    stats = merged_stats(done)
    tails, dropped = write_tails(out, done, first.seq_len + 1, first.dtype, stats)
    manifest = dataclasses.replace(
        first, tokenizer=tokenizer.name, shards=entries + tails, sources=stats, dropped_tokens=dropped
    )
    for spec, st in stats.items():
        if not st.documents:
            warning(f"source {spec!r} gave no documents to write")
    warn_unsampled(manifest)
    if not manifest.split("train"):
        shutil.rmtree(out / TAILS_DIR, ignore_errors=True)
        raise DslmError(f"too little text for one training sample of {first.seq_len + 1} tokens")
    manifest.save(out)  # the commit point
    shutil.rmtree(out / DEDUP_DIR, ignore_errors=True)
    return manifest


def task_entries(out: Path, task: Finished) -> list[ShardEntry]:
    """A task's shard entries, named relative to `out`, after checking that each shard is there
    with its size. Only the size: counting a shard's samples reads every tar header (47 us a
    sample, over an hour for 100B tokens, in one process); `dslm-shard verify` checks samples and
    sha256."""
    entries = []
    for entry in task.manifest.shards:
        path = task.home / entry.name
        if not path.is_file() or path.stat().st_size != entry.bytes:
            raise DslmError(
                f"{path} is missing or not the {entry.bytes:,} bytes its task wrote; rebuild task "
                f"{task.tails.task} with --overwrite, then merge"
            )
        entries.append(dataclasses.replace(entry, name=f"{task.home.name}/{entry.name}"))
    return entries


def merged_stats(done: list[Finished]) -> dict[str, SourceStats]:
    """Each source's counts summed over the tasks, without their dropped tokens (the merge
    drops fewer: only what is left after packing every task's tails)."""
    merged: dict[str, SourceStats] = {}
    for task in done:
        for spec, st in task.manifest.sources.items():
            total = merged.setdefault(spec, SourceStats())
            total.documents += st.documents
            total.bytes += st.bytes
            total.tokens += st.tokens
            total.headers_stripped += st.headers_stripped
            for reason, n in st.filtered.items():
                total.filtered[reason] = total.filtered.get(reason, 0) + n
    return merged


def write_tails(
    out: Path, done: list[Finished], sample_len: int, dtype: str, stats: dict[str, SourceStats]
) -> tuple[list[ShardEntry], dict[str, int]]:
    """Pack each stream's leftover tokens of every task, in task order, into samples in
    OUT/tails/; return their shard entries (named relative to `out`) and the tokens still left
    per stream, which are dropped and counted in their sources' `dropped_tokens`."""
    shutil.rmtree(out / TAILS_DIR, ignore_errors=True)  # a merge that stopped before its manifest
    (out / TAILS_DIR).mkdir()
    specs = list(stats)
    writers: dict[str, ShardWriter] = {}
    dropped: dict[str, int] = {}
    for name in sorted({name for task in done for name in task.tails.pending}):
        split, _, language = name.split(".", 2)  # SPLIT.COPY.LANGUAGE; only the language may hold dots
        writer = writers.setdefault(
            split, ShardWriter(out / TAILS_DIR, split, done[0].tails.samples_per_shard, sample_len)
        )
        packer = Packer(sample_len, np.dtype(dtype))
        for task in done:
            tokens, start = task.tails.pending.get(name, []), 0
            owners = task.tails.owners.get(name, [[-1, len(tokens)]])
            if sum(n for _, n in owners) != len(tokens):
                raise DslmError(
                    f"{task.home / TAILS_NAME}: stream {name} holds {len(tokens)} tokens but names the "
                    f"sources of {sum(n for _, n in owners)}; rebuild the task with --overwrite"
                )
            for source, n in owners:
                for sample in packer.add(np.asarray(tokens[start : start + n], dtype=dtype), source):
                    writer.add(sample, language)
                start += n
        dropped[name] = packer.pending_tokens
        for source, n in packer.owners:
            if source >= 0:
                stats[specs[source]].dropped_tokens += n
    entries = [dataclasses.replace(e, name=f"{TAILS_DIR}/{e.name}") for w in writers.values() for e in w.close()]
    return entries, dropped
