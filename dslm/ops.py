"""DeepSpeed's JIT-built ops (here the shared-memory all-reduce its CPU backend builds at init): in
which folder torch builds them, one build at a time, and what a killed build leaves.

torch builds an op in TORCH_EXTENSIONS_DIR/NAME, by default ~/.cache/torch_extensions/pyXY_cpu/NAME,
which every Python install of the user shares: two virtualenvs then rebuild the same op in turn
(each from its own sources), each waiting for the other's build. dslm gives each install its own
folder (extensions_dir) unless TORCH_EXTENSIONS_DIR is set.

While it builds, torch holds NAME/lock (torch.utils.file_baton.FileBaton): the file is created with
O_EXCL, its descriptor stays open for the whole build, and it is removed at the end; every other
process polls until the file is gone, silently and without a time limit. A build killed midway
leaves the file, and every later start then waits forever. The file records no owner, and its age
tells nothing (a build takes 40 s alone and minutes on a busy machine), but a live owner holds it
open and a dead one does not (the kernel closes a killed process's descriptors): a lock that no
live process holds open was left by a build that is gone. The one moment a live owner does not
hold it, between FileBaton.release's close and its remove, never comes while dslm looks: dslm
processes build one at a time per folder (build_ops), so while one looks, no other is inside
torch's lock. A lock held from another machine (a folder on a shared filesystem that programs
other than dslm build in) looks dead from here."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from dslm.compat import import_attr
from dslm.files import holders, waiting_lock
from dslm.logs import libraries

EXTENSIONS_DIR = "TORCH_EXTENSIONS_DIR"
BUILD_LOCK = "lock"
"""torch's lock file in each op's build folder (torch.utils.cpp_extension._jit_compile)."""
DSLM_LOCK = "dslm-build.lock"
"""dslm's own lock in the extensions folder: one dslm process builds at a time."""


def extensions_dir() -> Path:
    """The folder torch builds DeepSpeed's ops in for dslm: TORCH_EXTENSIONS_DIR when set, else
    this install's own, `torch_extensions` in sys.prefix (the virtualenv), or, where that is not
    writable, a folder named after sys.prefix in torch's default (~/.cache/torch_extensions)."""
    if os.environ.get(EXTENSIONS_DIR):
        return Path(os.environ[EXTENSIONS_DIR])
    prefix = Path(sys.prefix)
    if os.access(prefix, os.W_OK):
        return prefix / "torch_extensions"
    from torch.utils.cpp_extension import get_default_build_root  # imports setuptools: only here

    return Path(get_default_build_root()) / f"{prefix.name}-{hashlib.sha256(bytes(prefix)).hexdigest()[:8]}"


def deepspeed_module() -> ModuleType:
    """deepspeed, imported inside dslm.logs.libraries() (what its import prints goes to the libraries' log)."""
    with libraries():
        import deepspeed
    return deepspeed


def build_ops(announce: bool = False) -> None:
    """Build, or load when built, the ops DeepSpeed's torch backend builds at its init (its CPU
    all-reduce; none on GPUs), in extensions_dir(), which this also sets as TORCH_EXTENSIONS_DIR
    for the process and its children. dslm processes build one at a time per folder, the others
    waiting; first, a lock left by a killed build is removed (remove_dead_locks). With `announce`,
    a build that will compile says so first. Call it before deepspeed.init_distributed, which then
    finds the op loaded."""
    folder = extensions_dir()
    os.environ[EXTENSIONS_DIR] = str(folder)
    folder.mkdir(parents=True, exist_ok=True)
    deepspeed = deepspeed_module()
    build_shm_op = import_attr("deepspeed", "deepspeed.comm.torch", "build_shm_op")
    with waiting_lock(folder / DSLM_LOCK):
        remove_dead_locks(folder)
        if announce and (op := comm_op_to_build(deepspeed, folder)):
            print(f"building DeepSpeed's {op} op in {folder / op} (once per install, about a minute)...", flush=True)
        with libraries():  # "... built successfully", and the compiler's output
            build_shm_op()


def comm_op_to_build(deepspeed: ModuleType, folder: Path) -> str | None:
    """The name of the op DeepSpeed's communication backend (deepspeed.comm.torch.build_shm_op: the
    CPU accelerator's shared-memory all-reduce) is about to compile in `folder`, or None when it
    needs none, or is installed prebuilt, or its build is up to date (op_build_current)."""
    builder = deepspeed.get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    if deepspeed.git_version_info.installed_ops.get(builder.NAME, False) or op_build_current(folder / builder.NAME):
        return None
    return builder.NAME


def op_build_current(build: Path) -> bool:
    """Whether the op built in folder `build` (torch builds op NAME in TORCH_EXTENSIONS_DIR/NAME) is
    up to date: the folder has a build.ninja and ninja's dry run (`ninja -n`, which compares the
    sources', headers' and outputs' times and the commands it last ran) finds nothing to do. False
    when ninja is missing (torch's build then fails, saying so)."""
    if not (build / "build.ninja").is_file():
        return False
    try:
        dry_run = subprocess.run(["ninja", "-n", "-C", str(build)], capture_output=True, text=True)
    except OSError:
        return False
    return dry_run.returncode == 0 and "no work to do" in dry_run.stdout


def remove_dead_locks(folder: Path) -> None:
    """Remove each op's build lock in `folder` that no live process holds open, with a line naming
    it; for one a live process holds, a line naming the process that the start waits for."""
    locks = sorted(folder.glob(f"*/{BUILD_LOCK}"))
    held = holders(locks)
    for lock in locks:
        if lock in held:
            print(f"waiting for process {held[lock]} to finish building {lock.parent.name} ({lock})", flush=True)
        else:
            lock.unlink(missing_ok=True)
            print(
                f"removed {lock}: the lock of a build of {lock.parent.name} that was killed (no process holds it)",
                flush=True,
            )
