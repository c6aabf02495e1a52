"""dslm-shard: train the tokenizer, then write tokenized train/val tar shards and a manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer

from dslm.cli import ArgumentParser, run_command
from dslm.data.fim import FimConfig
from dslm.data.manifest import Manifest
from dslm.data.templates import DIRECTIONS, TEMPLATES
from dslm.data.tokens import PAD_ID, load_text_tokenizer
from dslm.errors import DslmError
from dslm.logs import warning
from dslm_shards.build import (
    BuildReport,
    ShardConfig,
    all_cores,
    build_shards,
    find_task_duplicates,
    train_and_save_tokenizer,
    write_digests,
)
from dslm_shards.sft import SFT_SUFFIXES, RecordFields, SftConfig, build_sft_shards
from dslm_shards.sources import Partition, Source, parse_source
from dslm_shards.tasks import STAGES, merge_build
from dslm_shards.verify import verify_build


def add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source",
        action="append",
        required=True,
        metavar="KIND:PATH[,key=value]",
        help="repeatable: code:FOLDER|ARCHIVE (.py .c .h .java files; .zip/.tar/.tar.gz), "
        "text:FILES (.parquet .jsonl .jsonl.gz .txt; field=NAME, default text), "
        "fineweb:[REPO|FILES] (default HuggingFaceFW/fineweb; config=NAME, default sample-100BT); "
        "every kind takes weight=FLOAT (default 1): in `build`, each document is written "
        "that many times on average (0.5: half of them, 2: twice); in `tokenizer`, the "
        "source's relative share of the sample",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="skip files whose path below the source's folder matches, e.g. 'site-packages/*'; repeatable",
    )


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="dslm-shard", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    add_tokenizer_parser(sub)
    add_build_parser(sub)
    add_sft_parser(sub)
    m = sub.add_parser(
        "merge",
        help="make one build of the tasks of a build split with --tasks",
        description="Check that every task of a build split with --tasks finished stage write "
        "with the same inputs and settings, pack their streams' leftover tokens into "
        "OUT/tails/, and write OUT/manifest.json (last) over all shards.",
    )
    m.add_argument("folder", type=Path, help="the --out of the tasks")

    v = sub.add_parser("verify", help="check every shard's size, sample count and sha256 against the manifest")
    v.add_argument("folder", type=Path, help="a folder written by `dslm-shard build`")

    i = sub.add_parser("inspect", help="print a build's statistics; --show decodes samples")
    i.add_argument("folder", type=Path, help="a folder written by `dslm-shard build`")
    i.add_argument("--show", type=int, default=0, metavar="N", help="decode the first N train samples")
    return p


def add_tokenizer_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on the sources")
    add_source_args(t)
    t.add_argument(
        "--vocab-size", type=int, default=8888, help="8888 for gpt-12l-1024d, 8000 for code-33m (default: %(default)s)"
    )
    t.add_argument(
        "--sample-bytes",
        type=int,
        default=200_000_000,
        help="UTF-8 bytes of filtered text to learn from, shared among the sources by weight (default: %(default)s)",
    )
    t.add_argument("--out", type=Path, required=True, help="where to write tokenizer.json")
    t.add_argument(
        "--fim",
        action="store_true",
        help="add the four fill-in-the-middle tokens (<fim_prefix> <fim_middle> <fim_suffix> <fim_pad>, ids 8..11), "
        "which `build --fim-rate` needs",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out (shards built with it must then be rebuilt: every command that "
        "reads them checks their tokenizer's sha256)",
    )


def add_build_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("build", help="tokenize the sources into train/val tar shards + manifest.json")
    add_source_args(b)
    b.add_argument("--tokenizer", type=Path, required=True, help="tokenizer.json from `dslm-shard tokenizer`")
    b.add_argument("--out", type=Path, required=True, help="output folder")
    b.add_argument(
        "--seq-len", type=int, default=1024, help="model context; samples hold seq_len+1 tokens (default: %(default)s)"
    )
    b.add_argument("--samples-per-shard", type=int, default=10_000, help="(default: %(default)s)")
    b.add_argument("--val-fraction", type=float, default=0.01, help="share of documents in val (default: %(default)s)")
    b.add_argument(
        "--workers",
        type=int,
        default=all_cores(),
        help="processes that filter and tokenize; 0: in this process (default: all cores, %(default)s)",
    )
    add_fim_args(b)
    b.add_argument(
        "--dtype",
        choices=("auto", "uint16", "uint32"),
        default="auto",
        help="token dtype in the shards; auto: uint16 when the vocab fits (default: %(default)s)",
    )
    b.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished build in --out, or start an unfinished one over (a rerun "
        "without it resumes an unfinished build of the same inputs); with --tasks: "
        "start this task's stage over",
    )
    d = b.add_argument_group("a build split over tasks (processes or SLURM array tasks; dslm-submit shard runs it all)")
    d.add_argument(
        "--tasks",
        type=int,
        metavar="N",
        help="split the inputs' units (files, parquet row groups, archive members, hub data files) "
        "round-robin over N tasks; run each stage for every --task K in [0, N), stage by "
        "stage, then `dslm-shard merge OUT`. Same documents and counts as one process",
    )
    d.add_argument("--task", type=int, metavar="K", help="this task's index, in [0, N)")
    d.add_argument(
        "--stage",
        choices=STAGES,
        default="write",
        help="digests: write the digests of the task's kept documents, bucketed by hash; dedup: "
        "find the duplicates in bucket K across all tasks (first copy in input order wins); "
        "write: write the task's shards without them into OUT/task-K/ (default: %(default)s)",
    )


def add_fim_args(b: argparse.ArgumentParser) -> None:
    """--fim-rate and --fim-spm-rate of `dslm-shard build` (dslm.data.fim.FimConfig)."""
    g = b.add_argument_group(
        "fill-in-the-middle (Bavarian et al. 2022): train documents cut at two random characters into "
        "prefix, middle and suffix and laid out so that the model learns to write the middle"
    )
    g.add_argument(
        "--fim-rate",
        type=float,
        default=0.0,
        metavar="R",
        help="share of train documents transformed, within 0..1; the paper's and StarCoder's 0.5 (needs a "
        "tokenizer made with `dslm-shard tokenizer --fim`; default: %(default)s, none)",
    )
    g.add_argument(
        "--fim-spm-rate",
        type=float,
        default=0.5,
        metavar="R",
        help="share of the transformed documents laid out suffix-prefix-middle, the rest prefix-suffix-middle "
        "(default: %(default)s)",
    )


def add_sft_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "sft",
        help="frame instruction records with a template into train/val tar shards with loss masks",
        description="Read Alpaca records (instruction, optional input, output) or chat records (messages: "
        "[{role, content}]; each user message followed by an assistant message is one example), "
        "frame each example with --template, and pack whole examples into samples of seq_len+1 "
        "tokens (padded with <pad>; an example is never split across samples). Each sample "
        "carries KEY.mask.npy, 1 on the tokens the loss is on. Bad records are skipped, counted "
        "in the manifest and warned about (FILE:LINE); an example longer than a sample is "
        "dropped (too_long), not cut, because a cut response teaches the model to stop "
        "mid-answer and a cut instruction can lose the question.",
    )
    s.add_argument(
        "--source",
        action="append",
        required=True,
        metavar="FILES",
        help=f"repeatable: {' '.join(SFT_SUFFIXES)} files of records: a file, a folder (walked "
        f"below) or a glob (`**` spans folders); a record with the messages field is chat, "
        f"any other Alpaca",
    )
    s.add_argument(
        "--template",
        required=True,
        choices=list(TEMPLATES),
        help=". ".join(f"{t.name}: {t.summary}" for t in TEMPLATES.values())
        + ". With --direction backward the loss is on the other block (the one read last backward)",
    )
    s.add_argument(
        "--tokenizer",
        type=Path,
        required=True,
        help="tokenizer.json from `dslm-shard tokenizer` (it must hold the template markers)",
    )
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument(
        "--direction",
        choices=DIRECTIONS,
        default="forward",
        help="the reading direction the masks are made for; training needs data.direction to "
        "match (default: %(default)s)",
    )
    add_packing_args(s)
    add_record_field_args(s)
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished build in --out (without it, one there is an error); an "
        "interrupted run is always started over",
    )


def add_packing_args(s: argparse.ArgumentParser) -> None:
    """--seq-len, --samples-per-shard, --val-fraction of `dslm-shard sft`."""
    s.add_argument(
        "--seq-len", type=int, default=1024, help="model context; samples hold seq_len+1 tokens (default: %(default)s)"
    )
    s.add_argument(
        "--samples-per-shard",
        type=int,
        default=10_000,
        help="samples per tar shard; the last of a split holds the rest (default: %(default)s)",
    )
    s.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="share of examples in val, by a hash of the example (default: %(default)s)",
    )


def add_record_field_args(s: argparse.ArgumentParser) -> None:
    """--instruction-field, --output-field, --input-field, --messages-field (RecordFields)."""
    fields = {
        "instruction": "Alpaca: the instruction's field",
        "output": "Alpaca: the response's field",
        "input": "Alpaca: the optional input's field, put after the instruction and a blank line",
        "messages": "chat: the field of the [{role, content}] list; a record with it is read as chat",
    }
    for name, default in vars(RecordFields()).items():
        s.add_argument(f"--{name}-field", default=default, help=f"{fields[name]} (default: %(default)s)")


def main(argv: list[str] | None = None) -> None:
    run_command("dslm-shard", lambda: dispatch(parser().parse_args(argv)))


def dispatch(args: argparse.Namespace) -> None:
    if args.command == "verify":
        return verify(args.folder)
    if args.command == "inspect":
        return inspect(args.folder, args.show)
    if args.command == "sft":
        return sft(args)
    if args.command == "merge":
        manifest = merge_build(args.folder)
        print_summary(manifest)
        print(f"wrote {args.folder / 'manifest.json'}")
        return
    sources = [parse_source(s, tuple(args.exclude)) for s in args.source]
    if args.command == "tokenizer":
        for (spec, language), ratio in train_and_save_tokenizer(
            sources, args.vocab_size, args.sample_bytes, args.out, overwrite=args.overwrite, fim=args.fim
        ).items():
            print(f"{spec} [{language}]: {ratio:.3f} tokens/byte")
        vocab = Tokenizer.from_file(str(args.out)).get_vocab_size()
        if vocab < args.vocab_size:
            warning(
                f"--vocab-size {args.vocab_size:,} asked for, {vocab:,} learned: the sample has no more "
                f"pairs to merge (more text, or a larger --sample-bytes, gives more)"
            )
        print(f"wrote {args.out} (vocab {vocab:,})")
        return
    cfg = shard_config(args)
    if (args.tasks, args.task) != (None, None) or args.stage != "write":
        return run_stage(cfg, sources, task_partition(args), args.stage)
    report = build_shards(cfg, sources)
    print_summary(report.manifest)
    print_speed(report)
    print(f"wrote {args.out / 'manifest.json'}")


def shard_config(args: argparse.Namespace) -> ShardConfig:
    """The build's settings from `dslm-shard build`'s parsed arguments; DslmError for a value out
    of range."""
    return ShardConfig(
        out=args.out,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        samples_per_shard=args.samples_per_shard,
        val_fraction=args.val_fraction,
        workers=args.workers,
        dtype=args.dtype,
        overwrite=args.overwrite,
        fim=FimConfig(rate=args.fim_rate, spm_rate=args.fim_spm_rate),
    )


def task_partition(args: argparse.Namespace) -> Partition:
    if args.tasks is None or args.task is None:
        raise DslmError("--tasks N and --task K go together (and --stage needs both)")
    return Partition(args.tasks, args.task)


def run_stage(cfg: ShardConfig, sources: list[Source], part: Partition, stage: str) -> None:
    """One stage of one task of a build split over tasks (dslm_shards.tasks)."""
    load_text_tokenizer(cfg.tokenizer)  # a missing or bad tokenizer is one line, in every stage
    name = f"task {part.task} of {part.tasks}, stage {stage}"
    if stage == "digests":
        kept = write_digests(cfg, sources, part)
        print(f"{name}: " + ("already finished, kept" if kept < 0 else f"{kept:,} kept documents' digests written"))
    elif stage == "dedup":
        counts = find_task_duplicates(cfg, sources, part)
        print(
            f"{name}: "
            + (
                "already finished, kept"
                if counts is None
                else f"{counts[0]:,} digests in bucket {part.task}, {counts[1]:,} later copies"
            )
        )
    else:
        report = build_shards(cfg, sources, part)
        print_summary(report.manifest, tails_kept=True)
        if report.documents or not report.resumed_shards:
            print_speed(report)
        else:
            print(f"{name}: already finished, kept")
    print(f"{name}: done")


def sft(args: argparse.Namespace) -> None:
    fields = RecordFields(args.instruction_field, args.input_field, args.output_field, args.messages_field)
    cfg = SftConfig(
        out=args.out,
        tokenizer=args.tokenizer,
        template=args.template,
        sources=args.source,
        direction=args.direction,
        seq_len=args.seq_len,
        samples_per_shard=args.samples_per_shard,
        val_fraction=args.val_fraction,
        fields=fields,
        overwrite=args.overwrite,
    )
    manifest = build_sft_shards(cfg)
    print_summary(manifest)
    print(f"wrote {args.out / 'manifest.json'}")


def print_summary(manifest: Manifest, tails_kept: bool = False) -> None:
    """The build's shards, drops and per-source counts; `tails_kept`: a task's, whose streams'
    last tokens wait in task.json for the merge instead of being dropped."""
    print(f"seq_len {manifest.seq_len}, dtype {manifest.dtype}, vocab {manifest.vocab_size}")
    for split in ("train", "val"):
        entries = manifest.split(split)
        print(
            f"{split:>5}: {len(entries)} shards, {sum(e.samples for e in entries):,} samples, "
            f"{sum(e.tokens for e in entries):,} tokens"
        )
    if manifest.masks:
        print_examples(manifest)
    if manifest.dropped_tokens:
        print_dropped(manifest, tails_kept)
    all_tokens = sum(st.tokens for st in manifest.sources.values()) or 1
    for spec, st in manifest.sources.items():
        per_byte = st.tokens / st.bytes if st.bytes else 0.0
        filtered = ", ".join(f"{reason} {n:,}" for reason, n in sorted(st.filtered.items())) or "none"
        print(
            f"{spec}: {st.documents:,} documents, {st.bytes:,} bytes, {st.tokens:,} tokens "
            f"({st.tokens / all_tokens:.1%} of all, {per_byte:.3f} tokens/byte), "
            f"{st.headers_stripped:,} long headers stripped; skipped: {filtered}"
            + (f"; {st.dropped_tokens:,} tokens dropped at stream ends" if st.dropped_tokens else "")
        )


def print_dropped(manifest: Manifest, tails_kept: bool) -> None:
    """The tokens of each packing stream left in its last, partial sample and not written."""
    streams = ", ".join(f"{name} {n:,}" for name, n in manifest.dropped_tokens.items())
    total = sum(manifest.dropped_tokens.values())
    of_all = total / (sum(st.tokens for st in manifest.sources.values()) or 1)
    what = "kept in task.json for the merge" if tails_kept else "dropped"
    print(
        f"{what}: {total:,} tokens ({of_all:.2%} of the documents'), each stream's last sample being "
        f"shorter than {manifest.seq_len + 1} tokens: {streams}"
    )


def print_examples(manifest: Manifest) -> None:
    """The packing of instruction shards: examples written and dropped, and how full samples are."""
    examples = sum(st.documents for st in manifest.sources.values())
    too_long = sum(st.filtered.get("too_long", 0) for st in manifest.sources.values())
    fill = sum(st.tokens for st in manifest.sources.values()) / (sum(e.tokens for e in manifest.shards) or 1)
    print(
        f"template {manifest.template}, direction {manifest.direction}: {examples:,} examples packed "
        f"whole, mean fill {fill:.1%} of sample tokens (the rest <pad>), {too_long:,} dropped as longer "
        f"than a sample of {manifest.seq_len + 1} tokens (too_long)"
    )


def print_speed(report: BuildReport) -> None:
    kept = f", {report.resumed_shards} shards kept from the unfinished run" if report.resumed_shards else ""
    print(
        f"this run: {report.seconds:,.1f} s, {report.documents / report.seconds:,.0f} documents/s, "
        f"{report.tokens / report.seconds:,.0f} tokens/s{kept}"
    )


def verify(folder: Path) -> None:
    problems = verify_build(folder)
    for line in problems:
        print(f"BAD {line}")
    if problems:
        raise DslmError(f"{folder}: {len(problems)} of the manifest's files do not match")
    print(f"{folder}: all {len(Manifest.load(folder).shards)} shards match the manifest")


def inspect(folder: Path, show: int) -> None:
    if show < 0:
        raise DslmError(f"--show {show} must not be negative")
    manifest = Manifest.load(folder)
    print_summary(manifest)
    if show:
        # Imported here: the loader brings in torch, which the build's processes do not need.
        from dslm.data.loader import ShardSamples

        tok = Tokenizer.from_file(str(manifest.tokenizer_file(folder)))
        samples = ShardSamples(folder, manifest, "train")
        for i in range(min(show, len(samples))):
            sample = samples[i]
            print(f"--- sample {i}\n{decode_sample(tok, sample['input_ids'].tolist())}")
            if manifest.masks:
                spans = target_spans(sample["input_ids"].tolist(), sample["labels"].tolist())
                print(f"--- sample {i}: {len(spans)} targets (the tokens the loss is on)")
                for n, span in enumerate(spans, 1):
                    print(f"[{n}] {tok.decode(span, skip_special_tokens=False)}")


def decode_sample(tok: Tokenizer, ids: list[int]) -> str:
    """The sample's text with its special tokens, its trailing <pad> run counted rather than spelled out."""
    pads = next((n for n, token in enumerate(reversed(ids)) if token != PAD_ID), len(ids))
    text = tok.decode(ids[: len(ids) - pads], skip_special_tokens=False)
    return f"{text} (+{pads} <pad>)" if pads else text


def target_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The runs of consecutive training targets of a sample: tokens whose label is the token
    itself (the others are labelled with the loss's ignore index, never a token id)."""
    spans: list[list[int]] = []
    was_target = False
    for token, label in zip(ids, labels):
        if token == label:
            if not was_target:
                spans.append([])
            spans[-1].append(token)
        was_target = token == label
    return spans


if __name__ == "__main__":
    main()
