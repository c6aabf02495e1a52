import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from dslm.ops import extensions_dir
from dslm.shm import PREFIX, SHM_DIR, remove_dead_buffers
from tests.conftest import launched, run_launch
from tests.dslm.test_train import BIN, REPO, train_args

HOLD_AFTER_INIT = """
import signal
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
print("initialized", flush=True)
signal.pause()
"""
"""A DeepSpeed program that waits, once its ranks have made their all-reduce buffers, to be killed."""


def buffer(folder: Path, port: int, rank: int = 0) -> Path:
    return folder / f"{PREFIX}_{os.getuid()}_127.0.0.1_{port}_{rank}"


def buffers_of(port: int) -> list[str]:
    """The names of the all-reduce buffers in /dev/shm of the run at 127.0.0.1:`port`."""
    return sorted(path.name for path in SHM_DIR.glob(buffer(SHM_DIR, port, 0).name[:-1] + "*"))


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def read_until(process: subprocess.Popen, done) -> str:
    """The process's output up to the first line for which `done(output so far)` holds."""
    output = ""
    for line in process.stdout:
        output += line
        if done(output):
            return output
    raise AssertionError(f"the process ended (status {process.wait()}) before it got there:\n{output[-3000:]}")


def kill(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and its ranks, like a node failure
    assert process.wait() == -signal.SIGKILL


def test_a_start_removes_the_buffers_no_live_process_holds_and_says_how_much_it_freed(shm_tmp, hold_open, capsys):
    dead = [buffer(shm_tmp, 1, rank) for rank in (0, 1)]
    opened, mapped = buffer(shm_tmp, 2), buffer(shm_tmp, 3)
    others = shm_tmp / f"{PREFIX}_{os.getuid() + 1}_127.0.0.1_1_0"  # another user's
    unrelated = shm_tmp / "psm_1234"
    for path in (*dead, opened, mapped, others, unrelated):
        path.write_bytes(bytes(2**20))
    hold_open(opened)
    hold_open(mapped, "map")
    remove_dead_buffers(shm_tmp)
    assert sorted(p for p in shm_tmp.iterdir() if p.suffix != ".lock") == sorted([opened, mapped, others, unrelated])
    said = f"removed 2 DeepSpeed all-reduce buffers of runs that are gone from {shm_tmp} (2 MiB freed)\n"
    assert capsys.readouterr().out == said
    remove_dead_buffers(shm_tmp)
    assert capsys.readouterr().out == ""


@pytest.mark.slow
def test_no_run_leaves_buffers_and_a_start_removes_those_of_dead_runs_but_never_a_live_runs(
    tiny_shards, tmp_path, hold_open
):
    shards, _ = tiny_shards
    dead_port, killed_port, next_port, live_port = free_ports(4)
    live = [buffer(SHM_DIR, live_port, rank) for rank in (0, 1)]  # a live run's: one held open, one mapped
    try:
        for path, how in zip(live, ("open", "map")):
            path.write_bytes(bytes(2**20))
            hold_open(path, how)

        # a DeepSpeed program killed after its init: its ranks' buffers stay, as DeepSpeed never removes them
        (tmp_path / "hold.py").write_text(HOLD_AFTER_INIT)
        with launched(
            [BIN / "deepspeed", "--num_gpus", "2", "--master_port", str(dead_port), "hold.py"],
            cwd=tmp_path,
            env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions_dir())},
        ) as plain:
            read_until(plain, lambda output: output.count("initialized\n") == 2)
            kill(plain)
        assert buffers_of(dead_port) == [buffer(SHM_DIR, dead_port, rank).name for rank in (0, 1)]

        # a dslm run: its start removes them, and killed while it trains, it leaves none of its own
        launch = [BIN / "deepspeed", "--num_gpus", "2", "--master_port", str(killed_port), REPO / "dslm/train.py"]
        args = train_args(
            shards,
            tmp_path,
            "killed",
            max_steps=10000,
            warmup_steps=1,
            log_interval=1,
            val_interval=0,
            checkpoint_interval=10000,
        )
        with launched([*launch, *args], cwd=tmp_path) as run:
            output = read_until(run, lambda output: re.search(r"^step +1 \|", output, re.M))
            kill(run)
        freed = re.search(
            r"^removed (\d+) DeepSpeed all-reduce buffers? of runs that are gone from /dev/shm "
            r"\(([\d,]+) MiB freed\)$",
            output,
            re.M,
        )
        assert freed and int(freed.group(1)) >= 2 and int(freed.group(2).replace(",", "")) >= 132, output[-3000:]
        assert buffers_of(dead_port) == [] and buffers_of(killed_port) == []

        # another run, to its end: it leaves none either, and the live run's were never touched
        launch[4] = str(next_port)
        args = train_args(shards, tmp_path, "next", max_steps=2, warmup_steps=1, log_interval=1, val_interval=0)
        assert run_launch([*launch, *args], cwd=tmp_path).returncode == 0
        assert buffers_of(killed_port) == [] and buffers_of(next_port) == []
        assert all(path.stat().st_size == 2**20 for path in live)
    finally:
        for path in live:
            path.unlink(missing_ok=True)
