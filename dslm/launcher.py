"""`dslm-train --nproc-per-node N`: N ranks of dslm-train on this machine, with the stop signals
and exit statuses that schedulers and terminals expect (DeepSpeed's launcher and torchrun turn a
SIGTERM into SIGKILL after 30 s and exit 1, whatever the ranks did).

Each rank runs in a process group of its own and dies with the launcher (PR_SET_PDEATHSIG), so a
signal reaches a rank exactly once, through the launcher: SIGTERM to the launch's process group
(`timeout`, `kill -- -PGID`) or Ctrl-C at the terminal (SIGINT to the foreground group) is passed
to every rank, which stop at the next step boundary after a checkpoint (dslm.stop); a second Ctrl-C
stops them at once. The launcher waits for every rank and exits with the status of the first one
that failed (0 when none did; 75 when they stopped on a signal)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

from dslm.engine import free_port
from dslm.signals import STOP_SIGNALS

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def rank_env(rank: int, world_size: int, port: str) -> dict[str, str]:
    """The environment of rank `rank` of `world_size` on this machine, as torchrun sets it."""
    return {
        **os.environ,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
    }


def die_with_launcher(launcher_pid: int) -> None:
    """preexec_fn of a rank: SIGKILL when the launcher dies (a SIGKILL to the launch's process
    group then ends the ranks too, as it would without their own groups)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != launcher_pid:  # the launcher died before prctl
        os._exit(1)


def launch(command: list[str], world_size: int, port: str) -> int:
    """Run `command` as ranks 0..world_size-1, passing each stop signal the launcher receives to
    every rank; returns the exit status of the first rank that failed, 0 when none did (a rank
    killed by signal S counts as 128 + S, as in a shell)."""
    pid = os.getpid()
    ranks = [
        subprocess.Popen(
            command, env=rank_env(rank, world_size, port), process_group=0, preexec_fn=lambda: die_with_launcher(pid)
        )
        for rank in range(world_size)
    ]

    def forward(signum: int, frame: object) -> None:
        for rank in ranks:
            if rank.returncode is None:
                rank.send_signal(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, forward)
    first_failure = 0
    running = {rank.pid: rank for rank in ranks}
    while running:
        pid, status = os.wait()
        if pid in running:
            rank = running.pop(pid)
            rank.returncode = os.waitstatus_to_exitcode(status)
            code = rank.returncode if rank.returncode >= 0 else 128 - rank.returncode
            first_failure = first_failure or code
    return first_failure


def strip_option(argv: list[str], option: str) -> list[str]:
    """`argv` without `option VALUE` or `option=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def launch_ranks(argv: list[str], world_size: int) -> None:
    """dslm-train's ranks for `argv` (dslm-train's arguments with --nproc-per-node): SystemExit
    with the launch's status."""
    port = os.environ.get("DSLM_MASTER_PORT") or str(free_port())
    command = [sys.executable, "-m", "dslm.train", *strip_option(argv, "--nproc-per-node")]
    sys.exit(launch(command, world_size, port))
