"""`dslm-shard sft`: instruction records framed by a template (dslm.data.templates) and packed into
train/val tar shards whose samples carry a loss mask.

Records are read from .jsonl, .jsonl.gz and .parquet files (a file, a folder walked below, or a
glob), in sorted path order. Each record's layout is found from its fields (names set by
RecordFields):

    chat     it has `messages`: a list of {role, content}. Each user message followed directly by
             an assistant message makes one example (instruction: the user's content, response:
             the assistant's). The content of the record's system messages goes before its first
             example's instruction, after a blank line; other roles are passed over.
    Alpaca   `instruction`, `output` and an optional `input`: one example whose instruction is
             the instruction, then a blank line and the input when that is not blank.

Texts are kept as written (code keeps its indentation); only the check for an empty instruction
or response strips them. What cannot be used is skipped and counted by reason in the manifest
(`sources[SPEC].filtered`), with one warning line naming FILE:LINE (or FILE:ROW) for each of the
first WARNINGS_PER_FILE bad records of a file and one line for the rest of them:

    not_json, not_object, invalid_utf8     a jsonl line that is no JSON object of UTF-8 text
    missing_field, not_string              a text field absent (or null), or not a string
    bad_messages, no_pairs                 `messages` not a list of {role, content}, or no user
                                           message followed by an assistant message in it
    empty_instruction, empty_response      an example with nothing but whitespace on one side
    unreadable_file                        a file that fails to read (what was read is kept)
    duplicate                              the same instruction and response as an earlier example
    too_long                               longer, framed, than a sample (seq_len + 1 tokens)

An example longer than a sample is dropped rather than cut: a cut response teaches the model to
stop mid-answer, and a cut instruction can lose the question. Examples are never split across
samples either: each is placed whole in the open sample when it fits, else the open sample is
closed (padded with <pad>, mask 0) and the example starts the next one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tokenizers import Tokenizer

from dslm.data.manifest import MANIFEST_NAME, Manifest, ShardEntry, SourceStats, check_build_tokenizer
from dslm.data.templates import DIRECTIONS, Framer, get_template
from dslm.data.tokens import PAD_ID, load_text_tokenizer
from dslm.errors import DslmError
from dslm.files import make_folder, sha256_file
from dslm.logs import warning
from dslm_shards.build import SPLITS, TOKENIZER_NAME, place_tokenizer, token_dtype
from dslm_shards.journal import load_state
from dslm_shards.sources import guarded, jsonl_lines, local_files, parquet_rows, skip, without_bom
from dslm_shards.tasks import remove_finished_build, remove_unfinished_build
from dslm_shards.writer import ShardWriter, check_packing, split_of

SFT_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
SFT_LANGUAGE = "instruct"
"""The language member of every sample of instruction shards."""
WARNINGS_PER_FILE = 20
"""Bad records of one file that get a warning line each; one more line counts the rest."""


@dataclass
class RecordFields:
    """The names of the fields instruction records are read from."""

    instruction: str = "instruction"
    """Alpaca: the task (--instruction-field)."""
    input: str = "input"
    """Alpaca: optional context, put after the instruction and a blank line (--input-field)."""
    output: str = "output"
    """Alpaca: the response (--output-field)."""
    messages: str = "messages"
    """Chat: the list of {role, content} messages; a record with this field (not null) is read as
    chat (--messages-field)."""


@dataclass
class SftConfig:
    """The settings of `dslm-shard sft`, each one of its options. Raises DslmError for a value out
    of its range."""

    out: Path
    """Output folder (created if missing) for tokenizer.json, the train/val tar shards and
    manifest.json (--out)."""
    tokenizer: Path
    """tokenizer.json from `dslm-shard tokenizer` (--tokenizer): it must hold dslm's template
    markers (dslm.data.templates.marker_ids); copied into `out` unless it is that file."""
    template: str
    """A name in dslm.data.templates.TEMPLATES (--template): how an example is framed and which
    of its blocks the loss is on."""
    sources: list[str]
    """Instruction records, each a .jsonl/.jsonl.gz/.parquet file, a folder or a glob (--source,
    repeatable); the string keys the source's counts in the manifest."""
    direction: str = "forward"
    """The reading direction the masks are made for, "forward" or "backward" (--direction);
    recorded in the manifest, and training on the shards needs data.direction to match."""
    seq_len: int = 1024
    """Model context in tokens, within 1..MAX_SEQ_LEN (--seq-len; dslm_shards.writer); a sample holds
    seq_len + 1 tokens, and a framed example longer than that is dropped (counted as too_long)."""
    samples_per_shard: int = 10_000
    """Samples per tar shard, >= 1 (--samples-per-shard); the last shard of a split holds the rest."""
    val_fraction: float = 0.05
    """Share of examples in the val split, in [0, 1) (--val-fraction), chosen by a hash of the
    instruction and response."""
    fields: RecordFields = field(default_factory=RecordFields)
    """The field names of the records (--instruction-field, --input-field, --output-field,
    --messages-field)."""
    overwrite: bool = False
    """Replace a finished build in `out` (--overwrite); without it one there is an error."""

    def __post_init__(self) -> None:
        get_template(self.template)
        if self.direction not in DIRECTIONS:
            raise DslmError(f"direction {self.direction!r} is not one of {', '.join(DIRECTIONS)}")
        check_packing(self.seq_len, self.samples_per_shard)
        if not 0.0 <= self.val_fraction < 1.0:
            raise DslmError(f"val_fraction {self.val_fraction} must be in [0, 1)")
        if not self.sources:
            raise DslmError("no --source given")


