"""`dslm-shard build` across worker counts, after crashes, and with source weights."""

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from dslm.errors import DslmError
from dslm_shards.build import ShardBuild, ShardConfig, build_shards, token_dtype
from dslm_shards.encode import copies
from dslm_shards.journal import DIGESTS_NAME, JOURNAL_NAME, load_state
from dslm_shards.sources import CodeSource
from dslm_shards.verify import verify_build
from dslm_shards.writer import ShardWriter


def config(tiny_shards, out, **overrides):
    tokenizer = tiny_shards[0] / "tokenizer.json"
    settings = dict(seq_len=32, samples_per_shard=100, val_fraction=0.1, batch_documents=4, workers=0)
    return ShardConfig(out=out, tokenizer=tokenizer, **{**settings, **overrides})


@pytest.fixture
def sources(code_corpus):
    return [CodeSource(spec="email", root=code_corpus / "email"), CodeSource(spec="json", root=code_corpus / "json")]


@pytest.fixture
def whole(tiny_shards, sources, tmp_path):
    """The same build, never interrupted."""
    return build_shards(config(tiny_shards, tmp_path / "whole"), sources).manifest


def test_output_is_the_same_for_any_number_of_workers(tiny_shards, sources, whole, tmp_path):
    for workers in (1, 2):
        assert build_shards(config(tiny_shards, tmp_path / f"w{workers}", workers=workers), sources).manifest == whole
    assert len(whole.split("train")) > 5 and whole.split("val")


def test_shards_read_back_with_webdataset(tiny_shards):
    out, manifest = tiny_shards
    entry = manifest.split("train")[0]
    samples = list(wds.WebDataset(str(out / entry.name), shardshuffle=False).decode())
    assert len(samples) == entry.samples
    assert samples[0]["tokens.npy"].shape == (manifest.seq_len + 1,)


def crash_at_batch(monkeypatch, n):
    """Make the n-th batch of the next build raise, as a crash would stop it (after the journal's
    last save, with more written since)."""
    consume, seen = ShardBuild.consume, []

    def crashing(self, batch, results):
        seen.append(batch)
        if len(seen) == n:
            raise RuntimeError("simulated crash")
        return consume(self, batch, results)

    monkeypatch.setattr(ShardBuild, "consume", crashing)


def test_rerun_after_a_crash_keeps_verified_shards_and_writes_the_same_build(
    tiny_shards, sources, whole, tmp_path, monkeypatch
):
    out, cfg = tmp_path / "out", config(tiny_shards, tmp_path / "out")
    crash_at_batch(monkeypatch, 9)
    with pytest.raises(RuntimeError, match="simulated"):
        build_shards(cfg, sources)
    monkeypatch.undo()
    state = load_state(out)
    assert state is not None and not (out / "manifest.json").exists()
    kept = {e.name: (out / e.name).stat().st_mtime_ns for w in state.writers.values() for e in w.entries}
    assert kept and state.position.documents > 0
    report = build_shards(cfg, sources)
    assert report.resumed_shards == len(kept)
    assert report.manifest == whole
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept, "a kept shard was rewritten"
    assert verify_build(out) == []
    assert not (out / JOURNAL_NAME).exists() and not (out / DIGESTS_NAME).exists()
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("crash_at", [30, 65])
def test_a_crash_after_shards_finished_since_the_journal_resumes_without_starting_over(
    tiny_shards, sources, tmp_path, monkeypatch, capsys, crash_at
):
    """Small shards: a batch finishes several, and the journal is saved only after it. A crash just
    after a shard's rename leaves finished shards (and the journaled open one) that the journal
    does not know: the rerun takes them back and still resumes."""
    settings = dict(samples_per_shard=5, batch_documents=1)
    whole = build_shards(config(tiny_shards, tmp_path / "whole", **settings), sources).manifest
    out, cfg = tmp_path / "out", config(tiny_shards, tmp_path / "out", **settings)
    finish, finished = ShardWriter._finish_shard, []

    def crashing(self):
        finished.append(finish(self))
        if len(finished) == crash_at:
            raise RuntimeError("simulated crash")
        return finished[-1]

    monkeypatch.setattr(ShardWriter, "_finish_shard", crashing)
    with pytest.raises(RuntimeError, match="simulated"):
        build_shards(cfg, sources)
    monkeypatch.undo()
    journaled = sum(len(w.entries) for w in load_state(out).writers.values())
    assert 0 < journaled < crash_at, "the crash came after shards the journal does not list"
    capsys.readouterr()
    report = build_shards(cfg, sources)
    assert "starting over" not in capsys.readouterr().err
    assert report.resumed_shards == journaled and report.manifest == whole
    assert verify_build(out) == [] and not list(out.glob(".*.tmp"))


