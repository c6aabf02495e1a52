"""The code's style is ruff's, as configured in pyproject.toml: lint (pyflakes, pycodestyle's
errors, import order) and the formatter, at a line length of 120."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")


@pytest.mark.skipif(RUFF is None, reason="ruff is not installed (the test extras install it: make install)")
@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_passes(command):
    proc = subprocess.run([RUFF, *command, "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
