"""The rendezvous port of a scheduler's job (dslm.engine.rendezvous_port, slurm/rendezvous.sh): no cluster needed."""

import subprocess
from pathlib import Path

from dslm.engine import rendezvous_port

REPO = Path(__file__).resolve().parents[2]
EPHEMERAL = range(32768, 61000)  # Linux's default net.ipv4.ip_local_port_range
JOB_IDS = [*range(0, 5000), *range(1_000_000, 1_005_000, 7), 2**31 - 1]


def test_ports_stay_out_of_the_ephemeral_range_and_move_on_each_restart():
    for job_id in JOB_IDS:
        ports = [rendezvous_port(job_id, restart) for restart in range(4)]
        assert all(1024 <= port < EPHEMERAL.start for port in ports), (job_id, ports)
        assert len(set(ports)) == 4, f"job {job_id}: a restart must not wait on the port it had"
    # neighbouring jobs (running side by side on a node) get different ports
    assert len({rendezvous_port(job_id) for job_id in range(20000)}) == 20000


def test_the_sbatch_script_computes_the_same_ports():
    pairs = [(job_id, restart) for job_id in JOB_IDS[::97] for restart in (0, 1, 5)]
    script = f"source {REPO / 'slurm/rendezvous.sh'}; " + "; ".join(f"rendezvous_port {j} {r}" for j, r in pairs)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert [int(port) for port in out] == [rendezvous_port(j, r) for j, r in pairs]
