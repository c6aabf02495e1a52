"""dslm's training path against a plain-PyTorch loop of the same model: tokens/s, step time,
MFU, peak GPU memory, and the ratio dslm / baseline.

    python bench/train_throughput.py [--preset gpt-12l-1024d] [--micro-batch-sizes 8,16,32]
        [--zero-stages 0,1,2] [--shards DIR] [--json OUT] [key=value ...]

Both sides run in this one process on the same device, from the same initial weights
(`dslm.model.GPT`, seeded alike) and the same batches:
  dslm      the real path: `init_distributed` (a world of one), `load_ds_config` on
            ds_configs/zeroN.json (bf16 weights, gradient clipping), `build_engine` (DeepSpeed,
            AdamW, lr schedule, `engine.compile()` with --compile), `train_loader` reading the
            shards in its worker process, and `dslm.trainer.train_step`;
  baseline  a minimal loop: the same batches read ahead into (pinned) memory, bf16 autocast
            over fp32 weights, `torch.optim.AdamW` (fused on a GPU, foreach on a CPU) with the
            same parameter groups and schedule, the same gradient clipping, `torch.compile`
            with --compile.
The model's attention is SDPA on both sides.

For each micro-batch size, the baseline and dslm at each ZeRO stage are set up one after the
other and warmed up (compilation included, untimed); then each takes --windows timed windows of
--steps optimizer steps, in turns, the order rotating each round, so that drift (clocks, other
load on the machine) hits every side alike. The device is synchronised only at window ends.
tokens/s is the median over a side's windows; the ratio is dslm's over the baseline's. MFU counts
6N + 12·L·H·Q·T FLOPs per token (`dslm.mfu`) against the GPU's dense bf16 peak (none on a CPU).
One more untimed step after the warm-up runs under torch.profiler, which counts what a step
dispatches (`OpCensus`): ATen ops, host syncs and, on a GPU, kernels and copies.
Peak memory is the most a side allocated during its set-up and warm-up beyond what the sides set
up before it hold. All sides of one micro-batch size are held at once: 1 + (number of stages)
copies of the model's weights and optimizer states.

Everything runs in this one process, DeepSpeed engines included: one world of one rank, set up
once; the engines of a micro-batch size are destroyed and torch.compile's caches reset before
the next.

Without --shards, shards are built once from a few packages of the interpreter's standard
library with the project's own tokenizer and shard builder, at the preset's context and vocab,
and kept in --cache for the next run.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import statistics
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from itertools import cycle, islice
from pathlib import Path
from typing import Callable

import deepspeed
import psutil
import torch
from deepspeed.utils import logger as deepspeed_logger
from provenance import git_commit  # bench/provenance.py, beside this script
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader

from dslm.cli import run_command
from dslm.config import RunConfig, check_against_manifest, load_config
from dslm.data.loader import Batch, DataConfig, DeviceBatches, TrainSamples, to_device, train_loader, train_order
from dslm.data.manifest import MANIFEST_NAME, Manifest
from dslm.engine import build_engine, init_distributed, load_ds_config
from dslm.errors import DslmError
from dslm.mfu import device_peak_flops, flops_per_token
from dslm.model import GPT, PRESETS
from dslm.objective import next_token
from dslm.optim import lr_factor, param_groups
from dslm.trainer import train_step
from dslm_shards.build import TOKENIZER_NAME, ShardConfig, build_shards, train_and_save_tokenizer
from dslm_shards.sources import CodeSource

REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS_PACKAGES = ("asyncio", "email", "http", "json", "logging")
"""Real Python, ~1.5 MB (~0.36 M tokens at vocab 2048): throughput does not depend on what the
tokens say, the loader cycles through the samples, and the shards build in seconds."""
OWNED_KEYS = (
    "model.preset",
    "data.shards",
    "train.micro_batch_size",
    "train.grad_accum",
    "train.compile",
    "train.max_steps",
    "train.warmup_steps",
)
"""Config keys the flags set; a key=value override may not set them too."""
ON_GPU = torch.cuda.is_available()


@dataclass
class BenchSettings:
    """What the benchmark measures; the fields are its command-line options (parse_args, whose
    defaults depend on whether there is a GPU). Raises DslmError for a value out of its range."""

    preset: str
    """Model size, a name in dslm.model.PRESETS (--preset)."""
    micro_batch_sizes: tuple[int, ...]
    """Micro-batch sizes to sweep, in sequences per forward pass (train.micro_batch_size), each >= 1,
    at least one (--micro-batch-sizes); every side is measured at each."""
    zero_stages: tuple[int, ...]
    """ZeRO stages of the dslm side to sweep, each 0, 1 or 2, at least one (--zero-stages); stage N
    needs `ds_configs`/zeroN.json. The baseline clips gradients as the first stage's config says."""
    grad_accum: int
    """Micro-batches per optimizer step, on both sides, >= 1 (--grad-accum)."""
    warmup: int
    """Untimed optimizer steps per side before the windows, >= 1 (--warmup; torch.compile compiles
    here); also the lr schedule's train.warmup_steps."""
    windows: int
    """Timed windows per side, >= 1 (--windows), taken in turns with the other sides; a side's
    tokens/s is the median over its windows."""
    steps: int
    """Optimizer steps per timed window, >= 1 (--steps). Each side runs warmup + 1 + windows x steps
    steps in all (train.max_steps)."""
    compile: bool
    """torch.compile on both sides (--compile; dslm: train.compile=true)."""
    shards: Path | None
    """An existing `dslm-shard build` folder (--shards), whose vocab and seq_len must fit the model;
    None builds (or reuses) stdlib shards in `cache`."""
    cache: Path
    """Folder where the stdlib shards are built and kept, one subfolder per vocab size and seq_len
    (--cache); used only when `shards` is None."""
    ds_configs: Path = REPO / "ds_configs"
    """Folder holding zeroN.json (--ds-configs): another one tries DeepSpeed settings without
    touching ds_configs/."""
    overrides: tuple[str, ...] = ()
    """Dotted dslm config overrides (key=value) for both sides, e.g. model.vocab_multiple=128; a key
    the options set (OWNED_KEYS) is refused."""
    json_out: Path | None = None
    """File to write the results to as JSON as well (--json); None: the printed table only."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise DslmError(f"--preset {self.preset!r} is not one of {', '.join(PRESETS)}")
        if not self.micro_batch_sizes or min(self.micro_batch_sizes) < 1:
            raise DslmError("--micro-batch-sizes must list positive integers")
        bad = [str(s) for s in self.zero_stages if s not in (0, 1, 2)]
        if bad or not self.zero_stages:
            raise DslmError(f"--zero-stages must list stages among 0, 1, 2 (got {', '.join(bad) or 'none'})")
        missing = [str(self.ds_config(s)) for s in self.zero_stages if not self.ds_config(s).is_file()]
        if missing:
            raise DslmError(f"no DeepSpeed config {', '.join(missing)}")
        # at least one warm-up step: the first one compiles, starts the loader and grows the allocator
        if min(self.grad_accum, self.warmup, self.windows, self.steps) < 1:
            raise DslmError("--grad-accum, --warmup, --windows and --steps must be at least 1")
        for override in self.overrides:
            if "=" not in override or override.split("=", 1)[0] in OWNED_KEYS:
                raise DslmError(
                    f"override {override!r} must be key=value with a key the flags do not set ({', '.join(OWNED_KEYS)})"
                )

    @property
    def total_steps(self) -> int:
        """Warm-up, the step `op_census` counts, and the windows."""
        return self.warmup + 1 + self.windows * self.steps

    def ds_config(self, zero_stage: int) -> Path:
        return self.ds_configs / f"zero{zero_stage}.json"


GPU_DEFAULTS = dict(preset="gpt-12l-1024d", micro_batch_sizes="8,16,32", warmup=10, windows=5, steps=20)
CPU_DEFAULTS = dict(preset="tiny", micro_batch_sizes="4,8", warmup=2, windows=5, steps=4)
"""On 2 idle CPU cores the whole default run takes about a minute."""


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def parse_args(argv: list[str] | None = None) -> BenchSettings:
    p = argparse.ArgumentParser(
        prog="train_throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Defaults are for this machine, which has {'a' if ON_GPU else 'no'} GPU.",
    )
    add_sweep_args(p)
    p.add_argument(
        "--ds-configs",
        type=Path,
        metavar="DIR",
        default=REPO / "ds_configs",
        help="folder of the DeepSpeed configs zero0/1/2.json (default: the repository's ds_configs/)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=ON_GPU,
        help="torch.compile on both sides (default: on with a GPU, off without)",
    )
    p.add_argument(
        "--shards",
        type=Path,
        metavar="DIR",
        help="an existing `dslm-shard build` folder "
        "(default: build stdlib shards for the preset into --cache, or reuse them)",
    )
    p.add_argument(
        "--cache",
        type=Path,
        metavar="DIR",
        default=Path(tempfile.gettempdir()) / "dslm-bench",
        help="where built shards are kept (default: %(default)s)",
    )
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dslm config overrides for both sides, e.g. model.vocab_multiple=128 data.num_workers=2",
    )
    args = p.parse_args(argv)
    return BenchSettings(
        preset=args.preset,
        micro_batch_sizes=args.micro_batch_sizes,
        zero_stages=args.zero_stages,
        grad_accum=args.grad_accum,
        warmup=args.warmup,
        windows=args.windows,
        steps=args.steps,
        compile=args.compile,
        shards=args.shards,
        cache=args.cache,
        ds_configs=args.ds_configs,
        overrides=tuple(args.overrides),
        json_out=args.json,
    )


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    """What is swept and how long each point is timed; the defaults are this machine's."""
    defaults = GPU_DEFAULTS if ON_GPU else CPU_DEFAULTS
    p.add_argument(
        "--preset", default=defaults["preset"], choices=sorted(PRESETS), help="model size (default: %(default)s)"
    )
    p.add_argument(
        "--micro-batch-sizes",
        type=int_list,
        default=defaults["micro_batch_sizes"],
        metavar="B,B,...",
        help="micro-batch sizes to sweep (default: %(default)s)",
    )
    p.add_argument(
        "--zero-stages",
        type=int_list,
        default="0,1,2",
        metavar="S,S,...",
        help="ZeRO stages to sweep, --ds-configs/zeroS.json each (default: %(default)s)",
    )
    p.add_argument(
        "--grad-accum", type=int, default=1, metavar="N", help="micro-batches per optimizer step (default: %(default)s)"
    )
    p.add_argument(
        "--warmup", type=int, default=defaults["warmup"], metavar="N", help="untimed steps first (default: %(default)s)"
    )
    p.add_argument(
        "--windows", type=int, default=defaults["windows"], metavar="N", help="timed windows (default: %(default)s)"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=defaults["steps"],
        metavar="N",
        help="optimizer steps per window (default: %(default)s)",
    )


