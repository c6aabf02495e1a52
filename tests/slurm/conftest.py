"""The SLURM test cluster (slurm/testcluster/) for the tests in this folder, started once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

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

    def job_field(self, job: str, name: str) -> str:
        """A field of `scontrol show job` (JobState, Restarts, ...), also for a job that ended
        less than MinJobAge (300 s) ago."""
        out = subprocess.run(["scontrol", "show", "job", job], env=self.env, capture_output=True, text=True).stdout
        return next((w.split("=", 1)[1] for w in out.split() if w.startswith(f"{name}=")), "")


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
