"""Sealing, checking and pruning checkpoint tags (files only; the training tests cover DeepSpeed)."""

import dataclasses

import pytest

from dslm.checkpoint import (LATEST_NAME, SEAL_NAME, Checkpointer, TrainState, best_tag, newest_resumable, rng_file,
                             seal, seal_problem, sealed_state, tag_for)
from dslm.errors import DslmError
from dslm.resume import check_same_shards, shards_identity


def fake_tag(folder, step, world_size=2, sealed=True, val_loss=None):
    tag_dir = folder / tag_for(step)
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
    for rank in range(world_size):
        (tag_dir / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"o" * 50)
        (tag_dir / rng_file(rank)).write_bytes(b"r" * 10)
    if sealed:
        seal(tag_dir, TrainState(step=step, samples=step * 16, world_size=world_size, val_loss=val_loss))
    return tag_dir


def test_sealed_tag_is_resumable_and_remembers_the_state(tmp_path):
    tag_dir = fake_tag(tmp_path, 10)
    assert seal_problem(tag_dir) is None
    assert sealed_state(tag_dir) == TrainState(step=10, samples=160, world_size=2)


def test_unsealed_truncated_missing_or_short_of_ranks_is_not(tmp_path):
    assert "never sealed" in seal_problem(fake_tag(tmp_path, 1, sealed=False))
    truncated = fake_tag(tmp_path, 2)
    (truncated / "mp_rank_00_model_states.pt").write_bytes(b"m" * 99)
    assert "99 bytes, sealed with 100" in seal_problem(truncated)
    missing = fake_tag(tmp_path, 3)
    (missing / rng_file(1)).unlink()
    assert f"{rng_file(1)} is missing" in seal_problem(missing)
    short = fake_tag(tmp_path, 4, world_size=1)
    seal(short, TrainState(step=4, world_size=2))
    assert "1 ranks' state, sealed by 2" in seal_problem(short)


def test_newest_intact_tag_wins_and_newer_damaged_ones_are_named(tmp_path):
    fake_tag(tmp_path, 5)
    good = fake_tag(tmp_path, 10)
    fake_tag(tmp_path, 15, sealed=False)
    damaged = fake_tag(tmp_path, 20)
    (damaged / SEAL_NAME).write_text((damaged / SEAL_NAME).read_text().replace("100", "101"))
    tag_dir, skipped = newest_resumable(tmp_path)
    assert tag_dir == good
    assert [line.split(": ")[0] for line in skipped] == [f"skipping checkpoint {tmp_path / tag_for(s)}" for s in (20, 15)]
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
