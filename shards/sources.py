"""Document sources: where the text to tokenize comes from.

A source is given on the command line as `KIND:PATH[,key=value...]`:

    code:PATH      source files (.py python, .c/.h c, .java java) below a folder, or the members
                   of a .zip, .tar, .tar.gz or .tgz archive (e.g. a JDK's lib/src.zip)
    text:PATH      .parquet, .jsonl, .jsonl.gz and .txt files: one file, a folder or a glob
                   (`**` spans folders); a .txt file is one document, the others hold one per record
    fineweb:PATH   FineWeb records streamed with Hugging Face `datasets`: a hub dataset id
                   (default HuggingFaceFW/fineweb), or local .parquet/.jsonl/.jsonl.gz files
                   (file, folder or glob) with FineWeb's columns

    keys:  weight=FLOAT   every kind: the source's mixing weight (positive, default 1.0): epochs of
                          it in a build, its relative share of the tokenizer's sample
           field=NAME     text: the column or JSON key holding the text (default `text`)
           config=NAME    fineweb on the hub: the dataset config (default sample-100BT)

    code:/usr/include,weight=0.5         text:data/*.jsonl,field=content
    fineweb:HuggingFaceFW/fineweb,config=sample-10BT        fineweb:local/fw/*.parquet

PATH cannot contain a comma (commas separate the keys). Files, and members of an archive, are
read in sorted path order so that a build is reproducible. `--exclude` globs match a file's path
relative to the source folder (for a glob: its folder part before the first wildcard; for a
single file: its folder), and an archive member's name. Documents that cannot be used are
skipped and counted by reason in the manifest: `invalid_utf8`, `empty`, `bad_record` (a record
without its text, or a jsonl line that is not JSON), `unreadable_file` (a file or archive member
that fails to read: permissions, a damaged archive, parquet or gzip; what was read from it before
the error is kept, and a warning line names it).
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import itertools
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Collection, Iterable, Iterator, Protocol, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from dslm.data.manifest import SourceStats
from dslm.errors import DslmError
from dslm.logs import warning

CODE_LANGUAGES = {".py": "python", ".c": "c", ".h": "c", ".java": "java"}
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
TEXT_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".txt")
FINEWEB_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz")
FINEWEB_REPO = "HuggingFaceFW/fineweb"
FINEWEB_CONFIG = "sample-100BT"
FINEWEB_COLUMNS = ("text", "id", "dump", "url", "date", "file_path", "language", "language_score", "token_count")
T = TypeVar("T")
PARQUET_BATCH_ROWS = 1024
"""Rows per record batch read from a parquet file: bounds memory whatever the file's size."""

KEYS = {"code": {"weight"}, "text": {"weight", "field"}, "fineweb": {"weight", "config"}}
"""The keys each kind of source takes after its PATH."""
USAGE = (
    "code:FOLDER|ARCHIVE, text:FILES or fineweb:[REPO|FILES], then optional ,key=value: "
    "weight=FLOAT (any kind), field=NAME (text), config=NAME (fineweb)"
)
WILDCARD = re.compile(r"[*?[]")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
BOM = "\ufeff"
"""A byte-order mark: U+FEFF, the bytes EF BB BF in UTF-8, which some editors (Notepad, Visual
Studio) put at the start of a file. It marks the encoding and is not text (Unicode 15, section
23.8), so `decode` strips it from the start of every document and jsonl line."""


@dataclass
class Document:
    id: str
    """Where the text came from within its source: a code file's path below the folder or its
    archive member name (so rules on paths never see the folders above the corpus), a text
    file's path, `FILE:N` (N-th record) or a record id."""
    text: str
    language: str
    unit: int = 0
    """Index of the input unit it came from, in the source's order (see `Source.units`)."""


Units = Callable[[int], bool]
"""Which of a source's input units to read, by index (None: all)."""


