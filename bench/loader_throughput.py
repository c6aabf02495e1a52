"""Training-loader throughput per worker on real shards: the tokens/s that `train_loader`
delivers with data.num_workers = 0, 1, 2, against what one GPU consumes at the headline size, so
how many loader workers a GPU needs.

    python bench/loader_throughput.py [--workers 0,1,2] [--micro-batch 8] [--batches 2000] [--warmup 50]
                                      [--seq-len 1024] [--vocab-size 8888] [--corpus-mb 40]
                                      [--samples-per-shard 256] [--shards DIR] [--work DIR] [--json OUT]

Shards: built with the project's own builder, as tests/conftest.py builds its fixture: a tokenizer
trained (`train_and_save_tokenizer`) on one copy of five stdlib packages (asyncio, email, http,
json, logging), then `build_shards` at --seq-len over copies of them (each file made unique by a
trailing comment, so dedup keeps it) until the corpus reaches --corpus-mb, --samples-per-shard
samples per shard, no val split. With --shards DIR an existing build is read instead; with
--work DIR the build is kept there for the next run (which reads it at the same seq_len and
vocab). The shard files are read once before any measurement, so every side finds them in the
page cache.

The loader: `train_loader(cfg, TrainSamples(cfg, [manifest]), train_order(cfg, [manifest], seed),
rank 0, world size 1, --micro-batch)`, as tests/dslm/test_loader.py builds it, with DataConfig's
defaults (prefetch_factor 2, shuffle_window 16, max_open_shards 64, verify "size") but
num_workers. A fresh loader per side: --warmup micro-batches (worker start-up, the first shards
opened and checked), then --batches micro-batches timed; the consumer drops each batch (no pinned
memory, no device copy: no GPU here), so the figure is the loader's ceiling. Tokens count
seq_len per sample (what a training step trains on; a sample holds seq_len + 1). Also measured:
the main process's CPU time per micro-batch, and the workers' CPU time, from which "tokens per
worker CPU-second" is the rate of one worker that has a core to itself.

GPU_TOKENS_PER_S is what one H100 consumes at the headline size (gpt-12l-1024d, seq_len 1024).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from itertools import islice
from pathlib import Path

import psutil
from loader_scale import int_list  # bench/loader_scale.py, beside this script

HERE = Path(__file__).resolve()
STDLIB = Path(sysconfig.get_paths()["stdlib"])
PACKAGES = ("asyncio", "email", "http", "json", "logging")
GPU_TOKENS_PER_S = 450_000
SEED = 1


def write_corpus(folder: Path, min_bytes: int) -> Path:
    """Copies of PACKAGES' source files under folder/copyN/ until at least `min_bytes`; each file
    ends in a comment naming its copy. Returns folder/copy0."""
    files = [
        (package / path.relative_to(STDLIB / package), path.read_bytes())
        for package in map(Path, PACKAGES)
        for path in sorted((STDLIB / package).rglob("*.py"))
        if "__pycache__" not in path.parts
    ]
    written, copy = 0, 0
    while written < min_bytes or copy == 0:
        for rel, raw in files:
            target = folder / f"copy{copy}" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(raw + f"\n# copy {copy}\n".encode())
            written += len(raw)
        copy += 1
    return folder / "copy0"


def build(work: Path, args: argparse.Namespace) -> Path:
    from dslm_shards.build import TOKENIZER_NAME, ShardConfig, build_shards, train_and_save_tokenizer
    from dslm_shards.sources import CodeSource

    corpus, out = work / "corpus", work / "shards"
    shutil.rmtree(corpus, ignore_errors=True)
    first = write_corpus(corpus, args.corpus_mb << 20)
    out.mkdir(parents=True, exist_ok=True)
    train_and_save_tokenizer(
        [CodeSource(spec=f"code:{first}", root=first)], args.vocab_size, sample_bytes=10**9, out=out / TOKENIZER_NAME
    )
    cfg = ShardConfig(
        out=out,
        tokenizer=out / TOKENIZER_NAME,
        seq_len=args.seq_len,
        samples_per_shard=args.samples_per_shard,
        val_fraction=0.0,
        overwrite=True,
    )
    build_shards(cfg, [CodeSource(spec=f"code:{corpus}", root=corpus)])
    shutil.rmtree(corpus)
    return out


def reusable(shards: Path, args: argparse.Namespace) -> bool:
    """Whether a previous run left a finished build of the same seq_len and vocab in --work."""
    from dslm.data.manifest import MANIFEST_NAME, Manifest

    if not (shards / MANIFEST_NAME).is_file():
        return False
    manifest = Manifest.load(shards)
    return (manifest.seq_len, manifest.vocab_size) == (args.seq_len, args.vocab_size)


def warm_page_cache(folder: Path) -> int:
    """Reads every file below `folder` once; their bytes."""
    total = 0
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    total += len(chunk)
    return total


def workers_cpu_s(me: psutil.Process) -> float:
    total = 0.0
    for child in me.children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(shards: Path, num_workers: int, args: argparse.Namespace) -> dict:
    from dslm.data.loader import DataConfig, TrainSamples, train_loader, train_order
    from dslm.data.manifest import Manifest

    manifest = Manifest.load(shards)
    cfg = DataConfig(shards=str(shards), num_workers=num_workers)
    loader = train_loader(
        cfg, TrainSamples(cfg, [manifest]), train_order(cfg, [manifest], SEED), 0, 1, args.micro_batch
    )
    batches = iter(loader)
    start = time.perf_counter()
    for batch in islice(batches, args.warmup):
        assert batch["input_ids"].shape == (args.micro_batch, manifest.seq_len + 1)
    warmup_s = time.perf_counter() - start
    me = psutil.Process()
    cpu0, wcpu0, start = time.process_time(), workers_cpu_s(me), time.perf_counter()
    rows = 0
    for batch in islice(batches, args.batches):
        rows += len(batch["input_ids"])
    seconds = time.perf_counter() - start
    main_cpu, worker_cpu = time.process_time() - cpu0, workers_cpu_s(me) - wcpu0
    del batches, loader  # stops the workers
    tokens = rows * manifest.seq_len
    rate = tokens / seconds
    result = {
        "num_workers": num_workers,
        "batches": args.batches,
        "samples": rows,
        "tokens": tokens,
        "seconds": seconds,
        "warmup_s": warmup_s,
        "tokens_per_s": rate,
        "tokens_per_s_per_worker": rate / max(num_workers, 1),
        "ms_per_batch": seconds * 1000 / args.batches,
        "main_cpu_ms_per_batch": main_cpu * 1000 / args.batches,
    }
    if num_workers:
        result["worker_cpu_ms_per_batch"] = worker_cpu * 1000 / args.batches
        result["tokens_per_worker_cpu_s"] = tokens / worker_cpu if worker_cpu > 0 else None
    return result


def report(args: argparse.Namespace, shards: Path, info: dict, results: list[dict], commit: str) -> None:
    cores = len(os.sched_getaffinity(0))
    print(
        f"loader_throughput: {info['train_shards']} train shards, {info['train_samples']:,} samples of seq_len "
        f"{info['seq_len']} (vocab {info['vocab_size']}, {info['bytes'] / 2**20:,.0f} MiB, page cache warm); "
        f"micro-batch {args.micro_batch}, {args.batches} micro-batches after {args.warmup}; CPU, {cores} cores, "
        f"load average {os.getloadavg()[0]:.1f}; {datetime.date.today()}; commit {commit}"
    )
    print(
        f"| num_workers | tokens/s | per worker | ms per micro-batch | main process CPU ms per micro-batch | "
        f"worker CPU ms per micro-batch | tokens per worker CPU-second | workers for {GPU_TOKENS_PER_S:,} tokens/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        per_cpu = r.get("tokens_per_worker_cpu_s")
        need = "-" if not r["num_workers"] else f"{GPU_TOKENS_PER_S / r['tokens_per_s_per_worker']:.2f}"
        print(
            f"| {r['num_workers']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_worker']:,.0f} | "
            f"{r['ms_per_batch']:.2f} | {r['main_cpu_ms_per_batch']:.2f} | "
            f"{'-' if 'worker_cpu_ms_per_batch' not in r else format(r['worker_cpu_ms_per_batch'], '.2f')} | "
            f"{'-' if per_cpu is None else format(per_cpu, ',.0f')} | {need} |"
        )
    busiest = max(r["num_workers"] for r in results)
    if busiest + 1 > cores:
        print(
            f"note: {busiest} workers and the main process share {cores} cores (oversubscribed): the rows with "
            f"{cores} or more workers understate a worker's rate; 'tokens per worker CPU-second' does not "
            "depend on it"
        )
    one = next((r for r in results if r["num_workers"] == 1), None)
    if one:
        per_cpu = one.get("tokens_per_worker_cpu_s") or one["tokens_per_s"]
        print(
            f"one GPU at {GPU_TOKENS_PER_S:,} tokens/s needs {math.ceil(GPU_TOKENS_PER_S / one['tokens_per_s'])} "
            f"worker(s) at the 1-worker rate ({one['tokens_per_s']:,.0f} tokens/s), "
            f"{GPU_TOKENS_PER_S / per_cpu:.3f} of a core by worker CPU time"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "shards": str(shards),
                    **info,
                    "micro_batch": args.micro_batch,
                    "gpu_tokens_per_s": GPU_TOKENS_PER_S,
                    "cores": cores,
                    "commit": commit,
                    "results": results,
                },
                indent=2,
            )
        )


def main() -> None:
    p = argparse.ArgumentParser(
        prog="loader_throughput", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workers", type=int_list, default=[0, 1, 2], help="data.num_workers values (default: 0,1,2)")
    p.add_argument("--micro-batch", type=int, default=8, help="(default: %(default)s)")
    p.add_argument("--batches", type=int, default=2000, help="micro-batches timed per side (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=50, help="micro-batches read before timing (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=1024, help="(default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=8888, help="(default: %(default)s)")
    p.add_argument("--corpus-mb", type=int, default=40, help="source code sharded (default: %(default)s)")
    p.add_argument("--samples-per-shard", type=int, default=256, help="(default: %(default)s)")
    p.add_argument("--shards", type=Path, help="read this build instead of building one")
    p.add_argument(
        "--work",
        type=Path,
        help="build into this folder and keep it; a later run reads that build "
        "if its seq_len and vocab match (default: a temporary folder)",
    )
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    for name in ("micro_batch", "batches", "seq_len", "vocab_size", "corpus_mb", "samples_per_shard"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if args.warmup < 0:
        p.error(f"--warmup {args.warmup} must not be negative")
    sys.path.insert(0, str(HERE.parent))
    from provenance import git_commit  # bench/provenance.py, beside this script

    from dslm.data.manifest import Manifest

    work = args.work or Path(tempfile.mkdtemp(prefix="dslm-loader-"))
    try:
        shards = args.shards or (work / "shards" if reusable(work / "shards", args) else build(work, args))
        manifest = Manifest.load(shards)
        train = manifest.split("train")
        info = {
            "train_shards": len(train),
            "train_samples": sum(e.samples for e in train),
            "seq_len": manifest.seq_len,
            "vocab_size": manifest.vocab_size,
            "bytes": warm_page_cache(shards),
        }
        results = []
        for num_workers in args.workers:
            results.append(measure(shards, num_workers, args))
            print(f"num_workers={num_workers}: {results[-1]['tokens_per_s']:,.0f} tokens/s", file=sys.stderr)
        report(args, shards, info, results, git_commit("dslm/data", "bench/loader_throughput.py"))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
