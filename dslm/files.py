"""Small file helpers shared by every stage: nothing half-written is ever visible."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a temporary name beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
