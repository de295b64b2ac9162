#!/usr/bin/env bash
# Multi-node GPU run with Open MPI: one process per GPU.
#   launch/gpu_mpi.sh HOSTFILE GPUS_PER_NODE -- train-embedder --workdir /shared/run mesh.fsdp=-1
# HOSTFILE lists one node per line (first line = coordinator, process 0). Open MPI 5 does not
# publish the launcher's address, so JAX_COORDINATOR_ADDRESS is set here for every rank; ranks
# and local ranks come from OMPI_COMM_WORLD_* (embedrl_jax/distributed.py).
set -euo pipefail
hosts=${1:?hostfile}; per_node=${2:?GPUs per node}; shift 2
[ "${1:-}" = "--" ] && shift
repo=$(cd "$(dirname "$0")/.." && pwd)
. "$repo/launch/xla_flags.sh"   # XLA_FLAGS_GPU: latency-hiding scheduler, pipelined collectives
nodes=$(grep -cv '^\s*\(#\|$\)' "$hosts")
head=$(grep -v '^\s*\(#\|$\)' "$hosts" | head -1 | awk '{print $1}')
export JAX_COORDINATOR_ADDRESS="$head:${JAX_COORDINATOR_PORT:-61234}"
export XLA_FLAGS="$XLA_FLAGS_GPU ${XLA_FLAGS:-}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
# one GPU per rank: each rank sees only its own device (CUDA_VISIBLE_DEVICES=local rank)
exec mpirun -np $((nodes * per_node)) --hostfile "$hosts" --map-by "ppr:${per_node}:node" \
  -x JAX_COORDINATOR_ADDRESS -x XLA_FLAGS -x XLA_PYTHON_CLIENT_MEM_FRACTION -x PATH -x VIRTUAL_ENV \
  bash -c 'export CUDA_VISIBLE_DEVICES=$OMPI_COMM_WORLD_LOCAL_RANK; cd "$0" && . .venv/bin/activate && exec embedrl --distributed "$@"' \
  "$repo" "$@"