def run_config(settings: BenchSettings, shards: Path | None, micro_batch_size: int) -> RunConfig:
    """The dslm config both sides use: defaults < preset < overrides < what the flags set."""
    owned = {
        "model.preset": settings.preset,
        "train.micro_batch_size": micro_batch_size,
        "train.grad_accum": settings.grad_accum,
        "train.compile": settings.compile,
        "train.max_steps": settings.total_steps,
        "train.warmup_steps": settings.warmup,
    }
    if shards:
        owned["data.shards"] = shards
    return load_config(None, [*settings.overrides, *(f"{k}={v}" for k, v in owned.items())])


def stdlib_shards(cache: Path, vocab_size: int, seq_len: int) -> Path:
    """Shards of CORPUS_PACKAGES with a tokenizer of `vocab_size`, built once per (vocab, seq_len);
    an interrupted build resumes."""
    out = cache / f"stdlib-vocab{vocab_size}-seq{seq_len}"
    if (out / MANIFEST_NAME).is_file():  # the manifest is written last: the build is complete
        return out
    out.mkdir(parents=True, exist_ok=True)
    sources = [CodeSource(spec=f"code:{STDLIB / p}", root=STDLIB / p) for p in CORPUS_PACKAGES]
    if not (out / TOKENIZER_NAME).is_file():
        train_and_save_tokenizer(sources, vocab_size, sample_bytes=10**9, out=out / TOKENIZER_NAME)
    build_shards(ShardConfig(out=out, tokenizer=out / TOKENIZER_NAME, seq_len=seq_len, val_fraction=0.0), sources)
    return out


