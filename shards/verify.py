"""`dslm-shard verify` and `inspect`: check a build against its manifest, and describe it."""

from __future__ import annotations

import tarfile
from pathlib import Path

from dslm.data.manifest import Manifest, shard_problem
from dslm.files import sha256_file
from dslm_shards.writer import SAMPLE_SUFFIX


def count_samples(path: Path) -> int:
    """Samples in a tar. A tar cut at a member boundary still reads without error, so counts
    (not tarfile) are what reveal truncation."""
    with tarfile.open(path) as tar:
        return sum(1 for m in tar if m.name.endswith(SAMPLE_SUFFIX))


def verify_build(folder: Path) -> list[str]:
    """One line per problem found ('' list when the build is intact)."""
    manifest = Manifest.load(folder)
    problems = []
    tokenizer = folder / manifest.tokenizer
    if not tokenizer.is_file() or sha256_file(tokenizer) != manifest.tokenizer_sha256:
        problems.append(f"{manifest.tokenizer}: missing or sha256 differs from the manifest")
    for entry in manifest.shards:
        if (problem := shard_problem(folder / entry.name, entry, count_samples)) is not None:
            problems.append(f"{entry.name}: {problem}")
    return problems
