"""Document filters for `dslm-shard build`: quality rules, license-header stripping, exact dedup.

Pure functions and one stateful class (`DocumentFilter`, which remembers what it has kept);
no I/O. Code documents (python, c, java) follow the code model card; every other language is
web text. Every rule measures the text as it will be kept, i.e. after header stripping.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from dataclasses import dataclass

from dslm.errors import DslmError
from dslm_shards.sources import Document

DROP_REASONS: tuple[str, ...] = (
    # code
    "test_file",
    "too_few_lines",
    "too_many_lines",
    "non_ascii",
    "long_lines",
    "encoded_data",
    # web text
    "too_short",
    "repeated_lines",
    "few_alpha_words",
    # both
    "duplicate",
)
"""Every reason `DocumentFilter.apply` can give, for a count per reason in the manifest."""

HEADER_STRIPPED = "header_stripped"
"""Counter name for code documents kept without their long header (not a drop)."""


@dataclass
class FilterConfig:
    """Thresholds of `DocumentFilter`. A document is dropped only strictly past a threshold. Code
    lines are those of str.splitlines(); lengths are in characters (len) and are taken after header
    stripping. Raises DslmError for a value out of its range."""

    min_lines: int = 3
    """Code with fewer lines is dropped (too_few_lines): stubs and empty `__init__.py` (model card).
    1 <= min_lines <= max_lines."""
    max_lines: int = 4000
    """Code with more lines is dropped (too_many_lines): generated tables, amalgamations (model card).
    At least min_lines."""
    max_non_ascii: float = 0.25
    """Code whose share of non-ASCII characters is higher is dropped (non_ascii), a fraction in
    [0, 1]. Source code is almost all ASCII even with localized comments; a quarter non-ASCII means
    a data file, a mis-decoded binary or a string table rather than code."""
    max_line_length: int = 1000
    """Code with a line longer than this many characters (len(line), line break excluded) is dropped
    (long_lines), > 0: minified code, one-line data and base64 blobs. The value of Codex
    (Chen et al. 2021) and The Stack / StarCoder."""
    max_mean_line_length: float = 100.0
    """Code whose mean line length in characters (line breaks excluded) is higher is dropped
    (long_lines), > 0; same sources as `max_line_length`. Hand-written code averages well below it."""
    max_encoded_run: int = 1024
    """Code with a longer run, in characters, of base64 characters (`[A-Za-z0-9+/=\\n]`, newlines
    included) is dropped (encoded_data), > 0: wrapped blobs whose 64-76 character lines pass the
    line-length rules. StarCoder2's encoded-data filter (Lozhkov et al. 2024) with its 1,024 limit."""
    max_header_lines: int = 20
    """A leading comment block or module docstring longer than this many lines is stripped from code
    (license headers); one this long or shorter is kept (model card). >= 0 (0 strips every header)."""
    min_text_chars: int = 200
    """Web text with fewer characters, not counting whitespace at the ends, is dropped (too_short).
    >= 0 (0 turns this rule off)."""
    max_duplicate_line_fraction: float = 0.3
    """Web text where a higher share of its non-blank lines repeat an earlier line is dropped
    (repeated_lines): menus, boilerplate, spam. A fraction in [0, 1]. Gopher's repetition rule
    (Rae et al. 2021, table A1)."""
    min_alpha_word_fraction: float = 0.8
    """Web text where a lower share of its words hold a letter is dropped (few_alpha_words):
    tables of numbers, symbol soup. A fraction in [0, 1]. Gopher's quality rule (Rae et al. 2021,
    appendix A)."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_lines <= self.max_lines:
            raise DslmError(f"filter min_lines {self.min_lines}, max_lines {self.max_lines}: need 1 <= min <= max")
        for name in ("max_line_length", "max_mean_line_length", "max_encoded_run"):
            if getattr(self, name) <= 0:
                raise DslmError(f"filter {name} {getattr(self, name)} must be positive")
        for name in ("max_header_lines", "min_text_chars"):
            if getattr(self, name) < 0:
                raise DslmError(f"filter {name} {getattr(self, name)} must not be negative")
        for name in ("max_non_ascii", "max_duplicate_line_fraction", "min_alpha_word_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DslmError(f"filter {name} {getattr(self, name)} must be in [0, 1]")


@dataclass(frozen=True)
class Verdict:
    """Keep `text` (reason None) or drop the document for `reason` (text None)."""

    text: str | None
    reason: str | None = None
    header_stripped: bool = False


# --- test files -------------------------------------------------------------------------------

TEST_FOLDERS = frozenset({"test", "tests", "testing"})
"""Folder names (any case) that hold tests; folders ending in `_test`/`_tests` count too
(CPython's `idlelib/idle_test`). Covers Maven's `src/test/java`."""

TEST_FILE_PATTERNS = (
    # pytest's default discovery, plus Django's tests.py and pytest's conftest.py
    "test_*.py",
    "*_test.py",
    "test.py",
    "tests.py",
    "conftest.py",
    # Maven Surefire's default includes
    "Test*.java",
    "*Test.java",
    "*Tests.java",
    "*TestCase.java",
    # C: the same names as Python's
    "test_*.c",
    "*_test.c",
    "test.c",
)


def is_test_file(doc_id: str) -> bool:
    """Whether the path `doc_id` (an archive member as `ARCHIVE!member/path`) is a test file.

    Every folder of the id counts, so a corpus must not sit below a folder named like a test
    folder (e.g. /tmp/tests/corpus): all of it would be dropped.
    """
    *folders, name = re.split(r"[/!]", doc_id)
    in_test_folder = any(f in TEST_FOLDERS or f.endswith(("_test", "_tests")) for f in map(str.lower, folders))
    return in_test_folder or any(fnmatch.fnmatchcase(name, p) for p in TEST_FILE_PATTERNS)


# --- header stripping -------------------------------------------------------------------------

BLANK_LINES = re.compile(r"(?:[ \t\f\r]*\n)*")
PY_SHEBANG = re.compile(r"#![^\n]*\n")
PY_CODING = re.compile(r"[ \t\f]*#[^\n]*?coding[:=][ \t]*[-\w.]+[^\n]*\n")  # PEP 263
PY_COMMENTS = re.compile(r"(?:[ \t]*#[^\n]*(?:\n|\Z))+")
# A backslash escapes the next character, so \""" does not close the string (raw strings too).
PY_DOCSTRING = re.compile(r"""[rRuU]?(\"\"\"|''')(?:\\.|[^\\])*?\1""", re.S)
C_BLOCK_COMMENT = re.compile(r"/\*.*?\*/", re.S)
C_LINE_COMMENTS = re.compile(r"(?:[ \t]*//[^\n]*(?:\n|\Z))+")


def python_prelude_end(text: str) -> int:
    """Offset after a shebang line and a PEP 263 encoding line, which must stay first."""
    pos = 0
    if match := PY_SHEBANG.match(text):
        pos = match.end()
    if match := PY_CODING.match(text, pos):
        pos = match.end()
    return pos


HEADER_PATTERNS: dict[str, tuple[re.Pattern[str], ...]] = {
    "python": (PY_COMMENTS, PY_DOCSTRING),
    "c": (C_BLOCK_COMMENT, C_LINE_COMMENTS),
    "java": (C_BLOCK_COMMENT, C_LINE_COMMENTS),
}
"""Header syntax per code language. These languages get the code rules; all others are web text."""


def header_end(text: str, start: int, language: str) -> int:
    """End offset of the header comment or docstring that begins at `start`; `start` if none."""
    for pattern in HEADER_PATTERNS[language]:
        if match := pattern.match(text, start):
            return match.end()
    return start


def span_lines(text: str, start: int, end: int) -> int:
    """Number of lines that text[start:end] touches."""
    if start == end:
        return 0
    return text.count("\n", start, end) + (text[end - 1] != "\n")


def strip_header(text: str, language: str, max_lines: int) -> str:
    """`text` without its leading header (and the blank lines around it) when that is longer
    than `max_lines` lines; `text` unchanged otherwise. Python keeps its shebang and encoding."""
    keep = python_prelude_end(text) if language == "python" else 0
    start = BLANK_LINES.match(text, keep).end()
    end = header_end(text, start, language)
    if span_lines(text, start, end) <= max_lines:
        return text
    # the end of the header's last line and the blank lines after it go with it
    return text[:keep] + text[BLANK_LINES.match(text, end).end() :]


# --- measures ---------------------------------------------------------------------------------

BASE64_RUN = re.compile(r"[a-zA-Z0-9+/\n=]{64,}")  # StarCoder2's base64 pattern


def non_ascii_share(text: str) -> float:
    """Share of characters outside ASCII."""
    if not text:
        return 0.0
    return 1.0 - len(text.encode("ascii", "ignore")) / len(text)


def longest_encoded_run(text: str) -> int:
    """Length of the longest run of at least 64 base64 characters (newlines included); 0 if none."""
    return max((m.end() - m.start() for m in BASE64_RUN.finditer(text)), default=0)


def duplicate_line_fraction(text: str) -> float:
    """Share of non-blank lines that repeat an earlier line (Gopher's duplicate line fraction)."""
    lines = [line for line in map(str.strip, text.split("\n")) if line]
    if not lines:
        return 0.0
    return (len(lines) - len(set(lines))) / len(lines)


def alpha_word_fraction(text: str) -> float:
    """Share of whitespace-separated words that hold at least one letter (any script)."""
    words = text.split()
    if not words:
        return 0.0
    return sum(any(map(str.isalpha, word)) for word in words) / len(words)


def text_digest(text: str) -> bytes:
    """MD5 of the UTF-8 text: 16 bytes, for exact dedup (not for security)."""
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).digest()