def bench_shards(settings: BenchSettings) -> tuple[Path, Manifest]:
    """--shards, checked against the model, or stdlib shards at the preset's vocab and context."""
    model = run_config(settings, None, 1).model
    folder = settings.shards or stdlib_shards(settings.cache, model.vocab_size, model.block_size)
    manifest = Manifest.load(folder)
    check_against_manifest(run_config(settings, folder, 1), manifest)
    return folder, manifest


@dataclass
class OpCensus:
    """What one optimizer step dispatches, counted by torch.profiler: the framework's overhead in
    terms that do not depend on the device's speed."""

    ops: int
    """ATen ops not called by another ATen op: each is a dispatch from Python-level code, and most
    launch a kernel on a GPU."""
    host_syncs: int
    """Device values read on the host (`aten::_local_scalar_dense`: .item(), bool(), float()); each
    waits for the device to catch up. (On a CPU, torch's non-fused AdamW reads each parameter's step
    count this way: two per parameter in the baseline, free there.)"""
    gpu_events: int | None
    """Kernels and copies run on the GPU; None on a CPU."""


def is_aten(event) -> bool:
    return event is not None and event.name.startswith("aten::")


def op_census(step: Callable[[], torch.Tensor]) -> OpCensus:
    """Run one step under the profiler and count what it dispatched."""
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if ON_GPU else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        step()
        synchronize()
    events = prof.events()
    return OpCensus(
        ops=sum(is_aten(e) and not is_aten(e.cpu_parent) for e in events),
        host_syncs=sum(e.name == "aten::_local_scalar_dense" for e in events),
        gpu_events=sum(e.device_type == DeviceType.CUDA for e in events) if ON_GPU else None,
    )


