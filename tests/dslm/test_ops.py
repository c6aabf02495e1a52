import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dslm.ops import extensions_dir, remove_dead_locks
from tests.conftest import run_launch
from tests.dslm.test_train import BIN, REPO, train_args


def test_ops_build_in_the_installs_own_folder_unless_the_user_set_one(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    if not os.access(sys.prefix, os.W_OK):
        pytest.skip(f"{sys.prefix} is not writable")
    assert extensions_dir() == Path(sys.prefix) / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_dir() == tmp_path


def test_a_lock_no_process_holds_is_removed_and_a_held_one_names_its_holder(tmp_path, hold_open, capsys):
    dead, live = tmp_path / "op_a" / "lock", tmp_path / "op_b" / "lock"
    for lock in (dead, live):
        lock.parent.mkdir()
        lock.touch()
    holder = hold_open(live)
    remove_dead_locks(tmp_path)
    assert not dead.exists() and live.exists()
    assert capsys.readouterr().out.splitlines() == [
        f"removed {dead}: the lock of a build of op_a that was killed (no process holds it)",
        f"waiting for process {holder.pid} to finish building op_b ({live})",
    ]


def built_shm_op() -> Path:
    """The folder of DeepSpeed's shm op as dslm builds it (built now if it is not yet)."""
    build = "from dslm.ops import build_ops, extensions_dir; build_ops(); print(extensions_dir())"
    out = subprocess.run([sys.executable, "-c", build], check=True, capture_output=True, text=True, timeout=1800)
    return Path(out.stdout.splitlines()[-1]) / "deepspeed_shm_comm"


@pytest.mark.slow
def test_a_lock_left_by_a_killed_build_is_removed_with_one_line_and_the_run_trains(tiny_shards, tmp_path, free_port):
    shards, _ = tiny_shards
    op = tmp_path / "extensions" / "deepspeed_shm_comm"
    shutil.copytree(built_shm_op(), op, ignore=shutil.ignore_patterns("lock"))  # built: no 40 s build
    lock = op / "lock"
    lock.touch()  # what a build killed midway leaves: torch's lock file, which no process holds
    launch = [BIN / "deepspeed", "--num_gpus", "2", "--master_port", str(free_port), REPO / "dslm/train.py"]
    args = train_args(shards, tmp_path, max_steps=2, warmup_steps=1, log_interval=1, val_interval=0)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(op.parent)}
    proc = run_launch([*launch, *args], cwd=tmp_path, env=env)  # before: it waited for the lock forever
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert [line for line in proc.stdout.splitlines() if str(lock) in line] == [
        f"removed {lock}: the lock of a build of deepspeed_shm_comm that was killed (no process holds it)"
    ]
    assert not lock.exists() and (tmp_path / "t" / "checkpoints" / "latest").read_text() == "global_step2"
