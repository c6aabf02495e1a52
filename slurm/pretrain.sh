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
# job, which resumes from that checkpoint with `--resume auto`. Preemption (SIGTERM) does the same.
#SBATCH --job-name=dslm
#SBATCH --nodes=2
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out  # and RUN_DIR/logs/slurm-JOBID.out
set -uo pipefail

EXIT_STOPPED=75  # dslm.stop.EXIT_STOPPED
cd "$SLURM_SUBMIT_DIR"
BIN=${DSLM_BIN:-$SLURM_SUBMIT_DIR/.venv/bin}
DS_CONFIG=${DSLM_DS_CONFIG:-ds_configs/zero2.json}

# Rendezvous from SLURM's environment: the first node hosts rank 0; the port follows the job id.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT

RESUME=()
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
    RESUME=(--resume auto)  # a requeued job continues from its newest intact checkpoint
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
srun --kill-on-bad-exit=1 bash -c \
    'RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS \
     LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-1} exec "$@"' _ \
    "$BIN/dslm-train" --deepspeed "$DS_CONFIG" "${RESUME[@]}" "$@" &
srun_pid=$!
while :; do  # `wait` returns early when a trap runs: wait until srun itself has ended
    wait "$srun_pid"
    status=$?
    kill -0 "$srun_pid" 2>/dev/null || break
done

if [ $requeue = 1 ] || [ $status = $EXIT_STOPPED ]; then
    echo "dslm: stopped at a checkpoint; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    finish 0
fi
finish $status