def test_a_damaged_kept_shard_means_starting_over(tiny_shards, sources, whole, tmp_path, monkeypatch, capsys):
    out, cfg = tmp_path / "out", config(tiny_shards, tmp_path / "out")
    crash_at_batch(monkeypatch, 9)
    with pytest.raises(RuntimeError):
        build_shards(cfg, sources)
    monkeypatch.undo()
    first = load_state(out).writers["train"].entries[0]
    with open(out / first.name, "r+b") as f:
        f.truncate(first.bytes - 1024)
    report = build_shards(cfg, sources)
    assert "starting over" in capsys.readouterr().err
    assert report.resumed_shards == 0 and report.manifest == whole


def test_an_unfinished_build_of_other_inputs_is_not_resumed(tiny_shards, sources, tmp_path, monkeypatch):
    cfg = config(tiny_shards, tmp_path / "out")
    crash_at_batch(monkeypatch, 9)
    with pytest.raises(RuntimeError):
        build_shards(cfg, sources)
    monkeypatch.undo()
    cfg.seq_len = 48
    with pytest.raises(DslmError, match="unfinished build of other sources or settings.*--overwrite"):
        build_shards(cfg, sources)
    cfg.overwrite = True
    assert build_shards(cfg, sources).manifest.seq_len == 48
    assert verify_build(cfg.out) == []


def test_a_journal_without_owners_resumes_with_the_same_shards(tiny_shards, sources, whole, tmp_path, monkeypatch):
    """A journal written before the pending tokens' sources were kept: the build resumes and
    counts the dropped tokens per stream as before; only per source can some go uncounted."""
    out, cfg = tmp_path / "out", config(tiny_shards, tmp_path / "out")
    crash_at_batch(monkeypatch, 9)
    with pytest.raises(RuntimeError):
        build_shards(cfg, sources)
    monkeypatch.undo()
    raw = json.loads((out / JOURNAL_NAME).read_text())
    assert any(raw.pop("owners").values())
    (out / JOURNAL_NAME).write_text(json.dumps(raw))
    manifest = build_shards(cfg, sources).manifest
    assert (manifest.shards, manifest.dropped_tokens) == (whole.shards, whole.dropped_tokens)
    assert all(manifest.sources[s].dropped_tokens <= whole.sources[s].dropped_tokens for s in whole.sources)


def accounted(manifest):
    """Every token of every source is in a shard or counted as dropped, per stream and per source."""
    dropped = sum(manifest.dropped_tokens.values())
    assert sum(e.tokens for e in manifest.shards) + dropped == sum(s.tokens for s in manifest.sources.values())
    assert sum(s.dropped_tokens for s in manifest.sources.values()) == dropped
    assert all(0 <= n <= manifest.seq_len for n in manifest.dropped_tokens.values())


def test_every_token_is_in_a_shard_or_counted_as_dropped(tiny_shards, code_corpus, whole, tmp_path):
    accounted(whole)
    assert {name.split(".")[0] for name in whole.dropped_tokens} == {"train", "val"}
    source = CodeSource(spec="json", root=code_corpus / "json", weight=2.0)
    twice = build_shards(config(tiny_shards, tmp_path / "twice"), [source]).manifest
    accounted(twice)
    assert {"train.0.python", "train.1.python"} <= set(twice.dropped_tokens)