@dataclass
class Side:
    """One side of the comparison at one micro-batch size, ready for timed windows."""

    name: str
    """"baseline" or "dslm"."""
    zero_stage: int | None
    step: Callable[[], torch.Tensor]
    """One optimizer step; returns its mean loss, still on the device."""
    close: Callable[[], None]
    peak_memory: int | None = None
    census: OpCensus | None = None
    window_seconds: list[float] = field(default_factory=list)
    loss: float | None = None
    """Mean training loss over the last window."""


def seeded_model(cfg: RunConfig) -> GPT:
    torch.manual_seed(cfg.train.seed)  # the same initial weights on both sides
    return GPT(cfg.model)


def dslm_side(cfg: RunConfig, manifest: Manifest, ds_config_file: Path, zero_stage: int) -> Side:
    """The real training path at one ZeRO stage."""
    ds_config = load_ds_config(ds_config_file, cfg.train, world_size=1)
    engine = build_engine(seeded_model(cfg), cfg.train, ds_config)
    batches = DeviceBatches(iter(dslm_loader(cfg.data, cfg, manifest)), engine.device)
    # destroy: DeepSpeed's own teardown (optimizer buffers, hooks, its GC setting)
    return Side(
        "dslm", zero_stage, lambda: train_step(engine, batches, next_token, cfg.train.grad_accum), engine.destroy
    )


def dslm_loader(data: DataConfig, cfg: RunConfig, manifest: Manifest) -> DataLoader:
    """dslm's training loader on one rank from the start, as dslm.train builds it."""
    return train_loader(
        data,
        TrainSamples(data, [manifest]),
        train_order(data, [manifest], cfg.train.seed),
        rank=0,
        world_size=1,
        micro_batch=cfg.train.micro_batch_size,
    )


