#!/usr/bin/env bash
#SBATCH --job-name=debug
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=00:15:00
#SBATCH --signal=USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#
# Debug run: one process on one GPU (or CPU, with --gpus-per-node=0), the tiny configs/debug.yaml model,
# 15 minutes. Any stage: STAGE=sft|grpo|... (default pretrain) with a CONFIG of that stage.
#
#   sbatch slurm/debug.sh [key=value ...]
#   STAGE=grpo CONFIG=configs/grpo_addition.yaml sbatch slurm/debug.sh rl.init_from=runs/debug-123
#
# One process, started by srun itself: no torchrun, no process group. parallel.device=auto puts it on the
# GPU when there is one (configs/debug.yaml says cpu); a later device override wins.
set -uo pipefail
LLM_DIST_ROOT=${LLM_DIST_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}  # sbatch runs a copy of this file: find the repo
[ -f "$LLM_DIST_ROOT/slurm/common.sh" ] || { echo "slurm: no slurm/common.sh under $LLM_DIST_ROOT:" \
    "submit from the repository root or set LLM_DIST_ROOT" >&2; exit 2; }
source "$LLM_DIST_ROOT/slurm/common.sh"
LAUNCHER=${LAUNCHER:-srun} NPROC_PER_NODE=${NPROC_PER_NODE:-1} \
    slurm_main "${STAGE:-pretrain}" configs/debug.yaml parallel.device=auto "$@"
