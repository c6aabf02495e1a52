"""`dslm-shard build` throughput against a bare `Tokenizer.encode_batch` loop, and its peak memory.

    python bench/shards_throughput.py [--corpus-mb 60] [--rss-corpus-mb 0] [--workers N]

Both sides get the same documents on the same cores in this one run: the corpus is the Python
standard library's source files that pass the build's filters, `--copies` times over (each copy
made unique by a trailing comment, so dedup keeps it). The baseline encodes the texts exactly as
the build tokenizes them (long headers already stripped), from memory, 256 at a time with
`encode_batch` and its own thread pool on every core; the build is the real `dslm-shard build`
command, from reading files to renaming the last shard. Order: baseline, build, baseline; the
ratio is the build's tokens/s over the mean of the two baselines.

With `--rss-corpus-mb`, a second build shards a corpus of at least that many MB and reports its
peak RSS (the build's processes summed, sampled every 0.1 s), to compare against
`MEMORY_CAP_MB`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import psutil

from dslm.data.manifest import Manifest, SourceStats
from dslm.data.tokens import load_text_tokenizer
from dslm_shards.build import all_cores, train_and_save_tokenizer
from dslm_shards.filters import DocumentFilter
from dslm_shards.sources import CodeSource, Document

STDLIB = Path(sysconfig.get_paths()["stdlib"])
BASELINES = ("encode_batch", "encode_batch_fast")
"""The issue's baseline, and the offset-free variant the build's workers call."""
RSS_FILES = 300
MEMORY_CAP_MB = 512
"""The most the build's processes may hold together (RSS) with default settings on 2 cores,
whatever the corpus size."""


def kept_stdlib_texts() -> list[tuple[str, str]]:
    """(relative path, file text) of the stdlib files the build's filters keep, once each."""
    source = CodeSource(spec="stdlib", root=STDLIB, exclude=("site-packages/*",))
    doc_filter = DocumentFilter()
    return [(doc.id, doc.text) for doc in source.documents(SourceStats()) if doc_filter.apply(doc).text is not None]


def write_corpus(folder: Path, files: list[tuple[str, str]], min_bytes: int) -> list[str]:
    """Copies of `files` under folder/copyN/ until at least `min_bytes`; the texts as the build
    will tokenize them."""
    doc_filter, texts, written, copy = DocumentFilter(), [], 0, 0
    while written < min_bytes or copy == 0:
        for rel, text in files:
            unique = f"{text}\n# copy {copy}\n"
            path = folder / f"copy{copy}" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(unique)
            written += len(unique.encode())
            texts.append(doc_filter.check(Document(id=rel, text=unique, language="python")).text)
        copy += 1
    return texts


def baseline(tokenizer: Path, texts: list[str], method: str) -> float:
    """Tokens/s of a bare `method` loop (framing tokens counted, as the build counts them)."""
    tok = load_text_tokenizer(tokenizer)
    encode = getattr(tok, method)
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), 256):
        tokens += sum(len(e.ids) + 2 for e in encode(texts[i : i + 256]))
    return tokens / (time.perf_counter() - start)


def baselines(tokenizer: Path, texts: list[str]) -> dict[str, float]:
    return {method: baseline(tokenizer, texts, method) for method in BASELINES}


class PeakRss:
    """The peak of the summed RSS of a process and its children, and the largest of one of them,
    sampled in a thread."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.peak = self.largest = 0
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while self.root.is_running() and self.root.status() != psutil.STATUS_ZOMBIE:
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                sizes = [p.memory_info().rss for p in procs]
                self.peak, self.largest = max(self.peak, sum(sizes)), max(self.largest, *sizes)
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.1)


def build(corpus: Path, tokenizer: Path, out: Path, workers: int) -> tuple[float, PeakRss, Manifest]:
    """(seconds, peak RSS, manifest) of one `dslm-shard build` run."""
    cmd = [
        sys.executable,
        "-m",
        "dslm_shards.cli",
        "build",
        "--source",
        f"code:{corpus}",
        "--tokenizer",
        str(tokenizer),
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--overwrite",
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rss = PeakRss(proc.pid)
    if proc.wait() != 0:
        raise SystemExit(f"build failed: {' '.join(cmd)}")
    seconds = time.perf_counter() - start
    rss.thread.join()
    return seconds, rss, Manifest.load(out)


def describe(rss: PeakRss) -> str:
    return f"peak RSS {rss.peak / 2**20:,.0f} MB summed over its processes, {rss.largest / 2**20:,.0f} MB the largest"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus-mb", type=int, default=60, help="size of the throughput corpus (default: %(default)s)")
    p.add_argument("--rss-corpus-mb", type=int, default=0, help="also build this large a corpus for peak RSS")
    p.add_argument("--workers", type=int, default=all_cores(), help="build workers (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=8888)
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="dslm-bench-"))
    files = kept_stdlib_texts()
    tokenizer = work / "tokenizer.json"
    if not tokenizer.exists():
        source = CodeSource(spec="stdlib", root=STDLIB, exclude=("site-packages/*",))
        train_and_save_tokenizer([source], args.vocab_size, 20_000_000, tokenizer)

    corpus = work / "corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    texts = write_corpus(corpus, files, args.corpus_mb << 20)
    size = sum(len(t.encode()) for t in texts)
    before = baselines(tokenizer, texts)
    seconds, peak, manifest = build(corpus, tokenizer, work / "shards", args.workers)
    after = baselines(tokenizer, texts)
    built = sum(s.tokens for s in manifest.sources.values())
    documents = sum(s.documents for s in manifest.sources.values())
    assert documents == len(texts), f"the build kept {documents} of {len(texts)} documents: not the same text"
    rate = built / seconds
    print(
        f"corpus: {len(texts):,} files, {size / 1e6:.1f} MB, {built:,} tokens; {args.workers} workers, "
        f"{psutil.cpu_count()} cores"
    )
    print(f"dslm-shard build: {rate:,.0f} tokens/s ({seconds:.1f} s, {describe(peak)})")
    for method in BASELINES:
        mean = (before[method] + after[method]) / 2
        print(
            f"bare {method}: {before[method]:,.0f} and {after[method]:,.0f} tokens/s; "
            f"ratio build / {method}: {rate / mean:.3f}"
        )

    if args.rss_corpus_mb:
        shutil.rmtree(corpus)
        # A few hundred files copied over and over: the tokenizer's word cache makes this faster to
        # shard than varied text, and memory does not depend on what the text says.
        write_corpus(corpus, files[:RSS_FILES], args.rss_corpus_mb << 20)
        size = sum(f.stat().st_size for f in corpus.rglob("*.py"))
        seconds, peak, manifest = build(corpus, tokenizer, work / "shards", args.workers)
        print(
            f"memory: {size / 2**20:,.0f} MB corpus ({size / 2**20 / MEMORY_CAP_MB:.1f}x the "
            f"{MEMORY_CAP_MB} MB cap) in {seconds:,.0f} s: {describe(peak)}"
        )
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
