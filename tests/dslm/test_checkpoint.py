"""Sealing, checking and pruning checkpoint tags, their lineage and their RNG files (files
only; the training tests cover DeepSpeed)."""

import dataclasses
import json
import os
import random

import numpy as np
import pytest
import torch

from dslm.checkpoint.format import (
    ABANDONED_NAME,
    BEST_NAME,
    CHECKSUM,
    LATEST_NAME,
    SEAL_NAME,
    TrainState,
    best_tag,
    check_loads_safely,
    load_rng_state,
    newest_resumable,
    own_checksums,
    resume_problem,
    rng_file,
    rng_state,
    seal,
    seal_problem,
    sealed_state,
    set_rng_state,
    tag_files,
)
from dslm.checkpoint.resume import batch_note, check_same_shards, find_resume, recorded_batch, shards_identity
from dslm.checkpoint.save import Checkpointer, start_branch
from dslm.errors import DslmError
from dslm.run_dir import tag_for

MODEL_FILE = "mp_rank_00_model_states.pt"


def optim_file(rank):
    return f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def fake_tag(folder, step, world_size=2, sealed=True, val_loss=None):
    """A tag of real torch files in DeepSpeed's names (small tensors), sealed unless told."""
    tag_dir = folder / tag_for(step)
    tag_dir.mkdir(parents=True)
    torch.save({"module": {"w": torch.full((25,), float(step))}}, tag_dir / MODEL_FILE)
    for rank in range(world_size):
        torch.save({"optimizer_state_dict": {"m": torch.zeros(10)}}, tag_dir / optim_file(rank))
        torch.save(rng_state(), tag_dir / rng_file(rank))
    if sealed:
        seal(tag_dir, TrainState(step=step, samples=step * 16, world_size=world_size, val_loss=val_loss))
    return tag_dir


def flip_byte(path, at=-100):
    """Change one byte of a file in place: its size stays."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


class RunsCode:
    """Unpickling this runs a shell command (what weights_only=True must refuse)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def live_run(folder, steps, latest):
    """Sealed tags at `steps`, `latest` naming global_step`latest` (as Checkpointer.save leaves them)."""
    for step in steps:
        fake_tag(folder, step, world_size=1)
    (folder / LATEST_NAME).write_text(tag_for(latest))


def test_sealed_tag_is_resumable_and_remembers_the_state(tmp_path):
    tag_dir = fake_tag(tmp_path, 10)
    assert seal_problem(tag_dir) is None
    assert sealed_state(tag_dir) == TrainState(step=10, samples=160, world_size=2)


def test_unsealed_truncated_missing_or_short_of_ranks_is_not(tmp_path):
    assert "never sealed" in seal_problem(fake_tag(tmp_path, 1, sealed=False))
    truncated = fake_tag(tmp_path, 2)
    size = (truncated / MODEL_FILE).stat().st_size
    (truncated / MODEL_FILE).write_bytes((truncated / MODEL_FILE).read_bytes()[:-1])
    assert f"{size - 1} bytes, sealed with {size}" in seal_problem(truncated)
    missing = fake_tag(tmp_path, 3)
    (missing / rng_file(1)).unlink()
    assert f"{rng_file(1)} is missing" in seal_problem(missing)
    short = fake_tag(tmp_path, 4, world_size=1)
    seal(short, TrainState(step=4, world_size=2))
    assert "holds the state of 1 rank, sealed by 2" in seal_problem(short)


def test_newest_intact_tag_wins_and_newer_damaged_ones_are_named(tmp_path):
    fake_tag(tmp_path, 5)
    good = fake_tag(tmp_path, 10)
    fake_tag(tmp_path, 15, sealed=False)
    damaged = fake_tag(tmp_path, 20)
    flip_byte(damaged / optim_file(1))
    tag_dir, skipped = newest_resumable(tmp_path)
    assert tag_dir == good
    assert [line.split(": ")[0] for line in skipped] == [
        f"skipping checkpoint {tmp_path / tag_for(s)}" for s in (20, 15)
    ]
    assert newest_resumable(tmp_path / "none") == (None, [])