MAX_TASKS = 10_000
"""Most tasks a build splits into (--tasks): in each stage every task lists where each of the N
tasks' records start in its file (N + 1 offsets), so a stage writes about N**2 numbers in all,
10**8 (under a GB) at 10,000 tasks. SLURM's own MaxArraySize is 1,001 unless raised."""


def check_tasks(tasks: int) -> None:
    """DslmError for a --tasks outside 1..MAX_TASKS."""
    if not 1 <= tasks <= MAX_TASKS:
        raise DslmError(f"--tasks {tasks} must be within 1..{MAX_TASKS:,}")


@dataclass(frozen=True)
class Partition:
    """Task `task` of `tasks` (0 <= task < tasks) in a build split over many processes: it reads
    the units whose index is `task` modulo `tasks` (round-robin, as datatrove deals files to its
    ranks), so that every task gets a like mix of a corpus whose files are sorted by size or date."""

    tasks: int = 1
    task: int = 0

    def __post_init__(self) -> None:
        check_tasks(self.tasks)
        if not 0 <= self.task < self.tasks:
            raise DslmError(f"--task {self.task} must be in [0, --tasks {self.tasks})")

    def __call__(self, unit: int) -> bool:
        return unit % self.tasks == self.task


class Source(Protocol):
    """What the shard builder reads. `spec` (the command-line string) keys the source's counts
    in the manifest; `weight` is its relative share when sources are mixed.

    A source is a fixed sequence of input units, the pieces a build can split among tasks: a code
    file or archive member, a text file or a parquet row group, a hub dataset's data file."""

    spec: str
    weight: float

    def units(self) -> int:
        """How many input units the source has."""
        ...

    def documents(self, stats: SourceStats, units: Units | None = None) -> Iterator[Document]:
        """Usable documents of the selected units (all when None) in a fixed order, each with its
        unit's index; what is skipped is counted in `stats.filtered`."""
        ...


@dataclass
class CodeSource:
    """Source files below a folder, or members of a .zip/.tar archive; language from the extension."""

    spec: str
    root: Path
    exclude: tuple[str, ...] = ()
    weight: float = 1.0

    def units(self) -> int:
        """Source files, or archive members: one unit each."""
        if not self.root.is_dir():
            return len(archive_names(self.root, self.keep_member))
        return len(self.folder_files)

    @cached_property
    def folder_files(self) -> list[Path]:
        """The source files below the folder, in sorted order: listed once (the tokenizer's sample
        and a task's stages read the units more than once)."""
        return local_files(str(self.root), CODE_LANGUAGES, self.exclude)

    def documents(self, stats: SourceStats, units: Units | None = None) -> Iterator[Document]:
        for unit, doc_id, raw in self.files(stats, units or everything):
            text = clean_text(raw, stats)
            if text is not None:
                yield Document(id=doc_id, text=text, language=CODE_LANGUAGES[PurePosixPath(doc_id).suffix], unit=unit)

    def files(self, stats: SourceStats, units: Units) -> Iterator[tuple[int, str, bytes]]:
        """(unit, id, content) of every readable source file of the selected units, in sorted order."""
        if not self.root.is_dir():
            yield from guarded(self.root, archive_members(self.root, self.keep_member, stats, units), stats)
            return
        for unit, path in enumerate(self.folder_files):
            if units(unit) and (raw := read_or_skip(path, path.read_bytes, stats)) is not None:
                yield unit, path.relative_to(self.root).as_posix(), raw

    def keep_member(self, name: str) -> bool:
        return PurePosixPath(name).suffix in CODE_LANGUAGES and not excluded(name, self.exclude)


