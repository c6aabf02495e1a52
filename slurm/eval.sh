#!/usr/bin/env bash
# Offline evaluation on SLURM: `sbatch slurm/eval.sh runs/NAME [dslm-eval options]` evaluates
# every checkpoint of the run that has no result yet and writes the results into the run
# (eval/stepN.json and its TensorBoard). Edit the defaults below or override them on the
# `sbatch` command line (`--gpus-per-node=0` on CPU nodes). DSLM_BIN: as in pretrain.sh.
#SBATCH --job-name=dslm-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --time=2:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

cd "$SLURM_SUBMIT_DIR"
BIN=${DSLM_BIN:-$SLURM_SUBMIT_DIR/.venv/bin}
echo "dslm-eval: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST: $*"
exec "$BIN/dslm-eval" "$@"
