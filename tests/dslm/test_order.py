import numpy as np
import pytest

from dslm.data.mix import Interleave, MixBase, MixedOrder
from dslm.data.order import WindowOrder

SIZES = [37, 50, 50, 12, 50, 50, 49, 1, 50, 50, 50]


def shard_of(order: WindowOrder, indices: np.ndarray) -> np.ndarray:
    return np.searchsorted(order.starts, indices, side="right") - 1


@pytest.mark.parametrize("window", [1, 3, 4, len(SIZES), 100])
def test_each_epoch_reads_every_sample_once_and_the_next_one_differs(window):
    order = WindowOrder(SIZES, seed=5, window=window)
    n = len(order)
    first, second = order.indices(0, n), order.indices(n, n)
    assert sorted(first) == sorted(second) == list(range(n))
    assert not np.array_equal(first, second)


def test_a_position_is_the_same_sample_whatever_is_read_before_it():
    n = sum(SIZES)
    straight = WindowOrder(SIZES, seed=5, window=3).indices(0, 3 * n)
    hopping = WindowOrder(SIZES, seed=5, window=3)
    for start in (2 * n + 7, 5, n - 3, 0, 2 * n - 1):  # across epochs, windows and back
        assert np.array_equal(hopping.indices(start, 40), straight[start : start + 40])
    assert not np.array_equal(WindowOrder(SIZES, seed=6, window=3).indices(0, n), straight[:n])
    assert not np.array_equal(WindowOrder(SIZES, seed=5, window=3, key=[1]).indices(0, n), straight[:n])


def test_a_window_reads_only_its_own_shards_and_mixes_them():
    order = WindowOrder([100] * 64, seed=1, window=8)
    shards = shard_of(order, order.indices(0, len(order)))
    windows = shards.reshape(8, 800)  # equal shards: window w is positions 800w .. 800w + 799
    assert all(len(set(w)) == 8 for w in windows)
    assert len(set(map(frozenset, windows))) == 8 and set().union(*map(set, windows)) == set(range(64))
    # shuffle quality: consecutive samples share a shard about 1/8 of the time, not in runs
    same = np.mean(shards[1:] == shards[:-1])
    assert 0.08 < same < 0.17


def test_memory_does_not_grow_with_the_samples():
    """A billion samples: a permutation of them would need 8 GB; the window order needs the shards' tables."""
    order = WindowOrder([100_000] * 10_000, seed=0, window=16)
    n = len(order)
    assert n == 10**9
    across = order.indices(n - 3, 6)  # the end of epoch 0 and the start of epoch 1
    assert ((0 <= across) & (across < n)).all() and len(set(across)) == 6
    tables = order._epoch[1].nbytes + order._epoch[2].nbytes + order._window[4].nbytes
    assert tables < 20 * 2**20


def test_bad_sizes_and_windows_are_refused():
    with pytest.raises(ValueError, match="positive"):
        WindowOrder([3, 0], seed=0, window=1)
    with pytest.raises(ValueError, match="window=0"):
        WindowOrder([3], seed=0, window=0)


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.3, 0.2], [1, 1, 1, 5], [0.999, 0.001]])
def test_mix_proportions_hold_over_any_thousand_consecutive_samples(weights):
    interleave = Interleave(weights)
    sources, _ = interleave.assign(0, 200_000)
    counts = np.stack([np.convolve(sources == i, np.ones(1000, dtype=int), "valid") for i in range(len(weights))])
    shares = np.asarray(weights) / sum(weights)
    assert np.abs(counts / 1000 - shares[:, None]).max() <= 0.01
    assert np.abs(counts / 1000 - shares[:, None]).max() <= len(weights) / 1000  # the documented bound


def test_mix_cursors_are_a_closed_form_of_the_global_position():
    interleave = Interleave([0.5, 0.3, 0.2])
    sources, cursors = interleave.assign(0, 5000)
    for i in range(3):  # each source's own positions count up from 0, one by one
        assert np.array_equal(cursors[sources == i], np.arange((sources == i).sum()))
    for position in (0, 1, 7, 999, 4321):
        assert interleave.cursors(position) == [int((sources[:position] == i).sum()) for i in range(3)]
    later_sources, later_cursors = interleave.assign(4321, 50)  # any range reads the same as the straight one
    assert np.array_equal(later_sources, sources[4321:4371]) and np.array_equal(later_cursors, cursors[4321:4371])


def test_new_weights_continue_every_cursor_from_the_base():
    old = Interleave([0.7, 0.3])
    base = MixBase(1000, old.cursors(1000))
    assert base.cursors == [700, 300]
    new = Interleave([0.5, 0.5], base)
    sources, cursors = new.assign(1000, 1000)
    assert new.cursors(2000) == [1200, 800]
    for i, start in enumerate(base.cursors):
        assert np.array_equal(cursors[sources == i], start + np.arange(500))


def test_a_mixed_order_reads_each_source_in_its_own_order():
    orders = [WindowOrder([30, 30], seed=2, window=1, key=[0]), WindowOrder([7, 7, 7], seed=2, window=2, key=[1])]
    mixed = MixedOrder(orders, Interleave([0.6, 0.4]))
    sources, indices = mixed.draw(0, 300)
    for i, order in enumerate(orders):
        assert np.array_equal(indices[sources == i], order.indices(0, int((sources == i).sum())))
    again = MixedOrder(orders, Interleave([0.6, 0.4]))
    assert all(np.array_equal(a, b) for a, b in zip(again.draw(123, 40), (sources[123:163], indices[123:163])))