class BadRecord(Exception):
    """A record or example that cannot be used; `reason` is the manifest's count key, the message
    says why in words."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def as_object(raw: bytes | dict[str, Any]) -> dict[str, Any]:
    """A record as a dict: a parquet row as it is, a jsonl line parsed. Raises BadRecord."""
    if isinstance(raw, dict):
        return raw
    try:
        record = json.loads(without_bom(raw.decode("utf-8")))
    except UnicodeDecodeError:
        raise BadRecord("invalid_utf8", "the line is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise BadRecord("not_json", f"not JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise BadRecord("not_object", f"a JSON {type(record).__name__}, not an object")
    return record


def text_field(record: dict[str, Any], name: str, required: bool = True) -> str:
    """record[name] as text without a leading byte-order mark; an optional field that is absent
    or null is "". Raises BadRecord."""
    value = record.get(name)
    if value is None:
        if required:
            raise BadRecord("missing_field", f"no {name!r} field")
        return ""
    if not isinstance(value, str):
        raise BadRecord("not_string", f"{name!r} is a {type(value).__name__}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape: the tokenizer cannot take it
        raise BadRecord("invalid_utf8", f"{name!r} is not valid Unicode text") from None
    return without_bom(value)


def join_blocks(*texts: str) -> str:
    """The texts that are not blank, joined by a blank line."""
    return "\n\n".join(text for text in texts if text.strip())


def alpaca_example(record: dict[str, Any], fields: RecordFields) -> tuple[str, str]:
    """(instruction, response) of an Alpaca record. Raises BadRecord."""
    instruction = text_field(record, fields.instruction)
    context = text_field(record, fields.input, required=False)
    return join_blocks(instruction, context), text_field(record, fields.output)


def chat_examples(messages: object, name: str) -> list[tuple[str, str]]:
    """(instruction, response) per user message followed by an assistant message, the system
    messages' content before the first instruction. Raises BadRecord."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise BadRecord("bad_messages", f"{name!r} is not a list of {{role, content}} objects")
    try:
        turns = [(text_field(m, "role"), text_field(m, "content")) for m in messages]
    except BadRecord as e:
        raise BadRecord("bad_messages", f"a message in {name!r}: {e}") from None
    system = join_blocks(*(content for role, content in turns if role == "system"))
    pairs: list[tuple[str, str]] = []
    for (role, content), (next_role, reply) in zip(turns, turns[1:]):
        if role == "user" and next_role == "assistant":
            pairs.append((content if pairs else join_blocks(system, content), reply))
    if not pairs:
        raise BadRecord("no_pairs", f"{name!r} has no user message followed by an assistant message")
    return pairs


def record_examples(raw: bytes | dict[str, Any], fields: RecordFields) -> list[tuple[str, str]]:
    """The (instruction, response) examples of one record, chat or Alpaca. Raises BadRecord."""
    record = as_object(raw)
    if record.get(fields.messages) is not None:
        return chat_examples(record[fields.messages], fields.messages)
    return [alpaca_example(record, fields)]


def checked(example: tuple[str, str]) -> None:
    """Raises BadRecord when a side of the example is blank."""
    instruction, response = example
    if not instruction.strip():
        raise BadRecord("empty_instruction", "the instruction is empty")
    if not response.strip():
        raise BadRecord("empty_response", "the response is empty")


