#!/usr/bin/env bash
# Multi-node GPU run under SLURM. Default: one process per GPU.
#   sbatch --nodes=4 launch/gpu_slurm.sh train-embedder --workdir /shared/run mesh.fsdp=-1
# (8 GPUs per node; for other nodes pass --ntasks-per-node=G --gpus-per-task=1 to sbatch.)
# One process per node seeing all its GPUs instead:
#   sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-task=8 launch/gpu_slurm.sh train-embedder ...
# embedrl --distributed reads the coordinator (first node), process count and rank from SLURM and
# gives each process the GPUs it sees (embedrl_jax/distributed.py); set JAX_COORDINATOR_PORT if
# the default port (derived from the job id) is taken, JAX_LOCAL_DEVICE_IDS to choose GPUs.
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-task=1
#SBATCH --exclusive
set -euo pipefail
repo=${EMBEDRL_REPO:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$repo" && . .venv/bin/activate
. launch/xla_flags.sh   # XLA_FLAGS_GPU: latency-hiding scheduler, pipelined collectives
export XLA_FLAGS="$XLA_FLAGS_GPU ${XLA_FLAGS:-}"
# jax preallocates 75 % of each GPU by default; training wants most of it
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
srun embedrl --distributed "$@"