def test_prune_keeps_the_newest_sealed_tags(tmp_path):
    for step in (2, 4, 6):
        fake_tag(tmp_path, step)
    fake_tag(tmp_path, 3, sealed=False)  # debris of a crash
    fake_tag(tmp_path, 8, sealed=False)  # being written now
    Checkpointer(tmp_path, keep_last=2).prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(s) for s in (4, 6, 8)]
    Checkpointer(tmp_path, keep_last=0).prune()
    assert len(list(tmp_path.iterdir())) == 3 and not (tmp_path / LATEST_NAME).exists()


def test_resuming_on_other_shards_is_an_error_naming_what_changed(tiny_shards):
    out, manifest = tiny_shards
    state = TrainState(step=5, shards=shards_identity(manifest))
    check_same_shards(state, manifest, str(out))
    other = dataclasses.replace(manifest, seq_len=manifest.seq_len * 2, tokenizer_sha256="0" * 64)
    with pytest.raises(DslmError, match=r"tokenizer_sha256 .* -> 0000.*seq_len 64 -> 128"):
        check_same_shards(state, other, str(out))


def test_the_best_tag_by_val_loss_survives_pruning(tmp_path):
    for step, val_loss in ((2, 3.0), (4, 2.5), (6, None), (8, 2.7)):
        fake_tag(tmp_path, step, val_loss=val_loss)
    assert best_tag(tmp_path) == tmp_path / tag_for(4)
    Checkpointer(tmp_path, keep_last=1).prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(4), tag_for(8)]
    assert best_tag(tmp_path / "none") is None


# Lineage (issue 15, item 1): `latest`, not the highest step, names the live branch.


def test_the_issues_rollback_resume_auto_continues_the_rollback_not_the_abandoned_step(tmp_path):
    live_run(tmp_path, (9, 12), latest=12)  # 12 steps, checkpoint every 3, keep_last=2
    lines = start_branch(tmp_path, tmp_path / tag_for(9))  # rolled back to step 9
    aside = tmp_path / ABANDONED_NAME / f"after_{tag_for(9)}"
    assert [p.name for p in aside.iterdir()] == [tag_for(12)] and seal_problem(aside / tag_for(12)) is None
    assert len(lines) == 1 and tag_for(12) in lines[0] and str(aside) in lines[0]
    assert (tmp_path / LATEST_NAME).read_text() == tag_for(9)
    fake_tag(tmp_path, 10, world_size=1)  # checkpoint_interval=1, keep_last=1, stopped at step 10
    (tmp_path / LATEST_NAME).write_text(tag_for(10))
    Checkpointer(tmp_path, keep_last=1).prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == [ABANDONED_NAME, tag_for(10), LATEST_NAME]
    assert newest_resumable(tmp_path) == (tmp_path / tag_for(10), [])


def test_tags_beyond_latest_are_never_resumed_by_auto_nor_counted_by_pruning(tmp_path):
    live_run(tmp_path, (9, 10, 11, 12), latest=11)  # 12: a branch abandoned by a dslm that did not move it aside
    Checkpointer(tmp_path, keep_last=3).prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == [tag_for(s) for s in (10, 11, 12, 9)] + [LATEST_NAME]
    tag_dir, skipped = newest_resumable(tmp_path)
    assert tag_dir == tmp_path / tag_for(11)
    assert skipped == [
        f"skipping checkpoint {tmp_path / tag_for(12)}: beyond {tag_for(11)}, which "
        f"{tmp_path / LATEST_NAME} names (not on the run's live branch)"
    ]
    flip_byte(tmp_path / tag_for(11) / MODEL_FILE)  # the tag latest names is damaged: back along the live branch
    tag_dir, skipped = newest_resumable(tmp_path)
    assert tag_dir == tmp_path / tag_for(10) and f"{MODEL_FILE} does not match its {CHECKSUM}" in skipped[1]
    (tmp_path / LATEST_NAME).write_text(tag_for(13))  # names a tag that is gone: the older live ones
    assert newest_resumable(tmp_path)[0] == tmp_path / tag_for(12)


