"""Stopping on a signal. Schedulers send SIGUSR1 (slurm/pretrain.sh's `--signal`), SIGUSR2
(submitit's) or SIGTERM (preemption, `scancel`, `timeout`, a service stop) some time before they
end a job, often to every process of it at once; a terminal sends SIGINT (Ctrl-C) to its
foreground process group.

During start-up (the op build, the universal conversion, model construction), a stop signal ends
the process at once with one line (StartupStop): nothing is written yet. Before that, while
Python imports torch, dslm.signals answers it the same way. Once training runs (`StopSignal.start`), the handler only sets a flag (a collective inside a
signal handler would deadlock); at the next step boundary the ranks agree on it, checkpoint
together and exit with EXIT_STOPPED so that a wrapper can requeue and resume with `--resume auto`.
A second SIGINT stops at once (KeyboardInterrupt). DataLoader workers ignore the stop signals
(`ignore_stop_signals`): they end with their trainer, which must outlive them to checkpoint."""

from __future__ import annotations

import atexit
import io
import multiprocessing
import os
import signal
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dslm.errors import DslmError
from dslm.signals import STOP_SIGNALS, stopped_at_startup
from dslm_local.errors import EXIT_STOPPED


class StartupStop(BaseException):
    """Raised by the handler of a stop signal during start-up: a BaseException, as KeyboardInterrupt,
    so that no library's `except Exception` takes it for a failure of its own."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StoppedAtStartup(DslmError):
    """A stop signal came before the first step: nothing was written; run the same command again."""

    exit_status = EXIT_STOPPED

    def __init__(self, signum: int):
        super().__init__(stopped_at_startup(signum))


@dataclass
class Stop:
    """Why the ranks stopped before train.max_steps, at `step`."""

    step: int
    signal: int = 0
    """The signal they agreed on, or 0."""
    damaged: list[str] = field(default_factory=list)
    """One line per damaged shard that the next step would have read (data.on_bad_shard=stop)."""
    failed: list[str] = field(default_factory=list)
    """Why a rank's loader could not take the next step's micro-batches (DeviceBatches.failure)."""


class StopSignal:
    """The stop signals' handler for this process, installed on creation (start-up: a signal
    raises StartupStop); `start()` switches it to stopping at a step boundary. A second SIGINT
    raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.received = 0
        self.interrupts = 0
        self.group: dist.ProcessGroup | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.handle)

    def start(self) -> None:
        """Collective, right before the first step: from now on a stop signal ends the run at the
        next step boundary with a checkpoint."""
        # a host-side group: checking the flag every step never waits on the GPU
        self.group = dist.new_group(backend="gloo")

    def handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt
        if self.group is None:
            raise StartupStop(signum)
        if not self.received and os.environ.get("RANK", "0") == "0":
            again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
            say(
                f"\ndslm-train: {signal.Signals(signum).name}: stopping at the next step boundary after a "
                f"checkpoint{again}\n"
            )
        self.received = self.received or signum

    def agreed(self, damaged: str = "", failed: str = "") -> tuple[int, list[str], list[str]]:
        """Collective: (the signal any rank has received (the highest number), or 0; the damaged
        shards the ranks found, one line each from `damaged`; the loaders' failures, one line each
        from `failed`; "" where a rank has none). The lines are gathered only when some rank has one."""
        flag = torch.tensor([self.received, bool(damaged), bool(failed)], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        lines: list[list[str]] = [[], []]
        if flag[1] or flag[2]:
            found: list = [None] * dist.get_world_size()
            dist.all_gather_object(found, (damaged, failed), group=self.group)
            lines = [list(dict.fromkeys(rank[kind] for rank in found if rank[kind])) for kind in (0, 1)]
        return int(flag[0]), *lines


def say(text: str) -> None:
    """Write `text` to sys.stderr's file (the terminal, while dslm.logs sends descriptor 2 to the
    libraries' log) in one system call: a print inside a signal handler could interrupt a print of
    the main thread (a reentrant call)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        fd = 2
    os.write(fd, text.encode())


def ignore_stop_signals() -> None:
    """For a loader worker: ignore the stop signals, which a scheduler or a terminal sends to every
    process of the job; its trainer stops at a step boundary and ends it. (Left to torch's handler,
    a SIGTERM kills the worker first, and the trainer dies with it.) The trainer kills its workers
    at exit instead (kill_workers_at_exit)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def kill_workers_at_exit() -> None:
    """Register (once) an exit handler that SIGKILLs this process's daemonic children, the loader's
    workers, before multiprocessing's own: that one ends them with SIGTERM, which they ignore, and
    then waits for them forever (an iterator still referenced at exit never told them to stop)."""
    atexit.unregister(kill_daemonic_children)
    atexit.register(kill_daemonic_children)  # atexit runs last-in first-out: before multiprocessing's


def kill_daemonic_children() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would take their end for a failure
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
