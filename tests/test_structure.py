"""The layout rules of the code base, checked from the source: imports point one way and never in
a circle, shards/, eval/ and launch/ go by their installed names (dslm_*), functions stay short, and
every config field says what it means."""

import ast
import os
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {
    "dslm": REPO / "dslm",
    "dslm_shards": REPO / "shards",
    "dslm_eval": REPO / "eval",
    "dslm_launch": REPO / "launch",
    "dslm_local": REPO / "local" / "dslm_local",
}
"""Each package by its import name (what pip installs, pyproject.toml's package-dir) and its folder."""
PACKAGES = tuple(FOLDERS)
GENERIC_NAMES = ("shards", "eval", "launch")
"""The folders' own names, which nothing imports them as: installed top-level, they would collide
with any other package or module of those names."""
MAX_FUNCTION_LINES = 60
LOCAL_DEPENDENCIES = {"numpy", "onnxruntime", "tokenizers"}
"""All that dslm_local may import besides the standard library and itself (local/pyproject.toml)."""


def module_name(path: Path, package: str) -> str:
    parts = (package, *path.relative_to(FOLDERS[package]).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_files(package: str) -> list[Path]:
    return sorted(FOLDERS.get(package, REPO / package).rglob("*.py"))


def sources(packages=PACKAGES) -> dict[str, Path]:
    """module name -> file, for every module of `packages`."""
    return {module_name(p, package): p for package in packages for p in package_files(package)}


def imported(tree: ast.AST, module: str, known: set[str], is_package: bool = False) -> set[str]:
    """The modules of `known` that `module` imports, anywhere in it (inside functions too)."""
    package = module if is_package else module.rpartition(".")[0]  # what `from . import` names
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package `level` steps up
                up = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{up}.{base}" if base else up
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:  # the most specific known module the name lies in
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph(packages=PACKAGES) -> dict[str, set[str]]:
    modules = sources(packages)
    return {
        name: imported(ast.parse(path.read_text()), name, set(modules), path.name == "__init__.py")
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_sees_relative_nested_and_from_imports():
    known = {"p", "p.a", "p.b", "p.sub", "p.sub.c"}
    tree = ast.parse("from . import a\nfrom .sub.c import X\ndef f():\n    import p.b\n")
    assert imported(tree, "p.d", known) == {"p.a", "p.sub.c", "p.b"}
    package_init = ast.parse("from .. import b\nfrom .c import X\n")
    assert imported(package_init, "p.sub", known, is_package=True) == {"p.b", "p.sub.c"}
    assert imported(ast.parse("from ..a import X\n"), "p.sub.c", known) == {"p.a"}


def test_no_import_cycles_between_modules():
    assert find_cycle(import_graph()) is None


def test_dslm_imports_none_of_the_packages_built_on_it():
    above = [
        (module, target)
        for module, targets in import_graph().items()
        if module.split(".")[0] == "dslm"
        for target in targets
        if target.split(".")[0] not in ("dslm", "dslm_local")
    ]
    assert above == []


def test_dslm_local_needs_nothing_but_its_three_libraries():
    """dslm-complete runs where torch is not installed: dslm_local imports only the standard
    library, itself and LOCAL_DEPENDENCIES (a test in tests/local runs it with torch unimportable)."""
    found = set()
    for path in package_files("dslm_local"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                found.add(node.module.split(".")[0])
    assert found - set(sys.stdlib_module_names) - {"dslm_local", "__future__"} == LOCAL_DEPENDENCIES


def left_out(folder: str, names: list[str]) -> set[str]:
    """Of `names` in `folder`, what is not the project's own: git and other hidden folders (.ci
    excepted), virtual environments, caches, build outputs, and the runs and data of a checkout."""
    top = Path(folder) == REPO
    return {
        n
        for n in names
        if n in ("__pycache__", "build")
        or n.endswith(".egg-info")
        or (top and ((n.startswith(".") and n != ".ci") or n in ("runs", "data") or "venv" in n))
    }


def project_files() -> list[Path]:
    """Every file of the project: code, tests, scripts, docs, recipes, configs."""
    files = []
    for folder, dirs, names in os.walk(REPO):
        dirs[:] = sorted(set(dirs) - left_out(folder, dirs))
        files += [Path(folder) / name for name in sorted(set(names) - left_out(folder, names))]
    return files


def generic_imports(path: Path) -> list[str]:
    """`path:line name` for each import in a Python file of a folder by its generic name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module]
        else:
            continue
        found += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] in GENERIC_NAMES]
    return found


def test_no_python_file_imports_shards_eval_or_launch_by_the_folder_name():
    assert [hit for path in project_files() if path.suffix == ".py" for hit in generic_imports(path)] == []


def test_no_file_names_a_module_of_shards_eval_or_launch_by_the_folder_name():
    """Docs, docstrings, shell scripts, `python -m` lines and entry points name a module of these
    folders as it is installed (dslm_shards.cli)."""
    modules = [f"{folder}\\.{path.stem}" for folder in GENERIC_NAMES for path in (REPO / folder).glob("*.py")]
    pattern = re.compile(
        rf"(?<![\w./-])({'|'.join(modules)})\b|^\s*(from|import)\s+({'|'.join(GENERIC_NAMES)})\b", re.MULTILINE
    )
    found = []
    for path in project_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:  # not a text file
            continue
        for match in pattern.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append(f"{path.relative_to(REPO)}:{line} {match.group().strip()}")
    assert found == []


def functions(packages=PACKAGES + ("bench",)):
    for package in packages:
        for path in package_files(package):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield path.relative_to(REPO), node


def test_no_function_is_longer_than_60_lines():
    long = [
        f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, node in functions()
        if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


def config_classes(packages=PACKAGES + ("bench",)):
    """Dataclasses that hold settings: named *Config, *Limits or *Settings."""
    for package in packages:
        for path in package_files(package):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.ClassDef)
                    and node.name.endswith(("Config", "Limits", "Settings"))
                    and any("dataclass" in ast.unparse(d) for d in node.decorator_list)
                ):
                    yield path.relative_to(REPO), node


def undocumented_fields(cls: ast.ClassDef) -> list[str]:
    """Fields not followed by a docstring (the string literal right below the field)."""
    body = cls.body
    return [
        node.target.id
        for i, node in enumerate(body)
        if isinstance(node, ast.AnnAssign)
        and not (
            i + 1 < len(body)
            and isinstance(body[i + 1], ast.Expr)
            and isinstance(body[i + 1].value, ast.Constant)
            and isinstance(body[i + 1].value.value, str)
        )
    ]


def test_config_classes_are_found():
    names = {node.name for _, node in config_classes()}
    expected = {"ModelConfig", "DataConfig", "TrainConfig", "OptimConfig", "RunConfig", "ShardConfig", "SlurmConfig"}
    assert expected <= names


@pytest.mark.parametrize("path, cls", list(config_classes()), ids=lambda x: getattr(x, "name", str(x)))
def test_every_config_field_is_documented(path, cls):
    assert undocumented_fields(cls) == [], f"{path}: {cls.name}"