def test_with_keep_last_3_pruning_keeps_the_rollbacks_own_tags(tmp_path):
    live_run(tmp_path, (3, 6, 9, 12), latest=12)
    start_branch(tmp_path, tmp_path / tag_for(6))
    checkpointer = Checkpointer(tmp_path, keep_last=3)
    for step in (7, 8, 9):  # tag 9 of the old branch is aside: this one is new
        fake_tag(tmp_path, step, world_size=1)
        (tmp_path / LATEST_NAME).write_text(tag_for(step))
        checkpointer.prune()
    assert sorted(p.name for p in tmp_path.glob("global_step*")) == [tag_for(s) for s in (7, 8, 9)]
    aside = tmp_path / ABANDONED_NAME / f"after_{tag_for(6)}"
    assert sorted(p.name for p in aside.iterdir()) == [tag_for(12), tag_for(9)]


def test_a_new_branch_removes_partial_tags_and_derived_folders_and_repoints_best(tmp_path):
    for step, val_loss in ((4, 3.0), (8, 2.0)):
        fake_tag(tmp_path, step, world_size=1, val_loss=val_loss)
    fake_tag(tmp_path, 12, world_size=1, sealed=False)  # a save that did not finish
    (tmp_path / f"{tag_for(8)}_universal").mkdir()
    (tmp_path / LATEST_NAME).write_text(tag_for(8))
    (tmp_path / BEST_NAME).write_text(tag_for(8))
    lines = start_branch(tmp_path, tmp_path / tag_for(4))
    assert lines[0] == f"removed {tmp_path / tag_for(12)}: never sealed (a save that did not finish)"
    assert not (tmp_path / tag_for(12)).exists() and not (tmp_path / f"{tag_for(8)}_universal").exists()
    assert (tmp_path / BEST_NAME).read_text() == tag_for(4) and (tmp_path / LATEST_NAME).read_text() == tag_for(4)
    fake_tag(tmp_path, 8, world_size=1)  # the new branch reaches step 8 again, and rolls back to 4 again
    start_branch(tmp_path, tmp_path / tag_for(4))
    assert sorted(p.name for p in (tmp_path / ABANDONED_NAME).iterdir()) == [
        f"after_{tag_for(4)}",
        f"after_{tag_for(4)}_2",
    ]
    assert best_tag(tmp_path) == tmp_path / tag_for(4) and start_branch(tmp_path, tmp_path / tag_for(4)) == []


# Checksums (item 3): a changed byte is found, and resume falls back past it naming the file.


def test_the_seal_records_size_and_checksum_of_every_file_hashed_by_its_writer(tmp_path):
    tag_dir = fake_tag(tmp_path, 5)
    files = json.loads((tag_dir / SEAL_NAME).read_text())["files"]
    assert sorted(files) == tag_files(tag_dir) and all(set(r) == {"bytes", CHECKSUM} for r in files.values())
    parts = [own_checksums(tag_dir, rank, 2) for rank in (0, 1)]
    assert sorted(parts[1]) == [optim_file(1), rng_file(1)] and MODEL_FILE in parts[0]
    assert {name: files[name][CHECKSUM] for name in files} == parts[0] | parts[1]
    seal(tag_dir, sealed_state(tag_dir), parts[0])  # what no rank hashed, rank 0 hashes while sealing
    assert json.loads((tag_dir / SEAL_NAME).read_text())["files"] == files


def test_a_changed_byte_of_the_same_size_is_found_and_resume_falls_back_naming_the_file(tmp_path):
    live_run(tmp_path, (4, 8), latest=8)
    flip_byte(tmp_path / tag_for(8) / rng_file(0))
    assert seal_problem(tmp_path / tag_for(8)) is None, "sizes alone (what listing tags checks) do not see it"
    problem = f"{rng_file(0)} does not match its {CHECKSUM} checksum in {SEAL_NAME}"
    assert problem in seal_problem(tmp_path / tag_for(8), checksums=True)
    tag_dir, skipped = newest_resumable(tmp_path)
    assert tag_dir == tmp_path / tag_for(4) and skipped == [
        f"skipping checkpoint {tmp_path / tag_for(8)}: {problem} (its bytes changed after sealing)"
    ]
    with pytest.raises(DslmError, match=f"cannot resume from {tmp_path / tag_for(8)}: {problem}"):
        find_resume(str(tmp_path / tag_for(8)), tmp_path)
    assert find_resume("auto", tmp_path) == tmp_path / tag_for(4)


