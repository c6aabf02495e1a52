import dataclasses
import shutil
import signal
import subprocess
import sys
from itertools import islice
from pathlib import Path

import psutil
import pytest
import torch

from dslm.data.loader import (
    DataConfig,
    DeviceBatches,
    GlobalOrderSampler,
    ShardSamples,
    TrainSamples,
    train_loader,
    train_order,
)
from dslm.data.manifest import Manifest
from dslm.data.mix import Interleave, MixedOrder, MixSource
from dslm.data.order import WindowOrder
from dslm.errors import BadShard, DslmError
from dslm.model import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[2]


def one_source(sizes, seed=7, window=2):
    return MixedOrder([WindowOrder(sizes, seed, window, key=[0])], Interleave([1.0]))


def global_steps(sizes, world_size, micro_batch, steps, start=0):
    """The set of sample indices each global micro-step reads, over all ranks."""
    per_rank = [
        [
            i
            for _, i in islice(
                iter(GlobalOrderSampler(one_source(sizes), r, world_size, micro_batch, start)), steps * micro_batch
            )
        ]
        for r in range(world_size)
    ]
    return [sorted(i for r in per_rank for i in r[s * micro_batch : (s + 1) * micro_batch]) for s in range(steps)]


def loader(cfg, manifest, seed, rank, world_size, micro_batch, start=0):
    return train_loader(
        cfg, TrainSamples(cfg, [manifest]), train_order(cfg, [manifest], seed), rank, world_size, micro_batch, start
    )


def test_epoch_reads_every_sample_once_whatever_the_world_size():
    two_ranks = global_steps([10, 10, 8, 10, 10], world_size=2, micro_batch=3, steps=8)
    assert sorted(i for step in two_ranks for i in step) == list(range(48))
    one_rank = global_steps([10, 10, 8, 10, 10], world_size=1, micro_batch=6, steps=8)
    assert one_rank == two_ranks  # same samples per global step on 1 rank with twice the micro-batch


def test_next_epoch_is_a_new_order():
    first, second = (global_steps([4, 6], 1, 10, 1, start=s)[0] for s in (0, 10))
    order = list(islice(iter(GlobalOrderSampler(one_source([4, 6]), 0, 1, 10)), 20))
    assert first == second == list(range(10)) and order[:10] != order[10:]


def test_loader_yields_token_batches(tiny_shards):
    out, manifest = tiny_shards
    cfg = DataConfig(shards=str(out), num_workers=2)
    batches = list(islice(iter(loader(cfg, manifest, seed=1, rank=0, world_size=1, micro_batch=4)), 3))
    assert all(
        b[name].shape == (4, manifest.seq_len + 1) and b[name].dtype == torch.int64
        for b in batches
        for name in ("input_ids", "labels")
    )
    assert all(torch.equal(b["input_ids"], b["labels"]) for b in batches)  # pretraining: every token a target
    dataset = ShardSamples(out, manifest, "train")
    assert len(dataset) == sum(e.samples for e in manifest.split("train"))
    expected = [dataset[int(i)]["input_ids"] for i in train_order(cfg, [manifest], seed=1).draw(0, 4)[1]]
    assert torch.equal(batches[0]["input_ids"], torch.stack(expected))


