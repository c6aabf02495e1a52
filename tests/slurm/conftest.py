"""The SLURM test cluster (slurm/testcluster/) for the tests in this folder, started once per session."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_DIR = Path("/var/tmp/dslm-testcluster")


@dataclass
class Cluster:
    env: dict[str, str]
    """The environment for sbatch/squeue/scancel against the test cluster."""

    def in_queue(self, job: str) -> bool:
        return bool(
            subprocess.run(["squeue", "-h", "-j", job], env=self.env, capture_output=True, text=True).stdout.strip()
        )

    def wait_done(self, job: str, timeout: float = 600) -> None:
        end = time.monotonic() + timeout
        while self.in_queue(job):
            assert time.monotonic() < end, f"job {job} still queued after {timeout} s"
            time.sleep(1)

    def paused_ranks(self, job: str, name: str, before: list[int] | None = None) -> list[int]:
        """The pids of run `name`'s ranks 0 and 1 (dslm-train processes; the nodes share this
        machine's processes) once both have stopped themselves where the job's DSLM_TEST_PAUSE told
        them to, other processes than the `before` ones (the job's next run). Fails when the job
        ends first."""
        while True:
            assert self.in_queue(job), f"job {job} ended before its ranks paused"
            pids = [rank_pid(name, rank) for rank in (0, 1)]
            if all(pids) and not set(pids) & set(before or []) and all(map(is_stopped, pids)):
                return pids
            time.sleep(0.2)

    @staticmethod
    def go_on_with(pids: list[int], pending: signal.Signals | None = None) -> None:
        """SIGCONT to each paused rank of `pids`, once the signal `pending` (if any), sent to it
        meanwhile, waits to be delivered: it acts at the point the rank paused."""
        for pid in pids:
            while pending is not None and not is_pending(pid, pending):
                time.sleep(0.05)
            os.kill(pid, signal.SIGCONT)

    def job_field(self, job: str, name: str) -> str:
        """A field of `scontrol show job` (JobState, Restarts, ...), also for a job that ended
        less than MinJobAge (300 s) ago."""
        out = subprocess.run(["scontrol", "show", "job", job], env=self.env, capture_output=True, text=True).stdout
        return next((w.split("=", 1)[1] for w in out.split() if w.startswith(f"{name}=")), "")


def rank_pid(name: str, rank: int) -> int | None:
    """The dslm-train process of run `name` with RANK=`rank`."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            any(a.endswith(b"dslm-train") for a in cmdline)
            and f"name={name}".encode() in cmdline
            and f"RANK={rank}".encode() in environ
        ):
            return int(proc.name)
    return None


def is_stopped(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:  # it went meanwhile
        return False


def is_pending(pid: int, sig: signal.Signals) -> bool:
    """Whether `sig` waits to be delivered to process `pid` (its thread's or its process's pending
    set in /proc/PID/status)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    masks = [int(line.split()[1], 16) for line in lines if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask >> (sig - 1) & 1 for mask in masks)


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster needs root (network namespaces, munge, slurmd)")
    if shutil.which("slurmctld") is None:
        pytest.skip("Debian's slurmd slurmctld slurm-client munge are not installed (.ci/run installs them)")
    # gloo on the nodes' bridge interface; one thread per rank as under the local launcher (the same
    # thread count gives the same float reductions, hence the same losses)
    env = {
        **os.environ,
        "SLURM_CONF": str(CLUSTER_DIR / "slurm.conf"),
        "GLOO_SOCKET_IFNAME": "eth0",
        "OMP_NUM_THREADS": "1",
    }
    running = subprocess.run(["sinfo", "-h"], env=env, capture_output=True).returncode == 0
    if not running:
        subprocess.run([REPO / "slurm/testcluster/start.sh"], check=True, timeout=900)
    yield Cluster(env)
    if not running:
        subprocess.run([REPO / "slurm/testcluster/stop.sh"], check=True, timeout=600)
