"""Stopping on a signal: schedulers send SIGUSR1 (slurm/pretrain.sh's `--signal`), SIGUSR2
(submitit's) or SIGTERM (preemption) some time before they end a job. The handler only sets a
flag (a collective inside a signal handler would deadlock); at the next step boundary the ranks
agree on it, checkpoint together and exit with EXIT_STOPPED so that a wrapper can requeue and
resume with `--resume auto`."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
EXIT_STOPPED = 75
"""sysexits' EX_TEMPFAIL: stopped on request after a checkpoint; run again to continue."""


@dataclass
class Stop:
    """Why the ranks stopped before train.max_steps, at `step`."""

    step: int
    signal: int = 0
    """The signal they agreed on, or 0."""
    damaged: list[str] = field(default_factory=list)
    """One line per damaged shard that the next step would have read (data.on_bad_shard=stop)."""


class StopSignal:
    """Collective: create on every rank after the process group exists."""

    def __init__(self) -> None:
        self.received = 0
        # a host-side group: checking the flag every step never waits on the GPU
        self.group = dist.new_group(backend="gloo")
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.handle)

    def handle(self, signum: int, frame: object) -> None:
        self.received = signum

    def agreed(self, damaged: str = "") -> tuple[int, list[str]]:
        """Collective: (the signal any rank has received (the highest number), or 0; the damaged
        shards the ranks found, one line each from `damaged`, "" where a rank found none). The
        lines are gathered only when some rank found one."""
        flag = torch.tensor([self.received, bool(damaged)], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        lines: list[str] = []
        if flag[1]:
            found: list = [None] * dist.get_world_size()
            dist.all_gather_object(found, damaged, group=self.group)
            lines = list(dict.fromkeys(line for line in found if line))
        return int(flag[0]), lines
