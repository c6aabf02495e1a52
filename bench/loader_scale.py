"""The training order at scale: memory and time of dslm.data.order.WindowOrder (the two-level
shuffle) against the full permutation it replaced, and how well each one shuffles, side by side
in one run on a synthetic split.

    python bench/loader_scale.py [--samples 100000000] [--shards 100000] [--windows 16,256]
                                 [--micro-batch 8] [--positions 1000000] [--json OUT]

No shard is read: an order needs only the shards' sample counts (--samples spread over --shards
shards, 1,000 each by default). The sides:
- "before": the order of the loader until issue 17: epoch e reads position p at
  `np.random.default_rng([seed, e]).permutation(N)[p % N]`, one array of N int64 per epoch, the
  old one still held while the next is drawn (as its GlobalOrderSampler did); read here by slices,
  which is faster than its per-position Python loop;
- "window W": `WindowOrder(sizes, seed, W, key=[0])` for each W in --windows (16 is the default
  data.shuffle_window), as dslm.data.loader.train_order builds it for a single source.

Each side runs in a fresh process of its own (Python, numpy and the order: nothing else imported;
numpy's first-call costs paid before anything is measured), which in turn measures:
- first index: the order built and the sample index at position 0 (any other start, e.g. a
  resume mid-epoch, costs the same: one epoch's tables and one window);
- positions 0 .. --positions - 1 read in calls of --micro-batch (what a rank's GlobalOrderSampler
  asks per micro-step), then again in calls of 4,096; for the window sides also through
  `MixedOrder.draw` (one source, calls of --micro-batch), what the loader's sampler calls; each
  reported as seconds per 1M positions;
- epoch boundary: the sample index at position N (the first of epoch 1), right after the above;
- peak RSS (MiB): `getrusage(RUSAGE_SELF).ru_maxrss` after all of that, minus its value right
  after the imports ("delta"), and as is ("absolute"); "at first index" is the delta right after
  the first index.
Then, after the peak was read, shuffle quality over the same positions (checked to be distinct
sample indices): the fraction of consecutive positions whose samples come from the same shard, and
the distinct shards among each run of 1,000 consecutive positions (mean and largest).

The issue's goal: under 50 MB and under 1 s to the first index at 100M samples in 100k shards.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
SEED = 1234
POSITIONS = 1_000_000
LARGE_CALL = 4096
RUN = 1000
"""Consecutive positions over which distinct shards are counted."""
GOAL_MB, GOAL_S = 50, 1.0
"""The issue's goal (MB = 10**6 bytes; RSS is reported in MiB)."""


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def shard_sizes(samples: int, shards: int) -> np.ndarray:
    sizes = np.full(shards, samples // shards, dtype=np.int64)
    sizes[: samples % shards] += 1
    return sizes


# ------------------------------------------------------------------ the measured process


class FullPermutation:
    """The order before issue 17: a permutation of all N samples per epoch."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed = num_samples, seed
        self.epoch, self.order = -1, np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return self.num_samples

    def indices(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            epoch, local = divmod(start + done, self.num_samples)
            if epoch != self.epoch:  # drawn while the old one is still held, as the old sampler did
                self.epoch, self.order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            n = min(count - done, self.num_samples - local)
            out[done : done + n] = self.order[local : local + n]
            done += n
        return out


def read_positions(read, count: int, call: int) -> float:
    """Seconds to read positions 0 .. count - 1 with `read(start, n)` in calls of `call`."""
    start = time.perf_counter()
    for position in range(0, count, call):
        read(position, min(call, count - position))
    return time.perf_counter() - start


def quality(indices: np.ndarray, sizes: np.ndarray) -> dict:
    starts = np.concatenate([[0], np.cumsum(sizes)])
    shards = np.searchsorted(starts, indices, side="right") - 1
    runs = np.sort(shards[: len(shards) // RUN * RUN].reshape(-1, RUN), axis=1)
    distinct = 1 + (np.diff(runs, axis=1) != 0).sum(axis=1)
    return {
        "same_shard_fraction": float((shards[1:] == shards[:-1]).mean()),
        "shards_per_1000_mean": float(distinct.mean()),
        "shards_per_1000_max": int(distinct.max()),
    }


def worker(side: str, samples: int, shards: int, micro_batch: int, positions: int) -> dict:
    from dslm.data.mix import Interleave, MixedOrder
    from dslm.data.order import WindowOrder

    sizes = shard_sizes(samples, shards)
    np.random.default_rng([0, 0]).permutation(10)  # numpy's first-call costs, the same for every side
    baseline_mib = max_rss_mib()
    start = time.perf_counter()
    if side == "before":
        order = FullPermutation(samples, SEED)
    else:
        order = WindowOrder(sizes, SEED, int(side.split()[1]), key=[0])
    first = order.indices(0, 1)
    result = {"first_index_s": time.perf_counter() - start}
    result["rss_delta_first_mib"] = max_rss_mib() - baseline_mib
    result["per_1m_small_s"] = read_positions(order.indices, positions, micro_batch) * POSITIONS / positions
    result["per_1m_large_s"] = read_positions(order.indices, positions, LARGE_CALL) * POSITIONS / positions
    if side != "before":
        mixed = MixedOrder([order], Interleave([1.0]))
        result["per_1m_draw_s"] = read_positions(mixed.draw, positions, micro_batch) * POSITIONS / positions
    start = time.perf_counter()
    order.indices(samples, 1)
    result["epoch_boundary_s"] = time.perf_counter() - start
    peak_mib = max_rss_mib()
    result |= {"rss_baseline_mib": baseline_mib, "rss_peak_mib": peak_mib, "rss_delta_mib": peak_mib - baseline_mib}

    read = order.indices(0, positions)
    assert read[0] == first[0] and len(np.unique(read)) == positions, "positions of one epoch repeat a sample"
    return result | quality(read, sizes)


def run_worker(side: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        str(HERE),
        "--worker",
        side,
        "--samples",
        str(args.samples),
        "--shards",
        str(args.shards),
        "--micro-batch",
        str(args.micro_batch),
        "--positions",
        str(args.positions),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"loader_scale: {side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ the parent


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers >= 0")
    return values


def device_line() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.machine()
    )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"CPU ({model}, {os.cpu_count()} cores, {memory:.0f} GiB)"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(args: argparse.Namespace, results: dict[str, dict], commit: str) -> None:
    before = results["before"]
    print(
        f"loader_scale: {args.samples:,} samples in {args.shards:,} shards; {args.positions:,} positions read "
        f"in calls of {args.micro_batch} and of {LARGE_CALL} (times per 1M); {device_line()}, load average "
        f"{os.getloadavg()[0]:.1f}; {datetime.date.today()}; commit {commit}"
    )
    print(
        "| order | peak RSS delta (MiB) | at first index | absolute | first index (s) | vs before | "
        f"s per 1M positions, calls of {args.micro_batch} | calls of {LARGE_CALL} | via MixedOrder.draw | "
        "epoch boundary (s) | same shard as previous | shards per 1,000 (mean / max) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for side, r in results.items():
        ratio = None if side == "before" else r["first_index_s"] / before["first_index_s"]
        print(
            f"| {side} | {r['rss_delta_mib']:,.1f} | {r['rss_delta_first_mib']:,.1f} | {r['rss_peak_mib']:,.1f} | "
            f"{r['first_index_s']:.4f} | {fmt(ratio, '.5f')} | "
            f"{r['per_1m_small_s']:.3f} | {r['per_1m_large_s']:.4f} | {fmt(r.get('per_1m_draw_s'), '.3f')} | "
            f"{r['epoch_boundary_s']:.4f} | {r['same_shard_fraction']:.4%} | "
            f"{r['shards_per_1000_mean']:.1f} / {r['shards_per_1000_max']} |"
        )
    for side, r in results.items():
        if side != "before":
            ok = r["rss_delta_mib"] * 2**20 < GOAL_MB * 10**6 and r["first_index_s"] < GOAL_S
            print(
                f"{side}: {'meets' if ok else 'MISSES'} the goal (< {GOAL_MB} MB, < {GOAL_S:g} s to the first "
                f"index): {r['rss_delta_mib']:.1f} MiB over the imports ({r['rss_peak_mib']:.1f} MiB in all), "
                f"{r['first_index_s'] * 1000:.1f} ms; before: {before['rss_delta_mib']:,.0f} MiB, "
                f"{before['first_index_s']:.2f} s"
            )
    if args.json:
        figures = {
            "samples": args.samples,
            "shards": args.shards,
            "micro_batch": args.micro_batch,
            "large_call": LARGE_CALL,
            "positions": args.positions,
            "device": device_line(),
            "commit": commit,
            "results": results,
        }
        args.json.write_text(json.dumps(figures, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(
        prog="loader_scale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--samples", type=int, default=100_000_000, help="samples in the split (default: %(default)s)")
    p.add_argument("--shards", type=int, default=100_000, help="shards they are spread over (default: %(default)s)")
    p.add_argument(
        "--windows",
        type=int_list,
        default=[16, 256],
        help="comma-separated shuffle windows, in shards (default: 16,256)",
    )
    p.add_argument("--micro-batch", type=int, default=8, help="positions per call (default: %(default)s)")
    p.add_argument(
        "--positions",
        type=int,
        default=POSITIONS,
        help="positions read from 0 on, timed and for the shuffle quality (default: %(default)s)",
    )
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not 1 <= args.shards <= args.samples:
        p.error(f"--shards {args.shards} must be between 1 and --samples ({args.samples})")
    if args.micro_batch < 1:
        p.error(f"--micro-batch {args.micro_batch} must be at least 1")
    if min(args.windows) < 1:
        p.error(f"--windows {','.join(map(str, args.windows))}: a window holds at least 1 shard")
    if not RUN <= args.positions <= args.samples:
        p.error(f"--positions {args.positions} must be between {RUN} and --samples ({args.samples})")
    if args.worker:
        print(json.dumps(worker(args.worker, args.samples, args.shards, args.micro_batch, args.positions)))
        return
    sys.path.insert(0, str(HERE.parent))
    from provenance import git_commit  # bench/provenance.py, beside this script

    results = {side: run_worker(side, args) for side in ["before", *(f"window {w}" for w in args.windows)]}
    report(args, results, git_commit("dslm/data", "bench/loader_scale.py"))


if __name__ == "__main__":
    main()
