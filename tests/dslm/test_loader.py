from itertools import islice

import pytest
import torch

from dslm.data.loader import DataConfig, DeviceBatches, GlobalOrderSampler, ShardSamples, epoch_order, train_loader


def global_steps(num_samples, world_size, micro_batch, steps, start=0):
    """The set of sample indices each global micro-step reads, over all ranks."""
    per_rank = [list(islice(iter(GlobalOrderSampler(num_samples, 7, r, world_size, micro_batch, start)), steps * micro_batch))
                for r in range(world_size)]
    return [sorted(i for r in per_rank for i in r[s * micro_batch:(s + 1) * micro_batch]) for s in range(steps)]


def test_epoch_reads_every_sample_once_whatever_the_world_size():
    two_ranks = global_steps(num_samples=48, world_size=2, micro_batch=3, steps=8)
    assert sorted(i for step in two_ranks for i in step) == list(range(48))
    one_rank = global_steps(num_samples=48, world_size=1, micro_batch=6, steps=8)
    assert one_rank == two_ranks  # same samples per global step on 1 rank with twice the micro-batch


def test_next_epoch_is_a_new_order():
    first, second = (global_steps(10, 1, 10, 1, start=s)[0] for s in (0, 10))
    order = list(islice(iter(GlobalOrderSampler(10, 7, 0, 1, 10)), 20))
    assert first == second == list(range(10)) and order[:10] != order[10:]


def test_loader_yields_token_batches(tiny_shards):
    out, manifest = tiny_shards
    loader = train_loader(DataConfig(shards=str(out), num_workers=2), manifest, seed=1, rank=0, world_size=1, micro_batch=4)
    batches = list(islice(iter(loader), 3))
    assert all(b[name].shape == (4, manifest.seq_len + 1) and b[name].dtype == torch.int64
               for b in batches for name in ("input_ids", "labels"))
    assert all(torch.equal(b["input_ids"], b["labels"]) for b in batches)  # pretraining: every token a target
    dataset = ShardSamples(out, manifest, "train")
    assert len(dataset) == sum(e.samples for e in manifest.split("train"))
    expected = [dataset[int(i)]["input_ids"] for i in epoch_order(len(dataset), seed=1, epoch=0)[:4]]
    assert torch.equal(batches[0]["input_ids"], torch.stack(expected))


def test_backward_reads_each_sample_reversed_in_the_same_order(tiny_shards):
    out, manifest = tiny_shards
    forward = train_loader(DataConfig(shards=str(out), num_workers=0), manifest, seed=1, rank=0, world_size=1,
                           micro_batch=4)
    backward = train_loader(DataConfig(shards=str(out), num_workers=0, direction="backward"), manifest, seed=1,
                            rank=0, world_size=1, micro_batch=4)
    for f, b in islice(zip(forward, backward), 2):
        assert torch.equal(b["input_ids"], f["input_ids"].flip(1)) and torch.equal(b["labels"], f["labels"].flip(1))
        assert (b["input_ids"][:, 0] != f["input_ids"][:, 0]).any()


def test_direction_is_checked():
    with pytest.raises(ValueError, match="data.direction='sideways' is not one of forward, backward"):
        DataConfig(direction="sideways")


def test_device_batches_take_one_batch_ahead_and_keep_the_order():
    rows = [{"input_ids": torch.arange(i * 5, i * 5 + 5).view(1, 5)} for i in range(4)]
    taken = []
    source = (taken.append(i) or row for i, row in enumerate(rows))
    batches = DeviceBatches(source, torch.device("cpu"))
    assert taken == []  # nothing is read before it is asked for
    first = next(batches)
    batches.prefetch()
    batches.prefetch()  # a second prefetch does not skip a batch
    assert taken == [0, 1]
    assert torch.equal(first["input_ids"], rows[0]["input_ids"])
    rest = [batch["input_ids"][0, 0].item() for batch in islice(batches, 3)]
    assert rest == [5, 10, 15] and taken == [0, 1, 2, 3]


def read_positions(out, manifest, world_size, micro_batch, start, stop, workers=2):
    """Rows (as bytes) at global positions start..stop-1, read by `world_size` real loaders with
    `workers` worker processes each, the way training ranks read them."""
    rows = []
    step_size = world_size * micro_batch
    for rank in range(world_size):
        loader = train_loader(DataConfig(shards=str(out), num_workers=workers), manifest, seed=3, rank=rank,
                              world_size=world_size, micro_batch=micro_batch, start=start)
        steps = -(-(stop - start) // step_size)
        for step, batch in enumerate(islice(iter(loader), steps)):
            for k, row in enumerate(batch["input_ids"]):
                if start + step * step_size + rank * micro_batch + k < stop:
                    rows.append(row.numpy().tobytes())
    return rows


def test_one_epoch_on_two_ranks_with_workers_reads_every_sample_once_even_after_a_resume_on_one(tiny_shards):
    out, manifest = tiny_shards
    dataset = ShardSamples(out, manifest, "train")
    everything = sorted(dataset[i]["input_ids"].numpy().tobytes() for i in range(len(dataset)))
    assert sorted(read_positions(out, manifest, 2, 4, 0, len(dataset))) == everything
    cursor = 8 * 37  # where a 2-rank run with micro-batch 4 checkpointed, 37 steps in
    resumed = read_positions(out, manifest, 2, 4, 0, cursor) + read_positions(out, manifest, 1, 8, cursor, len(dataset))
    assert sorted(resumed) == everything