def test_a_tag_sealed_before_checksums_is_checked_by_size(tmp_path):
    tag_dir = fake_tag(tmp_path, 3, world_size=1)
    sealed = json.loads((tag_dir / SEAL_NAME).read_text())
    sealed["files"] = {name: record["bytes"] for name, record in sealed["files"].items()}
    (tag_dir / SEAL_NAME).write_text(json.dumps(sealed))
    assert resume_problem(tag_dir) is None
    (tag_dir / MODEL_FILE).write_bytes(b"")
    assert "0 bytes, sealed with" in resume_problem(tag_dir)


# Safe loading (item 5): no file of a tag is unpickled beyond tensors and plain data.


@pytest.mark.parametrize("name", [MODEL_FILE, optim_file(0), rng_file(0), "zero/w/fp32.pt"])
def test_a_file_that_needs_arbitrary_unpickling_is_refused_before_anything_loads_it(tmp_path, name):
    tag_dir = fake_tag(tmp_path, 2, world_size=1)
    (tag_dir / name).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": RunsCode(tmp_path / "ran")}, tag_dir / name)
    seal(tag_dir, sealed_state(tag_dir))  # sealed with it: its checksum matches
    with pytest.raises(
        DslmError,
        match=rf"{tag_dir / name}: refusing to load it: it needs arbitrary unpickling "
        r"\(posix.system\)",
    ):
        check_loads_safely(tag_dir)
    assert f"{name}: refusing to load it" in resume_problem(tag_dir)
    assert newest_resumable(tmp_path)[0] is None and not (tmp_path / "ran").exists()


def test_a_damaged_torch_file_is_one_line(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"w": torch.ones(100)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DslmError, match=rf"^{path}: cannot read it: damaged or not a torch file \(Pytorch"):
        check_loads_safely(tmp_path)


def draws():
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def test_the_rng_state_round_trips_with_plain_weights_only_loading(tmp_path):
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = draws()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # no allowed globals at all
    assert draws() == expected
    set_rng_state(load_rng_state(tmp_path / "rng.pt"))
    assert draws() == expected


def test_an_rng_file_of_the_old_format_is_read_and_one_with_code_refused(tmp_path):
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(old, tmp_path / "old.pt")
    expected = draws()
    set_rng_state(load_rng_state(tmp_path / "old.pt"))
    assert draws() == expected
    torch.save({**old, "numpy": RunsCode(tmp_path / "ran")}, tmp_path / "bad.pt")
    with pytest.raises(DslmError, match="bad.pt: refusing to load it"):
        load_rng_state(tmp_path / "bad.pt")
    assert not (tmp_path / "ran").exists()


# World size (item 7): the message compares the actual global batches.


def test_the_batch_note_compares_actual_global_batches():
    assert batch_note(16, 16, 4) == "the global batch stays 16 samples"  # 2 ranks -> 1, grad_accum 2 -> 4
    assert batch_note(16, 8, 4) == "the global batch is now 8 samples, was 16 (x1/2); train.grad_accum=4 keeps it"
    assert batch_note(24, 48, 16) == "the global batch is now 48 samples, was 24 (x2)"
    assert batch_note(0, 8, 4) == "the global batch is 8 samples (the checkpoint does not record what it was)"
    assert recorded_batch(TrainState(step=3, samples=48, global_batch=20)) == 20
    assert recorded_batch(TrainState(step=3, samples=48)) == 16  # a tag from before global_batch was recorded
    assert recorded_batch(TrainState(step=3, samples=50)) == recorded_batch(TrainState()) == 0