def read_ahead(cfg: RunConfig, manifest: Manifest, total_steps: int) -> list[torch.Tensor]:
    """The micro-batches dslm's loader yields, in its order, read before the clock starts."""
    loader = dslm_loader(dataclasses.replace(cfg.data, num_workers=0), cfg, manifest)
    batches = list(islice(loader, total_steps * cfg.train.grad_accum))
    return [{name: t.pin_memory() for name, t in b.items()} for b in batches] if ON_GPU else batches


def baseline_side(cfg: RunConfig, batches: list[Batch], clip: float) -> Side:
    """A plain PyTorch loop of the same model, data, optimizer and schedule."""
    device = torch.device("cuda" if ON_GPU else "cpu")
    model = seeded_model(cfg).to(device)
    train = cfg.train
    optimizer = torch.optim.AdamW(
        param_groups(model, train.weight_decay),
        lr=train.lr,
        betas=(train.beta1, train.beta2),
        fused=ON_GPU,
        foreach=not ON_GPU,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, train, train.max_steps))
    forward = torch.compile(model) if train.compile else model
    micro_batches = cycle(batches)

    def step() -> torch.Tensor:
        total = torch.zeros((), device=device)
        for _ in range(train.grad_accum):
            inputs, targets = next_token(to_device(next(micro_batches), device))
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = forward(inputs, targets)
            (loss / train.grad_accum).backward()
            total += loss.detach().float()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        return total / train.grad_accum

    return Side("baseline", None, step, close=lambda: None)


def synchronize() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def free_memory() -> None:
    """Collect unreachable objects now (so the next side's memory is its own) and return cached
    GPU blocks."""
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()


def warmed_up(start: Callable[[], Side], warmup: int) -> Side | None:
    """The side `start` sets up, after its warm-up steps and one more counted by `op_census`,
    with the most it allocated beyond what the sides set up before it hold (they are idle
    meanwhile); None if it does not fit."""
    before = torch.cuda.memory_allocated() if ON_GPU else 0
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    try:
        side = start()
        for _ in range(warmup):
            side.step()
        side.census = op_census(side.step)
    except torch.OutOfMemoryError:
        side = None
    if side is None:
        free_memory()  # here, not in the handler, whose traceback still holds the side's tensors
        return None
    if ON_GPU:
        side.peak_memory = torch.cuda.max_memory_allocated() - before
    return side


def timed_window(side: Side, steps: int) -> None:
    """`steps` optimizer steps, the device synchronised only at the end; the losses stay on the
    device until then, as in dslm's training loop."""
    start = time.perf_counter()
    loss = sum(side.step() for _ in range(steps))
    synchronize()
    side.window_seconds.append(time.perf_counter() - start)
    side.loss = float(loss) / steps


@dataclass
class Measurement:
    """The figures of one side at one micro-batch size (and ZeRO stage for dslm)."""

    side: str
    micro_batch_size: int
    zero_stage: int | None
    tokens_per_step: int
    steps: int
    """Optimizer steps per window."""
    window_seconds: list[float]
    """Wall time of each timed window; empty when the side ran out of memory."""
    loss: float | None
    """Mean training loss over the last window: the sides should agree (same weights, same data)."""
    peak_memory: int | None
    """Bytes allocated at most during set-up and warm-up (see `warmed_up`); None on a CPU."""
    census: OpCensus | None

    @property
    def window_rates(self) -> list[float]:
        """Tokens/s of each window."""
        return [self.tokens_per_step * self.steps / s for s in self.window_seconds]


def rotated(items: list, by: int) -> list:
    """`items` starting at position `by`, wrapping around."""
    by = by % len(items) if items else 0
    return items[by:] + items[:by]


