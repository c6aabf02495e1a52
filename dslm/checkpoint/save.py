"""Writing checkpoints: the Checkpointer (every rank's files, then rank 0's seal and `latest`),
pruning, the best tag, and moving an abandoned branch aside (dslm.checkpoint.format has the
layout and the seal).

Writes that fail cleanly: a write that fails (disk full, quota, the file size limit,
a read-only filesystem) is kept with its OS error instead of raised in the middle of DeepSpeed's
save, so every rank still reaches the save's closing barrier; then the ranks agree, rank 0 removes
the partial tag, and every rank raises the same WriteError naming the tag, the folder and the
error. `latest` and the tags before are never touched. The advice to free space goes only with
the errors that mean space (OUT_OF_SPACE); any other names its cause as it is."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from dslm.checkpoint.format import (
    ABANDONED_NAME,
    BEST_NAME,
    LATEST_NAME,
    SEAL_NAME,
    TrainState,
    best_tag,
    list_checkpoints,
    live_checkpoints,
    own_checksums,
    rng_file,
    rng_state,
    seal,
    sealed_state,
    universal_dir,
)
from dslm.compat import has_method, require
from dslm.errors import WriteError
from dslm.files import atomic_write_text
from dslm.run_dir import tag_for

OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""A full disk, a quota, the file size limit (ulimit -f): running again helps once space is freed."""


class KeptWrites:
    """DeepSpeed's checkpoint writer (engine.checkpoint_engine) with its `save` writing through a
    Python file: torch's own C++ writer reports a full disk as "unexpected pos", without the OS
    error. The first failed write of a save is kept in `error`; later writes of that save are
    skipped. Everything else is DeepSpeed's writer's."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.error: str | None = None
        self.out_of_space = False
        """Whether `error` is one of OUT_OF_SPACE."""

    @classmethod
    def around(cls, engine) -> KeptWrites:
        """The engine's writer, wrapped on first use, with no error kept: call at the start of a save."""
        if not isinstance(engine.checkpoint_engine, cls):
            require(
                "deepspeed",
                "the engine writes its files with engine.checkpoint_engine.save(state_dict, path)",
                has_method(getattr(engine, "checkpoint_engine", None), "save", ("state_dict", "path")),
            )
            engine.checkpoint_engine = cls(engine.checkpoint_engine)
        engine.checkpoint_engine.error, engine.checkpoint_engine.out_of_space = None, False
        return engine.checkpoint_engine

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def save(self, state_dict, path: str) -> None:
        """torch.save as DeepSpeed's writer does it, unless a write of this save failed already."""
        if self.error is not None:
            return
        with self.kept(path), open(path, "wb") as f:
            torch.save(state_dict, f, _use_new_zipfile_serialization=getattr(self.inner, "zipfile_serialization", True))

    @contextmanager
    def kept(self, path: str | Path) -> Iterator[None]:
        """Run a write of `path`, keeping its failure (the first of the save) instead of raising it."""
        try:
            yield
        except (OSError, RuntimeError) as e:  # torch's writer raises RuntimeError, the OSError as its context
            if self.error is None:
                cause = root_cause(e)
                self.out_of_space = isinstance(cause, OSError) and cause.errno in OUT_OF_SPACE
                self.error = f"writing {Path(path).name}: {describe(cause, Path(path).parent)}"

    def raise_if_failed(self, tag_dir: Path) -> None:
        """Collective: when a write failed on any rank, rank 0 removes the partial `tag_dir` and every
        rank raises WriteError with the first rank's error."""
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, (self.error, self.out_of_space))
        failed = [(rank, error, space) for rank, (error, space) in enumerate(errors) if error is not None]
        if not failed:
            return
        if dist.get_rank() == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        dist.barrier()
        rank, error, out_of_space = failed[0]
        then = "free space, then run again" if out_of_space else "once that is fixed, run again"
        raise WriteError(
            f"checkpoint {tag_dir.name} could not be saved in {tag_dir.parent} (rank {rank} {error}); "
            f"removed the partial tag, the previous checkpoint and `latest` are intact: {then} "
            f"with --resume auto"
        )


def root_cause(error: BaseException) -> BaseException:
    """The OS error behind `error` in its chain of causes (torch's writer wraps it in a
    RuntimeError), else the first exception of the chain: what made the write fail."""
    chain, seen = [], error
    while seen is not None and seen not in chain:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain[-1]


def describe(cause: BaseException, folder: Path) -> str:
    """ "[Errno 28] No space left on device" for an OS error, with the space left in `folder` when it
    is about space; else the exception's type and first line."""
    if isinstance(cause, OSError) and cause.errno is not None:
        free = shutil.disk_usage(folder).free if folder.exists() else 0
        space = f" ({free:,} bytes free)" if cause.errno in OUT_OF_SPACE else ""
        return f"[Errno {cause.errno}] {cause.strerror}{space}"
    return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}".rstrip(": ")


