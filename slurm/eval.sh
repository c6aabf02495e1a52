#!/usr/bin/env bash
# Offline evaluation on SLURM: `sbatch slurm/eval.sh runs/NAME [dslm-eval options]` evaluates
# every checkpoint of the run that has no result yet and writes the results into the run
# (eval/stepN.json and its TensorBoard); the job's output is copied to runs/NAME/logs/eval-JOBID.out.
# Edit the defaults below or override them on the `sbatch` command line (`--gpus-per-node=0` on
# CPU nodes). DSLM_BIN: as in pretrain.sh.
#SBATCH --job-name=dslm-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --time=2:00:00
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

cd "$SLURM_SUBMIT_DIR"
BIN=${DSLM_BIN:-$SLURM_SUBMIT_DIR/.venv/bin}
source slurm/run_log.sh
TARGET=${1:-}
for RUN_DIR in "$TARGET" "$TARGET/../.."; do  # a run, or a checkpoint or export inside one
    if [ -n "$TARGET" ] && [ -f "$RUN_DIR/config.yaml" ]; then
        log_to_run "$(cd "$RUN_DIR" && pwd)" eval
        echo "dslm-eval: log $LOG; tensorboard --logdir $(cd "$RUN_DIR" && pwd)/tb"
        break
    fi
done
echo "dslm-eval: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST: $*"
"$BIN/dslm-eval" "$@"
finish $?
