#!/usr/bin/env bash
# Multi-node GPU run under SLURM: one process per node, all local GPUs in that process.
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh train-embedder --workdir /shared/run mesh.fsdp=-1
# jax.distributed reads the coordinator, process count and rank from SLURM (--distributed).
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
repo=${EMBEDRL_REPO:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$repo" && . .venv/bin/activate
srun embedrl --distributed "$@"
