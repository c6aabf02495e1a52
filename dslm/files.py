"""Small file helpers shared by every stage: nothing half-written is ever visible."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from dslm.errors import DslmError


def tmp_path(final: str | Path) -> Path:
    """Where `final` (a file or a folder) is written until it is complete: `.NAME.tmp` beside it,
    hidden, and on the same filesystem so that the rename into place is atomic."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp")


def remove(path: Path) -> None:
    """Remove a file or a folder tree; nothing there is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """A fresh temporary path beside `final` for the block to write a file or a folder at. When the
    block ends without an error it is renamed onto `final` (an existing file there is replaced; an
    existing folder is an error of os.replace); when it raises, the temporary is removed and
    `final` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(final)
    remove(tmp)  # left by a crash before
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        remove(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a temporary name beside `path`, flushed to disk, then rename it into place."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_copy(source: str | Path, target: str | Path) -> None:
    """Copy a file to `target` through a temporary name."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def open_at(path: str | Path, length: int) -> BinaryIO:
    """`path` open for writing after its first `length` bytes, the rest cut off (0: a new file)."""
    f = open(path, "r+b" if length else "wb")
    f.truncate(length)
    f.seek(length)
    return f


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def exclusive(lock: str | Path, what: str) -> Iterator[None]:
    """Hold `lock` (a file, created if missing) for the block, so that no two processes write
    `what` at once (fcntl.flock: advisory, one holder). Raises DslmError at once when another
    process holds it; the file is removed at the end."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DslmError(f"another process is writing {what} ({lock} is locked); wait for it to end, or stop "
                            f"it") from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
