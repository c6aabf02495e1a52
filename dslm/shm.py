"""The shared-memory buffers of DeepSpeed's CPU all-reduce (its shm_comm op,
deepspeed/ops/csrc/cpu/comm/shm.cpp), and what dslm does so that none is left behind.

When all ranks are on one machine, each rank creates /dev/shm/deepspeed_allreduce_buffer_UID_ADDR_PORT_RANK
(66 MiB; the user id, MASTER_ADDR, MASTER_PORT and the global rank) at DeepSpeed's init, maps every
rank's, and never removes its own: every run, killed or not, left its ranks' buffers in memory
(one machine had 21 GB of them, and its runs then hung). dslm

- before DeepSpeed's init, removes this user's buffers that no live process holds open or mapped
  (remove_dead_buffers): the kernel drops a process's descriptors and mappings when it dies, however
  it dies, and DeepSpeed keeps both for the life of a rank, from the moment it creates its buffer.
  Every rank does it, one process per machine at a time, before it can open a buffer itself: a rank
  of this run might otherwise open a dead buffer of its own name (a run on the same port before it)
  between the look and the removal, and wait on a name that is gone.
- after it, once every rank has mapped every rank's buffer (a barrier), removes the name of its own
  (release_buffer_name): the memory stays mapped until the run's last process ends, and then
  nothing of the run is left in /dev/shm, whether it ended or was killed."""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

from dslm.compat import require
from dslm.files import holders, waiting_lock
from dslm_local.cli import counted

SHM_DIR = Path("/dev/shm")
"""Where glibc's shm_open keeps its objects."""
PREFIX = "deepspeed_allreduce_buffer"


def buffer_name(rank: int) -> str:
    """The name DeepSpeed gives this process's buffer in SHM_DIR when it is global rank `rank`."""
    check_naming()
    return f"{PREFIX}_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{rank}"


@functools.cache
def check_naming() -> None:
    """DeepSpeed names its buffers as buffer_name says (read in the op's C++ source), or DslmError."""
    # found, not imported: importing deepspeed prints which accelerator it picked (dslm.ops.deepspeed_module)
    source = Path(importlib.util.find_spec("deepspeed").origin).parent / "ops/csrc/cpu/comm/shm.cpp"
    code = " ".join(source.read_text().split()) if source.is_file() else ""
    names = (
        f'#define SHM_BUFFER_NAME "{PREFIX}"',
        '"%s_%d_%s_%s", SHM_BUFFER_NAME, getuid(), addr_string, port_string);',
        '"%s_%d", shm_name_prefix, rank);',
    )
    require("deepspeed", f"{source} names its buffers {PREFIX}_UID_ADDR_PORT_RANK", all(n in code for n in names))


def remove_dead_buffers(folder: Path = SHM_DIR) -> None:
    """Remove this user's DeepSpeed all-reduce buffers in `folder` that no live process holds open or
    mapped, with one line saying how many and how much memory that freed (none: no line). One
    process per machine at a time (a lock in `folder`)."""
    check_naming()
    if not folder.is_dir():  # no shm_open here, so no buffer either
        return
    with waiting_lock(folder / f"dslm-shm-{os.getuid()}.lock"):
        buffers = sorted(folder.glob(f"{PREFIX}_{os.getuid()}_*"))
        held = holders(buffers)
        removed, freed = 0, 0
        for path in buffers:
            if path in held:
                continue
            try:
                size = path.stat().st_blocks * 512  # what tmpfs holds, not the size written
                path.unlink()
            except FileNotFoundError:  # its run, ending, removed it meanwhile
                continue
            removed, freed = removed + 1, freed + size
    if removed:
        print(
            f"removed {counted(removed, 'DeepSpeed all-reduce buffer')} of runs that are gone from {folder} "
            f"({freed / 2**20:,.0f} MiB freed)",
            flush=True,
        )


def release_buffer_name(rank: int, folder: Path = SHM_DIR) -> None:
    """Remove the name of this process's buffer (DeepSpeed created none: nothing to do). Only once
    every rank has mapped every rank's buffer: a rank that has not would wait for the name forever."""
    (folder / buffer_name(rank)).unlink(missing_ok=True)
