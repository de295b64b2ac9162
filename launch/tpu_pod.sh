#!/usr/bin/env bash
# Run one embedrl command on every worker of a Cloud TPU pod slice (one process per host).
#   launch/tpu_pod.sh TPU_NAME ZONE -- train-embedder --config configs/toy_embedder.json --workdir /mnt/shared/run mesh.fsdp=-1
# Multi-slice (e.g. two v5p slices of one queued resource): run it once per slice with the same
# command and add mesh.slices=2 (data parallel over the DCN, FSDP and tensor inside a slice).
# Assumes the repository is checked out at the same path on every worker and installed there
# (`pip install -e .[tpu]`); jax.distributed discovers the pod's hosts itself (--distributed).
# WORKDIR is a POSIX path every worker mounts (Filestore/NFS, or a bucket through gcsfuse):
# process 0 writes configs, data and exports there, and all hosts write their checkpoint shards.
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; shift 2
[ "${1:-}" = "--" ] && shift
repo=$(cd "$(dirname "$0")/.." && pwd)
. "$repo/launch/xla_flags.sh"   # LIBTPU_INIT_ARGS: latency-hiding scheduler, async collectives
cmd="cd $repo && . .venv/bin/activate && export LIBTPU_INIT_ARGS=$(printf '%q' "$LIBTPU_INIT_ARGS")"
cmd+=" && embedrl --distributed $(printf '%q ' "$@")"
exec gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$cmd"
