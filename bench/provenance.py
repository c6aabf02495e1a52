"""The commit a benchmark's figures were measured at, for bench/RESULTS.md. The benchmarks run as
scripts (`python bench/NAME.py`), so they import this module from their own folder."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit(*paths: str) -> str:
    """The short commit, marked " + local changes" when `paths` (what the figures depend on)
    differ from it; "unknown" outside a git checkout."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode:
        return "unknown"
    changed = git("diff", "--quiet", "HEAD", "--", *paths).returncode
    return head.stdout.strip() + (" + local changes" if changed else "")
