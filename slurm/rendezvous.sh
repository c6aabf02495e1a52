# Sourced by pretrain.sh: the rendezvous port of a job.

# rendezvous_port JOB_ID RESTART: dslm.engine.rendezvous_port in bash (tests/slurm/test_rendezvous.py
# checks that they agree): 10000-29999, below Linux's ephemeral ports (32768-60999), where a port
# may be taken by any outgoing connection; another one on each restart of the job.
rendezvous_port() {
    echo $((10000 + ($1 + $2 * 7919) % 20000))
}