@dataclass
class TextSource:
    """Local text files: a .txt file is one document; .parquet and .jsonl(.gz) files hold one per
    record, its text in `field`."""

    spec: str
    path: str
    field: str = "text"
    exclude: tuple[str, ...] = ()
    weight: float = 1.0

    def units(self) -> int:
        """A parquet file's row groups, and every other file: one unit each."""
        return sum(len(parts) for _, parts in self.units_by_file)

    @cached_property
    def units_by_file(self) -> list[tuple[Path, list[tuple[int, int | None]]]]:
        """The files with their units (`file_units`): listed, and parquet footers read, once."""
        return file_units(local_files(self.path, TEXT_SUFFIXES, self.exclude))

    def documents(self, stats: SourceStats, units: Units | None = None) -> Iterator[Document]:
        for file, parts in self.units_by_file:
            for unit, row_group in parts:
                if (units or everything)(unit):
                    for doc_id, value in guarded(file, self.records(file, row_group, stats), stats):
                        text = clean_text(value, stats)
                        if text is not None:
                            yield Document(id=doc_id, text=text, language="text", unit=unit)

    def records(self, file: Path, row_group: int | None, stats: SourceStats) -> Iterator[tuple[str, Any]]:
        """(id, raw text value) of each record in `file` (of one row group of a parquet file),
        read lazily (so `guarded` sees errors)."""
        if file.name.endswith(".parquet"):
            yield from parquet_values(file, self.field, row_group)
        elif file.name.endswith(".txt"):
            yield str(file), file.read_bytes()
        else:
            yield from jsonl_values(file, self.field, stats)


@dataclass
class FineWebSource:
    """FineWeb records streamed with Hugging Face `datasets` (read as they arrive, nothing is
    downloaded ahead): the hub dataset `path` in `config`, or local parquet/jsonl files."""

    spec: str
    path: str = FINEWEB_REPO
    config: str = FINEWEB_CONFIG
    exclude: tuple[str, ...] = ()
    weight: float = 1.0

    def units(self) -> int:
        """A hub dataset's data files (what `datasets` calls its shards), a local parquet file's row
        groups, and a local jsonl file: one unit each."""
        return len(self.unit_readers)

    def documents(self, stats: SourceStats, units: Units | None = None) -> Iterator[Document]:
        """A read error ends the source with one line (a stream cannot skip a bad file and go on;
        a rerun of the build resumes)."""
        try:
            for unit, records in enumerate(self.unit_readers):
                if (units or everything)(unit):
                    yield from self.read_documents(records(), stats, unit)
        except READ_ERRORS as e:
            raise DslmError(f"source {self.spec!r}: reading failed: {e}") from e

    def read_documents(self, records: Iterable[dict[str, Any]], stats: SourceStats, unit: int) -> Iterator[Document]:
        for record in records:
            missing = [column for column in FINEWEB_COLUMNS if column not in record]
            if missing:
                raise DslmError(
                    f"source {self.spec!r}: the records lack FineWeb's "
                    f"{'column' if len(missing) == 1 else 'columns'} {', '.join(missing)}"
                )
            text = clean_text(record["text"], stats)
            if text is not None:
                yield Document(id=str(record["id"]), text=text, language=record["language"] or "en", unit=unit)

    @cached_property
    def unit_readers(self) -> list[Callable[[], Iterable[dict[str, Any]]]]:
        """For each unit in order, what reads its records: hub files through `datasets`' own
        `IterableDataset.shard`, local parquet row groups with pyarrow, local jsonl files with
        `datasets`. Made once: a hub dataset's files are resolved over the network."""
        # Imported here: `datasets` takes seconds to import and only this source needs it.
        from datasets import load_dataset

        if is_hub_id(self.path):
            stream = load_dataset(self.path, name=self.config, split="train", streaming=True)
            return [partial(stream.shard, stream.n_shards, index) for index in range(stream.n_shards)]
        readers: list[Callable[[], Iterable[dict[str, Any]]]] = []
        for file, parts in file_units(local_files(self.path, FINEWEB_SUFFIXES, self.exclude)):
            if file.name.endswith(".parquet"):
                readers += [partial(parquet_records, file, list(FINEWEB_COLUMNS), group) for _, group in parts]
            else:
                readers.append(partial(load_dataset, "json", data_files=[str(file)], split="train", streaming=True))
        return readers