class BadRecords:
    """Counts one file's bad records by reason in `stats`, with a warning line for each of the
    first `shown` and one line for the rest (so a broken file cannot flood the terminal)."""

    def __init__(self, file: Path, stats: SourceStats, shown: int = WARNINGS_PER_FILE):
        self.file, self.stats, self.shown, self.count = file, stats, shown, 0

    def add(self, where: str, error: BadRecord) -> None:
        skip(self.stats, error.reason)
        self.count += 1
        if self.count <= self.shown:
            warning(f"skipped {where} ({error.reason}): {error}")

    def close(self) -> None:
        if self.count > self.shown:
            warning(
                f"skipped {self.count - self.shown:,} more bad records in {self.file} "
                f"(warnings stop at {self.shown} a file)"
            )


def file_records(file: Path, fields: RecordFields) -> Iterator[tuple[str, bytes | dict[str, Any]]]:
    """(`FILE:LINE` or `FILE:ROW`, raw record) per record: a jsonl line that is not blank, or a
    parquet row holding the columns named by `fields`."""
    if file.name.endswith(".parquet"):
        yield from parquet_rows(file, [fields.instruction, fields.input, fields.output, fields.messages])
        return
    yield from ((where, raw) for where, raw in jsonl_lines(file) if raw.strip())


def file_examples(file: Path, fields: RecordFields, stats: SourceStats) -> Iterator[tuple[str, str]]:
    """The usable (instruction, response) examples of a file, in order; the rest are counted in
    `stats.filtered` and warned about."""
    bad = BadRecords(file, stats)
    for where, raw in guarded(file, file_records(file, fields), stats):
        try:
            examples = record_examples(raw, fields)
        except BadRecord as e:
            bad.add(where, e)
            continue
        for example in examples:
            try:
                checked(example)
            except BadRecord as e:
                bad.add(where, e)
                continue
            yield example
    bad.close()


def source_files(spec: str) -> list[Path]:
    """The record files a --source names, sorted. Raises DslmError when it names none."""
    files = local_files(spec, SFT_SUFFIXES, ())
    if not files:
        raise DslmError(f"source {spec!r} matches no {'/'.join(SFT_SUFFIXES)} file (or folder holding one)")
    return files