def test_copies_follow_the_weight():
    digests = [bytes(np.random.default_rng(i).integers(0, 256, 16, dtype=np.uint8)) for i in range(4000)]
    assert {copies(d, 1.0) for d in digests} == {1}
    assert {copies(d, 3.0) for d in digests} == {3}
    assert 0.45 < np.mean([copies(d, 0.5) for d in digests]) < 0.55
    assert 2.2 < np.mean([copies(d, 2.25) for d in digests]) < 2.3
    assert [copies(d, 0.5) for d in digests] == [copies(d, 0.5) for d in digests]  # by digest, not chance


def test_weight_repeats_or_samples_a_source(tiny_shards, code_corpus, tmp_path):
    def build(weight):
        source = CodeSource(spec="json", root=code_corpus / "json", weight=weight)
        cfg = config(tiny_shards, tmp_path / str(weight), val_fraction=0.0, samples_per_shard=1000)
        return build_shards(cfg, [source]).manifest

    one, two, half = build(1.0), build(2.0), build(0.5)
    assert (two.sources["json"].documents, two.sources["json"].tokens) == (
        2 * one.sources["json"].documents,
        2 * one.sources["json"].tokens,
    )
    kept = half.sources["json"]
    assert kept.documents + kept.filtered["downsampled"] == one.sources["json"].documents
    assert 0 < kept.documents < one.sources["json"].documents


def test_dtype_must_hold_the_vocab():
    assert token_dtype(8888) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(8888, "uint32") == np.uint32
    with pytest.raises(DslmError, match="does not fit uint16.*--dtype uint32"):
        token_dtype(70_000, "uint16")


@pytest.mark.slow
def test_killed_build_resumes_from_the_command_line(tiny_shards, code_corpus, tmp_path):
    """A real SIGKILL in the middle of a build with a worker process, then the same command again."""
    last = tmp_path / "last" / "textwrap.py"
    last.parent.mkdir()
    shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py", last)
    roots = [code_corpus / "email", code_corpus / "json", last.parent]
    cmd = [
        sys.executable,
        "-m",
        "dslm_shards.cli",
        "build",
        *(a for root in roots for a in ("--source", f"code:{root}")),
        "--tokenizer",
        str(tiny_shards[0] / "tokenizer.json"),
        "--seq-len",
        "16",
        "--samples-per-shard",
        "50",
        "--workers",
        "1",
    ]
    whole = subprocess.run([*cmd, "--out", str(tmp_path / "whole")], capture_output=True, text=True, check=True)
    out = tmp_path / "out"
    # The killed build cannot finish: the last source's file becomes a FIFO that nothing writes, so
    # reading it blocks. Each source ends a batch and one worker encodes at most 2 batches ahead of
    # the writing (encode_batches), so email's shards are written and journaled before that read.
    text = last.read_bytes()
    last.unlink()
    os.mkfifo(last)
    proc = subprocess.Popen(
        [*cmd, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_for_journal(out, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the build ended before it could be killed"
    last.unlink()
    last.write_bytes(text)
    again = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, check=True)
    assert "shards kept from the unfinished run" in again.stdout, again.stdout
    assert json.loads((out / "manifest.json").read_text()) == json.loads(
        (tmp_path / "whole" / "manifest.json").read_text()
    )
    assert whole.returncode == 0 and verify_build(out) == []


def wait_for_journal(out: Path, proc: subprocess.Popen) -> None:
    """Until the build in `out` has journaled a shard. That takes about a second: the generous
    limit only ends the wait for a build that blocks before journaling anything."""
    end = time.monotonic() + 300
    while not (out / JOURNAL_NAME).exists():
        assert proc.poll() is None and time.monotonic() < end, "the build journaled no shard"
        time.sleep(0.05)
