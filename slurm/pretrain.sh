#!/usr/bin/env bash
# dslm training on SLURM, any number of nodes, no ssh, hostfile or pdsh:
#
#   sbatch slurm/pretrain.sh --config launch/recipes/RECIPE.yaml [key=value ...]
#
# Edit the defaults below, or override any of them on the command line
# (`sbatch --nodes=4 --time=2:00:00 slurm/pretrain.sh ...`). One task per GPU; on CPU nodes,
# `--gpus-per-node=0 --ntasks-per-node=RANKS`. Environment: DSLM_DS_CONFIG (default
# ds_configs/zero2.json), DSLM_BIN (the dslm-train to run; default .venv/bin of the folder
# sbatch was run from).
#
# SLURM signals this script 120 s before the time limit; it passes the signal to the ranks, which
# agree at the next step, save a checkpoint together and exit with 75; the script requeues the
# job, which resumes from that checkpoint with `--resume if-any` (or starts fresh when the job
# never got to a checkpoint). Preemption (SIGTERM) does the same. A rank that stops answering
# (train.collective_timeout_s) or a failed rendezvous ends the ranks with 69: the job is requeued
# too, at most DSLM_MAX_RETRIES times (default 3). Any other status ends the job: 2 bad input,
# 65 a damaged training shard (after a checkpoint: rebuild it, then resubmit), 74 a checkpoint
# could not be written (free space, then resubmit), else a crash.
# MASTER_PORT: DSLM_MASTER_PORT, else from the job id and its restart count (slurm/rendezvous.sh).
#SBATCH --job-name=dslm
#SBATCH --nodes=2
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out  # and RUN_DIR/logs/slurm-JOBID.out
set -uo pipefail

EXIT_STOPPED=75  # dslm_local.errors.EXIT_STOPPED
EXIT_RETRY=69    # dslm_local.errors.EXIT_RETRY
cd "$SLURM_SUBMIT_DIR"
BIN=${DSLM_BIN:-$SLURM_SUBMIT_DIR/.venv/bin}
DS_CONFIG=${DSLM_DS_CONFIG:-ds_configs/zero2.json}

# Rendezvous from SLURM's environment: the first node hosts rank 0; the port follows the job id.
source slurm/rendezvous.sh
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${DSLM_MASTER_PORT:-$(rendezvous_port "$SLURM_JOB_ID" "${SLURM_RESTART_COUNT:-0}")}
export MASTER_ADDR MASTER_PORT

RESUME=()
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
    RESUME=(--resume if-any)  # a requeued job continues from its newest intact checkpoint, if it has one
fi
source slurm/run_log.sh
RUN_DIR=$("$BIN/dslm-train" --print-run-dir "$@" | tail -n 1) || exit 2
log_to_run "$RUN_DIR" slurm
echo "dslm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST," \
     "$SLURM_NTASKS ranks, rendezvous $MASTER_ADDR:$MASTER_PORT"
echo "dslm: run directory $RUN_DIR; log $LOG; tensorboard --logdir $RUN_DIR/tb"

# SLURM signals this shell (`--signal=B:USR1@120`, or SIGTERM on preemption): pass it on to the
# ranks through srun; they checkpoint at the next step boundary and stop; then requeue.
requeue=0
stop_ranks() {
    requeue=1
    echo "dslm: SIG$1: the ranks checkpoint at the next step and stop"
    kill -"$1" "$srun_pid" 2>/dev/null
}
trap 'stop_ranks USR1' USR1
trap 'stop_ranks TERM' TERM
# each rank leaves its exit status in STATUS: srun's own is a signal's when it kills the others
STATUS=$RUN_DIR/logs/status-$SLURM_JOB_ID
rm -rf "$STATUS" && mkdir -p "$STATUS"
srun --kill-on-bad-exit=1 bash -c \
    'trap true USR1 USR2 TERM  # the signals are for dslm-train: this shell waits on, to keep its status
     RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS \
     LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-1} "${@:2}"; s=$?; echo $s > "$1/$SLURM_PROCID"; exit $s' _ \
    "$STATUS" "$BIN/dslm-train" --deepspeed "$DS_CONFIG" "${RESUME[@]}" "$@" &
srun_pid=$!
while :; do  # `wait` returns early when a trap runs: wait until srun itself has ended
    wait "$srun_pid"
    status=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done

ranks=$(cat "$STATUS"/* 2>/dev/null); rm -rf "$STATUS"
if [ $requeue = 1 ] || [ $status = $EXIT_STOPPED ]; then
    echo "dslm: stopped at a checkpoint; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    finish 0
fi
if grep -qx $EXIT_RETRY <<< "$ranks"; then  # a hung rank or a failed rendezvous: running again can help
    retries=$RUN_DIR/logs/retries-$SLURM_JOB_ID
    if [ "$(cat "$retries" 2>/dev/null | wc -l)" -lt "${DSLM_MAX_RETRIES:-3}" ]; then
        echo "retry" >> "$retries"
        echo "dslm: a rank or the rendezvous failed (status $EXIT_RETRY); requeueing job $SLURM_JOB_ID" \
             "(retry $(wc -l < "$retries") of ${DSLM_MAX_RETRIES:-3})"
        scontrol requeue "$SLURM_JOB_ID"
        finish 0
    fi
    echo "dslm: not requeued: DSLM_MAX_RETRIES=${DSLM_MAX_RETRIES:-3} retries used; resubmit with --resume auto"
fi
finish $status