def compare(cfg: RunConfig, manifest: Manifest, settings: BenchSettings, clip: float) -> list[Measurement]:
    """The baseline and dslm at each stage at one micro-batch size, their timed windows taken in
    turns (the order rotating each round)."""
    batches = read_ahead(cfg, manifest, settings.total_steps)
    starts = [("baseline", None, lambda: baseline_side(cfg, batches, clip))]
    starts += [
        ("dslm", stage, lambda stage=stage: dslm_side(cfg, manifest, settings.ds_config(stage), stage))
        for stage in settings.zero_stages
    ]
    sides = {(name, stage): warmed_up(start, settings.warmup) for name, stage, start in starts}
    running = [side for side in sides.values() if side is not None]
    for window in range(settings.windows):
        for side in rotated(running, window):
            timed_window(side, settings.steps)
    for side in running:
        side.close()
    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum * manifest.seq_len
    results = [
        Measurement(
            name,
            cfg.train.micro_batch_size,
            stage,
            tokens,
            settings.steps,
            side.window_seconds if side else [],
            side.loss if side else None,
            side.peak_memory if side else None,
            side.census if side else None,
        )
        for (name, stage), side in sides.items()
    ]
    del sides, running
    free_memory()
    # every side compiled a new model: without a reset, dynamo would count them all against its
    # recompile limit over the sweep and fall back to eager
    torch.compiler.reset()
    return results


def sweep(settings: BenchSettings, shards: Path, manifest: Manifest) -> list[Measurement]:
    # the baseline clips as the (first) DeepSpeed config says
    train = run_config(settings, shards, 1).train
    ds_config = load_ds_config(settings.ds_config(settings.zero_stages[0]), train, world_size=1)
    clip = ds_config.get("gradient_clipping", 0.0)
    results = []
    for mb in settings.micro_batch_sizes:
        results += (done := compare(run_config(settings, shards, mb), manifest, settings, clip))
        print_progress(done)
    return results


def print_progress(results: list[Measurement]) -> None:
    for m in results:
        rate = f"{statistics.median(m.window_rates):,.0f} tokens/s" if m.window_seconds else "out of memory"
        stage = "" if m.zero_stage is None else f" ZeRO-{m.zero_stage}"
        print(f"  micro-batch {m.micro_batch_size} {m.side}{stage}: {rate}", flush=True)


@dataclass
class Row:
    """A line of the results table."""

    side: str
    micro_batch_size: int
    zero_stage: int | None
    tokens_per_s: float | None = None
    """Median over the windows; None when the side ran out of memory."""
    slowest: float | None = None
    fastest: float | None = None
    step_ms: float | None = None
    mfu: float | None = None
    peak_memory: int | None = None
    loss: float | None = None
    census: OpCensus | None = None
    ratio: float | None = None
    """dslm tokens/s over the baseline's, at the same micro-batch size."""


def row(m: Measurement, mfu_per_token: float | None) -> Row:
    if not m.window_seconds:
        return Row(m.side, m.micro_batch_size, m.zero_stage)
    rates = m.window_rates
    median = statistics.median(rates)
    return Row(
        m.side,
        m.micro_batch_size,
        m.zero_stage,
        tokens_per_s=median,
        slowest=min(rates),
        fastest=max(rates),
        step_ms=1000 * m.tokens_per_step / median,
        mfu=median * mfu_per_token if mfu_per_token else None,
        peak_memory=m.peak_memory,
        loss=m.loss,
        census=m.census,
    )


def rows(results: list[Measurement], mfu_per_token: float | None) -> list[Row]:
    """Each measurement as a row; dslm's with its ratio to the baseline at the same micro-batch size."""
    table = [row(m, mfu_per_token) for m in results]
    baselines = {r.micro_batch_size: r.tokens_per_s for r in table if r.side == "baseline"}
    for r in table:
        if r.side == "dslm" and r.tokens_per_s and baselines[r.micro_batch_size]:
            r.ratio = r.tokens_per_s / baselines[r.micro_batch_size]
    return table


def device_name() -> str:
    if ON_GPU:
        return torch.cuda.get_device_name()
    return f"CPU, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB (no GPU)"


