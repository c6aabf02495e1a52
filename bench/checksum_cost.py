"""What the checkpoint seal's checksums cost: dslm.checkpoint.format.file_checksum (xxh3_128) per GB,
beside what writing that GB with torch.save costs, and sha256 for scale.

    python bench/checksum_cost.py [--gb 1] [--dir FOLDER] [--repeats 3]

One tensor of random bytes (--gb GB) is written with torch.save into --dir (default: a temporary
folder; give one on the filesystem that holds the checkpoints) and fsynced, as a rank writes its
part of a tag. Then, --repeats times: hashing it warm (still in the page cache, as each rank
hashes the files it has just written when a tag is sealed), hashing it cold (its pages dropped
with posix_fadvise(DONTNEED) first: what a resume reads), and, for scale, sha256 of it warm
(hashlib.file_digest). Each figure is the median, in seconds per GB (1e9 bytes).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from provenance import git_commit  # bench/provenance.py, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dslm.checkpoint.format import file_checksum


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def drop_cached_pages(path: Path) -> None:
    """Evict the file's pages from the page cache (the next read comes from the device)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write(path: Path, data: torch.Tensor) -> None:
    with open(path, "wb") as f:
        torch.save({"w": data}, f)
        f.flush()
        os.fsync(f.fileno())


def measure(folder: Path, gb: float, repeats: int) -> dict[str, float]:
    """Median seconds per GB of each operation."""
    data = torch.randint(0, 256, (int(gb * 1e9),), dtype=torch.uint8)
    path = folder / "part.pt"
    times: dict[str, list[float]] = {
        "torch.save + fsync": [],
        "xxh3_128, warm": [],
        "xxh3_128, cold": [],
        "sha256, warm": [],
    }
    for _ in range(repeats):
        times["torch.save + fsync"].append(timed(lambda: write(path, data)))
        times["xxh3_128, warm"].append(timed(lambda: file_checksum(path)))
        times["sha256, warm"].append(timed(lambda: sha256_file(path)))
        drop_cached_pages(path)
        times["xxh3_128, cold"].append(timed(lambda: file_checksum(path)))
    size_gb = path.stat().st_size / 1e9
    return {name: statistics.median(t) / size_gb for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0, help="size of the file, in GB (default 1)")
    p.add_argument("--dir", type=Path, default=None, help="where to write it (default: a temporary folder)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        per_gb = measure(Path(folder), args.gb, args.repeats)
    commit = git_commit("dslm/checkpoint/format.py", "bench/checksum_cost.py")
    device = f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"{args.gb:g} GB file, {args.repeats} repeats, {datetime.date.today()}, {commit}, {device}")
    print("| operation | s per GB | GB/s | vs torch.save |\n|---|---|---|---|")
    for name, seconds in per_gb.items():
        print(f"| {name} | {seconds:.3f} | {1 / seconds:.2f} | {seconds / per_gb['torch.save + fsync']:.0%} |")


if __name__ == "__main__":
    main()
