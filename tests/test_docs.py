"""The manual says only what is true: every dslm command and option that README.md and docs/*.md
show is in that command's --help (its entry point's, as pyproject.toml names it), every config key
they name is a field of the run config, every test and repository path they name exists, and every
relative link (and #anchor) they hold leads to a file of the repository."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from dslm.config import config_keys

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SCRIPTS = {"dslm/train.py": "dslm-train", "slurm/pretrain.sh": "dslm-train", "slurm/eval.sh": "dslm-eval"}
"""Paths that run a console script with the arguments given to them (`deepspeed dslm/train.py ...`,
`sbatch slurm/pretrain.sh ...`)."""
PASSED_ON = {"dslm-submit shard": "dslm-shard build", "dslm-submit eval": "dslm-eval"}
"""Commands that pass the options they do not know to another (their --help says so)."""
SECTIONS = ("model", "data", "train", "origin")
FILE_SUFFIXES = {"safetensors", "onnx", "json", "yaml", "py", "csv", "txt", "npy", "pt", "bin"}
"""`model.safetensors`, `model.onnx.data`: file names that start like a config key."""
TOP_FOLDERS = ("dslm", "shards", "eval", "launch", "slurm", "bench", "tests", "ds_configs", "local", "docs")
"""A word in a page that starts with one of these folders and ends in a file suffix or "/" names a
file or folder of the repository (`eval/val_loss` is a TensorBoard scalar)."""
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".toml", ".sh", ".json", ".txt", ".cfg", ""}
SKIPPED_FOLDERS = {".git", ".venv", ".whl", "data", "runs", "__pycache__", ".pytest_cache", ".ruff_cache"}
"""What the project's own files are not: version control, installs, and what runs write."""
SHELL_BREAKS = {"|", "||", "&", "&&", ";", ">", ">>", "<", "(", ")", "do", "then"}


@dataclass
class Span:
    """A piece of code in a page: a line of a fenced block, or an inline `span`."""

    page: Path
    line: int
    text: str
    section: str
    """The heading the span is under ("" before the first)."""
    inline: bool

    def where(self) -> str:
        return f"{shown(self.page)}:{self.line}"


def shown(path: Path) -> str:
    """A page's path as a message names it: from the repository's root (a page elsewhere, by name)."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def fenced_blocks(text: str) -> list[bool]:
    """For each line of a markdown page, whether it is inside (or a fence of) a fenced code block."""
    inside, marks = False, []
    for line in text.splitlines():
        fence = line.lstrip().startswith("```")
        marks.append(inside or fence)
        inside ^= fence
    return marks


def headings(text: str) -> list[tuple[int, str]]:
    """(line number, heading text) of each markdown heading outside code blocks."""
    return [
        (i + 1, m.group(1).strip())
        for i, (line, fenced) in enumerate(zip(text.splitlines(), fenced_blocks(text)))
        if not fenced and (m := re.match(r"#{1,6}\s+(.*)", line))
    ]


def spans(page: Path) -> list[Span]:
    """The code of a page: each command line of its fenced blocks (continuation lines joined) and
    each inline `span` of its prose (one may run over a line break)."""
    text = page.read_text()
    lines, fenced = text.splitlines(), fenced_blocks(text)
    sections = [""] * (len(lines) + 2)
    for number, heading in headings(text):
        sections[number:] = [heading] * (len(sections) - number)
    found, pending = [], ""
    for i, (line, in_block) in enumerate(zip(lines, fenced)):
        if in_block and not line.lstrip().startswith("```"):
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            found.append(Span(page, i + 1, pending, sections[i + 1], inline=False))
            pending = ""
    prose = "\n".join("" if in_block else line for line, in_block in zip(lines, fenced))
    for m in re.finditer(r"`([^`]+)`", prose):
        number = prose.count("\n", 0, m.start()) + 1
        found.append(Span(page, number, " ".join(m.group(1).split()), sections[number], inline=True))
    return sorted(found, key=lambda span: span.line)


def words(text: str) -> list[str]:
    """A command line's words as the shell splits them (quotes removed, comments dropped)."""
    try:
        lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        return list(lexer)
    except ValueError:  # an unclosed quote (bash's $'...'): plain words are enough for the options
        return text.split()