class Checkpointer:
    """Saves sealed tags under `folder`, keeping the newest `keep_last` (0: all)."""

    def __init__(self, folder: Path, keep_last: int):
        self.folder = folder
        self.keep_last = keep_last

    def save(self, engine, state: TrainState) -> Path:
        """Collective: every rank writes its part and hashes it; returns the sealed tag folder."""
        state = dataclasses.replace(state, global_batch=engine.train_batch_size())
        tag = tag_for(state.step)
        # universal_checkpoint_info lets ds_to_universal convert the tag for another world size
        client_state = {
            "dslm": dataclasses.asdict(state),
            "universal_checkpoint_info": {"universal_checkpoint_version": 0.2},
        }
        tag_dir = self.folder / tag
        if dist.get_rank() == 0:  # a tag written again (over debris) is unsealed until it is whole again
            (tag_dir / SEAL_NAME).unlink(missing_ok=True)
        dist.barrier()
        writes = KeptWrites.around(engine)  # a failed write (disk full) is kept, not raised mid-save
        engine.save_checkpoint(str(self.folder), tag=tag, client_state=client_state, save_latest=False)
        with writes.kept(tag_dir / rng_file(dist.get_rank())):
            torch.save(rng_state(), tag_dir / rng_file(dist.get_rank()))
        writes.raise_if_failed(tag_dir)  # collective: the partial tag removed, WriteError on every rank
        checksums = [None] * dist.get_world_size()  # each rank hashes its own files, still in its page cache
        dist.all_gather_object(checksums, own_checksums(tag_dir, dist.get_rank(), dist.get_world_size()))
        if dist.get_rank() == 0:
            seal(tag_dir, state, {name: digest for part in checksums for name, digest in part.items()})
            atomic_write_text(self.folder / LATEST_NAME, tag)
            write_best(self.folder)
            self.prune()
        dist.barrier()
        return tag_dir

    def prune(self) -> None:
        """Remove the live branch's tags (live_checkpoints) older than its newest `keep_last` sealed
        ones (sealed or not), except the best. Tags beyond `latest` are neither counted nor removed."""
        if not self.keep_last:
            return
        live = live_checkpoints(self.folder)
        sealed = [step for step, tag_dir in live if (tag_dir / SEAL_NAME).is_file()]
        if len(sealed) <= self.keep_last:
            return
        oldest_kept, best = sealed[-self.keep_last], best_tag(self.folder)
        for step, tag_dir in live:
            if step < oldest_kept and tag_dir != best:
                shutil.rmtree(tag_dir)
                shutil.rmtree(universal_dir(tag_dir), ignore_errors=True)


def start_branch(folder: Path, tag_dir: Path) -> list[str]:
    """Make `tag_dir` (a sealed tag a run resumes from) the head of `folder`'s live branch: the
    tags beyond its step are moved into folder/abandoned/after_global_stepN/ (those never sealed
    are removed: they are partial), their universal forms removed, `latest` and `best` rewritten.
    Returns a line for each thing done, for rank 0 to print."""
    step, lines = sealed_state(tag_dir).step, []
    beyond = [later for later_step, later in list_checkpoints(folder) if later_step > step]
    if tag_dir.parent.resolve() == folder.resolve():
        atomic_write_text(folder / LATEST_NAME, tag_dir.name)
    aside = fresh_folder(folder / ABANDONED_NAME / f"after_{tag_for(step)}")
    moved, lines = set_aside(beyond, aside)
    if moved:
        lines.append(
            f"moved {', '.join(sorted(moved))} (beyond {tag_dir.name}, an abandoned branch) to {aside}: "
            f"--resume auto and pruning no longer see them; delete it to free the space"
        )
    write_best(folder)
    return lines


def set_aside(tags: list[Path], aside: Path) -> tuple[list[str], list[str]]:
    """Take `tags` out of their checkpoint folder: each one's universal form removed, sealed tags
    moved into `aside` (made when needed), tags never sealed (partial saves) removed. Returns the
    names moved and a line for each tag removed."""
    moved, lines = [], []
    for tag_dir in tags:
        shutil.rmtree(universal_dir(tag_dir), ignore_errors=True)
        if (tag_dir / SEAL_NAME).is_file():
            aside.mkdir(parents=True, exist_ok=True)
            os.rename(tag_dir, aside / tag_dir.name)
            moved.append(tag_dir.name)
        else:
            shutil.rmtree(tag_dir)
            lines.append(f"removed {tag_dir}: never sealed (a save that did not finish)")
    return moved, lines


def fresh_folder(path: Path) -> Path:
    """`path`, or path_2, path_3 ... : the first that does not exist yet."""
    n = 1
    while (candidate := path if n == 1 else path.with_name(f"{path.name}_{n}")).exists():
        n += 1
    return candidate


def write_best(folder: Path) -> None:
    """Point `best` at best_tag, or remove it when no live tag has a val/loss."""
    if (best := best_tag(folder)) is not None:
        atomic_write_text(folder / BEST_NAME, best.name)
    else:
        (folder / BEST_NAME).unlink(missing_ok=True)
