"""What `pip install` of dslm puts on the path: dslm's own import names only (the folders shards/,
eval/ and launch/ install as dslm_shards, dslm_eval and dslm_launch), every module of those folders,
and console scripts that run from the installed copy, for a wheel and for editable installs."""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

from tests.test_structure import FOLDERS, GENERIC_NAMES, REPO, left_out

SCRIPTS = sorted(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])
OWN_NAME = re.compile(r"dslm(_\w+)?")
"""The top-level import names dslm may install: dslm, dslm_local and dslm_*."""
ORIGINS = """
import importlib.util, json
names = {names!r}
print(json.dumps({{name: (spec := importlib.util.find_spec(name)) and spec.origin for name in names}}))
"""
"""A script printing where each top-level name imports from, as JSON (null where it does not)."""


def site_packages(root: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(root), "platbase": str(root)}))


def fresh_venv(root: Path) -> Path:
    """A virtual environment with nothing installed, which finds the dependencies (torch,
    deepspeed, ...) where the running interpreter does, after its own site-packages. Folders a
    .pth file adds have their own .pth files ignored, so an editable dslm there stays inactive.
    Returns its python."""
    venv.create(root, with_pip=False, symlinks=True)
    dependencies = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (site_packages(root) / "dependencies.pth").write_text("".join(f"{p}\n" for p in dependencies))
    return root / "bin" / "python"


def pip_install(python: Path, *args) -> None:
    """pip install into `python`'s environment, offline, without the dependencies; the dslm that
    the dependencies' folders hold (this checkout's own install) is neither seen nor touched."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "--disable-pip-version-check",
            "install",
            "-q",
            "--ignore-installed",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            *args,
        ],
        check=True,
        timeout=600,
    )


def without_pythonpath() -> dict[str, str]:
    """This process's environment less PYTHONPATH: a command run with it finds only what is installed."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def origins(python: Path, cwd: Path) -> dict[str, str | None]:
    """Where each of dslm's packages and each generic name imports from under `python`, run from
    `cwd` (None where it does not import)."""
    script = ORIGINS.format(names=[*FOLDERS, *GENERIC_NAMES])
    proc = subprocess.run(
        [python, "-c", script], capture_output=True, text=True, env=without_pythonpath(), cwd=cwd, check=True
    )
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the repository to build from (a build writes into the folder it is given)."""
    return Path(shutil.copytree(REPO, tmp_path_factory.mktemp("source") / "dslm", ignore=left_out))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, source) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--disable-pip-version-check",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            out,
            source,
        ],
        check=True,
        timeout=600,
    )
    return next(out.glob("dslm-*.whl"))


def test_the_wheel_installs_no_top_level_name_but_dslms(wheel):
    with zipfile.ZipFile(wheel) as z:
        files = z.namelist()
        info = next(f.split("/")[0] for f in files if f.endswith(".dist-info/RECORD"))
        top_level = z.read(f"{info}/top_level.txt").decode().split()
        record = [line.split(",")[0] for line in z.read(f"{info}/RECORD").decode().splitlines()]
    installed = {f.split("/")[0] for f in files + record} - {info} | set(top_level)
    assert sorted(name for name in installed if not OWN_NAME.fullmatch(name)) == []
    assert set(top_level) == set(FOLDERS)


def test_the_wheel_holds_every_module_of_the_source_folders(wheel):
    """Each .py file of shards/, eval/, launch/, dslm/ and local/dslm_local/ (subpackages too) is in
    the wheel under its installed name."""
    expected = {
        f"{name}/{path.relative_to(folder).as_posix()}"
        for name, folder in FOLDERS.items()
        for path in folder.rglob("*.py")
        if "__pycache__" not in path.parts
    }
    with zipfile.ZipFile(wheel) as z:
        assert expected - set(z.namelist()) == set()


@pytest.mark.slow
def test_every_console_script_of_the_installed_wheel_runs_help(wheel, tmp_path):
    python = fresh_venv(tmp_path / "venv")
    pip_install(python, wheel)
    installed = {name: str(site_packages(tmp_path / "venv") / name / "__init__.py") for name in FOLDERS}
    assert origins(python, cwd=tmp_path) == {**installed, **dict.fromkeys(GENERIC_NAMES)}
    assert sorted(p.name for p in (tmp_path / "venv" / "bin").glob("dslm-*")) == SCRIPTS
    for script in SCRIPTS:
        proc = subprocess.run(
            [tmp_path / "venv" / "bin" / script, "--help"],
            capture_output=True,
            text=True,
            env=without_pythonpath(),
            cwd=tmp_path,
            timeout=300,
        )
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
        assert proc.stdout.startswith(f"usage: {script}"), proc.stdout[:200]


@pytest.mark.parametrize("mode", ["lenient", "strict"])
def test_an_editable_install_imports_the_folders_under_dslms_names(source, tmp_path, mode):
    """`pip install -e` in both of setuptools' editable modes: the installed names import from
    the checkout's folders (strict mode: through a tree of links to its files), and the generic
    names import from nowhere."""
    python = fresh_venv(tmp_path / "venv")
    pip_install(python, "-e", source, "--config-settings", f"editable_mode={mode}")
    found = origins(python, cwd=tmp_path)
    checkout = {name: str(source / folder.relative_to(REPO) / "__init__.py") for name, folder in FOLDERS.items()}
    assert {name: origin and str(Path(origin).resolve()) for name, origin in found.items()} == {
        **checkout,
        **dict.fromkeys(GENERIC_NAMES),
    }
