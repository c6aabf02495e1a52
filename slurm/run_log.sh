# Sourced by pretrain.sh and eval.sh: a copy of the job's output in the run directory.

# log_to_run RUN_DIR NAME: from here on, this script's output also goes to RUN_DIR/logs/NAME-JOBID.out
# (tee ignores the signals SLURM sends the script for the ranks).
log_to_run() {
    LOG=$1/logs/$2-$SLURM_JOB_ID.out
    mkdir -p "$1/logs"
    exec > >(trap '' USR1 USR2 TERM; exec tee -a "$LOG") 2>&1
    tee_pid=$!
}

# finish STATUS: close the pipe, let tee write the last lines, and end the job with STATUS.
finish() {
    exec >&- 2>&-
    wait "${tee_pid:-}" 2>/dev/null
    exit "$1"
}
