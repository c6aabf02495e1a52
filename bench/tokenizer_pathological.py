"""What one pathological document adds to `dslm-shard tokenizer`: seconds of training and of the
tokens/byte report, against the same build without it, side by side in one process (best of
--repeats).

  python bench/tokenizer_pathological.py [--size 1000000] [--repeats 3]

The base corpus is three packages of the interpreter's standard library; each pathological
document is one text file of --size characters: one word of random letters, one letter repeated,
CJK characters without spaces, and a word, --size spaces and a word (issue 15, item 10).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

from dslm_shards.build import train_and_save_tokenizer
from dslm_shards.sources import parse_source

PACKAGES = ("json", "email", "asyncio")


def documents(size: int) -> dict[str, str]:
    rng = random.Random(0)
    return {
        "random letters": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(size)),
        "one letter repeated": "a" * size,
        "CJK without spaces": "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(size)),
        "spaces between two words": "word" + " " * size + "word",
    }


def best(specs: list[str], out: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        train_and_save_tokenizer([parse_source(s) for s in specs], 8888, 200_000_000, out, overwrite=True)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1_000_000, help="characters per document (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each case, the best kept (default: %(default)s)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        for package in PACKAGES:
            shutil.copytree(
                Path(sysconfig.get_paths()["stdlib"]) / package,
                base / package,
                ignore=shutil.ignore_patterns("__pycache__"),
            )
        out = Path(tmp) / "tokenizer.json"
        baseline = best([f"code:{base}"], out, args.repeats)
        print(f"base corpus ({', '.join(PACKAGES)}): {baseline:.2f} s")
        for name, text in documents(args.size).items():
            doc = Path(tmp) / "doc.txt"
            doc.write_text(text)
            added = best([f"code:{base}", f"text:{doc}"], out, args.repeats) - baseline
            print(f"+ {name} ({args.size:,} characters): {added:+.2f} s")


if __name__ == "__main__":
    main()
