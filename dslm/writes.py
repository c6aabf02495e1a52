"""Checkpoint writes that fail cleanly. A write that fails (disk full, quota, the file size limit,
a read-only filesystem) is kept with its OS error instead of raised in the middle of DeepSpeed's
save, so every rank still reaches the save's closing barrier; then the ranks agree, rank 0 removes
the partial tag, and every rank raises the same WriteError naming the tag, the folder and the
error. `latest` and the tags before are never touched. The advice to free space goes only with
the errors that mean space (OUT_OF_SPACE); any other names its cause as it is."""

from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from dslm.compat import has_method, require
from dslm.errors import WriteError

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
            require("deepspeed", "the engine writes its files with engine.checkpoint_engine.save(state_dict, path)",
                    has_method(getattr(engine, "checkpoint_engine", None), "save", ("state_dict", "path")))
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
        raise WriteError(f"checkpoint {tag_dir.name} could not be saved in {tag_dir.parent} (rank {rank} {error}); "
                         f"removed the partial tag, the previous checkpoint and `latest` are intact: {then} "
                         f"with --resume auto")


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
    """"[Errno 28] No space left on device" for an OS error, with the space left in `folder` when it
    is about space; else the exception's type and first line."""
    if isinstance(cause, OSError) and cause.errno is not None:
        free = shutil.disk_usage(folder).free if folder.exists() else 0
        space = f" ({free:,} bytes free)" if cause.errno in OUT_OF_SPACE else ""
        return f"[Errno {cause.errno}] {cause.strerror}{space}"
    return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}".rstrip(": ")
