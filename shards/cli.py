"""dslm-shard: train the tokenizer, then write tokenized train/val tar shards and a manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer

from dslm.cli import run_command
from dslm.data.manifest import Manifest
from dslm.errors import DslmError
from shards.build import BuildReport, ShardConfig, all_cores, build_shards, train_and_save_tokenizer
from shards.sources import parse_source
from shards.verify import verify_build


def add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", action="append", required=True, metavar="KIND:PATH[,key=value]",
                   help="repeatable: code:FOLDER|ARCHIVE (.py .c .h .java files; .zip/.tar/.tar.gz), "
                        "text:FILES (.parquet .jsonl .jsonl.gz .txt; field=NAME, default text), "
                        "fineweb:[REPO|FILES] (default HuggingFaceFW/fineweb; config=NAME, default sample-100BT); "
                        "every kind takes weight=FLOAT (default 1): in `build`, each document is written "
                        "that many times on average (0.5: half of them, 2: twice); in `tokenizer`, the "
                        "source's relative share of the sample")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="skip files whose path below the source's folder matches, e.g. 'site-packages/*'; repeatable")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dslm-shard", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on the sources")
    add_source_args(t)
    t.add_argument("--vocab-size", type=int, default=8888, help="8888 for gpt-12l-1024d, 8000 for code-33m (default: %(default)s)")
    t.add_argument("--sample-bytes", type=int, default=200_000_000,
                   help="UTF-8 bytes of filtered text to learn from, shared among the sources by weight "
                        "(default: %(default)s)")
    t.add_argument("--out", type=Path, required=True, help="where to write tokenizer.json")

    b = sub.add_parser("build", help="tokenize the sources into train/val tar shards + manifest.json")
    add_source_args(b)
    b.add_argument("--tokenizer", type=Path, required=True, help="tokenizer.json from `dslm-shard tokenizer`")
    b.add_argument("--out", type=Path, required=True, help="output folder")
    b.add_argument("--seq-len", type=int, default=1024, help="model context; samples hold seq_len+1 tokens (default: %(default)s)")
    b.add_argument("--samples-per-shard", type=int, default=10_000, help="(default: %(default)s)")
    b.add_argument("--val-fraction", type=float, default=0.01, help="share of documents in val (default: %(default)s)")
    b.add_argument("--workers", type=int, default=all_cores(),
                   help="processes that filter and tokenize; 0: in this process (default: all cores, %(default)s)")
    b.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto",
                   help="token dtype in the shards; auto: uint16 when the vocab fits (default: %(default)s)")
    b.add_argument("--overwrite", action="store_true",
                   help="replace a finished build in --out, or start an unfinished one over (a rerun "
                        "without it resumes an unfinished build of the same inputs)")

    v = sub.add_parser("verify", help="check every shard's size, sample count and sha256 against the manifest")
    v.add_argument("folder", type=Path, help="a folder written by `dslm-shard build`")

    i = sub.add_parser("inspect", help="print a build's statistics; --show decodes samples")
    i.add_argument("folder", type=Path, help="a folder written by `dslm-shard build`")
    i.add_argument("--show", type=int, default=0, metavar="N", help="decode the first N train samples")
    return p


def main(argv: list[str] | None = None) -> None:
    run_command("dslm-shard", lambda: dispatch(parser().parse_args(argv)))


def dispatch(args: argparse.Namespace) -> None:
    if args.command == "verify":
        return verify(args.folder)
    if args.command == "inspect":
        return inspect(args.folder, args.show)
    sources = [parse_source(s, tuple(args.exclude)) for s in args.source]
    if args.command == "tokenizer":
        for (spec, language), ratio in train_and_save_tokenizer(sources, args.vocab_size, args.sample_bytes,
                                                                 args.out).items():
            print(f"{spec} [{language}]: {ratio:.3f} tokens/byte")
        print(f"wrote {args.out} (vocab {args.vocab_size})")
        return
    cfg = ShardConfig(out=args.out, tokenizer=args.tokenizer, seq_len=args.seq_len,
                      samples_per_shard=args.samples_per_shard, val_fraction=args.val_fraction,
                      workers=args.workers, dtype=args.dtype, overwrite=args.overwrite)
    report = build_shards(cfg, sources)
    print_summary(report.manifest)
    print_speed(report)
    print(f"wrote {args.out / 'manifest.json'}")


def print_summary(manifest: Manifest) -> None:
    print(f"seq_len {manifest.seq_len}, dtype {manifest.dtype}, vocab {manifest.vocab_size}")
    for split in ("train", "val"):
        entries = manifest.split(split)
        print(f"{split:>5}: {len(entries)} shards, {sum(e.samples for e in entries):,} samples, "
              f"{sum(e.tokens for e in entries):,} tokens")
    all_tokens = sum(st.tokens for st in manifest.sources.values()) or 1
    for spec, st in manifest.sources.items():
        per_byte = st.tokens / st.bytes if st.bytes else 0.0
        filtered = ", ".join(f"{reason} {n:,}" for reason, n in sorted(st.filtered.items())) or "none"
        print(f"{spec}: {st.documents:,} documents, {st.bytes:,} bytes, {st.tokens:,} tokens "
              f"({st.tokens / all_tokens:.1%} of all, {per_byte:.3f} tokens/byte), "
              f"{st.headers_stripped:,} long headers stripped; skipped: {filtered}")


def print_speed(report: BuildReport) -> None:
    kept = f", {report.resumed_shards} shards kept from the unfinished run" if report.resumed_shards else ""
    print(f"this run: {report.seconds:,.1f} s, {report.documents / report.seconds:,.0f} documents/s, "
          f"{report.tokens / report.seconds:,.0f} tokens/s{kept}")


def verify(folder: Path) -> None:
    problems = verify_build(folder)
    for line in problems:
        print(f"BAD {line}")
    if problems:
        raise DslmError(f"{folder}: {len(problems)} of the manifest's files do not match")
    print(f"{folder}: all {len(Manifest.load(folder).shards)} shards match the manifest")


def inspect(folder: Path, show: int) -> None:
    manifest = Manifest.load(folder)
    print_summary(manifest)
    if show:
        # Imported here: the loader brings in torch, which the build's processes do not need.
        from dslm.data.loader import ShardSamples

        tok = Tokenizer.from_file(str(folder / manifest.tokenizer))
        samples = ShardSamples(folder, manifest.split("train"))
        for i in range(min(show, len(samples))):
            print(f"--- sample {i}\n{tok.decode(samples[i].tolist(), skip_special_tokens=False)}")


if __name__ == "__main__":
    main()