def test_backward_reads_each_sample_reversed_in_the_same_order(tiny_shards):
    out, manifest = tiny_shards
    forward = loader(DataConfig(shards=str(out), num_workers=0), manifest, seed=1, rank=0, world_size=1, micro_batch=4)
    backward = loader(
        DataConfig(shards=str(out), num_workers=0, direction="backward"),
        manifest,
        seed=1,
        rank=0,
        world_size=1,
        micro_batch=4,
    )
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
        batches = loader(
            DataConfig(shards=str(out), num_workers=workers),
            manifest,
            seed=3,
            rank=rank,
            world_size=world_size,
            micro_batch=micro_batch,
            start=start,
        )
        steps = -(-(stop - start) // step_size)
        for step, batch in enumerate(islice(iter(batches), steps)):
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


def copy_shards(shards: Path, to: Path) -> Path:
    shutil.copytree(shards, to)
    return to


def test_a_shard_damaged_after_the_build_is_named_when_opened(tiny_shards, tmp_path):
    out = copy_shards(tiny_shards[0], tmp_path / "shards")
    manifest = Manifest.load(out)
    first, second = manifest.split("train")[:2]
    with open(out / first.name, "r+b") as f:  # cut short, as by a partial copy
        f.truncate(first.bytes // 2)
    data = bytearray((out / second.name).read_bytes())  # same size, other bytes: only the checksum tells
    data[first.bytes // 3 if len(data) > first.bytes // 3 else 600] ^= 0xFF
    (out / second.name).write_bytes(data)
    samples = ShardSamples(out, manifest, "train")
    with pytest.raises(BadShard) as error:
        samples[0]
    assert str(error.value) == (
        f"{out / first.name}: {first.bytes // 2:,} bytes, the manifest says {first.bytes:,} "
        f"(check the folder: dslm-shard verify {out})"
    )
    assert samples.damage(first.samples) is None  # sizes and counts hold
    full = ShardSamples(out, manifest, "train", verify="full")
    assert full.damage(first.samples).startswith(f"{out / second.name}: sha256 differs from the manifest")
    with pytest.raises(BadShard, match="sha256 differs"):
        full[first.samples]
    train = TrainSamples(DataConfig(shards=str(out), verify="full"), [manifest])
    skipped, intact = train[0, first.samples], train[0, first.samples + second.samples]
    assert skipped["skipped"] == 1 and (skipped["labels"] == IGNORE_INDEX).all()
    assert intact["skipped"] == 0 and torch.equal(
        intact["input_ids"], full[first.samples + second.samples]["input_ids"]
    )
    assert train.damage(0, 3) == str(error.value)


def test_open_shards_stay_within_the_bound(many_shards):
    out, manifest = many_shards
    samples = ShardSamples(out, manifest, "train", max_open_shards=5)
    for index in range(0, 400, 3):
        samples[index]
        assert len(samples._open) <= 5
    samples.close()
    assert not samples._open


READ_UNDER_ULIMIT = """
import resource, sys
from itertools import islice
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
from dslm.data.loader import DataConfig, TrainSamples, out_of_files, train_loader, train_order
from dslm.data.manifest import Manifest
cfg = DataConfig(shards=sys.argv[1], num_workers=2, max_open_shards=int(sys.argv[2]))
manifest = Manifest.load(sys.argv[1])
loader = train_loader(cfg, TrainSamples(cfg, [manifest]), train_order(cfg, [manifest], 0), 0, 1, 16)
try:
    print(sum(len(batch["input_ids"]) for batch in islice(loader, 200)))
except Exception as e:
    sys.exit(out_of_files(e) or repr(e))
"""


@pytest.mark.parametrize("max_open_shards, ok", [(64, True), (5000, False)])
def test_reading_thousands_of_shards_under_ulimit_256_needs_the_bound(many_shards, max_open_shards, ok):
    out, manifest = many_shards
    assert len(manifest.split("train")) > 3200  # each of 200 batches of 16 from its own shards
    proc = subprocess.run(
        [sys.executable, "-c", READ_UNDER_ULIMIT, out, str(max_open_shards)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    if ok:
        assert proc.returncode == 0 and proc.stdout.split() == ["3200"], proc.stderr[-2000:]
    else:  # without it, each worker keeps every shard it touched open: the limit ends the read (in the worker,
        # or as the trainer receives a batch's descriptors: out_of_files knows both)
        assert proc.returncode != 0 and "the data loader ran out of open files" in proc.stderr, proc.stderr[-2000:]


def test_mixed_sources_read_each_sample_once_across_a_resume_on_another_world_size(tiny_shards, many_shards):
    """Two sources at 0.6/0.4: a 2-rank read up to a cursor, then a 1-rank read on, gives what one
    straight 1-rank read gives, each source in its own order."""
    cfg = DataConfig(
        shards=str(tiny_shards[0]),
        mix=[MixSource(str(tiny_shards[0]), 0.6, "code"), MixSource(str(many_shards[0]), 0.4, "many")],
        num_workers=0,
    )
    manifests = [tiny_shards[1], many_shards[1]]
    samples = TrainSamples(cfg, manifests)

    def read(world_size, micro_batch, start, steps):
        rows = []
        for step in range(steps):
            for rank in range(world_size):
                sampler = GlobalOrderSampler(
                    train_order(cfg, manifests, seed=4),
                    rank,
                    world_size,
                    micro_batch,
                    start + step * micro_batch * world_size,
                )
                rows += islice(iter(sampler), micro_batch)
        return rows

    straight = read(1, 8, 0, 100)
    assert read(2, 4, 0, 40) + read(1, 8, 320, 60) == straight
    sources = [source for source, _ in straight]
    assert sources.count(0) == 480 and sources.count(1) == 320
    for source, index in straight[:8]:
        sample = samples[source, index]
        assert (sample["source"], sample["index"]) == (source, index)
        assert torch.equal(sample["input_ids"], samples.sources[source][index]["input_ids"])


def test_mix_settings_are_checked_and_one_open_shard_budget_is_shared(tiny_shards, other_shards):
    code, other = str(tiny_shards[0]), str(other_shards[0])
    with pytest.raises(ValueError, match="lists a folder twice"):
        DataConfig(mix=[MixSource(code, 1, "a"), MixSource(code + "/", 1, "b")])
    with pytest.raises(ValueError, match="must be above 0 and finite"):
        MixSource(code, float("inf"))
    with pytest.raises(ValueError, match="is not one of data.mix's folders"):
        DataConfig(shards=other + "x", mix=[MixSource(code), MixSource(other)])
    assert DataConfig(shards=other + "/", mix=[MixSource(code), MixSource(other)]).shards_source() == 1
    shards = len(tiny_shards[1].split("train"))
    cfg = DataConfig(mix=[MixSource(code), MixSource(other)], max_open_shards=2 * shards, shuffle_window=100)
    samples = TrainSamples(cfg, [tiny_shards[1], other_shards[1]])  # a window larger than a source is all its shards
    assert [s.max_open_shards for s in samples.sources] == [shards, shards]
    with pytest.raises(DslmError, match=rf"leaves {shards - 1} open shards to each of 2 sources"):
        TrainSamples(dataclasses.replace(cfg, max_open_shards=2 * shards - 1), [tiny_shards[1], other_shards[1]])


RAISE_FILE_LIMIT = """
import resource, sys
from dslm.data.loader import DataConfig, ensure_file_limit, open_files
resource.setrlimit(resource.RLIMIT_NOFILE, (100, 400))
cfg = DataConfig(max_open_shards=int(sys.argv[1]), num_workers=int(sys.argv[2]))
open_now = open_files()
ensure_file_limit(cfg, held_batches=int(sys.argv[3]))
print(open_now, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def test_the_open_file_limit_covers_the_shards_and_the_batches_in_flight_or_names_what_to_lower():
    def run(max_open_shards, workers=1, held=2):
        return subprocess.run(
            [sys.executable, "-c", RAISE_FILE_LIMIT, str(max_open_shards), str(workers), str(held)],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=REPO,
        )

    open_now, soft = map(int, run(4).stdout.split())
    assert soft == 100  # 4 shards and 2 batches of 6 tensors: left as it is
    open_now, soft = map(int, run(100).stdout.split())
    assert soft >= open_now + 2 * 100 + 2 * 12  # a worker's shards, its prefetched batches, what it inherits
    _, soft = map(int, run(4, workers=2, held=20).stdout.split())
    assert soft >= (20 + 2 * 2) * 6 and soft > 100  # the trainer holds each batch's tensors (grad_accum 19)
    refused = run(200)
    assert refused.returncode != 0 and "the data loader needs about" in refused.stderr
    assert "but the limit is 400 (ulimit -n): lower data.max_open_shards to" in refused.stderr


WORKER_AND_SIGTERM = """
import sys
from torch.utils.data import DataLoader
from dslm.data.loader import init_worker
from dslm.stop import kill_workers_at_exit
kill_workers_at_exit()
held = {}
held["cycle"] = held  # a reference cycle keeps the iterator alive until exit, as a trainer's objects may
held["batches"] = iter(DataLoader(list(range(100)), batch_size=2, num_workers=1, persistent_workers=True,
                                  worker_init_fn=init_worker))
print(next(held["batches"]).tolist(), flush=True)
sys.stdin.readline()  # the test signals the worker meanwhile
print(next(held["batches"]).tolist(), flush=True)
"""


def test_a_loader_worker_outlives_a_sigterm_to_it_and_ends_with_its_trainer():
    """Issue 27: SIGTERM to every process of a job killed the workers first, and the trainer with
    them; ignoring it, a worker must still end when the trainer exits (multiprocessing ends daemonic
    children with SIGTERM and then waits for them)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER_AND_SIGTERM],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stdout.readline().strip() == "[0, 1]"
    [worker] = psutil.Process(proc.pid).children()
    worker.send_signal(signal.SIGTERM)
    proc.stdin.write("\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=900)  # a safety net: without the exit handler the trainer never ends
    assert proc.returncode == 0 and out.strip() == "[2, 3]", err[-2000:]
    assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE
