"""`sbatch slurm/pretrain.sh` and `slurm/eval.sh` on a real SLURM cluster of two nodes (slurm/testcluster/), CPU and gloo."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dslm.metrics import read_scalars

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CLUSTER_DIR = Path("/var/tmp/dslm-testcluster")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    """The environment for sbatch/squeue against the test cluster, started here unless it runs."""
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster needs root (network namespaces, munge, slurmd)")
    if shutil.which("slurmctld") is None:
        pytest.skip("Debian's slurmd slurmctld slurm-client munge are not installed (.ci/run installs them)")
    # gloo on the nodes' bridge interface; one thread per rank as under the local launcher (the same
    # thread count gives the same float reductions, hence the same losses)
    env = {**os.environ, "SLURM_CONF": str(CLUSTER_DIR / "slurm.conf"), "GLOO_SOCKET_IFNAME": "eth0",
           "OMP_NUM_THREADS": "1"}
    running = subprocess.run(["sinfo", "-h"], env=env, capture_output=True).returncode == 0
    if not running:
        subprocess.run([REPO / "slurm/testcluster/start.sh"], check=True, timeout=120)
    yield env
    if not running:
        subprocess.run([REPO / "slurm/testcluster/stop.sh"], check=True, timeout=60)


def train_args(shards: Path, runs: Path, name: str) -> list[str]:
    settings = dict(micro_batch_size=4, grad_accum=2, max_steps=12, warmup_steps=2, log_interval=1,
                    checkpoint_interval=6, val_interval=0)
    return [f"name={name}", f"runs_dir={runs}", f"data.shards={shards}", "model.preset=tiny",
            *(f"train.{k}={v}" for k, v in settings.items())]


def submit(env: dict, log: Path, args: list[str]) -> str:
    cmd = ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--ntasks-per-node=1", "--open-mode=append",
           f"--output={log}", REPO / "slurm/pretrain.sh", *args]
    return subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def in_queue(env: dict, job: str) -> bool:
    return bool(subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True).stdout.strip())


def wait_done(env: dict, job: str, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while in_queue(env, job):
        assert time.monotonic() < end, f"job {job} still queued after {timeout} s"
        time.sleep(1)


def read_log(path: Path) -> str:
    """The job's output so far (progress bars can leave partial UTF-8 sequences)."""
    return path.read_text(errors="replace") if path.exists() else ""


def losses(run: Path) -> list[tuple[int, float]]:
    return read_scalars(run / "tb", "train/loss")


def test_two_node_job_matches_a_local_two_rank_run(cluster, tiny_shards, tmp_path, free_port):
    shards, _ = tiny_shards
    job = submit(cluster, tmp_path / "job.out", train_args(shards, tmp_path, "slurm"))
    launch = [BIN / "deepspeed", "--num_gpus", "2", "--master_port", str(free_port), REPO / "dslm/train.py",
              "--deepspeed", REPO / "ds_configs/zero2.json"]
    subprocess.run([*launch, *train_args(shards, tmp_path, "local")], cwd=tmp_path, check=True, timeout=900,
                   stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_done(cluster, job)
    log = read_log(tmp_path / "job.out")
    assert "2 ranks, rendezvous dslm-n1:" in log, log[-3000:]
    assert [s for s, _ in losses(tmp_path / "slurm")] == list(range(1, 13)), log[-3000:]
    assert losses(tmp_path / "slurm") == losses(tmp_path / "local")

    evaluation = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", f"--output={tmp_path / 'eval.out'}",
                                 REPO / "slurm/eval.sh", tmp_path / "slurm"],
                                env=cluster, cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()
    wait_done(cluster, evaluation)
    assert [s for s, _ in read_scalars(tmp_path / "slurm" / "tb", "eval/val_loss")] == [6, 12], \
        read_log(tmp_path / "eval.out")[-2000:]


def test_time_limit_signal_checkpoints_requeues_and_resumes(cluster, tiny_shards, tmp_path):
    shards, _ = tiny_shards
    log = tmp_path / "job.out"
    job = submit(cluster, log, train_args(shards, tmp_path, "requeued"))
    end = time.monotonic() + 300
    while "step      2 |" not in read_log(log):
        assert time.monotonic() < end and in_queue(cluster, job), "the job never reached step 2"
        time.sleep(0.2)
    # what `#SBATCH --signal=B:USR1@120` does before the time limit: signal the batch script
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=cluster, check=True)
    wait_done(cluster, job)
    text = read_log(log)
    assert "requeueing job" in text and "(restart 1)" in text, text[-3000:]
    assert "resumed from" in text
    run = tmp_path / "requeued"
    assert [s for s, _ in losses(run)] == list(range(1, 13)), "each step once in TensorBoard"
    assert (run / "checkpoints" / "latest").read_text() == "global_step12"