def file_units(files: list[Path]) -> list[tuple[Path, list[tuple[int, int | None]]]]:
    """Each file with its units, numbered from 0 in file order: (unit, row group) for each
    row group of a parquet file, (unit, None) for another file, or for a parquet file whose footer
    cannot be read (the error comes, counted, when its records are read)."""
    numbered, start = [], 0
    for file in files:
        groups: list[int | None] = [None]
        if file.name.endswith(".parquet"):
            try:
                groups = list(range(pq.ParquetFile(file).num_row_groups))
            except READ_ERRORS:
                pass
        numbered.append((file, [(start + i, group) for i, group in enumerate(groups)]))
        start += len(groups)
    return numbered


def everything(unit: int) -> bool:
    return True


def skip(stats: SourceStats, reason: str) -> None:
    stats.filtered[reason] = stats.filtered.get(reason, 0) + 1


READ_ERRORS = (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, zlib.error, pa.ArrowException)
"""What reading a damaged, truncated or unreadable file raises (gzip's BadGzipFile is an OSError)."""


def guarded(path: Path, items: Iterable[T], stats: SourceStats) -> Iterator[T]:
    """`items` (read lazily from `path`) until a read error, which is counted as unreadable_file
    and warned about in one line; what was read before it is kept."""
    try:
        yield from items
    except READ_ERRORS as e:
        unreadable(path, e, stats)


def read_or_skip(path: Path, read: Callable[[], T], stats: SourceStats) -> T | None:
    """`read()`, or None after counting a read error as unreadable_file."""
    try:
        return read()
    except READ_ERRORS as e:
        unreadable(path, e, stats)
        return None


def unreadable(path: Path, error: Exception, stats: SourceStats) -> None:
    skip(stats, "unreadable_file")
    warning(f"skipped unreadable {path} (or the rest of it): {error}")


def decode(raw: bytes, stats: SourceStats) -> str | None:
    """`raw` as UTF-8 text without leading byte-order marks, or None (counted as invalid_utf8):
    the tokenizer takes only valid text."""
    try:
        return without_bom(raw.decode("utf-8"))
    except UnicodeDecodeError:
        skip(stats, "invalid_utf8")
        return None


def without_bom(text: str) -> str:
    """`text` without the byte-order marks (BOM) at its start."""
    return text.lstrip(BOM)


def clean_text(value: object, stats: SourceStats) -> str | None:
    """The text of a document from any source, without a leading byte-order mark, or None after
    counting why it is not usable."""
    if isinstance(value, str):
        # Lone surrogates (JSON escapes such as "\\udc80") cannot be encoded later: round-tripping
        # through bytes makes them fail the same UTF-8 check as invalid bytes.
        value = value.encode("utf-8", "surrogatepass")
    if not isinstance(value, bytes):
        skip(stats, "bad_record")
        return None
    text = decode(value, stats)
    if text is not None and not text.strip():
        skip(stats, "empty")
        return None
    return text