PYPROJECTS = ("pyproject.toml", "local/pyproject.toml")


@cache
def console_scripts() -> dict[str, str]:
    """command -> entry point (module:function), from the packages' pyproject.toml files."""
    scripts = {}
    for pyproject in PYPROJECTS:
        scripts.update(tomllib.loads((REPO / pyproject).read_text())["project"].get("scripts", {}))
    return scripts


@cache
def distributions() -> set[str]:
    """The packages' names (dslm, dslm-local): words that look like commands and are not."""
    return {tomllib.loads((REPO / pyproject).read_text())["project"]["name"] for pyproject in PYPROJECTS}


HELP_SCRIPT = """
import contextlib, importlib, io, json, re, sys

def help_of(main, argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit:
            pass
    return out.getvalue()

helps = {}
for command, target in json.loads(sys.argv[1]).items():
    module, _, function = target.partition(":")
    main = getattr(importlib.import_module(module), function)
    helps[command] = help_of(main, ["--help"])
    for group in re.findall(r"^  \\{([a-z,-]+)\\}", helps[command], re.M):  # subcommands
        for sub in group.split(","):
            helps[f"{command} {sub}"] = help_of(main, [sub, "--help"])
print(json.dumps(helps))
"""


@cache
def helps() -> dict[str, str]:
    """The --help of every console script and of each of its subcommands ("dslm-shard build"), as
    their entry points print it, all in one process."""
    done = subprocess.run(
        [sys.executable, "-c", HELP_SCRIPT, json.dumps(console_scripts())],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def options(command: str) -> set[str]:
    """The long options a command's --help lists, with those of the command it passes others to."""
    found = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", helps()[command]))
    return found | (options(PASSED_ON[command]) if command in PASSED_ON else set())


def subcommands(command: str) -> list[str]:
    return [c for c in helps() if c.startswith(command + " ")]


def command_at(ws: list[str], i: int) -> str | None:
    """The command (with its subcommand) that word i starts, if it starts one (`dslm-eval`,
    `.venv/bin/dslm-eval`, `dslm/train.py`)."""
    word = ws[i].strip("[]`")
    name = word.rpartition("/")[2]
    command = SCRIPTS.get(word, name if name in console_scripts() else None)
    if command and i + 1 < len(ws) and f"{command} {ws[i + 1]}" in helps():
        return f"{command} {ws[i + 1]}"
    return command


def invocations(span: Span) -> list[tuple[str, list[str]]]:
    """(command, its arguments) for each dslm command a span runs."""
    ws, found = words(span.text), []
    for i in range(len(ws)):
        if command := command_at(ws, i):
            start = i + 1 + command.count(" ")
            end = next((j for j in range(start, len(ws)) if ws[j] in SHELL_BREAKS or command_at(ws, j)), len(ws))
            found.append((command, ws[start:end]))
    return found


def commands_named(text: str) -> set[str]:
    """The commands a piece of text names ("dslm-shard sft" names that subcommand; a bare
    "dslm-shard" all of them)."""
    found = set()
    for span_text in re.findall(r"`([^`]+)`", text):
        ws = words(span_text)
        for i in range(len(ws)):
            if command := command_at(ws, i):
                found |= {command} if " " in command or not subcommands(command) else {command, *subcommands(command)}
    return found


def flag(word: str) -> str | None:
    return m.group(1) if (m := re.match(r"(--[a-z][\w-]*)(=.*)?$", word)) else None


def wrong_options() -> list[str]:
    wrong = []
    for page in DOCS:
        text = page.read_text()
        by_section: dict[str, set[str]] = {}
        for span in spans(page):
            by_section.setdefault(span.section, set()).update(commands_named(f"`{span.text}`"))
        for span in spans(page):
            runs = invocations(span)
            for command, args in runs:
                wrong += [
                    f"{span.where()}: {command} has no {f}"
                    for a in args
                    if (f := flag(a)) and f not in options(command)
                ]
            first = words(span.text)[:1]
            if span.inline and not runs and first and flag(first[0]):  # a bare `--option`: its section's commands
                named = by_section.get(span.section) or commands_named(text)
                wrong += [
                    f"{span.where()}: no command of its section ({', '.join(sorted(named)) or 'none'}) has {f}"
                    for f in filter(None, map(flag, words(span.text)))
                    if not any(f in options(c) for c in named)
                ]
    return wrong


def wrong_names() -> list[str]:
    """`dslm-*` words that name no command, tests that do not exist, repository paths that are not there."""
    tests = {
        node
        for path in (REPO / "tests").rglob("*.py")
        for node in re.findall(r"^\s*def (test_\w+)", path.read_text(), re.M)
    }
    wrong = []
    for page in DOCS:
        for span in spans(page):
            for word in words(span.text):
                word = word.strip("[](),;:`'\"")
                if re.fullmatch(r"dslm-[a-z-]+", word) and word not in console_scripts().keys() | distributions():
                    wrong.append(f"{span.where()}: {word} is no command")
                elif re.fullmatch(r"test_\w+", word) and word not in tests:
                    wrong.append(f"{span.where()}: no test is named {word}")
                elif (
                    re.fullmatch(r"(%s)/[\w./*-]*(\.[a-z]+|/)" % "|".join(TOP_FOLDERS), word)
                    and not re.search(r"[A-Z]|\.\.\.", word)
                    and not any(REPO.glob(word.rstrip("/")))
                ):
                    wrong.append(f"{span.where()}: {word} is not in the repository")
    return wrong


@cache
def known_keys() -> set[str]:
    """Every config key, and every section and nested section (`train.lora`) above one."""
    names = {k.name.replace("[]", "") for k in config_keys()}
    return names | {name.rsplit(".", n)[0] for name in names for n in range(1, name.count(".") + 1)}


CONFIG_KEY = re.compile(r"(?<![\w./-])((?:%s)\.[a-z_]+(?:\.[a-z_]+)*)(?![\w(/])" % "|".join(SECTIONS))


def wrong_keys() -> list[str]:
    wrong = []
    for page in DOCS:
        for span in spans(page):
            for key in CONFIG_KEY.findall(span.text):
                if key not in known_keys() and key.split(".")[1] not in FILE_SUFFIXES:
                    wrong.append(f"{span.where()}: {key} is not a config key (dslm-train --help-config)")
            for command, args in invocations(span):  # top-level keys in dslm-train's overrides (name=...)
                if command in ("dslm-train", "dslm-submit train"):
                    wrong += [
                        f"{span.where()}: {a} sets no config key"
                        for a in args
                        if "=" in a and re.fullmatch(r"[a-z_]+", key := a.partition("=")[0]) and key not in known_keys()
                    ]
    return wrong


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces as -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def wrong_links() -> list[str]:
    wrong = []
    for page in DOCS:
        text = page.read_text()
        for i, (line, fenced) in enumerate(zip(text.splitlines(), fenced_blocks(text))):
            for target in [] if fenced else re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
                if re.match(r"[a-z]+:", target):
                    continue
                path, _, anchor = target.partition("#")
                file = (page.parent / path).resolve() if path else page
                where = f"{shown(page)}:{i + 1}: {target}"
                if not file.is_relative_to(REPO if page.is_relative_to(REPO) else page.parent):
                    wrong.append(f"{where}: outside the repository")
                elif not file.exists():
                    wrong.append(f"{where}: no such file")
                elif anchor and file.suffix == ".md" and anchor not in {slug(h) for _, h in headings(file.read_text())}:
                    wrong.append(f"{where}: no such heading in {shown(file)}")
    return wrong


def test_every_option_the_docs_show_is_in_its_commands_help():
    assert wrong_options() == []


def test_every_config_key_the_docs_show_exists():
    assert wrong_keys() == []


def test_every_command_test_and_repository_path_the_docs_name_exists():
    assert wrong_names() == []


def test_every_relative_link_resolves():
    assert wrong_links() == []


def test_no_file_points_outside_the_repository():
    """The maintainers' notes beside the repository are not part of it: nothing may cite them."""
    files = [
        path
        for path in REPO.rglob("*")
        if path.is_file() and path.suffix in TEXT_SUFFIXES and not set(path.relative_to(REPO).parts) & SKIPPED_FOLDERS
    ]
    assert [str(path.relative_to(REPO)) for path in files if re.search(r"\.\./shared\b", path.read_text())] == []


def test_the_checks_see_what_they_check(tmp_path, monkeypatch):
    """Each check finds a planted mistake, so an empty list means the docs are right, not that
    nothing was looked at."""
    page = tmp_path / "page.md"
    page.write_text(
        "\n".join(
            [
                "# Training",
                "",
                "Run `dslm-train --resum auto train.lr=1e-3 train.lrr=1 nme=x`; see `train.lora.rnak`,",  # line 3
                "`--nproc-per-node 2` and `--no-such-flag`, [a](missing.md), [b](#training), [c](#nowhere), [d](../x.md).",
                "`dslm-evaluate`, `test_nothing_like_this`, `dslm/nothing.py`, `dslm/config.py`, `dslm-local`,",
                "and a span over a line break: `dslm-eval runs/NAME",
                "--nope`.",
                "",
                "```",
                "dslm-shard build --source code:x \\",
                "    --tokenizer t --seq-len 8 --template instruct",  # line 11
                "```",
                "",
            ]
        )
    )
    monkeypatch.setattr(sys.modules[__name__], "DOCS", [page])
    assert wrong_options() == [
        "page.md:3: dslm-train has no --resum",
        "page.md:4: no command of its section (dslm-eval, dslm-shard build, dslm-train) has --no-such-flag",
        "page.md:6: dslm-eval has no --nope",
        "page.md:11: dslm-shard build has no --template",
    ]
    assert wrong_keys() == [
        "page.md:3: train.lrr is not a config key (dslm-train --help-config)",
        "page.md:3: nme=x sets no config key",
        "page.md:3: train.lora.rnak is not a config key (dslm-train --help-config)",
    ]
    assert wrong_links() == [
        "page.md:4: missing.md: no such file",
        "page.md:4: #nowhere: no such heading in page.md",
        "page.md:4: ../x.md: outside the repository",
    ]
    assert wrong_names() == [
        "page.md:5: dslm-evaluate is no command",
        "page.md:5: no test is named test_nothing_like_this",
        "page.md:5: dslm/nothing.py is not in the repository",
    ]


def test_the_readme_stays_short():
    assert (REPO / "README.md").stat().st_size < 16_000


def test_every_exit_status_is_written_as_dslm_local_errors_has_it():
    """The one table of exit statuses (dslm_local.errors) is the docs' table row for row, and the
    numbers the shell wrappers compare with."""
    from dslm_local import errors

    table = (REPO / "docs" / "faults.md").read_text().partition("## Exit statuses")[2].partition("\n## ")[0]
    assert [int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)] == list(errors.EXIT_STATUSES)
    for script in sorted((REPO / "slurm").glob("*.sh")):
        for name, value in re.findall(r"^(EXIT_[A-Z_]+)=(\d+)", script.read_text(), re.M):
            assert getattr(errors, name) == int(value), f"{script.name}: {name}={value}"
