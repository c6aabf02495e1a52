import base64
import random
import re

import pytest

from dslm.errors import DslmError
from dslm_shards.filters import (
    DROP_REASONS,
    DocumentFilter,
    FilterConfig,
    Verdict,
    is_test_file,
    strip_header,
    text_digest,
)
from dslm_shards.sources import Document

BODY = "import os\n\n\ndef main():\n    return os.getcwd()\n"


def code(text: str, id: str = "pkg/mod.py", language: str = "python") -> Document:
    return Document(id=id, text=text, language=language)


def web(text: str) -> Document:
    return Document(id="fineweb/0001", text=text, language="en")


def verdict(doc: Document, **cfg) -> Verdict:
    return DocumentFilter(FilterConfig(**cfg)).apply(doc)


def prose_lines(n: int) -> list[str]:
    """n distinct lines of plain English-like words."""
    return [f"line {i} says something plain about the weather today" for i in range(n)]


def spaced_line(n: int) -> str:
    """A line of n characters broken by spaces (no long base64-like run)."""
    return ("word " * n)[:n]


# --- one document per drop reason ---------------------------------------------------------------

BASE64_BLOB = base64.encodebytes(random.Random(0).randbytes(3000)).decode()  # 76-character lines

FAILING = {
    "test_file": code(BODY, id="pkg/tests/test_mod.py"),
    "too_few_lines": code("import os\nprint(os.name)\n"),
    "too_many_lines": code("x = 1\n" * 4001),
    "non_ascii": code("s = 'ééééééé'\n" * 3),
    "long_lines": code(BODY + "x = '" + "a " * 600 + "'\n"),
    "encoded_data": code(f'DATA = """\n{BASE64_BLOB}"""\nprint(DATA)\n'),
    "too_short": web("Too short to teach anything."),
    "repeated_lines": web("\n".join(["Home", "About", "Contact", "Login"] * 20)),
    "few_alpha_words": web(" ".join(str(i) for i in range(100))),
}


@pytest.mark.parametrize("reason", sorted(FAILING))
def test_each_rule_drops_with_its_reason(reason):
    assert verdict(FAILING[reason]) == Verdict(None, reason)


def test_reasons_list_is_complete_and_snake_case():
    assert set(DROP_REASONS) == set(FAILING) | {"duplicate"}
    assert len(DROP_REASONS) == len(set(DROP_REASONS))
    assert all(re.fullmatch(r"[a-z]+(_[a-z0-9]+)*", r) for r in DROP_REASONS)


def test_clean_code_and_text_are_kept_unchanged():
    assert verdict(code(BODY)) == Verdict(BODY)
    text = "\n".join(prose_lines(10))
    assert verdict(web(text)) == Verdict(text)


# --- code rules at their thresholds -------------------------------------------------------------


def test_line_count_limits():
    assert verdict(code("a = 1\nb = 2\nc = 3")).text is not None
    assert verdict(code("a = 1\nb = 2\n")).reason == "too_few_lines"
    many = "".join(f"x{i} = {i}\n" for i in range(4000))
    assert verdict(code(many)).text is not None
    assert verdict(code(many + "y = 0\n")).reason == "too_many_lines"


def test_non_ascii_share_limit():
    quarter = "éaa\n" * 100  # exactly 25% non-ASCII
    assert verdict(code(quarter)).text is not None
    assert verdict(code("ééa\n" + quarter[4:])).reason == "non_ascii"  # 101 of 400


def test_longest_line_limit():
    short = [spaced_line(10)] * 20
    assert verdict(code("\n".join([spaced_line(1000), *short]))).text is not None
    assert verdict(code("\n".join([spaced_line(1001), *short]))).reason == "long_lines"


def test_mean_line_length_limit():
    assert verdict(code("\n".join([spaced_line(100)] * 3))).text is not None
    assert verdict(code("\n".join([spaced_line(100)] * 2 + [spaced_line(101)]))).reason == "long_lines"


def test_encoded_run_limit():
    blob = ("A" * 63 + "\n") * 16  # one base64 run of exactly 1,024 characters
    assert verdict(code(f'DATA = """{blob}"""\nprint(DATA)\n')).text is not None
    assert verdict(code(f'DATA = """{blob}A"""\nprint(DATA)\n')).reason == "encoded_data"


