#!/usr/bin/env bash
#SBATCH --job-name=dpo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=12:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#
# DPO / IPO / hinge / SimPO (launch/dpo.py) on preference pairs.
#
#   sbatch slurm/dpo.sh [key=value ...]                    # from the repository root; logs/dpo-<job id>.out
#   sbatch --nodes=4 slurm/dpo.sh                          # multi-node: one torchrun per node
#   CONFIG=my.yaml NPROC_PER_NODE=4 LAUNCHER=srun sbatch slurm/dpo.sh
#
# Stopped by USR1 (`--signal` above, scancel) or SIGTERM, it saves a checkpoint and requeues itself; the
# requeued job resumes from it. Environment variables: slurm/common.sh. Details: slurm/README.md.
set -uo pipefail
LLM_DIST_ROOT=${LLM_DIST_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}  # sbatch runs a copy of this file: find the repo
[ -f "$LLM_DIST_ROOT/slurm/common.sh" ] || { echo "slurm: no slurm/common.sh under $LLM_DIST_ROOT:" \
    "submit from the repository root or set LLM_DIST_ROOT" >&2; exit 2; }
source "$LLM_DIST_ROOT/slurm/common.sh"
slurm_main dpo configs/dpo_addition.yaml "$@"
