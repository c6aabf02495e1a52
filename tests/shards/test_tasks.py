"""A build split over tasks (--tasks N --task K, three stages, then merge) equals one process's."""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dslm.data.loader import ShardSamples
from dslm.data.manifest import Manifest
from dslm.data.tokens import BOS_ID, EOS_ID
from dslm.errors import DslmError
from dslm.files import exclusive
from dslm_shards.build import ShardBuild, ShardConfig, build_shards, task_stamp, write_digests
from dslm_shards.cli import dispatch, parser
from dslm_shards.dedup import RECORD, find_duplicates, in_order, later_copies
from dslm_shards.sources import Partition, parse_source
from dslm_shards.tasks import STAGES, clear_build, merge_build
from dslm_shards.verify import verify_build
from tests.conftest import STDLIB, TINY_SEQ_LEN

PLANTED = {
    "json/decoder.py": "email/zz_copy_of_decoder.py",
    "email/utils.py": "json/aa_copy_of_utils.py",
    "email/charset.py": "email/zz_copy_of_charset.py",
    "json/scanner.py": "json/zz_copy_of_scanner.py",
}


def shard(argv: list[str]) -> None:
    dispatch(parser().parse_args(argv))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_shards) -> tuple[Path, Path]:
    """Two stdlib packages plus copies of four files planted in both halves of the file order."""
    root = tmp_path_factory.mktemp("tasks_corpus")
    for package in ("json", "email"):
        shutil.copytree(STDLIB / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    for original, copy in PLANTED.items():
        shutil.copy(root / original, root / copy)
    return root, tiny_shards[0] / "tokenizer.json"


def build_args(corpus: tuple[Path, Path], out: Path) -> list[str]:
    root, tokenizer = corpus
    return [
        "build",
        "--source",
        f"code:{root}",
        "--tokenizer",
        str(tokenizer),
        "--out",
        str(out),
        "--seq-len",
        str(TINY_SEQ_LEN),
        "--samples-per-shard",
        "40",
        "--val-fraction",
        "0.1",
        "--workers",
        "0",
    ]


def config(corpus: tuple[Path, Path], out: Path) -> ShardConfig:
    """build_args' settings, in batches of 3 documents: many journal saves, and a last batch that
    need not finish a shard."""
    return ShardConfig(
        out=out,
        tokenizer=corpus[1],
        seq_len=TINY_SEQ_LEN,
        samples_per_shard=40,
        val_fraction=0.1,
        workers=0,
        batch_documents=3,
    )


def build_in_tasks(corpus: tuple[Path, Path], out: Path, tasks: int) -> Manifest:
    cfg, sources = config(corpus, out), [parse_source(f"code:{corpus[0]}")]
    parts = [Partition(tasks, k) for k in range(tasks)]
    for part in parts:
        write_digests(cfg, sources, part)
    for part in parts:
        find_duplicates(out, part.task, task_stamp(cfg, sources, tasks))
    for part in parts:
        build_shards(cfg, sources, part)
    return merge_build(out)


def stream_segments(out: Path, split: str) -> list[list[int]]:
    """A split's samples, in manifest order, cut after every <eos> and before every <bos>, and
    where one folder's shards (a task's, the tails') end and the next's begin."""
    manifest = Manifest.load(out)
    samples = ShardSamples(out, manifest, split)
    segments: list[list[int]] = [[]]
    index, folder = 0, None
    for entry in manifest.split(split):
        if entry.name.rpartition("/")[0] != folder:
            folder = entry.name.rpartition("/")[0]
            segments.append([])
        for token in (t for i in range(index, index + entry.samples) for t in samples[i]["input_ids"].tolist()):
            if token == BOS_ID and segments[-1]:
                segments.append([])
            segments[-1].append(token)
            if token == EOS_ID:
                segments.append([])
        index += entry.samples
    return [s for s in segments if s]


def documents_of(out: Path, split: str = "train") -> tuple[Counter, tuple[int, ...]]:
    """The documents of a split of a one-language, weight-1 build, as token tuples, and the one
    cut at the end of the split's stream (its last, partial sample is dropped). A task's stream
    that ends inside a document continues in the merge's tails, in task order: the pieces are
    joined back in that order."""
    whole: Counter = Counter()
    starts, rests = [], []
    for segment in stream_segments(out, split):
        if segment[0] == BOS_ID and segment[-1] == EOS_ID:
            whole[tuple(segment)] += 1
        else:
            (starts if segment[0] == BOS_ID else rests).append(segment)
    assert len(starts) - len(rests) in (0, 1), "a document's start or rest is missing: a task's tail was lost"
    joined = [tuple(a + b) for a, b in zip(starts, rests)] + [tuple(a) for a in starts[len(rests) :]]
    cut = [doc for doc in joined if doc[-1] != EOS_ID]
    assert len(cut) == 1, "one document, the last of the stream, is cut by the dropped partial sample"
    whole.update(doc for doc in joined if doc[-1] == EOS_ID)
    return whole, cut[0]


def same_documents(one: Path, many: Path, split: str) -> None:
    """The same documents, but for the one each build cuts at the end: the same number of tokens
    is dropped, from the document that ends that build's stream."""
    docs_one, cut_one = documents_of(one, split)
    docs_many, cut_many = documents_of(many, split)
    if cut_one == cut_many:  # both streams end with the same document
        assert docs_one == docs_many
        return
    whole_one = next(d for d in docs_many if d[: len(cut_one)] == cut_one)  # uncut in the other build
    whole_many = next(d for d in docs_one if d[: len(cut_many)] == cut_many)
    assert docs_one - Counter([whole_many]) == docs_many - Counter([whole_one])
    assert len(whole_one) - len(cut_one) == len(whole_many) - len(cut_many)


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    shard(build_args(corpus, out))
    assert build_shards(
        config(corpus, tmp_path_factory.mktemp("one_small")), [parse_source(f"code:{corpus[0]}")]
    ).manifest == Manifest.load(out), "the batch size does not change a build"
    return out


@pytest.mark.parametrize("tasks", [2, 3])
def test_a_build_in_tasks_has_the_documents_and_counts_of_one_process(corpus, one_process, tmp_path, tasks):
    one = Manifest.load(one_process)
    many = build_in_tasks(corpus, tmp_path, tasks)
    assert many.sources == one.sources  # documents, bytes, tokens, skips by reason, dropped tokens
    assert one.sources[f"code:{corpus[0]}"].filtered["duplicate"] == len(PLANTED)
    assert many.dropped_tokens == one.dropped_tokens
    for split in ("train", "val"):
        assert sum(e.samples for e in many.split(split)) == sum(e.samples for e in one.split(split))
        same_documents(one_process, tmp_path, split)
    # the planted copies are in both halves: at least one pair is split between tasks
    files = sorted(str(p.relative_to(corpus[0])) for p in corpus[0].rglob("*.py"))
    assert any(files.index(a) % tasks != files.index(b) % tasks for a, b in PLANTED.items())
    assert {e.name.split("/")[0] for e in many.shards} == {f"task-{k:05d}" for k in range(tasks)} | {"tails"}
    assert verify_build(tmp_path) == [] and not (tmp_path / "dedup").exists()


def test_the_first_copy_in_input_order_wins_however_the_records_come(tmp_path):
    rng = np.random.default_rng(0)
    rows = np.zeros(200, RECORD)
    rows["d0"], rows["d1"] = rng.integers(0, 5, 200), 7  # 5 digests, many copies each
    rows["source"], rows["unit"], rows["doc"] = (
        rng.integers(0, 2, 200),
        rng.integers(0, 9, 200),
        rng.integers(0, 99, 200),
    )
    rows = np.unique(rows)
    for order in (rows, rows[::-1], rng.permutation(rows)):
        kept = np.setdiff1d(order, later_copies(in_order(order)))
        expected = sorted(min(tuple(r)[2:] for r in rows if r["d0"] == d) for d in np.unique(rows["d0"]))
        assert sorted(tuple(r)[2:] for r in kept) == expected


def test_a_task_rerun_writes_the_same_and_a_finished_task_is_kept(corpus, one_process, tmp_path, capsys):
    for stage in ("digests", "dedup"):
        for task in range(2):
            shard(build_args(corpus, tmp_path) + ["--tasks", "2", "--task", str(task), "--stage", stage])
    args = build_args(corpus, tmp_path) + ["--tasks", "2", "--task", "1"]
    shard(args)
    first = (tmp_path / "task-00001" / "manifest.json").read_text()
    (tmp_path / "task-00001" / "manifest.json").unlink()  # as if killed after its shards, before its commit
    shard(args)
    assert (tmp_path / "task-00001" / "manifest.json").read_text() == first
    capsys.readouterr()
    shard(args)
    assert "already finished, kept" in capsys.readouterr().out
    shard(build_args(corpus, tmp_path) + ["--tasks", "2", "--task", "0"])
    shard(["merge", str(tmp_path)])
    assert Manifest.load(tmp_path).sources == Manifest.load(one_process).sources


@pytest.mark.parametrize(
    "setup, argv, message",
    [
        (
            "none",
            ["--tasks", "2", "--task", "0", "--stage", "dedup"],
            r"stage digests has not finished for task 0 of 2",
        ),
        ("digests", ["--tasks", "2", "--task", "1"], r"stage dedup has not finished for task 0 of 2"),
        (
            "digests",
            ["--tasks", "3", "--task", "0", "--stage", "dedup"],
            r"stage digests of task 0 ran with other sources, settings or inputs than this one \(--tasks 2 there, 3 here",
        ),
        (
            "digests",
            ["--tasks", "2", "--task", "0", "--stage", "dedup", "--seq-len", "32"],
            r"ran with other .* \(differing seq_len; .*task-00000.json\): give every stage and task the same arguments",
        ),
        ("none", ["--tasks", "2"], r"--tasks N and --task K go together"),
        ("none", ["--stage", "dedup"], r"--tasks N and --task K go together"),
        ("none", ["--tasks", "2", "--task", "2"], r"--task 2 must be in \[0, --tasks 2\)"),
        ("none", ["--tasks", "0", "--task", "0"], r"--tasks 0 must be within 1..10,000"),
        ("none", ["--tasks", str(10**9), "--task", "0"], r"--tasks 1000000000 must be within 1..10,000"),
    ],
)
def test_stages_out_of_order_are_one_line(corpus, tmp_path, setup, argv, message):
    if setup == "digests":
        for task in range(2):
            shard(build_args(corpus, tmp_path) + ["--tasks", "2", "--task", str(task), "--stage", "digests"])
    with pytest.raises(DslmError, match=message):
        shard(build_args(corpus, tmp_path) + argv)


def test_merge_names_a_task_that_has_not_finished(corpus, tmp_path):
    with pytest.raises(DslmError, match="holds no task of a distributed build"):
        shard(["merge", str(tmp_path)])
    for stage in STAGES:
        shard(build_args(corpus, tmp_path) + ["--tasks", "2", "--task", "0", "--stage", stage])
        if stage != "write":
            shard(build_args(corpus, tmp_path) + ["--tasks", "2", "--task", "1", "--stage", stage])
    with pytest.raises(DslmError, match=r"task 1 of 2 has not finished .*task-00001 has no task.json or manifest.json"):
        shard(["merge", str(tmp_path)])
    shard(build_args(corpus, tmp_path) + ["--tasks", "2", "--task", "1"])
    shutil.copytree(tmp_path / "task-00000", tmp_path / "task-00002")
    with pytest.raises(DslmError, match=r"holds task-00002, beyond the 2 tasks"):
        shard(["merge", str(tmp_path)])
    shutil.rmtree(tmp_path / "task-00002")
    shard_file = tmp_path / "task-00001" / "train-000000.tar"
    kept = shard_file.read_bytes()
    shard_file.write_bytes(kept[:-512])
    with pytest.raises(DslmError, match=r"task-00001/train-000000.tar is missing or not the .* bytes its task wrote"):
        shard(["merge", str(tmp_path)])
    shard_file.write_bytes(kept)
    shard(["merge", str(tmp_path)])
    with pytest.raises(DslmError, match="already holds a finished build"):
        shard(["merge", str(tmp_path)])
    with pytest.raises(DslmError, match="already holds a finished build"):
        shard(build_args(corpus, tmp_path) + ["--tasks", "2", "--task", "0", "--stage", "digests"])


def test_the_tokenizer_sample_spans_the_source(tmp_path):
    """Its runs start at even places in the source, not all at its first files."""
    from dslm_shards.build import TokenizerSample
    from dslm_shards.filters import DocumentFilter

    for i in range(40):  # 570 bytes each
        (tmp_path / f"{i:02d}.txt").write_text(
            "".join(f"document {i:02d} says the quick brown fox jumps over line {j:02d}.\n" for j in range(10))
        )
    source = parse_source(f"text:{tmp_path}")
    texts = list(TokenizerSample(sample_bytes=8 * 570, parts=8).texts([source], DocumentFilter()))
    assert [t.split()[1] for t in texts] == [f"{i:02d}" for i in range(0, 40, 5)]


def test_a_task_killed_mid_way_resumes_and_keeps_its_verified_shards(corpus, one_process, tmp_path, monkeypatch):
    for stage in ("digests", "dedup"):
        for task in range(2):
            shard(build_args(corpus, tmp_path) + ["--tasks", "2", "--task", str(task), "--stage", stage])
    cfg = dataclasses.replace(config(corpus, tmp_path), batch_documents=1)
    sources, part = [parse_source(f"code:{corpus[0]}")], Partition(2, 1)
    consume, seen = ShardBuild.consume, []

    def crashing(self, batch, results):
        seen.append(batch)
        if len(seen) == 6:
            raise RuntimeError("simulated crash")
        return consume(self, batch, results)

    monkeypatch.setattr(ShardBuild, "consume", crashing)
    with pytest.raises(RuntimeError, match="simulated"):
        build_shards(cfg, sources, part)
    monkeypatch.undo()
    home = tmp_path / "task-00001"
    kept = {p.name: p.stat().st_mtime_ns for p in home.glob("train-*.tar")}
    assert kept and not (home / "manifest.json").exists()
    assert build_shards(cfg, sources, part).resumed_shards == len(kept)
    assert {name: (home / name).stat().st_mtime_ns for name in kept} == kept, "a kept shard was rewritten"
    shard(build_args(corpus, tmp_path) + ["--tasks", "2", "--task", "0"])
    shard(["merge", str(tmp_path)])
    assert Manifest.load(tmp_path).sources == Manifest.load(one_process).sources
    same_documents(one_process, tmp_path, "train")


def test_overwrite_rebuilds_a_finished_task_and_files_added_between_stages_are_named(corpus, tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(corpus[0], root)
    args = build_args((root, corpus[1]), tmp_path / "out")
    for stage in STAGES:
        for task in range(2):
            shard(args + ["--tasks", "2", "--task", str(task), "--stage", stage])
    (tmp_path / "out" / "task-00001" / "train-000000.tar").unlink()
    with pytest.raises(DslmError, match="task-00001/train-000000.tar is missing"):
        shard(["merge", str(tmp_path / "out")])
    shard(args + ["--tasks", "2", "--task", "1", "--overwrite"])  # the finished task is built again
    shard(["merge", str(tmp_path / "out")])
    assert verify_build(tmp_path / "out") == []
    # a file added after the duplicates were listed: their positions no longer fit the units
    for stage in ("digests", "dedup"):
        for task in range(2):
            shard(
                build_args((root, corpus[1]), tmp_path / "b") + ["--tasks", "2", "--task", str(task), "--stage", stage]
            )
    (root / "json" / "aaa_new.py").write_text((root / "email" / "utils.py").read_text())
    with pytest.raises(DslmError, match=r"stage dedup of task 0 ran with other .*\(differing units;"):
        shard(build_args((root, corpus[1]), tmp_path / "b") + ["--tasks", "2", "--task", "0"])


def test_one_process_and_tasks_do_not_share_a_folder_and_a_stage_runs_once_at_a_time(corpus, tmp_path):
    out = tmp_path / "out"
    for task in range(2):
        shard(build_args(corpus, out) + ["--tasks", "2", "--task", str(task), "--stage", "digests"])
    with pytest.raises(DslmError, match=r"holds a build split over tasks .* pass --overwrite to replace it"):
        shard(build_args(corpus, out))
    shard(build_args(corpus, out) + ["--overwrite"])  # replaces the tasks' files with one process's build
    assert not (out / "dedup").exists() and verify_build(out) == []
    with pytest.raises(DslmError, match="already holds a finished build"):
        shard(build_args(corpus, out) + ["--tasks", "2", "--task", "0", "--stage", "digests"])
    (out / ".build-journal.json").write_text("{}")
    (out / "manifest.json").unlink()
    with pytest.raises(DslmError, match="holds an unfinished build of one process"):
        shard(build_args(corpus, out) + ["--tasks", "2", "--task", "0", "--stage", "digests"])
    with exclusive(tmp_path / "b" / "task-00000" / ".build.lock", "a test"):
        for stage in ("digests", "dedup"):
            for task in range(2):
                shard(build_args(corpus, tmp_path / "b") + ["--tasks", "2", "--task", str(task), "--stage", stage])
        with pytest.raises(DslmError, match=r"another process is writing the build in .*task-00000 \(.*locked\)"):
            shard(build_args(corpus, tmp_path / "b") + ["--tasks", "2", "--task", "0"])


@pytest.mark.parametrize(
    "damaged", ["dedup/digests/task-00001.json", "dedup/digests/task-00001.npy", "task-00001/task.json"]
)
def test_a_damaged_file_of_a_stage_is_one_line(corpus, tmp_path, damaged):
    out = tmp_path / "out"
    stages = ["digests"] if damaged.startswith("dedup/digests") else list(STAGES)
    for stage in stages:
        for task in range(2):
            shard(build_args(corpus, out) + ["--tasks", "2", "--task", str(task), "--stage", stage])
    (out / damaged).write_text("{")
    with pytest.raises(DslmError, match=rf"{damaged} is damaged .*--overwrite"):
        if damaged.startswith("dedup/digests"):
            shard(build_args(corpus, out) + ["--tasks", "2", "--task", "0", "--stage", "dedup"])
        else:
            shard(["merge", str(out)])


def test_clearing_a_folder_removes_an_unfinished_build_of_one_process(corpus, tmp_path, monkeypatch):
    """What `dslm-submit shard --overwrite` does first: a split build can then start there."""
    consume, seen = ShardBuild.consume, []

    def crashing(self, batch, results):
        seen.append(batch)
        if len(seen) == 8:
            raise RuntimeError("simulated crash")
        return consume(self, batch, results)

    monkeypatch.setattr(ShardBuild, "consume", crashing)
    with pytest.raises(RuntimeError, match="simulated"):
        build_shards(config(corpus, tmp_path), [parse_source(f"code:{corpus[0]}")])
    monkeypatch.undo()
    assert (tmp_path / ".build-journal.json").exists() and list(tmp_path.glob("train-*.tar"))
    clear_build(tmp_path)
    assert not (tmp_path / ".build-journal.json").exists() and not list(tmp_path.glob("*.tar"))
    assert not list(tmp_path.glob(".*.tmp"))
    shard(build_args(corpus, tmp_path) + ["--tasks", "2", "--task", "0", "--stage", "digests"])