# --- test files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "doc_id",
    [
        "pkg/test_mod.py",
        "pkg/mod_test.py",
        "pkg/tests.py",
        "pkg/conftest.py",
        "src/main/java/org/x/ParserTest.java",
        "src/main/java/org/x/ParserTests.java",
        "src/main/java/org/x/ParserTestCase.java",
        "src/main/java/org/x/TestParser.java",
        "src/test_parser.c",
        "src/parser_test.c",
        "/usr/lib/python3.11/test/support/__init__.py",
        "proj/Tests/helpers.py",
        "lib/testing/util.c",
        "proj/src/test/java/org/x/Fixtures.java",
        "/usr/lib/python3.11/idlelib/idle_test/mock_idle.py",
        "/jdk/lib/src.zip!java.base/java/util/MapTest.java",
        "/corpus/code.tar!pkg/tests/helpers.py",
        "/corpus/code.zip!test_mod.py",
    ],
)
def test_test_files_are_detected(doc_id):
    assert is_test_file(doc_id)


@pytest.mark.parametrize(
    "doc_id",
    [
        "pkg/mod.py",
        "pkg/testing_utils.py",
        "pkg/contest.py",
        "src/main/java/org/x/Latest.java",
        "src/protest.c",
        "/data/testdata/x.py",
        "/corpus/tests.zip!pkg/mod.py",  # only folders count, and an archive is a file
        "/tmp/pytest-of-me/pytest-3/test_build0/corpus/mod.py",  # pytest's tmp_path is not a test folder
    ],
)
def test_other_files_are_not_test_files(doc_id):
    assert not is_test_file(doc_id)


def test_test_file_rule_applies_to_code_only():
    text = "\n".join(prose_lines(10))
    assert verdict(Document(id="tests/page.txt", text=text, language="text")).text == text


# --- header stripping ---------------------------------------------------------------------------


def hash_block(n: int) -> str:
    return "# Copyright line\n" * n


def docstring(n: int, quote: str = '"""') -> str:
    """A module docstring spanning n lines."""
    return quote + "Module summary.\n" + "Licensed under terms.\n" * (n - 2) + quote + "\n"


def c_block(n: int) -> str:
    return "/*\n" + " * Licensed under terms.\n" * (n - 2) + " */\n"


@pytest.mark.parametrize(
    "header",
    [
        hash_block(21),
        docstring(21),
        docstring(21, "'''"),
        'r"""Raw: \\d+ and an escaped quote \\""" still inside.\n' + "More.\n" * 19 + '"""\n',
    ],
)
def test_python_header_over_20_lines_is_stripped(header):
    assert strip_header(header + "\n\n" + BODY, "python", 20) == BODY


@pytest.mark.parametrize(
    "prelude",
    [
        "#!/usr/bin/env python3\n",
        "# -*- coding: utf-8 -*-\n",
        "#!/usr/bin/env python3\n# vim: set fileencoding=latin-1 :\n",
    ],
)
def test_python_shebang_and_encoding_lines_stay(prelude):
    assert strip_header(prelude + hash_block(25) + BODY, "python", 20) == prelude + BODY
    assert strip_header(prelude + "\n" + docstring(25) + BODY, "python", 20) == prelude + BODY


@pytest.mark.parametrize("header", [hash_block(20), docstring(20), "# short\n"])
def test_python_header_of_20_lines_or_fewer_is_kept(header):
    assert strip_header(header + BODY, "python", 20) == header + BODY


@pytest.mark.parametrize("language", ["c", "java"])
def test_c_and_java_headers(language):
    body = "package org.x;\n\nclass A {}\n" if language == "java" else "#include <stdio.h>\n\nint x;\n"
    assert strip_header(c_block(21) + "\n" + body, language, 20) == body
    assert strip_header("// Licensed under terms.\n" * 21 + body, language, 20) == body
    assert strip_header(c_block(20) + body, language, 20) == c_block(20) + body
    assert strip_header("/** Short javadoc. */\n" + body, language, 20) == "/** Short javadoc. */\n" + body


def test_only_a_leading_header_is_stripped():
    late = BODY + hash_block(30)
    assert strip_header(late, "python", 20) == late
    assert strip_header("int x;\n" + c_block(30), "c", 20) == "int x;\n" + c_block(30)


def test_unterminated_docstring_or_comment_is_left_alone():
    unclosed = '"""never closed\n' + "text\n" * 30
    assert strip_header(unclosed, "python", 20) == unclosed
    assert strip_header("/* never closed\n" * 30, "c", 20) == "/* never closed\n" * 30