# --- the filter -------------------------------------------------------------------------------


class DocumentFilter:
    """Applies the code or web-text rules to each document (`check`, no state), then drops exact
    duplicates of any document kept before, across all sources of a build (`first_seen`).

    `seen` holds the 16-byte MD5 digest of every distinct kept text, so memory grows with the
    number of distinct documents (the digest plus the set's overhead per document; the figure is
    in bench/RESULTS.md). `dslm-shard build` runs `check` in its worker processes
    and `first_seen` in order in the main one; a resumed build pre-seeds `seen` from its journal.
    """

    def __init__(self, cfg: FilterConfig | None = None, seen: set[bytes] | None = None):
        self.cfg = cfg or FilterConfig()
        self.seen: set[bytes] = set() if seen is None else seen

    def apply(self, doc: Document) -> Verdict:
        verdict = self.check(doc)
        if verdict.text is not None and not self.first_seen(text_digest(verdict.text)):
            return Verdict(None, "duplicate")
        return verdict

    def check(self, doc: Document) -> Verdict:
        """The rules for the document's language, without dedup."""
        if doc.language in HEADER_PATTERNS:
            if is_test_file(doc.id):
                return Verdict(None, "test_file")
            text = strip_header(doc.text, doc.language, self.cfg.max_header_lines)
            reason = self.code_reason(text)
        else:
            text = doc.text
            reason = self.web_reason(text)
        if reason is not None:
            return Verdict(None, reason)
        return Verdict(text, header_stripped=len(text) != len(doc.text))

    def first_seen(self, digest: bytes) -> bool:
        """True the first time a kept text's digest comes by (and remember it); False for a duplicate."""
        if digest in self.seen:
            return False
        self.seen.add(digest)
        return True

    def code_reason(self, text: str) -> str | None:
        cfg = self.cfg
        lengths = [len(line) for line in text.splitlines()]
        if len(lengths) < cfg.min_lines:
            return "too_few_lines"
        if len(lengths) > cfg.max_lines:
            return "too_many_lines"
        if non_ascii_share(text) > cfg.max_non_ascii:
            return "non_ascii"
        if max(lengths) > cfg.max_line_length or sum(lengths) / len(lengths) > cfg.max_mean_line_length:
            return "long_lines"
        if longest_encoded_run(text) > cfg.max_encoded_run:
            return "encoded_data"
        return None

    def web_reason(self, text: str) -> str | None:
        cfg = self.cfg
        if len(text.strip()) < cfg.min_text_chars:
            return "too_short"
        if duplicate_line_fraction(text) > cfg.max_duplicate_line_fraction:
            return "repeated_lines"
        if alpha_word_fraction(text) < cfg.min_alpha_word_fraction:
            return "few_alpha_words"
        return None