class ExamplePacker:
    """Places whole examples into samples of `sample_len` tokens, greedily in order: an example
    that does not fit in the open sample closes it (padded with <pad>, mask 0) and opens the next."""

    def __init__(self, sample_len: int, dtype: np.dtype):
        self.sample_len, self.dtype = sample_len, dtype
        self.ids: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.used = 0

    def add(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Place an example, (N,) ids and (N,) mask with N <= sample_len; return the sample it
        closed, if any, as (sample_len,) tokens of `dtype` and (sample_len,) uint8 mask."""
        if len(ids) > self.sample_len:
            raise ValueError(f"an example of {len(ids)} tokens does not fit a sample of {self.sample_len}")
        closed = self.flush() if self.used + len(ids) > self.sample_len else None
        self.ids.append(ids)
        self.masks.append(mask)
        self.used += len(ids)
        return closed

    def flush(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Close the open sample: its tokens and mask padded to sample_len, or None when it is empty."""
        if not self.used:
            return None
        pad = self.sample_len - self.used
        tokens = np.concatenate([*self.ids, np.full(pad, PAD_ID)]).astype(self.dtype)
        mask = np.concatenate([*self.masks, np.zeros(pad, dtype=np.uint8)]).astype(np.uint8)
        self.ids, self.masks, self.used = [], [], 0
        return tokens, mask


class SftBuild:
    """The examples of every source, in order: dedup, framing, the train/val split, packing and
    writing. `stats` counts per source: documents are examples written, bytes their UTF-8 text,
    tokens their framed tokens (padding not included)."""

    def __init__(self, cfg: SftConfig, framer: Framer, dtype: np.dtype):
        self.cfg, self.framer, self.dtype = cfg, framer, dtype
        self.sample_len = cfg.seq_len + 1
        self.stats = {spec: SourceStats() for spec in cfg.sources}
        self.seen: set[bytes] = set()
        self.packers = {split: ExamplePacker(self.sample_len, dtype) for split in SPLITS}
        self.writers = {split: ShardWriter(cfg.out, split, cfg.samples_per_shard, self.sample_len) for split in SPLITS}

    def add(self, example: tuple[str, str], stats: SourceStats) -> None:
        """Write one example, unless it repeats an earlier one or is longer than a sample."""
        instruction, response = example
        key = json.dumps([instruction, response])
        digest = hashlib.sha256(key.encode()).digest()[:16]
        if digest in self.seen:
            return skip(stats, "duplicate")
        self.seen.add(digest)
        ids, mask = self.framer.example({"instruction": instruction, "response": response}, self.cfg.direction)
        if len(ids) > self.sample_len:
            return skip(stats, "too_long")
        split = split_of(key, self.cfg.val_fraction)
        self.write(split, self.packers[split].add(ids, mask))
        stats.documents += 1
        stats.bytes += len(instruction.encode()) + len(response.encode())
        stats.tokens += len(ids)

    def write(self, split: str, sample: tuple[np.ndarray, np.ndarray] | None) -> None:
        if sample is not None:
            tokens, mask = sample
            self.writers[split].add(tokens, SFT_LANGUAGE, mask)

    def finish(self) -> list[ShardEntry]:
        """Close the last sample and shard of each split; the entries of every shard."""
        for split in SPLITS:
            self.write(split, self.packers[split].flush())
        return [entry for writer in self.writers.values() for entry in writer.close()]


def prepare_out(cfg: SftConfig) -> None:
    """Make `out` ready for a new build: a finished build there is replaced only with
    `overwrite`, as is an unfinished `dslm-shard build`; shards and temporary files that no
    manifest lists (from an interrupted run) are removed."""
    make_folder(cfg.out)
    if (cfg.out / MANIFEST_NAME).exists():
        if not cfg.overwrite:
            raise DslmError(f"{cfg.out} already holds a finished build; pass --overwrite to replace it")
        remove_finished_build(cfg.out)
    state = load_state(cfg.out)
    if state is not None:
        if not cfg.overwrite:
            raise DslmError(f"{cfg.out} holds an unfinished `dslm-shard build`; pass --overwrite to replace it")
        remove_unfinished_build(cfg.out, state)
    for leftover in [*cfg.out.glob(".*.tmp"), *(p for split in SPLITS for p in cfg.out.glob(f"{split}-*.tar"))]:
        leftover.unlink()


def build_sft_shards(cfg: SftConfig) -> Manifest:
    """Read, frame, pack and write every source's examples into `cfg.out`, then manifest.json
    (last: the commit point) with the template, masks=True and the direction. The tokenizer's
    markers and the sources are checked before anything is read or written. Raises DslmError for
    a tokenizer without the markers, a source that names no file, a finished build in `out`
    without `overwrite`, or no example to write."""
    check_build_tokenizer(cfg.tokenizer, cfg.out)
    tok = load_text_tokenizer(cfg.tokenizer)
    framer = Framer(get_template(cfg.template), tok)
    files = {spec: source_files(spec) for spec in cfg.sources}
    created = not cfg.out.exists()
    try:
        prepare_out(cfg)
        build = SftBuild(cfg, framer, token_dtype(tok.get_vocab_size()))
        for spec, paths in files.items():
            for path in paths:
                for example in file_examples(path, cfg.fields, build.stats[spec]):
                    build.add(example, build.stats[spec])
        manifest = sft_manifest(cfg, tok, build)
    except BaseException:
        if created:  # a failed build leaves no folder it made
            shutil.rmtree(cfg.out, ignore_errors=True)
        raise
    place_tokenizer(cfg.tokenizer, cfg.out)
    manifest.save(cfg.out)
    return manifest


def sft_manifest(cfg: SftConfig, tok: Tokenizer, build: SftBuild) -> Manifest:
    """The manifest of a finished build. Raises DslmError when no example was written to train."""
    if not any(stats.documents for stats in build.stats.values()):
        skipped: Counter[str] = Counter()
        for stats in build.stats.values():
            skipped.update(stats.filtered)
        reasons = ", ".join(f"{reason} {n:,}" for reason, n in sorted(skipped.items())) or "no records"
        raise DslmError(f"no example to write: every record of the sources was skipped ({reasons})")
    shards = build.finish()
    if not any(entry.split == "train" for entry in shards):
        raise DslmError(f"every example fell in the val split (val_fraction {cfg.val_fraction}); add examples")
    return Manifest(
        tokenizer=TOKENIZER_NAME,
        tokenizer_sha256=sha256_file(cfg.tokenizer),
        vocab_size=tok.get_vocab_size(),
        seq_len=cfg.seq_len,
        dtype=build.dtype.name,
        shards=shards,
        sources=build.stats,
        template=cfg.template,
        masks=True,
        direction=cfg.direction,
    )
