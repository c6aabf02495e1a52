"""Everything that touches DeepSpeed's setup: distributed init, the DS config, the engine.

deepspeed is imported on first use, inside dslm.logs.libraries() (dslm.ops.deepspeed_module): its import
prints which accelerator it picked, a line for the libraries' log rather than the terminal."""

from __future__ import annotations

import json
import os
import socket
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed.distributed_c10d as c10d
import torch.nn as nn

from dslm.compat import has_method, import_attr, require
from dslm.errors import DslmError, RankFailure
from dslm.logs import libraries
from dslm.ops import build_ops, deepspeed_module
from dslm.optim import build_optimizer
from dslm.shm import release_buffer_name, remove_dead_buffers
from dslm.trainer import TrainConfig
from dslm_local.cli import counted


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT_BASE, PORT_SPAN, PORT_STRIDE = 10000, 20000, 7919
"""rendezvous_port's range, 10000-29999: below Linux's ephemeral ports (32768-60999), which the
kernel hands to outgoing connections at random, so any of them may be taken when a job starts."""


def rendezvous_port(job_id: int, restart: int = 0) -> int:
    """MASTER_PORT for a scheduler's job: from its id, and moved on each restart (a requeued job does
    not wait on a port still held). slurm/rendezvous.sh is the same function in bash."""
    return PORT_BASE + (job_id + restart * PORT_STRIDE) % PORT_SPAN


def launched_ranks() -> tuple[int, int, int]:
    """(world size, ranks on this machine, this process's rank on it) as the launcher (deepspeed,
    torchrun, srun through slurm/pretrain.sh) set them in the environment; a world of one without one."""
    per_node = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1))
    return int(os.environ.get("WORLD_SIZE", 1)), int(per_node), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed(collective_timeout_s: int = 600) -> DistEnv:
    """Join the process group the launcher described (deepspeed, torchrun, srun); alone if none.
    Every collective, in every group (DeepSpeed's and dslm's too), gives up after
    `collective_timeout_s` seconds. A failed rendezvous (MASTER_PORT taken, rank 0 unreachable)
    is a RankFailure. Before, what dead runs left is cleared (dslm.shm, dslm.ops) and the op
    DeepSpeed's init builds is built in this install's folder; after it, the CPU all-reduce's
    buffers leave /dev/shm (they stay mapped until the run's last process ends)."""
    if "RANK" not in os.environ:  # started as a plain process: a world of one
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )
    timeout = set_group_timeout(collective_timeout_s)
    remove_dead_buffers()
    deepspeed = deepspeed_module()
    accel = deepspeed.get_accelerator()
    build_ops(announce=os.environ["RANK"] == "0")
    try:
        with libraries():  # DeepSpeed's communication backend loads, or builds, its op here
            deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), timeout=timeout)
    except torch.distributed.DistError as e:  # DistNetworkError (EADDRINUSE), DistStoreError (no rank 0)
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise RankFailure(
            f"rank {os.environ['RANK']}: the rendezvous at {where} failed: "
            f"{str(e).strip().splitlines()[0]}; running again can help "
            f"(another port: DSLM_MASTER_PORT)"
        ) from e
    _, per_node, local_rank = launched_ranks()
    if accel.device_name() == "cpu":
        torch.distributed.barrier()  # every rank has mapped every rank's all-reduce buffer
        release_buffer_name(torch.distributed.get_rank())
        # share the cores between the ranks on this machine instead of oversubscribing them,
        # unless OMP_NUM_THREADS says how many each rank takes
        threads = os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // per_node)
        torch.set_num_threads(int(threads))
    else:
        accel.set_device(local_rank)
    return DistEnv(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=local_rank,
        device=torch.device(accel.device_name(local_rank)),
    )


def set_group_timeout(seconds: int) -> timedelta:
    """Make `seconds` the timeout of every process group, also those made without one (DeepSpeed's
    clone of the world group, dslm.stop's), which torch gives its own default (30 min on gloo)."""
    timeout = timedelta(seconds=seconds)
    require(
        "torch",
        "torch.distributed.distributed_c10d keeps the default group timeouts in default_pg_timeout "
        "and default_pg_nccl_timeout",
        isinstance(getattr(c10d, "default_pg_timeout", None), timedelta) and hasattr(c10d, "default_pg_nccl_timeout"),
    )
    c10d.default_pg_timeout = timeout
    if c10d.default_pg_nccl_timeout is not None:
        c10d.default_pg_nccl_timeout = timeout
    return timeout


