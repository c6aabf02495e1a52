"""Document sources. A source spec on the command line is KIND:PATH, e.g. `code:/usr/lib/python3.11`."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from dslm.data.manifest import SourceStats
from dslm.errors import DslmError

CODE_LANGUAGES = {".py": "python", ".c": "c", ".h": "c", ".java": "java"}


@dataclass
class Document:
    id: str
    text: str
    language: str


@dataclass
class CodeSource:
    """Source files under a folder, language from the extension; files in sorted order."""

    spec: str
    root: Path
    exclude: tuple[str, ...] = ()

    def paths(self) -> Iterator[Path]:
        for folder, dirs, files in os.walk(self.root):
            dirs.sort()
            for name in sorted(files):
                path = Path(folder) / name
                if path.suffix in CODE_LANGUAGES and not self._excluded(path):
                    yield path

    def _excluded(self, path: Path) -> bool:
        rel = str(path.relative_to(self.root))
        return any(fnmatch.fnmatch(rel, pattern) for pattern in self.exclude)

    def documents(self, stats: SourceStats) -> Iterator[Document]:
        """Yield readable, non-empty documents; count what is skipped in `stats.filtered`."""
        for path in self.paths():
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                skip(stats, "invalid_utf8")
                continue
            if not text.strip():
                skip(stats, "empty")
                continue
            yield Document(id=str(path), text=text, language=CODE_LANGUAGES[path.suffix])


def skip(stats: SourceStats, reason: str) -> None:
    stats.filtered[reason] = stats.filtered.get(reason, 0) + 1


def parse_source(spec: str, exclude: tuple[str, ...] = ()) -> CodeSource:
    kind, sep, path = spec.partition(":")
    if not sep or kind != "code":
        raise DslmError(f"source {spec!r}: expected code:FOLDER")
    root = Path(path)
    if not root.is_dir():
        raise DslmError(f"source {spec!r}: {root} is not a folder")
    return CodeSource(spec=spec, root=root, exclude=exclude)