def test_stripping_is_reported_and_rules_see_the_stripped_text():
    kept = verdict(code(c_block(30) + "int a;\nint b;\nint c;\n", id="src/a.c", language="c"))
    assert kept == Verdict("int a;\nint b;\nint c;\n", header_stripped=True)
    # a license with two lines of code is too short once the license is gone
    assert verdict(code(hash_block(30) + "import os\nos.exit()\n")).reason == "too_few_lines"
    # web text is never stripped
    text = hash_block(30) + "\n".join(prose_lines(5))
    assert verdict(web(text)) == Verdict(None, "repeated_lines")


# --- web text rules at their thresholds ---------------------------------------------------------


def test_min_text_chars():
    assert verdict(web("a" * 200)).text is not None
    assert verdict(web("  " + "a" * 199 + "\n\n")).reason == "too_short"


def test_duplicate_line_fraction_limit():
    lines = prose_lines(7)
    assert verdict(web("\n".join(lines + lines[:3]))).text is not None  # 3 of 10 lines repeat
    assert verdict(web("\n".join(lines[:6] + lines[:4]))).reason == "repeated_lines"  # 4 of 10


def test_alpha_word_fraction_limit():
    def words(alpha: int, numbers: int) -> str:
        return " ".join([f"word{i}" for i in range(alpha)] + [str(1000 + i) for i in range(numbers)])

    assert verdict(web(words(80, 20))).text is not None
    assert verdict(web(words(79, 21))).reason == "few_alpha_words"


def test_any_script_counts_as_letters():
    text = "\n".join(f"第{i}行：这是一段很普通的中文文本，用来检查过滤器不会误删非拉丁文字。" for i in range(10))
    assert verdict(Document(id="w", text=text, language="zh")).text == text


# --- dedup --------------------------------------------------------------------------------------


def test_exact_duplicates_across_sources_and_languages():
    f = DocumentFilter()
    assert f.apply(code(BODY, id="/src/a/mod.py")).text == BODY
    assert f.apply(code(BODY, id="/other/src.zip!b/mod.py")) == Verdict(None, "duplicate")
    assert f.apply(code(BODY + "\n", id="/src/a/mod2.py")).text is not None  # one byte differs
    text = "\n".join(prose_lines(10))
    assert f.apply(web(text)).text == text
    assert f.apply(Document(id="other", text=text, language="text")) == Verdict(None, "duplicate")
    assert len(f.seen) == 3 and all(len(d) == 16 for d in f.seen)


def test_files_differing_only_in_a_stripped_header_are_duplicates():
    f = DocumentFilter()
    assert f.apply(code(hash_block(25) + BODY, id="a.py")).header_stripped
    assert f.apply(code(docstring(30) + BODY, id="b.py")) == Verdict(None, "duplicate")
    # a short header is kept, so it makes the file different
    assert f.apply(code("# short\n" + BODY, id="c.py")).text is not None


def test_dropped_documents_are_not_remembered():
    f = DocumentFilter()
    f.apply(code(BODY, id="tests/test_a.py"))
    f.apply(web("short"))
    assert not f.seen
    assert f.apply(code(BODY)).text == BODY


def test_check_is_stateless_and_seen_can_be_seeded():
    f = DocumentFilter()
    assert f.check(code(BODY)) == f.check(code(BODY)) == Verdict(BODY)
    assert not f.seen  # check never dedups: the build runs it in worker processes
    assert f.first_seen(text_digest(BODY)) and not f.first_seen(text_digest(BODY))
    seeded = DocumentFilter(seen={text_digest(BODY)})  # a resumed build, from its journal
    assert seeded.apply(code(BODY)) == Verdict(None, "duplicate")


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"min_lines": 0},
        {"min_lines": 10, "max_lines": 5},
        {"max_non_ascii": 1.5},
        {"max_duplicate_line_fraction": -0.1},
        {"min_alpha_word_fraction": 2.0},
        {"max_line_length": 0},
        {"max_mean_line_length": 0},
        {"max_encoded_run": -1},
        {"max_header_lines": -1},
        {"min_text_chars": -1},
    ],
)
def test_bad_config_values_are_errors(bad):
    with pytest.raises(DslmError, match="filter"):
        FilterConfig(**bad)


def test_thresholds_are_configurable():
    assert verdict(code(BODY), min_lines=6).reason == "too_few_lines"
    assert verdict(code(hash_block(5) + BODY), max_header_lines=4).header_stripped
