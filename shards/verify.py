"""`dslm-shard verify` and `inspect`: check a build against its manifest, and describe it."""

from __future__ import annotations

import tarfile
from pathlib import Path

from dslm.data.manifest import Manifest, ShardEntry
from dslm.files import sha256_file
from shards.writer import SAMPLE_SUFFIX


def count_samples(path: Path) -> int:
    """Samples in a tar. A tar cut at a member boundary still reads without error, so counts
    (not tarfile) are what reveal truncation."""
    with tarfile.open(path) as tar:
        return sum(1 for m in tar if m.name.endswith(SAMPLE_SUFFIX))


def shard_problem(folder: Path, entry: ShardEntry) -> str | None:
    """Why this shard does not match its manifest entry, or None when it does."""
    path = folder / entry.name
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != entry.bytes:
        return f"{size} bytes, manifest says {entry.bytes}"
    try:
        samples = count_samples(path)
    except tarfile.TarError as e:
        return f"unreadable tar ({e})"
    if samples != entry.samples:
        return f"{samples} samples, manifest says {entry.samples}"
    if sha256_file(path) != entry.sha256:
        return "sha256 differs from the manifest"
    return None


def verify_build(folder: Path) -> list[str]:
    """One line per problem found ('' list when the build is intact)."""
    manifest = Manifest.load(folder)
    problems = []
    tokenizer = folder / manifest.tokenizer
    if not tokenizer.is_file() or sha256_file(tokenizer) != manifest.tokenizer_sha256:
        problems.append(f"{manifest.tokenizer}: missing or sha256 differs from the manifest")
    for entry in manifest.shards:
        if (problem := shard_problem(folder, entry)) is not None:
            problems.append(f"{entry.name}: {problem}")
    return problems