def jsonl_lines(path: Path) -> Iterator[tuple[str, bytes]]:
    """(`PATH:LINE`, the raw line) per line of a .jsonl or .jsonl.gz file (lines from 1), read
    one line at a time."""
    with gzip.open(path) if path.name.endswith(".gz") else open(path, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            yield f"{path}:{number}", raw


def jsonl_values(path: Path, field: str, stats: SourceStats) -> Iterator[tuple[str, Any]]:
    """(`PATH:LINE`, record[field]) per line, read one line at a time; blank lines are not records."""
    for where, raw in jsonl_lines(path):
        line = decode(raw, stats)
        if line is None or not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or field not in record:
            skip(stats, "bad_record")
            continue
        yield where, record[field]


def parquet_values(path: Path, field: str, row_group: int | None = None) -> Iterator[tuple[str, Any]]:
    """(`PATH:ROW`, value) per row of column `field` (rows from 1 in the file), of one row group
    or all, read in bounded record batches."""
    parquet = pq.ParquetFile(path)
    if field not in parquet.schema_arrow.names:
        raise DslmError(
            f"{path}: no column {field!r} (columns: {', '.join(parquet.schema_arrow.names)}); "
            f"name the text column with field=NAME"
        )
    for where, row in parquet_rows(path, [field], row_group):
        yield where, row[field]


def parquet_records(path: Path, columns: list[str], row_group: int | None = None) -> Iterator[dict[str, Any]]:
    return (row for _, row in parquet_rows(path, columns, row_group))


def parquet_rows(path: Path, columns: list[str], row_group: int | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(`PATH:ROW`, {column: value}) per row (rows from 1 in the file) of one row group or all,
    holding those of `columns` that the file has (a row of a file with none of them is {}), read
    in bounded record batches."""
    parquet = pq.ParquetFile(path)
    present = [column for column in columns if column in parquet.schema_arrow.names]
    first = sum(parquet.metadata.row_group(g).num_rows for g in range(row_group or 0))
    groups = None if row_group is None else [row_group]
    batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=present, row_groups=groups)
    rows = (row for batch in batches for row in batch.to_pylist())
    for number, row in enumerate(rows, first + 1):
        yield f"{path}:{number}", row


def archive_names(path: Path, keep: Callable[[str], bool]) -> list[str]:
    """The wanted file members of a zip or tar, in sorted name order (the units of a code archive)."""
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            return sorted(filter(keep, archive.namelist()), key=PurePosixPath)
    with open_tar(path) as archive:
        return sorted((m.name for m in archive.getmembers() if m.isfile() and keep(m.name)), key=PurePosixPath)


def archive_members(
    path: Path, keep: Callable[[str], bool], stats: SourceStats, units: Units = everything
) -> Iterator[tuple[int, str, bytes]]:
    """(index, member name, content) of the wanted members of a zip or tar that `units` selects
    by their index in sorted name order; a member that fails to read (bad checksum) is counted
    as unreadable_file."""
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            for index, name in enumerate(sorted(filter(keep, archive.namelist()), key=PurePosixPath)):
                if units(index) and (raw := read_or_skip(path / name, partial(archive.read, name), stats)) is not None:
                    yield index, name, raw
        return
    with open_tar(path) as archive:
        members = [m for m in archive.getmembers() if m.isfile() and keep(m.name)]
        for index, member in enumerate(sorted(members, key=lambda m: PurePosixPath(m.name))):
            if (
                units(index)
                and (raw := read_or_skip(path / member.name, archive.extractfile(member).read, stats)) is not None
            ):
                yield index, member.name, raw


@contextmanager
def open_tar(path: Path) -> Iterator[tarfile.TarFile]:
    """A tar open for random access. A gzipped tar is inflated to a temporary file first: reading
    its members in sorted rather than stored order would rewind and re-inflate the gzip stream
    for most members, which takes quadratic time."""
    if path.name.endswith(".tar"):
        with tarfile.open(path) as archive:
            yield archive
        return
    with tempfile.TemporaryFile() as plain:
        with gzip.open(path) as packed:
            shutil.copyfileobj(packed, plain)
        plain.seek(0)
        with tarfile.open(fileobj=plain) as archive:
            yield archive


def local_files(pattern: str, suffixes: Collection[str], exclude: tuple[str, ...]) -> list[Path]:
    """Files ending in one of `suffixes` that a path names (a file, a folder walked below, or a
    glob of them), minus excluded ones, in sorted path order."""
    base = base_folder(pattern)
    found = set()
    for match in matches(pattern):
        for file in walk(match) if match.is_dir() else [match]:
            if has_suffix(file.name, suffixes) and not excluded(os.path.relpath(file, base), exclude):
                found.add(file)
    return sorted(found)


def matches(pattern: str) -> list[Path]:
    """The existing path itself (even if its name holds glob characters), else what the glob matches."""
    if not pattern:
        return []
    path = Path(pattern)
    return [path] if path.exists() else [Path(p) for p in glob.glob(pattern, recursive=True)]


def base_folder(pattern: str) -> Path:
    """The folder that excludes are relative to: the folder itself, a file's folder, or a glob's
    folder part before its first wildcard."""
    path = Path(pattern)
    if path.exists():
        return path if path.is_dir() else path.parent
    return Path(*itertools.takewhile(lambda part: not WILDCARD.search(part), path.parts))


def walk(folder: Path) -> Iterator[Path]:
    """Every file below `folder`; like os.walk, symlinked folders are not entered (no loops)."""
    for parent, _, names in os.walk(folder):
        for name in names:
            yield Path(parent) / name


def has_suffix(name: str, suffixes: Collection[str]) -> bool:
    return any(name.endswith(suffix) for suffix in suffixes)


def excluded(relative: str, exclude: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(relative, pattern) for pattern in exclude)


def is_hub_id(path: str) -> bool:
    """Whether a fineweb PATH names a hub dataset (`NAME` or `OWNER/NAME`) rather than local files."""
    return bool(HUB_ID.fullmatch(path)) and not has_suffix(path, FINEWEB_SUFFIXES) and not Path(path).exists()


def parse_source(spec: str, exclude: tuple[str, ...] = ()) -> Source:
    """The source for a command-line spec `KIND:PATH[,key=value...]` (see the module docstring)."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KEYS:
        raise spec_error(spec, f"unknown kind {kind!r}" if sep else "no KIND: prefix")
    path, *pairs = rest.split(",")
    options = parse_options(spec, pairs, KEYS[kind])
    weight = parse_weight(spec, options.pop("weight", "1.0"))
    if kind == "code":
        return code_source(spec, path, exclude, weight)
    if kind == "text":
        require_files(spec, path, TEXT_SUFFIXES)
        return TextSource(spec=spec, path=path, exclude=exclude, weight=weight, **options)
    return fineweb_source(spec, path or FINEWEB_REPO, options, exclude, weight)


def spec_error(spec: str, problem: str) -> DslmError:
    return DslmError(f"source {spec!r}: {problem}; expected {USAGE}")


def parse_options(spec: str, pairs: list[str], allowed: set[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not value:
            raise spec_error(spec, f"{pair!r} is not key=value")
        if key not in allowed:
            raise spec_error(spec, f"unknown key {key!r} for {spec.partition(':')[0]}")
        if key in options:
            raise spec_error(spec, f"key {key!r} given twice")
        options[key] = value
    return options


def parse_weight(spec: str, value: str) -> float:
    try:
        weight = float(value)
    except ValueError:
        weight = math.nan
    if not (math.isfinite(weight) and weight > 0):
        raise spec_error(spec, f"weight {value!r} is not a positive number")
    return weight


def code_source(spec: str, path: str, exclude: tuple[str, ...], weight: float) -> CodeSource:
    root = Path(path)
    if not path or not (root.is_dir() or (root.is_file() and has_suffix(root.name, ARCHIVE_SUFFIXES))):
        raise DslmError(f"source {spec!r}: {path!r} is not a folder or a {'/'.join(ARCHIVE_SUFFIXES)} archive")
    return CodeSource(spec=spec, root=root, exclude=exclude, weight=weight)


def fineweb_source(
    spec: str, path: str, options: dict[str, str], exclude: tuple[str, ...], weight: float
) -> FineWebSource:
    if is_hub_id(path):
        return FineWebSource(spec=spec, path=path, exclude=exclude, weight=weight, **options)
    if "config" in options:
        raise spec_error(spec, "config= names a hub dataset's config; local files have none")
    require_files(spec, path, FINEWEB_SUFFIXES)
    return FineWebSource(spec=spec, path=path, exclude=exclude, weight=weight)


def require_files(spec: str, path: str, suffixes: tuple[str, ...]) -> None:
    """A local PATH must name a folder or a file of a readable format (itself or through a glob)."""
    if not any(m.is_dir() or has_suffix(m.name, suffixes) for m in matches(path)):
        raise DslmError(f"source {spec!r}: {path!r} matches no folder or {'/'.join(suffixes)} file")