def describe(settings: BenchSettings, params: int, seq_len: int, shards: Path) -> dict[str, str]:
    return {
        "date": date.today().isoformat(),
        "commit": git_commit("dslm", "ds_configs"),
        "device": device_name(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "model": f"{settings.preset} ({params:,} params)",
        "seq_len": str(seq_len),
        "grad_accum": str(settings.grad_accum),
        "compile": "on" if settings.compile else "off",
        "timing": f"{settings.windows} windows x {settings.steps} steps after {settings.warmup} warm-up steps",
        "overrides": " ".join(settings.overrides) or "none",
        "ds_configs": str(settings.ds_configs),
        "shards": str(shards),
    }


def fmt(value: float | None, spec: str, scale: float = 1.0, unit: str = "") -> str:
    return "n/a" if value is None else format(value * scale, spec) + unit


def markdown(meta: dict[str, str], table: list[Row]) -> str:
    own_configs = meta["ds_configs"] == str(REPO / "ds_configs")
    ds_configs = "" if own_configs else f", DeepSpeed configs from {meta['ds_configs']}"
    lines = [
        f"`bench/train_throughput.py` on {meta['device']}, {meta['date']}, commit {meta['commit']}, "
        f"torch {meta['torch']}, deepspeed {meta['deepspeed']}: {meta['model']}, seq_len {meta['seq_len']}, "
        f"grad_accum {meta['grad_accum']}, compile {meta['compile']}, {meta['timing']}, "
        f"overrides: {meta['overrides']}{ds_configs}; 1-minute load average {meta['load']}.",
        "",
        "| date | commit | device | micro-batch | side | tokens/s (median) | windows (min-max) | step ms | MFU "
        "| peak GPU memory | loss | ops / host syncs / GPU events per step | dslm / baseline |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        side = "PyTorch baseline" if r.side == "baseline" else f"dslm ZeRO-{r.zero_stage}"
        rate = "out of memory" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}"
        spread = "" if r.slowest is None else f"{r.slowest:,.0f}-{r.fastest:,.0f}"
        ratio = f"**{r.ratio:.3f}**" if r.ratio else ""
        census = (
            "" if r.census is None else f"{r.census.ops:,} / {r.census.host_syncs:,} / {fmt(r.census.gpu_events, ',')}"
        )
        lines.append(
            f"| {meta['date']} | {meta['commit']} | {meta['device']} | {r.micro_batch_size} | {side} | "
            f"{rate} | {spread} | {fmt(r.step_ms, '.1f')} | {fmt(r.mfu, '.1%')} | "
            f"{fmt(r.peak_memory, '.2f', 2**-30, ' GiB')} | {fmt(r.loss, '.3f')} | {census} | {ratio} |"
        )
    return "\n".join(lines)


def bench(settings: BenchSettings) -> None:
    deepspeed_logger.setLevel(logging.WARNING)  # not its config and every engine's set-up at INFO
    env = init_distributed()  # started without a launcher, it sets up a world of one itself
    if env.world_size != 1:
        raise DslmError(f"run this benchmark as one process, not under a launcher of {env.world_size}")
    shards, manifest = bench_shards(settings)
    model = GPT(run_config(settings, shards, 1).model)
    peak = device_peak_flops()
    mfu_per_token = flops_per_token(model, manifest.seq_len) / peak if peak else None
    meta = describe(settings, model.num_params(), manifest.seq_len, shards)
    del model  # its fp32 weights would stay on the host through the sweep
    print(f"{meta['model']} at seq_len {manifest.seq_len} on {meta['device']}", flush=True)
    load = os.getloadavg()[0]
    results = sweep(settings, shards, manifest)
    # other work on the machine skews the figures (on a CPU above all): say how much there was
    meta["load"] = f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    table = rows(results, mfu_per_token)
    print(f"\n{markdown(meta, table)}")
    if settings.json_out:
        report = {
            "meta": meta,
            "rows": [dataclasses.asdict(r) for r in table],
            "runs": [dataclasses.asdict(m) for m in results],
        }
        settings.json_out.write_text(json.dumps(report, indent=2) + "\n")
    torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    run_command("train_throughput", lambda: bench(parse_args(argv)))


if __name__ == "__main__":
    main()