def timed_out_collective(error: BaseException, step: int | None, timeout_s: int) -> RankFailure | None:
    """A RankFailure naming the collective that timed out in `error` (gloo's "Timed out waiting",
    NCCL's watchdog), the dslm function it was in and `step` (None: before training); None when
    `error` is no collective's timeout."""
    if not isinstance(error, RuntimeError) or "timed out" not in str(error).lower():
        return None
    frames = [(f.f_code.co_filename, f.f_code.co_qualname) for f, _ in traceback.walk_tb(error.__traceback__)]
    ops = [name for file, name in frames if file.endswith(("distributed_c10d.py", "deepspeed/comm/comm.py"))]
    ours = [f"{Path(file).stem}.{name}" for file, name in frames if f"{os.sep}dslm{os.sep}" in file]
    in_step = "" if step is None else f" during step {step + any(name.endswith('train_step') for name in ours)}"
    return RankFailure(
        f"rank {torch.distributed.get_rank()}: collective {ops[-1] if ops else '?'} (in "
        f"{ours[-1] if ours else '?'}) timed out after {timeout_s} s{in_step}: another rank stopped "
        f"answering (train.collective_timeout_s={timeout_s}); run again to continue from the last "
        f"checkpoint"
    )


def load_ds_config(path: str | Path, train: TrainConfig, world_size: int) -> dict:
    """Read the DeepSpeed JSON and fill in the batch sizes from the run config; a clash, a missing
    file or bad JSON is a DslmError."""
    path = Path(path)
    if not path.is_file():
        raise DslmError(f"DeepSpeed config {path} does not exist")
    try:
        ds = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DslmError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise DslmError(f"DeepSpeed config {path} is not a JSON object")
    derived = {
        "train_micro_batch_size_per_gpu": (train.micro_batch_size, "train.micro_batch_size"),
        "gradient_accumulation_steps": (train.grad_accum, "train.grad_accum"),
        "train_batch_size": (
            train.micro_batch_size * train.grad_accum * world_size,
            f"train.micro_batch_size * train.grad_accum * world size {world_size}",
        ),
    }
    for key, (value, source) in derived.items():
        if key in ds and ds[key] != value:
            raise DslmError(
                f"{path}: {key}={ds[key]} disagrees with {source} = {value}; "
                f"leave batch sizes out of the DeepSpeed JSON"
            )
        ds[key] = value
    return ds


def zero_stage(ds_config: dict) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it names none, as DeepSpeed reads it)."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_engine(model: nn.Module, train: TrainConfig, ds_config: dict, load_universal: bool = False):
    """The DeepSpeed engine around `model`: dslm.optim's AdamW (PyTorch's fused CUDA kernel on a
    GPU, which needs no DeepSpeed op build) and schedule, and the training options.
    `load_universal`: the checkpoint it will load is DeepSpeed's universal form
    (dslm.checkpoint.resume.Resume.load_universal); `ds_config` itself is left unchanged."""
    model.activation_checkpointing = train.activation_checkpointing
    optimizer, schedule = build_optimizer(model, train, train.max_steps)
    if load_universal:
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    deepspeed = deepspeed_module()
    with libraries():
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    drop_redundant_overflow_check(engine.optimizer)
    if train.compile:
        engine.compile()
    return engine


def drop_redundant_overflow_check(optimizer) -> None:
    """Let ZeRO-1/2 look for non-finite gradients once per step instead of twice.

    With `check_grad_overflow` (our bf16 configs) DeepSpeed 0.19's ZeRO-1/2 step first checks every
    gradient tensor for inf/NaN (several ops per tensor, an all-reduce and a host sync; the op
    counts are in bench/RESULTS.md), then computes the global gradient norm for clipping and skips
    the step if that norm is not finite, which it is not exactly when some gradient element is inf or NaN (or the
    squares overflow, which the first check does not even catch). The first check decides nothing
    the second does not, so it is turned off on this optimizer; skipped steps and
    `engine.skipped_steps` are unchanged (tests/dslm/test_engine.py poisons a gradient at each stage).
    ZeRO-0's optimizer keeps its check: its norm turns inf into -1 and then squares it away."""
    zero_optimizer = import_attr("deepspeed", "deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer")
    if not isinstance(optimizer, zero_optimizer):
        return
    flags = ("check_grad_overflow", "compute_grad_norm", "cpu_offload")
    require(
        "deepspeed",
        f"DeepSpeedZeroOptimizer has {', '.join(flags)} and check_overflow(partition_gradients)",
        all(hasattr(optimizer, flag) for flag in flags)
        and has_method(optimizer, "check_overflow", ("partition_gradients",)),
    )
    if optimizer.check_grad_overflow and optimizer.compute_grad_norm and not optimizer.cpu_offload:
        # step() then leaves `overflow` False for the norm check to set
        optimizer.check_overflow = lambda partition_gradients=True: None


def describe(engine, world_size: int) -> str:
    """One line on what trains: where, over which process group, with which ZeRO stage, precision,
    optimizer and compilation."""
    require(
        "deepspeed",
        "the engine keeps the client's optimizer as engine.basic_optimizer",
        hasattr(engine, "basic_optimizer"),
    )
    optimizer = engine.basic_optimizer
    fused = "fused " if getattr(optimizer, "defaults", {}).get("fused") else ""
    dtype = str(next(engine.module.parameters()).dtype).removeprefix("torch.")
    return (
        f"engine: {counted(world_size, 'rank')} on {engine.device.type}, backend "
        f"{torch.distributed.get_backend()}, ZeRO stage {engine.zero_optimization_stage()}, {dtype} weights, "
        f"{fused}{type(optimizer).__name__}{', compiled' if engine.is_compiled else ''}"
    )
